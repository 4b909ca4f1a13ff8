"""``slcompile::sl_linear_factored`` against float64 dense matrices, opcheck, and ``sl_linear``."""
import subprocess
import sys

import pytest
import torch
from hypothesis import given, strategies as st

from slcompile import ops
from slcompile.ops_factored import TOKEN_BLOCK, sl_linear_factored, sl_linear_factored_backward, sparse_index
from slcompile.support import generate_support

from helpers import dense_reference_weight
from test_ops import _operands

FACTORED = torch.ops.slcompile.sl_linear_factored.default


def _grads(fn, x, A, B, values, bias, grad_y):
    """Output and gradients of ``fn`` w.r.t. every tensor operand (zeros where unused)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B, values, bias)]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, leaves, grad_y, allow_unused=True)
    return [y.detach()] + [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


@given(out_features=st.integers(1, 17), in_features=st.integers(1, 17), rank=st.integers(1, 6),
       density=st.sampled_from([0.0, 0.05, 0.3, 1.0]), scale=st.floats(0.01, 4.0),
       batch=st.sampled_from([(1,), (3,), (2, 5), (0,), (2, 0, 3)]), with_bias=st.booleans(),
       seed=st.integers(0, 1000))
def test_equals_float64_dense_reference(out_features, in_features, rank, density, scale, batch, with_bias, seed):
    nnz = int(density * in_features * out_features)
    x, A, B, values, support, bias = _operands(out_features, in_features, rank, nnz, batch, seed=seed)
    bias = bias if with_bias else torch.zeros(out_features, dtype=torch.float64)
    grad_y = torch.randn(*batch, out_features, dtype=torch.float64)

    def reference(x, A, B, values, bias):
        return x @ dense_reference_weight(A, B, values, support, scale).T + bias

    def factored(x, A, B, values, bias):
        return sl_linear_factored(x, A, B, values, support, scale, bias if with_bias else None)

    got, want = _grads(factored, x, A, B, values, bias, grad_y), _grads(reference, x, A, B, values, bias, grad_y)
    if not with_bias:
        got[5] = want[5] = torch.zeros(0)  # the bias is not an operand of the op then
    for name, a, b in zip(("y", "dx", "dA", "dB", "dvalues", "dbias"), got, want):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("batch", [(3,), (2, 3), (0,), (2, 0, 4)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_forward(batch, with_bias):
    x, A, B, values, support, bias = _operands(5, 7, 2, 9, batch)
    torch.library.opcheck(FACTORED, (x, A, B, values, support, 0.5, bias if with_bias else None))


def test_opcheck_backward_and_gradcheck():
    x, A, B, values, support, bias = _operands(6, 4, 3, 10, (5,))
    grad_y = torch.randn(5, 6, dtype=torch.float64)
    detached = [t.detach() for t in (x, A, B, values)]
    for need_dx in (True, False):
        torch.library.opcheck(torch.ops.slcompile.sl_linear_factored_backward.default,
                              (grad_y, *detached, support, 0.25, need_dx))
    assert torch.autograd.gradcheck(lambda *t: sl_linear_factored(t[0], t[1], t[2], t[3], support, 1.5, t[4]),
                                    (x, A, B, values, bias))


def test_need_dx_false_skips_the_input_gradient():
    x, A, B, values, support, _ = _operands(4, 3, 2, 5, (2,), requires_grad=False)
    grad_x, *_ = sl_linear_factored_backward(torch.ones(2, 4, dtype=torch.float64), x, A, B, values, support, 1.0,
                                             False)
    assert grad_x.numel() == 0


@pytest.mark.parametrize("support", ["generated", "unsorted_with_repeats"])
def test_equals_sl_linear_in_fp32(support):
    out_f, in_f, rank = 48, 40, 8
    # 300 tokens: two blocks of the sparse products (ops_factored.TOKEN_BLOCK = 256)
    x, A, B, values, sup, bias = _operands(out_f, in_f, rank, 192, (3, 100), dtype=torch.float32, seed=3)
    if support != "generated":  # sl_linear accepts any index: repeats add up
        sup = torch.randint(0, out_f * in_f, (192,), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
        sup[:10] = sup[10:20]
    grad_y = torch.randn(3, 100, out_f)
    got = _grads(lambda *t: sl_linear_factored(*t[:4], sup, 0.25, t[4]), x, A, B, values, bias, grad_y)
    want = _grads(lambda *t: ops.sl_linear(*t[:4], sup, 0.25, t[4]), x, A, B, values, bias, grad_y)
    for name, a, b in zip(("y", "dx", "dA", "dB", "dvalues", "dbias"), got, want):  # sums of 300 terms
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6 * b.abs().max().item(), msg=name)


def test_half_dtypes_keep_their_dtype():
    x, A, B, values, support, bias = _operands(12, 10, 3, 30, (4,), dtype=torch.float32)
    ref = sl_linear_factored(x, A, B, values, support, 0.5, bias)
    for dtype in (torch.bfloat16, torch.float16):
        args = [t.detach().to(dtype).requires_grad_() for t in (x, A, B, values, bias)]
        y = sl_linear_factored(*args[:4], support, 0.5, args[4])
        y.sum().backward()
        assert y.dtype == dtype and all(t.grad.dtype == dtype for t in args)
        torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)


def test_sparse_index_is_cached_and_rebuilt_on_change():
    support = generate_support(6, 5, 12, 0)
    first = sparse_index(support, 6, 5)
    assert sparse_index(support, 6, 5) is first
    assert first.order is None and first.crow.dtype == first.col.dtype == torch.int32
    support.copy_(support.flip(0))  # in place: the version counter moves, and it is now unsorted
    rebuilt = sparse_index(support, 6, 5)
    assert rebuilt is not first and rebuilt.order is not None
    values = torch.randn(12)
    dense = torch.zeros(30).index_put((support.long(),), values, accumulate=True).view(6, 5)
    torch.testing.assert_close(rebuilt.csr(values).to_dense(), dense)
    torch.testing.assert_close(rebuilt.csr_t(values).to_dense(), dense.T)


def test_transients_do_not_grow_with_tokens(replayed_peak):
    # The SpMM results are written into the op's outputs (N, out) / (N, in) block by block and the
    # low-rank terms added in place: beyond the outputs, only (N, r) products and per-block
    # buffers of the sparse library, no (out, N) copy or concatenation and no (out, in) W.
    from torch.profiler import ProfilerActivity, profile

    tokens, in_features, out_features, rank = 16 * TOKEN_BLOCK, 256, 512, 16
    x, A, B, values, support, _ = _operands(out_features, in_features, rank, 4000, (tokens,), requires_grad=False)
    grad_y = torch.randn(tokens, out_features, dtype=x.dtype)
    sparse_index(support, out_features, in_features)  # built (and cached) outside the profiles
    per_block = 4 * TOKEN_BLOCK * max(in_features, out_features) * x.element_size()
    low_rank = tokens * rank * x.element_size()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = sl_linear_factored(x, A, B, values, support, 0.5)
    assert y.nbytes <= replayed_peak(prof) <= y.nbytes + low_rank + per_block
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        grads = sl_linear_factored_backward(grad_y, x, A, B, values, support, 0.5, True)
    ends = sum(g.nbytes for g in grads)
    assert ends <= replayed_peak(prof) <= ends + low_rank + per_block  # x A^T freed before dY B


def test_csr_beta_warning_is_silenced_at_the_call_only():
    """No process-wide warning filter from importing slcompile, and no warning from the op's CSR
    tensors (torch warns once per process: hence a fresh interpreter)."""
    script = """
import warnings
import torch, slcompile
from slcompile.ops_factored import sl_linear_factored
from slcompile.support import generate_support
assert not any("Sparse CSR" in getattr(f[1], "pattern", "") for f in warnings.filters), warnings.filters
warnings.simplefilter("error")
sl_linear_factored(torch.randn(3, 8), torch.randn(2, 8), torch.randn(8, 2), torch.randn(6),
                   generate_support(8, 8, 6, 0), 0.5)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]

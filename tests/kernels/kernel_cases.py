"""Triton kernel cases against the float64 torch reference (run by ``test_kernels.py``).

``TRITON_INTERPRET`` is read when Triton is imported (its standard library is ``@triton.jit``
code too) and when a kernel is decorated, and ``torch._dynamo`` / ``torch._inductor`` import
Triton: a pytest session that already compiled something cannot switch to the interpreter.
So ``test_kernels.py`` runs this file in a fresh interpreter, with ``TRITON_INTERPRET=1`` on a
machine without CUDA (CPU tensors, fp32/fp16 only: the interpreter's bf16 arithmetic is wrong)
and compiled on the GPU otherwise (bf16 too). Run it directly for per-case output:
``TRITON_INTERPRET=1 .venv/bin/pytest tests/kernels/kernel_cases.py``.

Odd sizes (1, 7, 33, 130), several block shapes (more than one tile per axis) and outputs
written into a strided window of a larger sentinel-filled buffer catch unmasked accesses.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np

import pytest
import torch
from hypothesis import given, strategies as st

from slcompile import ops
from slcompile.support import generate_support

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") == "0"
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("kernel cases need CUDA or TRITON_INTERPRET=1 (tests/kernels/test_kernels.py sets it)",
                allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed (pip install triton==3.9.0 --no-deps)")

import slcompile.kernels as package  # noqa: E402  (after the TRITON_INTERPRET check)
from slcompile.kernels import grad_weight as grad_weight_kernel  # noqa: E402
from slcompile.kernels import materialize as materialize_kernel  # noqa: E402
from slcompile.kernels import spmm as spmm_kernel  # noqa: E402
from slcompile.kernels.tile_index import tile_index  # noqa: E402
from slcompile.ops_factored import sparse_index  # noqa: E402

SENTINEL = 12345.0
SIZES = st.sampled_from([1, 7, 16, 33, 64, 130])
BLOCKS = st.sampled_from([16, 32, 64])
kernels = SimpleNamespace(materialize=materialize_kernel, grad_weight=grad_weight_kernel, spmm=spmm_kernel,
                          device="cuda" if ON_GPU else "cpu",
                          dtypes=[torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else []))


def tolerance(dtype, magnitude):
    eps = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    return 4 * eps * magnitude + 1e-6


def factors(out_f, in_f, rank, density, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(rank, in_f, generator=gen).to(device, dtype)
    B = torch.randn(out_f, rank, generator=gen).to(device, dtype)
    nnz = int(density * in_f * out_f)
    support = generate_support(out_f, in_f, nnz, seed, device=device)
    values = torch.randn(nnz, generator=gen).to(device, dtype)
    return A, B, values, support


def check_weight(weight, A, B, values, support, scale):
    ref = ops.materialize(A.cpu().double(), B.cpu().double(), values.cpu().double(), support.cpu(), scale)
    magnitude = abs(scale) * (B.cpu().double().abs() @ A.cpu().double().abs()) + ref.abs()
    err = (weight.cpu().double() - ref).abs()
    assert bool((err <= tolerance(weight.dtype, magnitude)).all()), f"max error {err.max().item():.3g}"


def guarded(rows, cols, dtype, device, transpose=False):
    """A ``(rows, cols)`` window, strided inside a sentinel-filled buffer, and the buffer."""
    if transpose:  # column-major window
        buf = torch.full((cols + 5, rows + 3), SENTINEL, dtype=dtype, device=device)
        return buf[2:2 + cols, 1:1 + rows].t(), buf
    buf = torch.full((rows + 3, cols + 5), SENTINEL, dtype=dtype, device=device)
    return buf[1:1 + rows, 2:2 + cols], buf


def assert_guard_intact(buf, window):
    """Everything in ``buf`` outside ``window`` still holds the sentinel."""
    outside = buf.clone()
    outside.as_strided(window.shape, window.stride(), window.storage_offset()).fill_(SENTINEL)
    assert bool((outside == SENTINEL).all()), "kernel wrote outside its output"


@given(out_f=SIZES, in_f=SIZES, rank=st.sampled_from([1, 7, 16, 33]), density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
       blocks=st.tuples(BLOCKS, BLOCKS, st.sampled_from([16, 32])), half=st.booleans(), seed=st.integers(0, 3))
def test_materialize_matches_reference(out_f, in_f, rank, density, blocks, half, seed):
    dtype = torch.float16 if half else torch.float32
    A, B, values, support = factors(out_f, in_f, rank, density, dtype, kernels.device, seed)
    out, buf = guarded(out_f, in_f, dtype, kernels.device, transpose=seed % 2 == 1)
    block_m, block_n, block_k = blocks
    weight = kernels.materialize.materialize(A, B, values, support, 0.25, out=out, block_m=block_m,
                                             block_n=block_n, block_k=block_k)
    assert weight.data_ptr() == out.data_ptr()
    check_weight(weight, A, B, values, support, 0.25)
    assert_guard_intact(buf, out)


def test_grouped_order_covers_every_tile():
    """9 row tiles of 16: a full launch group of GROUP_M = 8 and a group of one; every tile is
    written (a missed one would keep the sentinel) and matches the reference."""
    assert materialize_kernel.GROUP_M == grad_weight_kernel.GROUP_M == 8
    A, B, values, support = factors(130, 70, 7, 0.1, torch.float32, kernels.device)
    out, buf = guarded(130, 70, torch.float32, kernels.device)
    weight = kernels.materialize.materialize(A, B, values, support, 0.5, out=out, block_m=16, block_n=16)
    check_weight(weight, A, B, values, support, 0.5)
    assert_guard_intact(buf, out)
    g, x = torch.randn(5, 130, device=kernels.device), torch.randn(5, 70, device=kernels.device)
    grad_w, grad_values = kernels.grad_weight.grad_weight(g, x, support, block_m=16, block_n=16, block_k=16)
    ref = g.cpu().double().t() @ x.cpu().double()
    magnitude = g.cpu().double().abs().t() @ x.cpu().double().abs()
    check_close(grad_w, ref, magnitude, torch.float32, "dW")
    check_close(grad_values, ref.view(-1)[support.cpu().long()], magnitude.view(-1)[support.cpu().long()],
                torch.float32, "dvalues")


def test_materialize_all_dtypes_strided_inputs():
    for dtype in kernels.dtypes:
        A, B, values, support = factors(33, 130, 7, 0.1, dtype, kernels.device)
        A_t = A.t().contiguous().t()  # column-major A and B: the kernel reads through strides
        B_t = B.t().contiguous().t()
        weight = kernels.materialize.materialize(A_t, B_t, values, support, 4.0)
        assert weight.shape == (33, 130) and weight.dtype == dtype
        check_weight(weight, A, B, values, support, 4.0)


def test_materialize_unsorted_duplicate_int64_support():
    """An index written by a user (pattern pass): any order, int64, repeated positions summed."""
    A, B, values, support = factors(7, 33, 7, 0.3, torch.float32, kernels.device)
    perm = torch.randperm(support.numel(), generator=torch.Generator().manual_seed(1)).to(kernels.device)
    index = torch.cat([support[perm], support[:5]]).long()
    vals = torch.cat([values[perm], values[:5] * 3])
    weight = kernels.materialize.materialize(A, B, vals, index, 0.5)
    check_weight(weight, A, B, vals, index, 0.5)


def test_tile_index_cached_and_invalidated():
    _, _, _, support = factors(33, 130, 1, 0.1, torch.float32, kernels.device)
    first = tile_index(support, 33, 130, 32)
    assert tile_index(support, 33, 130, 32) is first
    assert tile_index(support, 33, 130, 64) is not first  # one entry per block size, both kept
    assert tile_index(support, 33, 130, 32) is first
    assert first.perm is None and first.support.data_ptr() == support.data_ptr()  # no copy when sorted
    ptr = first.tile_ptr.cpu().long()
    assert ptr.shape == (33, 6) and int(ptr[-1, -1]) == support.numel()
    flat = support.cpu().long()
    for m, c in [(0, 0), (5, 2), (32, 4)]:
        chunk = flat[ptr[m, c]:ptr[m, c + 1]]
        assert bool(((chunk // 130 == m) & (chunk % 130 // 32 == c)).all())
    support.add_(0)  # bumps the version counter: the index is rebuilt
    assert tile_index(support, 33, 130, 32) is not first


def test_materialize_rejects_bad_arguments():
    A, B, values, support = factors(7, 33, 4, 0.3, torch.float32, kernels.device)
    with pytest.raises(ValueError, match="A \\(r, in\\)"):
        kernels.materialize.materialize(A, B.t(), values, support, 1.0)
    with pytest.raises(TypeError, match="one dtype"):
        kernels.materialize.materialize(A, B, values.double(), support, 1.0)
    with pytest.raises(ValueError, match="out must be"):
        kernels.materialize.materialize(A, B, values, support, 1.0, out=torch.empty(33, 7, device=kernels.device))


def test_cuda_registration_dispatches_to_the_kernel():
    """The function registered for CUDA runs the Triton kernel, and the torch reference for float64."""
    assert package.cuda_kernels_registered()
    A, B, values, support = factors(7, 33, 4, 0.3, torch.float32, kernels.device)
    check_weight(package._materialize_cuda(A, B, values, support, 2.0), A, B, values, support, 2.0)
    A, B, values = A.double(), B.double(), values.double()
    torch.testing.assert_close(package._materialize_cuda(A, B, values, support, 2.0),
                               ops.materialize(A, B, values, support, 2.0))


def test_inference_tensor_support_is_not_cached():
    A, B, values, support = factors(7, 33, 4, 0.3, torch.float32, kernels.device)
    with torch.inference_mode():
        frozen = support.clone()
        weight = kernels.materialize.materialize(A, B, values, frozen, 2.0)
    check_weight(weight, A, B, values, support, 2.0)
    assert tile_index(frozen, 7, 33, 64) is not tile_index(frozen, 7, 33, 64)  # rebuilt: never cached


def check_close(got, want, magnitude, dtype, name):
    """``got`` within the dtype's tolerance of the float64 ``want``, relative to ``magnitude``."""
    err = (got.cpu().double() - want).abs()
    assert bool((err <= tolerance(dtype, magnitude)).all()), f"{name}: max error {err.max().item():.3g}"


@given(tokens=st.sampled_from([0, 1, 7, 33, 70]), out_f=SIZES, in_f=SIZES, density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
       blocks=st.tuples(BLOCKS, BLOCKS, st.sampled_from([16, 32])), half=st.booleans(), write_dw=st.booleans(),
       seed=st.integers(0, 3))
def test_grad_weight_matches_reference(tokens, out_f, in_f, density, blocks, half, write_dw, seed):
    dtype = torch.float16 if half else torch.float32
    gen = torch.Generator().manual_seed(seed)
    grad_y = torch.randn(tokens, out_f, generator=gen).to(kernels.device, dtype)
    x = torch.randn(tokens, in_f, generator=gen).to(kernels.device, dtype)
    if seed % 2:  # transposed operands: the kernel reads through strides
        grad_y, x = grad_y.t().contiguous().t(), x.t().contiguous().t()
    support = generate_support(out_f, in_f, int(density * in_f * out_f), seed, device=kernels.device)
    block_m, block_n, block_k = blocks
    grad_w, grad_values = kernels.grad_weight.grad_weight(grad_y, x, support, write_dw=write_dw, block_m=block_m,
                                                          block_n=block_n, block_k=block_k, num_warps=4)
    ref = grad_y.cpu().double().t() @ x.cpu().double()
    magnitude = grad_y.cpu().double().abs().t() @ x.cpu().double().abs()
    flat = support.cpu().long()
    check_close(grad_values, ref.view(-1)[flat], magnitude.view(-1)[flat], dtype, "dvalues")
    assert grad_values.dtype == dtype and grad_values.shape == support.shape
    if write_dw:
        check_close(grad_w, ref, magnitude, dtype, "dW")
    else:
        assert grad_w is None


def test_grad_weight_unsorted_duplicate_int64_support_and_values_dtype():
    gen = torch.Generator().manual_seed(5)
    grad_y = torch.randn(9, 7, generator=gen).to(kernels.device, torch.float16)
    x = torch.randn(9, 33, generator=gen).to(kernels.device, torch.float16)
    _, _, _, support = factors(7, 33, 1, 0.3, torch.float32, kernels.device)
    perm = torch.randperm(support.numel(), generator=gen).to(kernels.device)
    index = torch.cat([support[perm], support[:5]]).long()
    ref = (grad_y.cpu().double().t() @ x.cpu().double()).view(-1)[index.cpu()]
    for write_dw in (False, True):  # fp32 dvalues from the accumulator even when the fp16 dW is stored
        _, grad_values = kernels.grad_weight.grad_weight(grad_y, x, index, write_dw=write_dw,
                                                         values_dtype=torch.float32, block_m=16, block_n=16,
                                                         block_k=16, num_warps=4)
        assert grad_values.dtype == torch.float32
        torch.testing.assert_close(grad_values.cpu().double(), ref, rtol=0, atol=1e-4)  # fp32 acc, rounded once


def test_grad_weight_writes_into_given_outputs():
    """``out=``: dW and dvalues written into views of one packed buffer (as the Inductor lowering
    passes them), unsorted support included; the sentinel around them untouched."""
    gen = torch.Generator().manual_seed(6)
    grad_y = torch.randn(11, 7, generator=gen).to(kernels.device)
    x = torch.randn(11, 33, generator=gen).to(kernels.device)
    _, _, _, support = factors(7, 33, 1, 0.3, torch.float32, kernels.device)
    for index in (support, support[torch.randperm(support.numel(), generator=gen).to(kernels.device)]):
        packed = torch.full((7 * 33 + index.numel() + 3,), float("nan"), device=kernels.device)
        dw, dvalues = packed[:7 * 33].view(7, 33), packed[7 * 33:-3]
        got = kernels.grad_weight.grad_weight(grad_y, x, index, out=(dw, dvalues), block_m=16, block_n=16,
                                              block_k=16, num_warps=4)
        assert got[0] is dw and got[1] is dvalues and bool(packed[-3:].isnan().all())
        ref = grad_y.cpu().double().t() @ x.cpu().double()
        torch.testing.assert_close(dw.cpu().double(), ref, rtol=0, atol=1e-4)
        torch.testing.assert_close(dvalues.cpu().double(), ref.view(-1)[index.cpu().long()], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="out must be dW \\(7, 33\\)"):
        kernels.grad_weight.grad_weight(grad_y, x, support, out=(dw.t(), dvalues))
    with pytest.raises(ValueError, match="write_dw=True"):
        kernels.grad_weight.grad_weight(grad_y, x, support, write_dw=False, out=(dw, dvalues))


def test_grad_weight_rejects_bad_arguments():
    g, x = torch.randn(4, 7, device=kernels.device), torch.randn(5, 9, device=kernels.device)
    support = torch.zeros(3, dtype=torch.int32, device=kernels.device)
    with pytest.raises(ValueError, match="grad_y \\(N, out\\) and x \\(N, in\\)"):
        kernels.grad_weight.grad_weight(g, x, support)
    with pytest.raises(TypeError, match="one dtype"):
        kernels.grad_weight.grad_weight(g, x[:4].double(), support)
    with pytest.raises(TypeError, match="support must be a 1-D int32 or int64"):
        kernels.grad_weight.grad_weight(g, x[:4], support.float())


@given(tokens=st.sampled_from([0, 1, 7, 33, 70]), rows=SIZES, cols=SIZES, density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
       blocks=st.tuples(BLOCKS, BLOCKS), half=st.booleans(), transposed=st.booleans(), seed=st.integers(0, 3))
def test_spmm_matches_reference(tokens, rows, cols, density, blocks, half, transposed, seed):
    dtype = torch.float16 if half else torch.float32
    gen = torch.Generator().manual_seed(seed)
    support = generate_support(rows, cols, int(density * rows * cols), seed, device=kernels.device)
    values = torch.randn(support.numel(), generator=gen).to(kernels.device, dtype)
    dense = torch.randn(tokens, cols, generator=gen).to(kernels.device, dtype)
    if transposed:
        dense = dense.t().contiguous().t()
    index = sparse_index(support, rows, cols)
    out, buf = guarded(tokens, rows, dtype, kernels.device, transpose=seed % 2 == 1)
    got = kernels.spmm.spmm(index.crow, index.col, index.csr_values(values), dense, out=out, block_r=blocks[0],
                            block_t=blocks[1])
    assert got.data_ptr() == out.data_ptr()
    s_dense = torch.zeros(rows * cols, dtype=torch.float64).index_put_((support.cpu().long(),),
                                                                       values.cpu().double()).view(rows, cols)
    check_close(got, dense.cpu().double() @ s_dense.t(), dense.cpu().double().abs() @ s_dense.abs().t(), dtype, "spmm")
    assert_guard_intact(buf, out)


def test_spmm_token_major_copy_has_aligned_columns():
    """The copy spmm gathers from: token axis contiguous, columns 16-element aligned (vector loads)."""
    dense = torch.randn(2047, 5, device=kernels.device)
    copy = kernels.spmm.token_major(dense)
    assert copy.stride() == (1, 2048) and torch.equal(copy, dense)


def test_spmm_rejects_bad_arguments():
    crow = torch.tensor([0, 1, 2], dtype=torch.int32, device=kernels.device)
    col = torch.tensor([0, 1], dtype=torch.int32, device=kernels.device)
    values = torch.ones(2, device=kernels.device)
    dense = torch.randn(3, 2, device=kernels.device)
    with pytest.raises(ValueError, match="values and col"):
        kernels.spmm.spmm(crow, col, values[:1], dense)
    with pytest.raises(TypeError, match="2-D dense operand"):
        kernels.spmm.spmm(crow, col, values, dense.double())
    with pytest.raises(ValueError, match="out must be"):
        kernels.spmm.spmm(crow, col, values, dense, out=torch.empty(2, 3, device=kernels.device))


def _op_operands(out_f, in_f, rank, density, batch, dtype, seed=0, shuffle=False):
    A, B, values, support = factors(out_f, in_f, rank, density, dtype, kernels.device, seed)
    if shuffle:  # an index written by a user: any order, int64, repeated positions
        perm = torch.randperm(support.numel(), generator=torch.Generator().manual_seed(seed)).to(kernels.device)
        support = torch.cat([support[perm], support[:3]]).long()
        values = torch.cat([values[perm], values[:3]])
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*batch, in_f, generator=gen).to(kernels.device, dtype)
    grad_y = torch.randn(*batch, out_f, generator=gen).to(kernels.device, dtype)
    return x, A, B, values, support, grad_y


def _dense_reference(x, A, B, values, support, scale, grad_y):
    """float64 ``y``, ``dx``, ``dA``, ``dB``, ``dvalues`` and their error magnitudes, by plain autograd."""
    from helpers import dense_reference_weight

    leaves = [t.cpu().double().requires_grad_() for t in (x, A, B, values)]
    y = leaves[0] @ dense_reference_weight(*leaves[1:], support.cpu(), scale).T
    grads = torch.autograd.grad(y, leaves, grad_y.cpu().double())
    x64, A64, B64, v64 = (t.detach().abs() for t in leaves)
    g64 = grad_y.cpu().double().abs()
    w_abs = dense_reference_weight(A64, B64, v64, support.cpu(), abs(scale))
    x2d, g2d = x64.reshape(-1, x64.shape[-1]), g64.reshape(-1, g64.shape[-1])
    dw_abs = g2d.t() @ x2d
    magnitudes = [x64 @ w_abs.T, g64 @ w_abs, abs(scale) * B64.t() @ dw_abs, abs(scale) * dw_abs @ A64.t(),
                  dw_abs.view(-1)[support.cpu().long()]]
    return [y.detach(), *grads], magnitudes


@pytest.mark.parametrize("path", ["materialize", "factored"])
@pytest.mark.parametrize("batch,shuffle", [((5,), False), ((2, 37), True), ((0,), False)])
def test_registered_cuda_ops_match_float64_dense(path, batch, shuffle):
    """The CUDA implementations (Triton) of both paths, forward and backward, against float64 autograd."""
    impls = package.CUDA_IMPLEMENTATIONS
    for dtype in kernels.dtypes:
        x, A, B, values, support, grad_y = _op_operands(33, 70, 7, 0.1, batch, dtype, shuffle=shuffle)
        if path == "materialize":
            y = torch.nn.functional.linear(x, impls["slcompile::materialize"](A, B, values, support, 0.5))
            grads = impls["slcompile::sl_linear_backward"](grad_y, x, A, B, values, support, 0.5, True)
        else:
            y = impls["slcompile::sl_linear_factored"](x, A, B, values, support, 0.5)
            grads = impls["slcompile::sl_linear_factored_backward"](grad_y, x, A, B, values, support, 0.5, True)
        wants, magnitudes = _dense_reference(x, A, B, values, support, 0.5, grad_y)
        for name, got, want, magnitude in zip(("y", "dx", "dA", "dB", "dvalues"), (y, *grads), wants, magnitudes):
            assert got.dtype == dtype and got.shape == want.shape, name
            check_close(got, want, magnitude, dtype, f"{path} {name} {dtype}")


def test_registered_cuda_ops_fall_back_to_torch_for_float64():
    impls = package.CUDA_IMPLEMENTATIONS
    x, A, B, values, support, grad_y = _op_operands(7, 9, 3, 0.3, (4,), torch.float64)
    for forward, backward in (("slcompile::sl_linear_factored", "slcompile::sl_linear_factored_backward"),):
        torch.testing.assert_close(impls[forward](x, A, B, values, support, 0.5),
                                   torch.ops.slcompile.sl_linear_factored(x, A, B, values, support, 0.5))
        for got, want in zip(impls[backward](grad_y, x, A, B, values, support, 0.5, True),
                             torch.ops.slcompile.sl_linear_factored_backward(grad_y, x, A, B, values, support, 0.5, True)):
            torch.testing.assert_close(got, want)
    for got, want in zip(impls["slcompile::sl_linear_backward"](grad_y, x, A, B, values, support, 0.5, False),
                         ops.sl_linear_backward(grad_y, x, A, B, values, support, 0.5, False)):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- hazards: 64-bit offsets, host syncs, blocks

class AddressProbe:
    """The interpreter's masked loads, stores and atomics outside ``real`` buffers are recorded, not
    done (loads read zeros): a kernel can be run with strides of a tensor too large to allocate."""

    def __init__(self, monkeypatch, *real: torch.Tensor):
        from triton.runtime import interpreter

        self.spans = [(t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes()) for t in real]
        self.virtual: list[int] = []
        builder = interpreter.InterpreterBuilder
        load, store, atomic = builder.create_masked_load, builder.create_masked_store, builder.create_atomic_rmw

        def masked_load(b, ptrs, mask, other, *args):
            return load(b, ptrs, self._split(ptrs, mask), other, *args)

        def masked_store(b, ptrs, value, mask, *args):
            return store(b, ptrs, value, self._split(ptrs, mask), *args)

        def atomic_rmw(b, op, ptrs, value, mask, *args):
            return atomic(b, op, ptrs, value, self._split(ptrs, mask), *args)

        monkeypatch.setattr(builder, "create_masked_load", masked_load)
        monkeypatch.setattr(builder, "create_masked_store", masked_store)
        monkeypatch.setattr(builder, "create_atomic_rmw", atomic_rmw)

    def _split(self, ptrs, mask):
        """Record the masked-in addresses outside every real buffer; the mask of the others."""
        addr = ptrs.data.astype(np.uint64)
        inside = np.zeros(addr.shape, dtype=bool)
        for lo, hi in self.spans:
            inside |= (addr >= lo) & (addr < hi)
        keep = np.broadcast_to(mask.data, addr.shape)
        self.virtual += [int(a) for a in addr[keep & ~inside]]
        return type(mask)(keep & inside, mask.dtype)


HUGE = 2**30  # an int32 stride; index 2 * HUGE passes 2**31


def reached(probe: AddressProbe, far: torch.Tensor, rows: int, cols: int) -> bool:
    """Every element ``(i, j)`` of ``far`` viewed as ``(rows, cols)`` with strides ``(HUGE, 1)`` was
    accessed at its own address (an int32 offset wraps below ``far`` from row 2 on)."""
    want = {far.data_ptr() + far.element_size() * (i * HUGE + j) for i in range(rows) for j in range(cols)}
    return want <= set(probe.virtual)


@pytest.mark.skipif(ON_GPU, reason="probes the interpreter's memory accesses")
def test_row_offsets_are_64_bit(monkeypatch):
    """Token / row index x stride past 2**31 elements reaches the right address (no int32 wrap)."""
    far = torch.zeros(1)  # the operand given a huge stride: every access to it is virtual
    support = torch.tensor([0, 17], dtype=torch.int32)
    index = tile_index(support, 4, 16, 16)
    x, dvalues = torch.randn(4, 16), torch.empty(2)
    probe = AddressProbe(monkeypatch, x, dvalues, index.support, index.tile_ptr)
    # grad_weight: dY (4 tokens, 16 out) with token stride HUGE (the reduction axis of tile_matmul)
    grad_weight_kernel._grad_weight_kernel[(1,)](
        far, x, index.support, index.tile_ptr, dvalues, dvalues, 4, 16, 16, index.n_col_tiles,
        HUGE, 1, x.stride(0), x.stride(1), 0, 0,
        BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, WRITE_DW=False, FROM_DW=False, INPUT_PRECISION="ieee", GROUP_M=8,
        CHUNK=8)
    assert reached(probe, far, 4, 16)
    # materialize: W (4 rows, 16) with row stride HUGE (the store and the sparse atomics)
    A, B, values = torch.randn(16, 16), torch.randn(4, 16), torch.randn(2)
    probe = AddressProbe(monkeypatch, A, B, values, index.support, index.tile_ptr)
    materialize_kernel._materialize_kernel[(1,)](
        A, B, values, index.support, index.tile_ptr, far, 4, 16, 16, index.n_col_tiles, 1.0,
        A.stride(0), A.stride(1), B.stride(0), B.stride(1), HUGE, 1,
        BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, INPUT_PRECISION="ieee", GROUP_M=8, CHUNK=8)
    assert reached(probe, far, 4, 16)
    assert probe.virtual.count(far.data_ptr() + far.element_size() * (HUGE + 1)) == 2  # (1, 1): stored, then added
    # spmm: out (4 tokens, 2 rows) with token stride HUGE
    crow, col, dense = torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32), x[:, :2]
    probe = AddressProbe(monkeypatch, crow, col, values, x)
    spmm_kernel._spmm_kernel[(1, 1)](crow, col, values, dense, far, 2, 4, dense.stride(1), dense.stride(0), HUGE, 1,
                                     BLOCK_R=16, BLOCK_T=16)
    assert reached(probe, far, 4, 2)


class SyncCounter:
    """Counts the ways a host function reads a device value back (each a sync on CUDA)."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name)))

    def _counting(self, method):
        def counted(tensor, *args):
            self.count += 1
            return method(tensor, *args)
        return counted


def test_steady_state_calls_do_not_sync(monkeypatch):
    """A cache miss checks once whether the support is sorted; a hit, and a miss during CUDA-graph
    capture, read nothing back."""
    A, B, values, support = factors(33, 70, 7, 0.1, torch.float32, kernels.device)
    g, x = torch.randn(9, 33, device=kernels.device), torch.randn(9, 70, device=kernels.device)
    syncs = SyncCounter(monkeypatch)
    kernels.materialize.materialize(A, B, values, support, 0.5)
    assert syncs.count == 1
    for call in range(2):
        syncs.count = 0
        weight = kernels.materialize.materialize(A, B, values, support, 0.5)
        kernels.grad_weight.grad_weight(g, x, support, block_n=64)  # materialize's block_n: the same index
        assert syncs.count == 0, f"call {call}"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    shuffled = support.flip(0)  # unsorted: sorted on the device, unchecked
    weight = kernels.materialize.materialize(A, B, values.flip(0), shuffled, 0.5)
    assert syncs.count == 0
    check_weight(weight, A, B, values.flip(0), shuffled, 0.5)


def test_host_functions_validate_blocks():
    A, B, values, support = factors(7, 33, 4, 0.3, torch.float32, kernels.device)
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        kernels.materialize.materialize(A, B, values, support, 1.0, block_k=24)
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        kernels.grad_weight.grad_weight(torch.randn(3, 7), torch.randn(3, 33), support, block_m=8)
    with pytest.raises(ValueError, match="block_t must be a power of two"):
        kernels.spmm.spmm(torch.tensor([0, 1]), torch.tensor([0]), torch.ones(1), torch.randn(2, 1), block_t=1024)

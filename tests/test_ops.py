"""The custom ops against torch.library.opcheck and float64 autograd."""
import pytest
import torch
from hypothesis import given, strategies as st

from slcompile import ops
from slcompile.support import generate_support

from helpers import dense_reference_weight


def _operands(out_features, in_features, rank, nnz, batch, dtype=torch.float64, requires_grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(requires_grad)

    support = generate_support(out_features, in_features, nnz, seed)
    return (rand(*batch, in_features), rand(rank, in_features), rand(out_features, rank), rand(nnz), support,
            rand(out_features))


@pytest.mark.parametrize("batch", [(3,), (2, 3), (0,), (2, 0, 4)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_sl_linear(batch, with_bias):
    x, A, B, values, support, bias = _operands(5, 7, 2, 9, batch)
    torch.library.opcheck(torch.ops.slcompile.sl_linear.default,
                          (x, A, B, values, support, 0.5, bias if with_bias else None))


def test_opcheck_materialize_and_backward():
    x, A, B, values, support, _ = _operands(6, 4, 3, 10, (5,))
    torch.library.opcheck(torch.ops.slcompile.materialize.default, (A, B, values, support, 0.25))
    grad_y = torch.randn(5, 6, dtype=torch.float64)
    detached = [t.detach() for t in (x, A, B, values)]
    for need_dx in (True, False):
        torch.library.opcheck(torch.ops.slcompile.sl_linear_backward.default,
                              (grad_y, *detached, support, 0.25, need_dx))


def test_gradcheck():
    x, A, B, values, support, bias = _operands(4, 3, 2, 5, (2, 3))
    assert torch.autograd.gradcheck(lambda *t: ops.sl_linear(t[0], t[1], t[2], t[3], support, 1.5, t[4]),
                                    (x, A, B, values, bias))
    assert torch.autograd.gradcheck(lambda a, b, v: ops.materialize(a, b, v, support, 1.5), (A, B, values))


@given(out_features=st.integers(1, 17), in_features=st.integers(1, 17), rank=st.integers(1, 6),
       density=st.floats(0.01, 0.99), scale=st.floats(0.01, 4.0), seed=st.integers(0, 1000))
def test_materialize_equals_dense_reference(out_features, in_features, rank, density, scale, seed):
    nnz = int(density * in_features * out_features)
    _, A, B, values, support, _ = _operands(out_features, in_features, rank, nnz, (1,), seed=seed)
    expected = dense_reference_weight(A, B, values, support, scale)
    torch.testing.assert_close(ops.materialize(A, B, values, support, scale), expected)


def test_need_dx_false_skips_the_input_gradient():
    x, A, B, values, support, _ = _operands(4, 3, 2, 5, (2,), requires_grad=False)
    grad_x, *_ = ops.sl_linear_backward(torch.ones(2, 4, dtype=torch.float64), x, A, B, values, support, 1.0,
                                        False)
    assert grad_x.numel() == 0


@pytest.mark.compile
def test_materialize_compiles_under_max_autotune_forward_and_backward():
    """Inductor's tuned addmm lowers the backward's ``scale * a @ b`` (a 0-dim dummy input crashed it)."""
    _, A, B, values, support, _ = _operands(8, 16, 4, 10, (1,), dtype=torch.float32)
    scale = 0.5

    def loss(A, B, values):
        return (ops.materialize(A, B, values, support, scale) ** 2).sum()

    expected = torch.autograd.grad(loss(A, B, values), (A, B, values))
    compiled = torch.compile(loss, options={"max_autotune": True})
    got = torch.autograd.grad(compiled(A, B, values), (A, B, values))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)

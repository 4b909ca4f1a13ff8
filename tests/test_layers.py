"""SLLinear against a dense float64 reference: values, gradients, dtypes, batch shapes, memory."""
import math

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

from slcompile import SLLinear
from slcompile.support import generate_support

from helpers import dense_reference_weight

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def assert_close_to_reference(actual, expected, dtype, reduction, what=""):
    """Rounding error of a length-``reduction`` dot product, relative to the result's magnitude."""
    tol = TOLERANCE[dtype] * (1 + reduction ** 0.5)
    scale = 1 + float(expected.detach().abs().max()) if expected.numel() else 1
    torch.testing.assert_close(actual.double(), expected, atol=tol * scale, rtol=tol,
                               msg=lambda m: f"{what}: {m}")


def _randomized(layer: SLLinear, seed: int) -> SLLinear:
    """B is zero at init; give every parameter random values so all gradients are exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64) * 0.5)
    return layer


@given(out_features=st.integers(1, 23), in_features=st.integers(1, 23), rank_frac=st.floats(0, 1),
       density=st.floats(0.001, 0.999), alpha=st.floats(0.1, 64.0), bias=st.booleans(),
       batch=st.lists(st.integers(0, 4), min_size=0, max_size=3),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 2**31), path=st.sampled_from(["auto", "materialize", "factored"]))
def test_forward_and_gradients_match_float64_dense(out_features, in_features, rank_frac, density, alpha, bias,
                                                   batch, dtype, seed, path):
    rank = max(1, round(rank_frac * min(in_features, out_features)))
    layer = _randomized(SLLinear(in_features, out_features, bias=bias, rank=rank, alpha=alpha, density=density,
                                 seed=seed, path=path, dtype=dtype), seed)
    x = torch.randn(*batch, in_features, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    x.requires_grad_(True)
    y = layer(x)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 2)).to(dtype)
    y.backward(grad_y)

    ref_params = {n: p.detach().double().requires_grad_(True) for n, p in layer.named_parameters()}
    ref_x = x.detach().double().requires_grad_(True)
    weight = dense_reference_weight(ref_params["A"], ref_params["B"], ref_params["values"], layer.support,
                                    layer.scale)
    ref_y = ref_x @ weight.T + (ref_params["bias"] if bias else 0)
    ref_y.backward(grad_y.double())

    reduction = max(in_features, out_features, math.prod(batch), rank)
    assert y.dtype == dtype and y.shape == (*batch, out_features)
    assert_close_to_reference(y, ref_y, dtype, reduction, "output")
    assert_close_to_reference(x.grad, ref_x.grad, dtype, reduction, "grad of x")
    for name, param in layer.named_parameters():
        assert param.grad.dtype == dtype
        # dA/dB chain two products (dW, then times B or A): twice the reduction's error.
        assert_close_to_reference(param.grad, ref_params[name].grad, dtype, 4 * reduction, f"grad of {name}")


def test_paper_init_and_shapes():
    torch.manual_seed(0)
    layer = SLLinear(300, 200, rank=16, alpha=32.0, density=0.05, seed=3)
    assert layer.A.shape == (16, 300) and layer.B.shape == (200, 16) and layer.values.shape == (3000,)
    assert layer.nnz == int(0.05 * 300 * 200) and layer.scale == 2.0
    assert torch.count_nonzero(layer.B) == 0
    bound = 1 / math.sqrt(300)
    for t in (layer.A, layer.values, layer.bias):
        assert t.abs().max() <= bound and t.abs().max() > 0.9 * bound
    assert not layer.support.requires_grad and layer.support.dtype == torch.int32
    assert "support" in dict(layer.named_buffers()) and "support" not in dict(layer.named_parameters())
    # At init the layer is S alone.
    expected = torch.zeros(200 * 300).index_put((layer.support.long(),), layer.values.detach()).view(200, 300)
    torch.testing.assert_close(layer.dense_weight(), expected)
    assert "rank=16" in repr(layer) and "nnz=3000" in repr(layer)


def test_from_linear_keeps_device_dtype_and_bias():
    linear = nn.Linear(12, 9, dtype=torch.float64)
    layer = SLLinear.from_linear(linear, rank=3, alpha=6.0, density=0.2, seed=4)
    assert layer.A.dtype == torch.float64 and torch.equal(layer.bias, linear.bias)
    assert torch.equal(layer.support, generate_support(9, 12, layer.nnz, 4))
    assert SLLinear.from_linear(nn.Linear(12, 9, bias=False), rank=3).bias is None


def _saved_bytes(module, x):
    """Bytes of tensors autograd saves for backward that are not parameters or buffers."""
    resident = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in resident:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum()
    return sum(saved.values())


@pytest.mark.parametrize("path", ["materialize", "factored"])
def test_saved_tensors_equal_nn_linear(path):
    x = torch.randn(64, 96, requires_grad=True)
    dense = nn.Linear(96, 80)
    sl = SLLinear(96, 80, rank=8, density=0.05, path=path)
    assert _saved_bytes(sl, x) == _saved_bytes(dense, x) == x.numel() * 4


def test_auto_path_follows_the_cost_model_per_call():
    """``path="auto"``: per call, the cost model's pick on this machine's CPU spec for the call's
    token count and mode (few tokens factored, very many materialize); both give the same result."""
    from slcompile import cost_model, eager
    from slcompile.path_policy import choose_path_for_call, runtime_device

    runs = {"factored": eager.EagerFactored.apply, "materialize": eager.EagerMaterialized.apply}  # eager CPU
    layer = _randomized(SLLinear(512, 512, rank=128, density=0.03), 0).float()
    wide = SLLinear(512, 512, rank=384, density=0.03)  # r (4 in / 3 + out) > in out: factored loses at large N
    spec = runtime_device("cpu")
    for module, tokens, want in ((layer, 1, "factored"), (wide, 2**22, "materialize")):
        for grad in (True, False):
            mode = "train" if grad else "forward"
            args = (tokens, 512, 512, module.rank, module.nnz)
            assert cost_model.choose_path(*args, spec, mode, 4, spec.margin) == want
            assert choose_path_for_call(*args, "cpu", mode, 4) == want
            with torch.set_grad_enabled(grad):
                x = torch.empty(1, 512).expand(tokens, 512)  # no (N, in) allocation
                assert module.path_for(x) == want and module._op(x) == runs[want]
    layer.double()
    x = torch.randn(3, 7, 512, dtype=torch.float64)
    fixed = {p: SLLinear(512, 512, rank=128, density=0.03, path=p, dtype=torch.float64)
             for p in ("materialize", "factored")}
    for other in fixed.values():
        other.load_state_dict(layer.state_dict())
    assert layer._op(x) == runs["factored"]  # 21 tokens
    torch.testing.assert_close(layer(x), fixed["materialize"](x))
    torch.testing.assert_close(fixed["factored"](x), fixed["materialize"](x))
    assert "path='auto'" in repr(layer)
    with pytest.raises(ValueError, match="SLConfig.path"):
        SLLinear(8, 8, rank=2, path="sparse")


def test_custom_ops_run_where_the_eager_fast_path_does_not_apply():
    """Traced, compiled, faked or subclassed calls run the custom ops (opaque nodes, CUDA kernels);
    eager CPU calls run the same bodies as autograd Functions; both agree."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from slcompile import eager, ops, ops_factored

    for path, op, fast in (("materialize", ops.sl_linear, eager.EagerMaterialized.apply),
                           ("factored", ops_factored.sl_linear_factored, eager.EagerFactored.apply)):
        layer = _randomized(SLLinear(12, 10, rank=3, density=0.2, path=path, dtype=torch.float64), 1)
        x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
        assert layer._op(x, layer.A, layer.B, layer.values) == fast
        assert layer._op(None) is op
        with FakeTensorMode() as mode:
            assert layer._op(mode.from_tensor(x)) is op
        graph = make_fx(layer)(x.detach()).graph  # a dispatch mode is active while tracing
        assert any(node.target is op._opoverload for node in graph.nodes)
        y = layer(x)
        grads = torch.autograd.grad(y.square().sum(), (x, *layer.parameters()))
        leaves = [t.detach().requires_grad_() for t in (x, layer.A, layer.B, layer.values, layer.bias)]
        y_op = op(*leaves[:4], layer.support, layer.scale, leaves[4])
        grads_op = torch.autograd.grad(y_op.square().sum(), leaves)
        torch.testing.assert_close(y, y_op)
        for got, want in zip(grads, grads_op):
            torch.testing.assert_close(got, want)
        # No double backward: differentiating the gradients raises, never treats them as constants.
        g = torch.autograd.grad(layer(x).sum(), x, create_graph=True)[0]
        assert g.requires_grad
        with pytest.raises(RuntimeError, match="no autograd formula"):
            (g.square().sum() + layer(x).sum()).backward()


@pytest.mark.parametrize("path", ["materialize", "factored"])
@pytest.mark.parametrize("route", ["eager", "custom_op"])
def test_output_can_be_modified_in_place_like_nn_linear(path, route):
    """``y += residual`` / ``y.relu_()`` on a layer's output (a fresh tensor, not a view) work and
    differentiate as for ``nn.Linear`` holding the dense ``W``."""
    from slcompile import ops, ops_factored

    layer = _randomized(SLLinear(12, 10, rank=3, density=0.2, path=path, dtype=torch.float64), 2)
    dense = nn.Linear(12, 10, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(layer.dense_weight())
        dense.bias.copy_(layer.bias)
    x = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(2, 3, 10, dtype=torch.float64)
    op = {"materialize": ops.sl_linear, "factored": ops_factored.sl_linear_factored}[path]
    y = layer(x) if route == "eager" else op(x, layer.A, layer.B, layer.values, layer.support, layer.scale,
                                              layer.bias)
    assert y._base is None
    y.add_(residual).relu_()
    want = dense(x).add_(residual).relu_()
    torch.testing.assert_close(y, want)
    grad_x, = torch.autograd.grad(y.square().sum(), x)
    want_x, = torch.autograd.grad(want.square().sum(), x)
    torch.testing.assert_close(grad_x, want_x)


@pytest.mark.parametrize("path", ["materialize", "factored"])
@pytest.mark.parametrize("bad", [-1, 8 * 16])
def test_a_support_index_out_of_range_raises_on_both_paths(path, bad):
    layer = SLLinear(16, 8, rank=2, density=0.2, path=path)
    with torch.no_grad():
        layer.support[3] = bad  # e.g. garbage left by to_empty() without reset_parameters()
    with pytest.raises(IndexError, match="out of range|outside"):
        layer(torch.randn(4, 16))


def test_bad_inputs_are_clear():
    layer = SLLinear(8, 4, rank=2)
    with pytest.raises(ValueError, match=r"expects input \(\.\.\., 8\), got shape \(3, 7\)"):
        layer(torch.randn(3, 7))
    with pytest.raises(TypeError, match="floating-point input"):
        layer(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="differs from its parameters"):
        layer(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"rank=9 exceeds"):
        SLLinear(8, 16, rank=9)
    with pytest.raises(ValueError, match="density"):
        SLLinear(8, 16, rank=2, density=1.5)
    with pytest.raises(ValueError, match="in_features"):
        SLLinear(0, 16, rank=2)
    with pytest.raises(TypeError, match="floating-point dtype"):
        SLLinear(8, 16, rank=2, dtype=torch.int8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["materialize", "factored"])
def test_autocast_computes_in_low_precision_with_fp32_master_weights(path, dtype):
    """On both paths (the factored one's MKL sparse products have no bf16: the op runs with
    autocast off on cast operands), for the layer and for the op called directly."""
    from slcompile import ops, ops_factored

    layer = _randomized(SLLinear(48, 40, rank=4, density=0.1, path=path), 3).float()
    x = torch.randn(5, 48)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert layer.A.grad.dtype == torch.float32 and layer.values.grad.dtype == torch.float32
    want = x.double() @ layer.dense_weight().double().t() + layer.bias.double()
    assert_close_to_reference(y, want, dtype, 48, f"{path} {dtype}")
    op = {"materialize": ops.sl_linear, "factored": ops_factored.sl_linear_factored}[path]
    with torch.autocast("cpu", dtype=dtype):  # the op is opaque to autocast: fp32 in, fp32 out
        direct = op(x, layer.A, layer.B, layer.values, layer.support, layer.scale, layer.bias)
    assert direct.dtype == torch.float32
    assert_close_to_reference(direct, want, torch.float32, 48, f"direct {path}")


def test_autocast_leaves_float64_alone_like_nn_linear():
    layer = SLLinear(8, 4, rank=2)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="differs from its parameters"):
        layer(torch.randn(3, 8, dtype=torch.float64))


@pytest.mark.parametrize("path", ["auto", "materialize", "factored"])
def test_forward_and_backward_on_the_meta_device(path):
    with torch.device("meta"):
        layer = SLLinear(16, 8, rank=4, path=path)
        x = torch.randn(5, 16, requires_grad=True)
        y = layer(x)
        y.sum().backward()
    assert y.shape == (5, 8) and y.device.type == "meta" and x.grad.shape == x.shape


def test_meta_device_allocates_nothing_and_materializes_like_a_fresh_layer():
    with torch.device("meta"):
        meta = SLLinear(4096, 11008, rank=1024, density=0.05, seed=11)
    assert all(t.device.type == "meta" for t in (*meta.parameters(), *meta.buffers()))
    assert meta.dense_weight().shape == (11008, 4096)
    small = SLLinear(40, 30, rank=4, seed=11, device="meta").to_empty(device="cpu")
    small.reset_parameters()
    assert torch.equal(small.support, SLLinear(40, 30, rank=4, seed=11).support)


def test_state_dict_round_trip_and_corrupt_support():
    layer = SLLinear(20, 10, rank=2, density=0.3, seed=1)
    clone = SLLinear(20, 10, rank=2, density=0.3, seed=2)
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(3, 20)
    torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)
    before = clone.state_dict()
    for corrupt, message in [
        (layer.support.clone().fill_(0), "duplicate"),
        (layer.support + 10_000, "outside"),
        (layer.support[:-1], "expected \\(60,\\).*another density"),
        (layer.support.float(), "dtype"),
        (layer.support[None], "shape"),
    ]:
        state = dict(layer.state_dict(), support=corrupt)
        with pytest.raises(ValueError, match=f"(corrupt checkpoint|checkpoint does not match).*{message}"):
            clone.load_state_dict(state)
        assert all(torch.equal(before[k], v) for k, v in clone.state_dict().items())  # nothing lost


def test_symbolic_trace_of_a_transformed_model_calls_the_op():
    layer = SLLinear(6, 5, rank=2, density=0.3)
    with torch.no_grad():
        layer.B.normal_()
    model = nn.Sequential(layer, nn.ReLU())
    gm = torch.fx.symbolic_trace(model)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.slcompile.sl_linear.default in targets or torch.ops.slcompile.sl_linear in targets
    x = torch.randn(3, 6)
    torch.testing.assert_close(gm(x), model(x))


def test_weight_metadata_costs_nothing_and_values_are_the_dense_weight(monkeypatch):
    layer = SLLinear(8, 6, rank=2, density=0.3, dtype=torch.float64)
    with torch.no_grad():
        layer.B.normal_()
    keys, params = list(layer.state_dict()), [n for n, _ in layer.named_parameters()]
    calls = []
    real = SLLinear.dense_weight
    monkeypatch.setattr(SLLinear, "dense_weight", lambda self: calls.append(1) or real(self))
    w = layer.weight
    assert (w.dtype, w.device, w.shape, w.size(1), w.ndim, w.dim(), w.numel()) == \
        (torch.float64, torch.device("cpu"), (6, 8), 8, 2, 2, 48)
    assert w.requires_grad and w.is_floating_point() and isinstance(w, torch.Tensor) and calls == []
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(nn.functional.linear(x, layer.weight, layer.bias), layer(x))
    assert torch.equal(w.detach() + 0, real(layer).detach()) and calls == [1, 1]
    assert not w.detach().requires_grad and not w.data.requires_grad and calls == [1, 1]  # no W formed
    (x @ w.T).sum().backward()  # differentiable into the factors
    assert layer.A.grad is not None and layer.values.grad is not None
    assert list(layer.state_dict()) == keys and [n for n, _ in layer.named_parameters()] == params
    for write in (lambda: w.add_(1), lambda: nn.init.normal_(w), lambda: w.copy_(torch.zeros(6, 8)),
                  lambda: w.data.copy_(torch.zeros(6, 8)), lambda: w.detach().zero_(), lambda: w.data.normal_()):
        with pytest.raises(RuntimeError, match="in-place .* change the layer's A, B or values"):
            write()
    layer.requires_grad_(False)
    assert not layer.weight.requires_grad


@pytest.mark.compile
def test_weight_dtype_reads_work_under_compile():
    class T5Style(nn.Module):  # modeling_t5 casts to self.wo.weight.dtype before the output projection
        def __init__(self):
            super().__init__()
            self.wo = SLLinear(8, 8, rank=2, density=0.3)

        def forward(self, h):
            if h.dtype != self.wo.weight.dtype:
                h = h.to(self.wo.weight.dtype)
            return self.wo(h)

    model, x = T5Style(), torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))


@pytest.mark.parametrize("path", ["materialize", "factored", "auto"])
def test_torch_func_grad_vmap_and_per_sample_gradients(path):
    """``torch.func``: grad, vmap over inputs, per-sample gradients (vmap of grad) and a Hessian-vector
    product (grad of grad) through ``functional_call``, each against the dense float64 reference.
    Forward-mode AD (``jvp``) has no rule: torch says so."""
    from torch.func import functional_call, grad, jvp, vmap

    layer = _randomized(SLLinear(9, 7, rank=3, density=0.3, path=path, dtype=torch.float64), 2)
    names = ("A", "B", "values", "bias")
    params = {name: getattr(layer, name).detach() for name in names}
    x = torch.randn(5, 9, dtype=torch.float64)

    def reference(p, inputs):
        weight = dense_reference_weight(p["A"], p["B"], p["values"], layer.support, layer.scale)
        return torch.nn.functional.linear(inputs, weight, p["bias"])

    def loss(fn, p, inputs):
        return fn(p, inputs).sin().sum()

    def ours(p, inputs):
        return functional_call(layer, p, (inputs,))

    got, want = (grad(lambda p: loss(fn, p, x))(params) for fn in (ours, reference))
    for name in names:
        torch.testing.assert_close(got[name], want[name])
    batched = torch.randn(3, 5, 9, dtype=torch.float64)
    torch.testing.assert_close(vmap(lambda inputs: ours(params, inputs))(batched), reference(params, batched))
    per_sample = [vmap(grad(lambda p, row: loss(fn, p, row[None])), in_dims=(None, 0))(params, x)
                  for fn in (ours, reference)]
    for name in names:
        assert per_sample[0][name].shape == (5, *params[name].shape)
        torch.testing.assert_close(per_sample[0][name], per_sample[1][name])
    tangent = {name: torch.randn_like(value) for name, value in params.items()}

    def hvp(fn):
        def directional(p):
            gradient = grad(lambda q: loss(fn, q, x))(p)
            return sum((gradient[name] * tangent[name]).sum() for name in names)
        return grad(directional)(params)

    got, want = hvp(ours), hvp(reference)
    for name in names:
        torch.testing.assert_close(got[name], want[name])
    with pytest.raises(NotImplementedError, match="jvp"):
        jvp(lambda p: ours(p, x), (params,), (tangent,))

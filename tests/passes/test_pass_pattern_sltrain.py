"""SLTrainPatternPass on hand-built FX graphs (symbolic_trace + fake values, as Dynamo's graphs carry).

Each case traces a module that writes SLTrain with ordinary ops, runs the pass, and checks the
rewritten graph calls ``slcompile::sl_linear`` and computes the same outputs and gradients. The
SLTrain authors' layer (re-created here: their ``autograd.Function`` and their forward as plain ops
with an in-place scatter) goes through Dynamo with a backend that only runs the pass, and once
through the ``slcompile`` backend, in float64.
"""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from slcompile.passes.nodes import SL_LINEAR
from slcompile.passes.pattern_sltrain import SLTrainPatternPass
from slcompile.support import generate_support

OUT, IN, RANK = 6, 10, 3


class Hand(nn.Module):
    """SLTrain written by hand; ``body(self, x)`` chooses the form.

    The support is a graph input (as Dynamo passes buffers) so that casts of it are traced, and
    zeros take their device from a tensor so that ``torch.zeros`` is traced too (symbolic_trace
    would fold both into constants).
    """

    def __init__(self, body, bias=False, index_dtype=torch.int32):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.A = nn.Parameter(torch.randn(RANK, IN, generator=gen))
        self.B = nn.Parameter(torch.randn(OUT, RANK, generator=gen))
        self.values = nn.Parameter(torch.randn(12, generator=gen))
        self.bias = nn.Parameter(torch.randn(OUT, generator=gen)) if bias else None
        self.register_buffer("support", generate_support(OUT, IN, 12, 0).to(index_dtype))
        self.scale = 0.75
        self.body = body

    def forward(self, x, support):
        self.idx = support
        return self.body(self, x)


def traced(module: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    """``module`` traced, every node with its fake value in ``meta['val']``."""
    gm = fx.symbolic_trace(module)
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(x, module.support)
    return gm


def run_pass(module: nn.Module, x: torch.Tensor) -> tuple[fx.GraphModule, SLTrainPatternPass]:
    gm = traced(module, x)
    rewrite = SLTrainPatternPass()
    rewrite(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return gm, rewrite


def sl_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target is SL_LINEAR]


def assert_same(module: nn.Module, gm: fx.GraphModule, x: torch.Tensor) -> None:
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, got = module(x1, module.support), gm(x2, module.support)
    refs = ref if isinstance(ref, tuple) else (ref,)
    gots = got if isinstance(got, tuple) else (got,)
    params = list(module.parameters())
    grad = lambda outs, x: torch.autograd.grad(sum(o.sum() for o in outs), [x, *params],  # noqa: E731
                                               allow_unused=True, materialize_grads=True)
    ref_grads, got_grads = grad(refs, x1), grad(gots, x2)
    for a, b in zip((*refs, *ref_grads), (*gots, *got_grads)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


# Ways to write each piece; the property test combines them.
LOW_RANK = {
    "scale_A": lambda m: m.B @ (m.scale * m.A),
    "scale_B": lambda m: torch.mm(m.scale * m.B, m.A),
    "scale_product": lambda m: (m.B @ m.A) * m.scale,
    "div_mul": lambda m: torch.matmul(m.B, m.A) / 4 * (4 * m.scale),
    "method": lambda m: m.B.mm(m.A).mul(m.scale),
}
INDEX = {
    "as_is": lambda m: m.idx,
    "long": lambda m: m.idx.long(),
    "to_int64": lambda m: m.idx.to(torch.int64),
}
ADD_INTO = {  # form 1: scatter into the flattened product, view back
    "index_add": lambda low, idx, v: low.view(-1).index_add(0, idx, v).view(OUT, IN),
    "torch_index_add": lambda low, idx, v: torch.index_add(low.reshape(-1), 0, idx, v).reshape(OUT, IN),
    "index_put": lambda low, idx, v: low.flatten().index_put((idx.long(),), v, accumulate=True).view_as(low),
    "scatter_add": lambda low, idx, v: low.view(-1).scatter_add(0, idx.long(), v).view(OUT, IN),
}
SEPARATE = {  # form 2: a dense S added to the product
    "zeros_index_add": lambda low, idx, v: low + torch.zeros(OUT * IN, device=v.device).index_add(0, idx, v)
    .view(OUT, IN),
    "zeros_first": lambda low, idx, v: torch.zeros(OUT * IN, device=v.device)
    .index_put((idx.long(),), v, accumulate=True).view_as(low) + low,
}
CONSUMER = {
    "linear": lambda x, w, b: F.linear(x, w, b),
    "matmul_t": lambda x, w, b: x @ w.t(),
    "matmul_T": lambda x, w, b: torch.matmul(x, w.T),
    "transpose": lambda x, w, b: x @ w.transpose(0, 1),
}


@given(low=st.sampled_from(sorted(LOW_RANK)), index=st.sampled_from(sorted(INDEX)),
       sparse=st.sampled_from(sorted(ADD_INTO) + sorted(SEPARATE)), consumer=st.sampled_from(sorted(CONSUMER)),
       bias=st.booleans(), lead=st.sampled_from([(), (5,), (2, 3)]))
def test_written_forms_become_sl_linear(low, index, sparse, consumer, bias, lead):
    bias = bias and consumer == "linear"
    combine = {**ADD_INTO, **SEPARATE}[sparse]

    def body(m, x):
        weight = combine(LOW_RANK[low](m), INDEX[index](m), m.values)
        return CONSUMER[consumer](x, weight, m.bias)

    module = Hand(body, bias=bias)
    x = torch.randn(*lead, IN)
    gm, rewrite = run_pass(module, x)
    assert rewrite.counts["sl_linear"] == 1, rewrite.notes
    (node,) = sl_nodes(gm)
    assert node.args[5] == pytest.approx(0.75)
    assert node.args[4].target == "support"  # the widening cast is dropped: the int32 input itself
    assert [n.op for n in gm.graph.nodes].count("call_method") == 0  # every matched node is erased
    assert_same(module, gm, x)


def test_int64_index_buffer_and_two_linears_sharing_parameters():
    def body(m, x):
        w1 = (m.scale * m.B @ m.A).view(-1).index_add(0, m.idx, m.values).view(OUT, IN)
        w2 = (m.B @ m.A).view(-1).index_add(0, m.idx, m.values).view(OUT, IN)
        return F.linear(x, w1) + F.linear(torch.tanh(x), w2)

    module = Hand(body, index_dtype=torch.int64)
    gm, rewrite = run_pass(module, torch.randn(4, IN))
    assert rewrite.counts["sl_linear"] == 2
    assert sorted(n.args[5] for n in sl_nodes(gm)) == [0.75, 1.0]
    assert_same(module, gm, torch.randn(4, IN))


def _low(m):
    return (m.B @ m.A) * m.scale


def _weight(m, low=None):
    return (_low(m) if low is None else low).view(-1).index_add(0, m.idx, m.values).view(OUT, IN)


def weight_also_returned(m, x):
    weight = _weight(m)
    return F.linear(x, weight), weight


def product_used_twice(m, x):
    low = _low(m)
    return F.linear(x, _weight(m, low)) + low.sum()


def index_put_overwrites(m, x):
    return F.linear(x, _low(m).flatten().index_put((m.idx.long(),), m.values).view(OUT, IN))


def index_add_alpha(m, x):
    return F.linear(x, _low(m).view(-1).index_add(0, m.idx, m.values, alpha=2.0).view(OUT, IN))


def tensor_scale(m, x):
    return F.linear(x, _weight(m, (m.B @ m.A) * m.values[0]))


def no_sparse_term(m, x):
    return F.linear(x, _low(m))


def dense_plus_sparse(m, x):  # form 2 without a low-rank product
    sparse = torch.zeros(OUT * IN, device=x.device).index_add(0, m.idx, m.values).view(OUT, IN)
    return F.linear(x, torch.ones(OUT, IN, device=x.device) + sparse)


def product_transposed_then_viewed(m, x):  # (in, out) product reinterpreted as (out, in)
    return F.linear(x, (m.A.t() @ m.B.t()).reshape(-1).index_add(0, m.idx, m.values).view(OUT, IN))


def scatter_into_viewed_zeros(m, x):  # conservative: the scatter target must be zeros itself
    sparse = torch.zeros(OUT * IN, 1, device=x.device).view(-1).index_add(0, m.idx, m.values)
    return F.linear(x, _low(m) + sparse.view(OUT, IN))


NON_MATCHES = {f.__name__: (f, note) for f, note in [
    (weight_also_returned, "users"), (product_used_twice, "users"), (index_put_overwrites, "accumulating"),
    (index_add_alpha, None), (tensor_scale, None), (no_sparse_term, None), (dense_plus_sparse, None),
    (product_transposed_then_viewed, "viewed back"), (scatter_into_viewed_zeros, None)]}


@pytest.mark.parametrize("case", sorted(NON_MATCHES))
def test_near_misses_are_left_alone(case):
    body, note = NON_MATCHES[case]
    module = Hand(body)
    x = torch.randn(3, IN)
    gm, rewrite = run_pass(module, x)
    assert rewrite.counts["sl_linear"] == 0 and not sl_nodes(gm)
    if note is not None:
        assert any(note in n for n in rewrite.notes), rewrite.notes
    assert_same(module, gm, x)


def _updated_in_place(m, x):  # the SLTrain authors' forward: W built, then updated through a flat view
    weight = m.B.mm(m.A * m.scale)
    weight.view(-1).scatter_add_(0, m.idx.long(), m.values)
    return F.linear(x, weight, m.bias)


def _in_place_chain(m, x):
    return F.linear(x, _low(m).view(-1).index_add_(0, m.idx, m.values).view(OUT, IN), m.bias)


def _in_place_zeros(m, x):  # form 2 with S = zeros updated in place
    sparse = torch.zeros(OUT * IN, device=x.device)
    sparse.index_put_((m.idx.long(),), m.values, accumulate=True)
    return F.linear(x, _low(m) + sparse.view(OUT, IN), m.bias)


def _in_place_transposed(m, x):
    weight = (m.B @ m.A) * m.scale
    weight.flatten().index_add_(0, m.idx, m.values)
    return x @ weight.t()


@pytest.mark.parametrize("body", [_updated_in_place, _in_place_chain, _in_place_zeros, _in_place_transposed])
def test_in_place_scatters_become_sl_linear(body):
    module = Hand(body, bias=body is not _in_place_transposed)
    x = torch.randn(2, 3, IN)
    gm, rewrite = run_pass(module, x)
    assert rewrite.counts["sl_linear"] == 1, rewrite.notes
    assert [n.op for n in gm.graph.nodes].count("call_method") == 0
    assert_same(module, gm, x)


def update_after_read(m, x):
    weight = _low(m)
    out = F.linear(x, weight)
    weight.view(-1).index_add_(0, m.idx, m.values)
    return out


def updated_twice(m, x):
    weight = _low(m)
    weight.view(-1).index_add_(0, m.idx, m.values)
    weight.view(-1).index_add_(0, m.idx, m.values)
    return F.linear(x, weight)


def not_a_scatter(m, x):
    weight = _low(m)
    weight.add_(1.0)
    return F.linear(x, weight)


def overwriting_put(m, x):
    weight = _low(m)
    weight.view(-1).index_put_((m.idx.long(),), m.values)
    return F.linear(x, weight)


def update_result_used(m, x):
    weight = _low(m)
    flat = weight.view(-1).index_add_(0, m.idx, m.values)
    return F.linear(x, weight) + flat.sum()


IN_PLACE_MISSES = {f.__name__: (f, note) for f, note in [
    (update_after_read, "before the in-place index_add_"), (updated_twice, "updated in place 2 times"),
    (not_a_scatter, "by add_"), (overwriting_put, "accumulating"), (update_result_used, "result of the in-place")]}


@pytest.mark.parametrize("case", sorted(IN_PLACE_MISSES))
def test_in_place_near_misses_name_the_reason(case):
    body, note = IN_PLACE_MISSES[case]
    module = Hand(body)
    x = torch.randn(3, IN)
    gm, rewrite = run_pass(module, x)
    assert rewrite.counts["sl_linear"] == 0 and not sl_nodes(gm)
    assert any(note in n for n in rewrite.notes), rewrite.notes
    with torch.no_grad():  # in eager, autograd refuses a weight updated after the linear saved it
        torch.testing.assert_close(gm(x, module.support), module(x, module.support))


def test_not_rewritten_under_autocast():
    def body(m, x):
        return F.linear(x, _low(m).view(-1).index_add(0, m.idx, m.values).view(OUT, IN))

    gm = traced(Hand(body), torch.randn(3, IN))
    rewrite = SLTrainPatternPass()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rewrite(gm.graph)
    assert rewrite.counts["sl_linear"] == 0 and any("autocast" in n for n in rewrite.notes)


def test_dtype_mismatch_is_left_alone():
    def body(m, x):
        return F.linear(x.double(), _low(m).double().view(-1).index_add(0, m.idx, m.values.double())
                        .view(OUT, IN))

    module = Hand(body)
    gm, rewrite = run_pass(module, torch.randn(3, IN))
    # The float64 casts sit between the product and the scatter: not the pattern, nothing rewritten.
    assert rewrite.counts["sl_linear"] == 0
    assert operator.matmul in [n.target for n in gm.graph.nodes]


def test_uuid_is_stable_bytes():
    assert SLTrainPatternPass().uuid() == SLTrainPatternPass().uuid()
    assert isinstance(SLTrainPatternPass().uuid(), bytes)


# ---------------------------------------------------------------- the SLTrain authors' layer, as they ship it

class SparseLinearFunction(torch.autograd.Function):
    """A re-creation of the SLTrain authors' function: ``W = B A * scaling + S`` built in place in the
    forward, recomputed in the backward (only the inputs are saved)."""

    @staticmethod
    def forward(ctx, x, A, B, values, indices, scaling, bias):
        weight = B.mm(A) * scaling
        weight.view(-1).scatter_add_(0, indices, values)
        ctx.save_for_backward(x, A, B, values, indices)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B, values, indices = ctx.saved_tensors
        weight = B.mm(A) * ctx.scaling
        weight.view(-1).scatter_add_(0, indices, values)
        return _grads(ctx, grad_out, x, weight, A, B, indices)


def _grads(ctx, grad_out, x, weight, A, B, indices):
    """Gradients for ``(x, A, B, values, indices, scaling, bias)``: ``dW = dY^T X``, ``dA = s B^T dW``,
    ``dB = s dW A^T``, ``dvalues = dW.view(-1)[indices]``."""
    dy, x2 = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
    d_weight = dy.t() @ x2
    d_bias = dy.sum(0) if ctx.has_bias else None
    return (grad_out @ weight, ctx.scaling * B.t() @ d_weight, ctx.scaling * d_weight @ A.t(),
            d_weight.view(-1)[indices], None, None, d_bias)


class SavedWeightFunction(torch.autograd.Function):
    """A variant saving ``W`` for its backward, built as ``(B @ A) * s`` with ``index_put_``."""

    @staticmethod
    def forward(ctx, x, A, B, values, indices, scaling, bias):
        weight = (B @ A) * scaling
        weight.view(-1).index_put_((indices,), values, accumulate=True)
        ctx.save_for_backward(x, weight, A, B, indices)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        return _grads(ctx, grad_out, *ctx.saved_tensors)


class AuthorsLinear(nn.Module):
    """Their module: ``lora_A (r, in)``, ``lora_B (out, r)``, sparse ``values`` at the int64 ``indices``."""

    def __init__(self, d_in, d_out, rank, nnz, bias=True, dtype=torch.float64, body=None):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.lora_A = nn.Parameter(torch.randn(rank, d_in, generator=gen, dtype=dtype))
        self.lora_B = nn.Parameter(torch.randn(d_out, rank, generator=gen, dtype=dtype))
        self.values = nn.Parameter(torch.randn(nnz, generator=gen, dtype=dtype))
        self.bias = nn.Parameter(torch.randn(d_out, generator=gen, dtype=dtype)) if bias else None
        self.register_buffer("indices", generate_support(d_out, d_in, nnz, 0).long())
        self.scaling = 2.0 / rank
        self.body = body  # None: their autograd.Function; else the forward written as plain ops

    def forward(self, x):
        if self.body is None:
            return SparseLinearFunction.apply(x, self.lora_A, self.lora_B, self.values, self.indices, self.scaling,
                                              self.bias)
        return self.body(self, x)


def saved_weight(m, x):
    return SavedWeightFunction.apply(x, m.lora_A, m.lora_B, m.values, m.indices, m.scaling, m.bias)


def plain_ops(m, x):  # their forward without the autograd.Function
    weight = m.lora_B.mm(m.lora_A * m.scaling)
    weight.view(-1).index_add_(0, m.indices, m.values)
    return F.linear(x, weight, m.bias)


def outputs_and_grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    y = model(x)
    grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(),
                                [x, *model.parameters()])
    return [y.detach(), *grads]


def dynamo_pass(model: nn.Module, x: torch.Tensor, prepare=None) -> tuple[list[fx.GraphModule], SLTrainPatternPass]:
    """``model`` through Dynamo with the pass run on each graph it records (no Inductor), after
    ``prepare(graph module)`` if given: the graphs and the pass."""
    torch._dynamo.reset()
    graphs, rewrite = [], SLTrainPatternPass()

    def backend(gm, example_inputs):
        if prepare is not None:
            prepare(gm)
        rewrite(gm.graph)
        gm.graph.lint()
        gm.recompile()
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    torch.testing.assert_close(outputs_and_grads(compiled, x), outputs_and_grads(model, x), rtol=1e-12, atol=1e-12)
    return graphs, rewrite


@pytest.mark.compile
@pytest.mark.parametrize("body, bias", [(None, True), (None, False), (saved_weight, True), (plain_ops, True)])
def test_authors_layer_through_dynamo(body, bias):
    model = AuthorsLinear(10, 6, 3, 12, bias=bias, body=body)
    (gm,), rewrite = dynamo_pass(model, torch.randn(2, 4, 10, dtype=torch.float64))
    assert rewrite.counts["sl_linear"] == 1, rewrite.notes
    (node,) = sl_nodes(gm)
    assert node.args[5] == pytest.approx(model.scaling) and (len(node.args) == 7) == bias
    assert {n.op for n in gm.graph.nodes} == {"placeholder", "call_function", "output"}  # subgraphs gone too
    assert not any(isinstance(m, fx.GraphModule) for m in gm.children())


def with_mutated_intermediates_returned(gm: fx.GraphModule) -> None:
    """Torch 2.11's Dynamo records an ``autograd.Function`` whose forward modifies an intermediate in
    place with those intermediates among the forward's outputs: ``((out, *mutated), saved)``."""
    for node in gm.graph.find_nodes(op="get_attr"):
        body = getattr(gm, node.target)
        if not (isinstance(body, fx.GraphModule) and "fwd" in node.target):
            continue
        output = body.graph.output_node()
        outs, saved = output.args[0]
        mutated = [n for n in body.graph.nodes if n.op in ("call_method", "call_function")
                   and str(getattr(n.target, "__name__", n.target)).endswith("_")]
        assert mutated, "the authors' forward modifies its weight in place"
        output.args = (((*outs, *mutated), saved),)
        body.recompile()


@pytest.mark.compile
def test_authors_function_recorded_as_torch_2_11_records_it():
    _, rewrite = dynamo_pass(AuthorsLinear(10, 6, 3, 12), torch.randn(3, 10, dtype=torch.float64),
                             prepare=with_mutated_intermediates_returned)
    assert rewrite.counts["sl_linear"] == 1, rewrite.notes


class ScaledInputFunction(SparseLinearFunction):
    """Not the SLTrain layer: the forward also scales its input (the backward is left out of the check)."""

    @staticmethod
    def forward(ctx, x, A, B, values, indices, scaling, bias):
        return SparseLinearFunction.forward(ctx, 2 * x, A, B, values, indices, scaling, bias)


@pytest.mark.compile
def test_other_autograd_function_is_left_with_a_note():
    model = AuthorsLinear(10, 6, 3, 12)
    torch._dynamo.reset()
    rewrite = SLTrainPatternPass()

    def backend(gm, example_inputs):
        rewrite(gm.graph)
        return gm.forward

    x = torch.randn(3, 10, dtype=torch.float64)
    args = (model.lora_A, model.lora_B, model.values, model.indices, model.scaling, model.bias)
    out = torch.compile(lambda x: ScaledInputFunction.apply(x, *args), backend=backend, fullgraph=True)(x)
    assert rewrite.counts["sl_linear"] == 0
    assert any("autograd.Function forward also computes" in n for n in rewrite.notes), rewrite.notes
    torch.testing.assert_close(out, SparseLinearFunction.apply(2 * x, *args))


@pytest.mark.compile
def test_authors_function_through_the_slcompile_backend():
    from slcompile.backend import last_report

    torch._dynamo.reset()
    model = AuthorsLinear(16, 12, 4, 20)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    compiled = torch.compile(model, backend="slcompile", fullgraph=True)
    torch.testing.assert_close(outputs_and_grads(compiled, x), outputs_and_grads(model, x), rtol=1e-10, atol=1e-10)
    report = last_report()
    assert report.counts()["pattern_sltrain"] == {"graphs": 1, "sl_linear": 1}, report.notes()


@pytest.mark.compile
def test_two_calls_of_the_authors_function():
    model = nn.Sequential(AuthorsLinear(10, 10, 3, 12), nn.Tanh(), AuthorsLinear(10, 6, 3, 12))
    (gm,), rewrite = dynamo_pass(model, torch.randn(4, 10, dtype=torch.float64))
    assert rewrite.counts["sl_linear"] == 2 and len(sl_nodes(gm)) == 2, rewrite.notes
    assert not any(isinstance(m, fx.GraphModule) for m in gm.children())

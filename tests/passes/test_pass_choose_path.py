"""ChoosePathPass: decisions on hand-built graphs with fake values (paper-sized shapes cost nothing),
a traced module run on real tensors after the pass, and one compilation through the backend."""
from __future__ import annotations

import pytest
import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import slcompile
import slcompile.backend as backend
from slcompile import cost_model, ops
from slcompile.passes.choose_path import DEFAULT_MARGIN, SL_LINEAR_FACTORED, ChoosePathPass
from slcompile.passes.nodes import SL_LINEAR

# FLOPs alone decide (one rate, no bandwidth or launch cost): crossovers follow from the formulas.
FLOPS_ONLY = cost_model.DeviceSpec("flops-only", dense_flops=1e12, form_flops=1e12, spmm_flops=1e12,
                                   sddmm_flops=1e12, bandwidth=1e30, launch_s=0.0)


def fake_graph(lead: tuple[int, ...], requires_grad: bool = True, in_f=4096, out_f=11008, rank=1024,
               density=0.05) -> fx.Graph:
    """One ``sl_linear`` node whose operands carry fake values, as in a Dynamo graph."""
    nnz = int(density * in_f * out_f)
    with FakeTensorMode():
        vals = {"x": torch.empty(*lead, in_f), "A": torch.empty(rank, in_f, requires_grad=requires_grad),
                "B": torch.empty(out_f, rank, requires_grad=requires_grad),
                "values": torch.empty(nnz, requires_grad=requires_grad),
                "support": torch.empty(nnz, dtype=torch.int32)}
        out = SL_LINEAR(*vals.values(), 0.25)
    graph = fx.Graph()
    nodes = []
    for name, val in vals.items():
        nodes.append(graph.placeholder(name))
        nodes[-1].meta["example_value"] = val
    call = graph.call_function(SL_LINEAR, (*nodes, 0.25))
    call.meta["example_value"] = out
    graph.output(call)
    return graph


def targets(graph: fx.Graph) -> list:
    return [n.target for n in graph.nodes if n.target in (SL_LINEAR, SL_LINEAR_FACTORED)]


@pytest.mark.parametrize("lead, requires_grad, expected", [
    ((1,), True, SL_LINEAR_FACTORED), ((4, 4), True, SL_LINEAR_FACTORED), ((8, 2048), True, SL_LINEAR),
    ((1,), False, SL_LINEAR_FACTORED), ((16384,), False, SL_LINEAR)])
def test_paper_shape_decisions_follow_the_cost_model(lead, requires_grad, expected):
    graph = fake_graph(lead, requires_grad)
    chooser = ChoosePathPass("h200-cusparse")
    chooser(graph)
    assert targets(graph) == [expected]
    tokens = 1
    for size in lead:
        tokens *= size
    mode = "train" if requires_grad else "forward"
    want = cost_model.choose_path(tokens, 4096, 11008, 1024, int(0.05 * 4096 * 11008), "h200-cusparse", mode, 4,
                                  DEFAULT_MARGIN)
    assert (expected is SL_LINEAR_FACTORED) == (want == "factored")
    assert chooser.counts[want] == 1 and f"N={tokens} " in chooser.notes[0] and f"({mode}," in chooser.notes[0]


class TwoLayers(nn.Module):
    """Two SLTrain linears; ``x_few`` and ``x_many`` differ only in their token count."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.few = slcompile.SLLinear(64, 64, rank=48, alpha=12.0, density=0.5, seed=1)
        self.many = slcompile.SLLinear(64, 64, rank=48, alpha=12.0, density=0.5, seed=2)
        with torch.no_grad():
            for layer in (self.few, self.many):
                layer.B.normal_()

    def forward(self, x_few, x_many):
        return self.few(x_few), self.many(x_many)


def test_few_tokens_rewritten_many_left_alone_and_exact():
    # FLOPs per layer (in = out = 64, r = 48, nnz = 2048): equal at N = 51.2 tokens, 20% apart at 35.3.
    module = TwoLayers()
    inputs = (torch.randn(2, 2, 64), torch.randn(4, 128, 64))
    gm = fx.symbolic_trace(module)
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
    chooser = ChoosePathPass(FLOPS_ONLY)
    chooser(gm.graph)
    gm.recompile()
    assert targets(gm.graph) == [SL_LINEAR_FACTORED, SL_LINEAR]
    assert dict(chooser.counts) == {"graphs": 1, "factored": 1, "materialize": 1}
    grads = [torch.randn(2, 2, 64), torch.randn(4, 128, 64)]
    results = []
    for fn in (gm, module):
        module.zero_grad(set_to_none=True)
        ys = fn(*inputs)
        torch.autograd.backward(ys, grads)
        results.append([*ys, *(p.grad.clone() for p in module.parameters())])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_symbolic_shapes_keep_materialize():
    layer = TwoLayers().few
    args = (layer.A, layer.B, layer.values, layer.support, layer.scale)
    gm = make_fx(lambda x, *a: ops.sl_linear(x, *a), tracing_mode="symbolic")(torch.randn(3, 64), *args)
    chooser = ChoosePathPass(FLOPS_ONLY)
    chooser(gm.graph)
    assert targets(gm.graph) == [SL_LINEAR] and chooser.counts["dynamic"] == 1 and "symbolic" in chooser.notes[0]


def test_uuid_depends_on_device_and_margin():
    assert ChoosePathPass().uuid() == ChoosePathPass().uuid()
    assert ChoosePathPass("cpu").uuid() != ChoosePathPass("h200").uuid() != ChoosePathPass().uuid()
    assert ChoosePathPass(margin=0.5).uuid() != ChoosePathPass().uuid()
    with pytest.raises(ValueError, match="margin"):
        ChoosePathPass(margin=1.5)


@pytest.mark.compile
def test_backend_with_choose_path_matches_eager():
    torch.manual_seed(0)
    # 6 tokens through 512 x 384 layers at rank 128: forming W costs ~40x the factored GEMMs, so
    # factored wins on any CPU spec (at rank 32 the two paths tie within dispatch overheads).
    model = nn.Sequential(slcompile.SLLinear(512, 384, rank=128, alpha=8.0, density=0.05, seed=1), nn.GELU(),
                          slcompile.SLLinear(384, 512, bias=False, rank=128, alpha=8.0, density=0.05, seed=2))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.B.normal_(0.0, 0.2)
    x = torch.randn(2, 3, 512)
    grad_y = torch.randn(2, 3, 512)

    def run(fn):
        model.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        y = fn(leaf)
        y.backward(grad_y)
        return [y.detach(), leaf.grad, *(p.grad.clone() for p in model.parameters())]

    eager = run(model)
    compiled = run(torch.compile(model, backend="slcompile", options={"choose_path": True}, dynamic=False))
    assert backend.last_report().counts()["choose_path"] == {"graphs": 1, "factored": 2}
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

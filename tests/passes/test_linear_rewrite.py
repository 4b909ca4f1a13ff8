"""rewrite_linears: the FX pass agrees with ``transform`` (same layers, bitwise-equal supports, same
outputs and gradients) and with a float64 dense reference, on hand-built graphs, ``symbolic_trace``,
functional ``F.linear`` code, ``torch.export(...).module()`` (also decomposed to ``mm``/``addmm``), a
tiny LLaMA written here, GPT-2's ``Conv1D`` (``x @ W``, ``W (in, out)``) and HF ``LlamaForCausalLM`` /
``GPT2LMHeadModel``."""
import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import fx, nn
from torch.nn.utils import parametrize

from slcompile import SLConfig, SLLinear, transform
from slcompile.passes import rewrite_linears
from slcompile.passes.nodes import SL_LINEAR
from slcompile.transform import linear_kind

aten = torch.ops.aten
dims = st.integers(1, 9)
densities = st.sampled_from([0.01, 0.1, 0.37, 0.5, 0.9])
seeds = st.integers(0, 2**31 - 1)


# ---------------------------------------------------------------- helpers

def sl_layers(module: nn.Module) -> dict[str, SLLinear]:
    """The ``SLLinear`` submodules by layer name (one installed at a weight's path ``x.weight`` is ``x``)."""
    layers = {}
    for path, m in module.named_modules():
        if isinstance(m, SLLinear):
            layers["" if path == "weight" else path.removesuffix(".weight")] = m
    return layers


@torch.no_grad()
def randomize(layers: dict[str, SLLinear], seed: int) -> None:
    """Random ``A``, ``B`` (not the zero init: the low-rank term must count) and ``values``, scaled so that
    both terms of ``W`` have entries of about ``1 / sqrt(in)``, like a dense init."""
    gen = torch.Generator().manual_seed(seed)
    for layer in layers.values():
        stds = {"A": layer.in_features ** -0.5, "B": 1 / (layer.scale * layer.rank ** 0.5),
                "values": layer.in_features ** -0.5}
        for attr, std in stds.items():
            param = getattr(layer, attr)
            param.copy_(std * torch.randn(param.shape, generator=gen, dtype=torch.float64))


@torch.no_grad()
def copy_layers(src: dict[str, SLLinear], dst: dict[str, SLLinear]) -> None:
    """Copy ``A``, ``B``, ``values``, ``bias`` by layer name, checking the supports are bitwise equal."""
    assert src.keys() == dst.keys()
    for name, layer in src.items():
        other = dst[name]
        assert other.support.dtype == torch.int32 and torch.equal(layer.support, other.support), name
        assert (other.scale, other.A.dtype) == (layer.scale, layer.A.dtype), name
        for attr in ("A", "B", "values"):
            getattr(other, attr).copy_(getattr(layer, attr))
        if other.bias is not None:
            other.bias.copy_(layer.bias)


def dense_reference(model: nn.Module, layers: dict[str, SLLinear]) -> nn.Module:
    """A float64 copy of ``model`` whose ``nn.Linear`` weights are ``W_ref``, built explicitly from the layers."""
    ref = copy.deepcopy(model).double()
    for name, layer in layers.items():
        w_ref = layer.scale * layer.B.detach().double() @ layer.A.detach().double()
        w_ref.view(-1)[layer.support.long()] += layer.values.detach().double()
        linear = ref.get_submodule(name)  # an nn.Linear or a Conv1D (weight W^T) at every layer name here
        linear.weight = nn.Parameter(w_ref.t() if linear_kind(linear).name == "Conv1D" else w_ref)
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.detach().double())
    return ref


def as_double(t):
    return t.double() if torch.is_floating_point(t) else t


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """float32 closeness, the absolute tolerance relative to the largest entry of ``expected``."""
    largest = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * max(1.0, largest),
                               msg=lambda message: f"{what}: {message}")


def check_against_transform(gm: fx.GraphModule, eager_model: nn.Module, cfg: SLConfig, inputs: tuple,
                            seed: int = 0, bias_moves: bool = True) -> tuple[fx.GraphModule, object]:
    """Rewrite ``gm`` and transform a copy of ``eager_model`` (the same model, or an ``nn.Linear`` twin of
    functional code); check layers, supports, outputs and gradients agree, and match float64.

    ``bias_moves=False``: the graph's bias stays a parameter of its own (not counted in the report).
    """
    eager, eager_report = transform(copy.deepcopy(eager_model), cfg)
    gm, report = rewrite_linears(gm, cfg)
    key = (lambda layer: layer) if bias_moves else (lambda layer: dataclasses.replace(layer, has_bias=False))
    assert sorted(map(key, report.replaced), key=str) == sorted(map(key, eager_report.replaced), key=str)
    assert report.kept == eager_report.kept
    eager_layers, graph_layers = sl_layers(eager), sl_layers(gm)
    params = dict(gm.named_parameters())
    assert not any(name in params or f"{name}.weight" in params for name in graph_layers)  # dense weights gone
    randomize(eager_layers, seed)
    copy_layers(eager_layers, graph_layers)
    assert sum(n.target is SL_LINEAR for n in gm.graph.nodes) >= len(graph_layers)

    out_graph, out_eager = gm(*inputs), eager(*inputs)
    torch.testing.assert_close(out_graph, out_eager)
    ref = dense_reference(eager_model, eager_layers)(*map(as_double, inputs))
    assert_close_scaled(out_graph.double(), ref, "output vs float64 dense reference")

    grad_out = torch.randn(out_graph.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=out_graph.dtype)
    (out_graph * grad_out).sum().backward()
    (out_eager * grad_out).sum().backward()
    for name, layer in eager_layers.items():
        for attr in ("A", "B", "values"):
            # The graph may decompose some ops (attention) differently from the eager modules.
            assert_close_scaled(getattr(graph_layers[name], attr).grad, getattr(layer, attr).grad,
                                f"{name}.{attr}.grad")
    return gm, report


# ---------------------------------------------------------------- models

class MLP(nn.Module):
    def __init__(self, d_in, d_hidden, d_out, vocab, bias):
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden, bias=bias)
        self.down = nn.Linear(d_hidden, d_out, bias=bias)
        self.lm_head = nn.Linear(d_out, vocab, bias=False)

    def forward(self, x):
        return self.lm_head(self.down(F.gelu(self.up(x))))


class Holder(nn.Module):
    """Parameters only, used functionally by the owner (``proj.weight`` / ``proj.bias``)."""

    def __init__(self, d_out, d_in):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / math.sqrt(d_in))
        self.bias = nn.Parameter(torch.randn(d_out))


class FunctionalNet(nn.Module):
    """Linear layers written with ``F.linear``: a bare holder (``proj``), two weights of one module
    (``mlp.w1``, ``mlp.w2``) and a weight next to a buffer (``scaled``: installed at ``scaled.weight``)."""

    def __init__(self, d_in, d_hidden, d_out):
        super().__init__()
        self.proj = Holder(d_hidden, d_in)
        self.mlp = nn.Module()
        self.mlp.w1 = nn.Parameter(torch.randn(d_hidden, d_hidden))
        self.mlp.w2 = nn.Parameter(torch.randn(d_out, d_hidden))
        self.scaled = nn.Module()
        self.scaled.weight = nn.Parameter(torch.randn(d_out, d_out))
        self.scaled.register_buffer("gain", torch.linspace(0.5, 1.5, d_out))

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.proj.weight, self.proj.bias))
        h = F.linear(torch.relu(F.linear(h, self.mlp.w1)), weight=self.mlp.w2)
        return F.linear(h, self.scaled.weight) * self.scaled.gain


class LinearTwin(nn.Module):
    """``FunctionalNet`` with ``nn.Linear`` modules at the same layer names (what ``transform`` sees)."""

    def __init__(self, net: FunctionalNet):
        super().__init__()
        (d_hidden, d_in), d_out = net.proj.weight.shape, net.mlp.w2.shape[0]
        self.proj = nn.Linear(d_in, d_hidden)
        self.mlp = nn.Module()
        self.mlp.w1 = nn.Linear(d_hidden, d_hidden, bias=False)
        self.mlp.w2 = nn.Linear(d_hidden, d_out, bias=False)
        self.scaled = nn.Linear(d_out, d_out, bias=False)
        self.register_buffer("gain", net.scaled.gain.clone())
        with torch.no_grad():
            for name in ("proj.weight", "proj.bias", "mlp.w1", "mlp.w2", "scaled.weight"):
                target = self.get_parameter(name) if name.startswith(("proj", "scaled")) \
                    else self.get_submodule(name).weight
                target.copy_(net.get_parameter(name))

    def forward(self, x):
        h = torch.tanh(self.proj(x))
        return self.scaled(self.mlp.w2(torch.relu(self.mlp.w1(h)))) * self.gain


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Block(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = RMSNorm(dim), RMSNorm(dim)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(att.transpose(1, 2).reshape(b, t, d))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyLlama(nn.Module):
    def __init__(self, vocab=32, dim=8, heads=2, hidden=12, layers=2, tie=False):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads, hidden) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, tokens):
        h = self.embed_tokens(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))


# ---------------------------------------------------------------- hand-built graphs

def graph_module(params: dict[str, torch.Tensor], build) -> fx.GraphModule:
    """A GraphModule over a root holding ``params`` (Parameters or buffers) at dotted paths; ``build(graph,
    x)`` adds nodes and returns the outputs."""
    root = nn.Module()
    for path, tensor in params.items():
        *parents, attr = path.split(".")
        owner = root
        for part in parents:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        if isinstance(tensor, nn.Parameter):
            owner.register_parameter(attr, tensor)
        else:
            owner.register_buffer(attr, tensor)
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(build(graph, x))
    return fx.GraphModule(root, graph)


def _p(*shape, dtype=torch.float32):
    return nn.Parameter(torch.randn(*shape, dtype=dtype))


def test_hand_built_graph_matches_and_non_matches():
    params = {"ok.weight": _p(5, 4), "ok.bias": _p(5), "lm_head.weight": _p(3, 4), "skip.weight": _p(2, 4),
              "table": torch.randn(2, 4), "twice.w": _p(4, 4), "leak.weight": _p(2, 4), "computed.weight": _p(2, 4)}
    nodes = {}

    def build(g, x):
        ok = g.call_function(aten.linear.default, (x, g.get_attr("ok.weight"), g.get_attr("ok.bias")))
        head = g.call_function(F.linear, (x, g.get_attr("lm_head.weight")))
        skip = g.call_function(F.linear, (x, g.get_attr("skip.weight")))
        table = g.call_function(F.linear, (x, g.get_attr("table")))
        w = g.get_attr("twice.w")
        twice = g.call_function(F.linear, (g.call_function(F.linear, (x, w)), w))
        leak_w = g.get_attr("leak.weight")
        nodes["sum"] = g.call_function(aten.sum.default, (leak_w,))
        leak = g.call_function(aten.add.Tensor, (g.call_function(F.linear, (x, leak_w)), nodes["sum"]))
        nodes["mul"] = g.call_function(aten.mul.Tensor, (g.get_attr("computed.weight"), 2.0))
        computed = nodes["linear"] = g.call_function(aten.linear.default, (x, nodes["mul"]))
        return (ok, head, skip, table, twice, leak, computed)

    gm = graph_module(params, build)
    x = torch.randn(3, 4)
    expected = [t.detach().clone() for t in gm(x)]
    gm, report = rewrite_linears(gm, SLConfig(rank=2, density=0.25, exclude=("skip",)))
    assert [layer.name for layer in report.replaced] == ["ok", "twice.w"]
    assert report.kept == {
        "lm_head": "output head (SLConfig.head_names)",
        "skip": "excluded by SLConfig.exclude",
        "table": "weight is a Tensor (buffer or constant), not an nn.Parameter",
        "leak": f"weight also used by node {nodes['sum'].name!r} (aten.sum.default)",
        f"node {nodes['linear'].name}":
            f"weight is computed at run time (by node {nodes['mul'].name!r}), not a constant parameter",
    }
    # The replaced dense weights are gone; the kept ones and the leaked weight still compute the same.
    names = dict(gm.named_parameters())
    assert "ok.weight" not in names and "twice.w" not in names and "ok.bias" in names
    assert isinstance(gm.ok, SLLinear) and gm.ok.bias is names["ok.bias"] and isinstance(gm.twice.w, SLLinear)
    assert sum(n.target is SL_LINEAR for n in gm.graph.nodes) == 3  # "twice.w" shared by two nodes
    out = gm(x)
    for i in (1, 2, 3, 5, 6):
        torch.testing.assert_close(out[i], expected[i])
    # "ok": rewritten with the init of transform (B = 0, so the layer is S alone plus the bias).
    w_ref = torch.zeros(5, 4, dtype=torch.float64)
    w_ref.view(-1)[gm.ok.support.long()] += gm.ok.values.detach().double()
    torch.testing.assert_close(out[0].double(), x.double() @ w_ref.T + gm.ok.bias.detach().double())


def test_mixed_dtypes_and_idempotence():
    params = {"lin64.weight": _p(3, 5, dtype=torch.float64), "lin64.bias": _p(3, dtype=torch.float64),
              "lin32.weight": _p(4, 3)}

    def build(g, x):
        h = g.call_function(aten.linear.default, (g.call_method("double", (x,)), g.get_attr("lin64.weight"),
                                                  g.get_attr("lin64.bias")))
        return g.call_function(aten.linear.default, (g.call_method("float", (h,)), g.get_attr("lin32.weight")))

    class Eager(nn.Module):
        def __init__(self, gm):
            super().__init__()
            self.lin64 = nn.Linear(5, 3, dtype=torch.float64)
            self.lin32 = nn.Linear(3, 4, bias=False)
            self.load_state_dict(gm.state_dict())

        def forward(self, x):
            # Cast to the next layer's dtype (float32 here, float64 in the dense reference copy).
            return self.lin32(self.lin64(x.double()).to(next(self.lin32.parameters()).dtype))

    gm = graph_module(params, build)
    eager = Eager(gm)
    cfg = SLConfig(rank=2, density=0.3, seed=7)
    gm, report = check_against_transform(gm, eager, cfg, (torch.randn(2, 5),))
    assert (gm.lin64.A.dtype, gm.lin32.A.dtype) == (torch.float64, torch.float32)
    code = gm.code
    again, again_report = rewrite_linears(gm, cfg)
    assert again is gm and gm.code == code and again_report.replaced == []
    assert again_report.kept == {"lin64": "already an SLLinear", "lin32": "already an SLLinear"}


def test_hand_built_mm_and_addmm_forms():
    params = {"fc.weight": _p(6, 4), "fc.bias": _p(6), "proj.weight": _p(3, 6)}

    def build(g, x):
        h = g.call_function(aten.addmm.default, (g.get_attr("fc.bias"), x,
                                                 g.call_function(aten.t.default, (g.get_attr("fc.weight"),))))
        proj_t = g.call_function(aten.transpose.int, (g.get_attr("proj.weight"), 1, 0))
        return g.call_function(aten.mm.default, (g.call_function(aten.relu.default, (h,)), proj_t))

    class Eager(nn.Module):
        def __init__(self, gm):
            super().__init__()
            self.fc, self.proj = nn.Linear(4, 6), nn.Linear(6, 3, bias=False)
            self.load_state_dict(gm.state_dict())

        def forward(self, x):
            return self.proj(torch.relu(self.fc(x)))

    gm = graph_module(params, build)
    gm, _ = check_against_transform(gm, Eager(gm), SLConfig(rank=2, density=0.2, seed=5), (torch.randn(5, 4),))
    assert {n.target for n in gm.graph.nodes if n.op == "call_function"} == {SL_LINEAR, aten.relu.default}

    def build_odd(g, x):  # a (1, out) bias and beta != 1: not the linear sl_linear computes
        wide_t = g.call_function(aten.t.default, (g.get_attr("wide.weight"),))
        wide = g.call_function(aten.addmm.default, (g.get_attr("wide.bias"), x, wide_t))
        beta_t = g.call_function(aten.t.default, (g.get_attr("beta.weight"),))
        return wide, g.call_function(aten.addmm.default, (g.get_attr("beta.bias"), x, beta_t), {"beta": 2})

    odd = graph_module({"wide.weight": _p(3, 4), "wide.bias": _p(1, 3), "beta.weight": _p(3, 4), "beta.bias": _p(3)},
                       build_odd)
    with pytest.raises(ValueError, match=r"wide: addmm bias is not an \(out,\) vector\)$"):
        rewrite_linears(odd, SLConfig(rank=1))


def test_no_eligible_node_raises():
    def build(g, x):
        return g.call_function(F.linear, (x, g.get_attr("w")))

    with pytest.raises(ValueError, match="no eligible linear node.*w: weight is a Tensor"):
        rewrite_linears(graph_module({"w": torch.randn(2, 3)}, build), SLConfig(rank=1))
    with pytest.raises(ValueError, match="no linear node at all"):
        rewrite_linears(graph_module({}, lambda g, x: g.call_function(torch.relu, (x,))), SLConfig(rank=1))
    with pytest.raises(TypeError, match="GraphModule"):
        rewrite_linears(nn.Linear(2, 2), SLConfig(rank=1))


def test_targets_are_checked_like_transform():
    model = MLP(4, 6, 5, 7, bias=True)
    with pytest.raises(ValueError, match="targets pattern 'q_proj' matches no module"):
        rewrite_linears(fx.symbolic_trace(model), SLConfig(rank=2, targets=("q_proj",)))
    with pytest.raises(ValueError, match="targets selects 'leak'.*weight also used by node"):
        def build(g, x):
            w = g.get_attr("leak.weight")
            return g.call_function(aten.add.Tensor, (g.call_function(F.linear, (x, w)),
                                                     g.call_function(aten.sum.default, (w,))))
        rewrite_linears(graph_module({"leak.weight": _p(2, 2)}, build), SLConfig(rank=1, targets=("leak",)))
    gm, report = rewrite_linears(fx.symbolic_trace(model), SLConfig(rank=2, targets=("down",)))
    assert [layer.name for layer in report.replaced] == ["down"]
    assert report.kept == {"up": "not matched by SLConfig.targets", "lm_head": "not matched by SLConfig.targets"}


def test_exported_graph_module_with_placeholder_weights_is_refused():
    ep = torch.export.export(MLP(3, 4, 2, 5, bias=False), (torch.randn(2, 3),))
    with pytest.raises(ValueError, match=r"graph input 'p_up_weight'.*ExportedProgram.module\(\)"):
        rewrite_linears(ep.graph_module, SLConfig(rank=1))


# ---------------------------------------------------------------- symbolic_trace / functional code

@st.composite
def mlp_cases(draw):
    d_in, d_hidden, d_out, vocab = (draw(dims) for _ in range(4))
    rank = draw(st.integers(1, min(d_in, d_hidden, d_out, vocab)))
    cfg = SLConfig(rank=rank, alpha=draw(st.sampled_from([1.0, 32.0])), density=draw(densities), seed=draw(seeds))
    batch = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))
    return (d_in, d_hidden, d_out, vocab), cfg, batch


@settings(deadline=None)
@given(case=mlp_cases(), bias=st.booleans())
def test_symbolic_trace_mlp(case, bias):
    (d_in, d_hidden, d_out, vocab), cfg, batch = case
    model = MLP(d_in, d_hidden, d_out, vocab, bias)
    gm, report = check_against_transform(fx.symbolic_trace(model), model, cfg, (torch.randn(*batch, d_in),),
                                         seed=cfg.seed)
    assert type(gm.lm_head) is nn.Linear and report.kept == {"lm_head": "output head (SLConfig.head_names)"}
    assert isinstance(gm.up, SLLinear) and (gm.up.bias is not None) == bias


@settings(deadline=None)
@given(case=mlp_cases())
def test_functional_linear_matches_its_nn_linear_twin(case):
    (d_in, d_hidden, d_out, _), cfg, batch = case
    net = FunctionalNet(d_in, d_hidden, d_out)
    gm, report = check_against_transform(fx.symbolic_trace(net), LinearTwin(net), cfg, (torch.randn(*batch, d_in),),
                                         seed=cfg.seed)
    # Installed at the layer name, except next to the buffer, where the weight's own slot is used.
    assert isinstance(gm.proj, SLLinear) and isinstance(gm.mlp.w1, SLLinear) and isinstance(gm.scaled.weight, SLLinear)
    assert torch.equal(gm.scaled.gain, net.scaled.gain)


def test_root_linear_and_module_called_twice():
    linear = nn.Linear(5, 4)  # traced: F.linear(x, weight, bias) on the root, the SLLinear goes to "weight"
    gm, _ = check_against_transform(fx.symbolic_trace(linear), linear, SLConfig(rank=2, density=0.5),
                                    (torch.randn(3, 5),), bias_moves=False)
    assert isinstance(gm.weight, SLLinear) and isinstance(gm.bias, nn.Parameter)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(torch.sin(self.lin(x)))

    model = Twice()
    gm, _ = check_against_transform(fx.symbolic_trace(model), model, SLConfig(rank=3), (torch.randn(2, 4),))
    assert sum(n.target is SL_LINEAR for n in gm.graph.nodes) == 2 and len(sl_layers(gm)) == 1


def test_parametrized_and_tied_weights_are_kept_like_transform():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(6, 4)
            self.para = nn.Linear(4, 4)
            parametrize.register_parametrization(self.para, "weight", nn.Identity())
            self.mid = nn.Linear(4, 4)
            self.proj = nn.Linear(4, 6, bias=False)
            self.proj.weight = self.embed.weight

        def forward(self, tokens):
            return self.proj(self.mid(self.para(self.embed(tokens))))

    model, tokens = Net(), torch.randint(0, 6, (2, 3))
    expected_kept = {"para": "module is parametrized (torch.nn.utils.parametrize)",
                     "proj": "weight tied to an embedding"}
    for gm in (fx.symbolic_trace(model), torch.export.export(model, (tokens,)).module()):
        gm, report = check_against_transform(gm, model, SLConfig(rank=2), (tokens,))
        assert report.kept == expected_kept and [layer.name for layer in report.replaced] == ["mid"]


# ---------------------------------------------------------------- torch.export

class ExportNet(nn.Module):
    def __init__(self, d_in, d_hidden, d_out, vocab):
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden)
        self.down = nn.Linear(d_hidden, d_out, bias=False)
        self.w_out = nn.Parameter(torch.randn(vocab, d_out))  # functional, root-level ("w_out")
        self.lm_head = nn.Linear(d_out, vocab)

    def forward(self, x):
        h = self.down(F.silu(self.up(x)))
        return self.lm_head(h) + F.linear(h, self.w_out)


class ExportTwin(nn.Module):
    def __init__(self, net: ExportNet):
        super().__init__()
        self.up, self.down, self.lm_head = net.up, net.down, net.lm_head
        self.w_out = nn.Linear(net.w_out.shape[1], net.w_out.shape[0], bias=False)
        self.w_out.weight = net.w_out

    def forward(self, x):
        h = self.down(F.silu(self.up(x)))
        return self.lm_head(h) + self.w_out(h)


@settings(deadline=None, max_examples=4)  # each example exports (and maybe decomposes) a model: ~0.5-2 s
@given(case=mlp_cases(), decompose=st.booleans())
def test_export_module(case, decompose):
    (d_in, d_hidden, d_out, vocab), cfg, batch = case
    net = ExportNet(d_in, d_hidden, d_out, vocab)
    x = torch.randn(*batch, d_in)
    ep = torch.export.export(net, (x,))
    if decompose:
        ep = ep.run_decompositions()
    gm = ep.module()
    forms = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert (aten.linear.default in forms) != decompose and (aten.mm.default in forms) == decompose
    gm, report = check_against_transform(gm, ExportTwin(net), cfg, (x,), seed=cfg.seed)
    assert report.kept == {"lm_head": "output head (SLConfig.head_names)"}
    assert not any(n.target in (aten.t.default, aten.permute.default) for n in gm.graph.nodes
                   if n.op == "call_function" and n.args[0].op == "get_attr" and n.args[0].target != "lm_head.weight")


# ---------------------------------------------------------------- LLaMA

@pytest.mark.parametrize("tracer, tie", [("symbolic_trace", False), ("symbolic_trace", True), ("export", True),
                                         ("export_decomposed", False)])
def test_tiny_llama(tracer, tie):
    torch.manual_seed(0)
    model = TinyLlama(tie=tie).eval()
    tokens = torch.randint(0, 32, (2, 5))
    if tracer == "symbolic_trace":
        gm = fx.symbolic_trace(model)
    else:
        ep = torch.export.export(model, (tokens,))
        gm = (ep.run_decompositions() if tracer == "export_decomposed" else ep).module()
    gm, report = check_against_transform(gm, model, SLConfig(rank=2, alpha=8.0, density=0.1, seed=3), (tokens,))
    assert len(report.replaced) == 2 * 7 and list(report.kept) == ["lm_head"]


def test_hf_llama_export():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    torch.manual_seed(0)

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = transformers.LlamaForCausalLM(config).eval()

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    model, ids = Logits(), torch.randint(0, 48, (1, 6))
    gm = torch.export.export(model, (ids,)).module()
    gm, report = check_against_transform(gm, model, SLConfig(rank=4, alpha=16.0, density=0.05, seed=11), (ids,))
    assert len(report.replaced) == 2 * 7 and report.kept == {"m.lm_head": "output head (SLConfig.head_names)"}


# ---------------------------------------------------------------- GPT-2's Conv1D: x @ W with W (in, out)

class Conv1D(nn.Module):
    """GPT-2's ``Conv1D`` (``transformers.pytorch_utils``) written here: ``y = x @ W + b``, ``W (nx, nf)``."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / math.sqrt(nx))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.nf,))


class ConvMLP(nn.Module):
    def __init__(self, d=6, hidden=10):
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(hidden, d), Conv1D(d, hidden)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


@pytest.mark.parametrize("tracer", ["symbolic_trace", "export"])
def test_conv1d_mlp(tracer):
    torch.manual_seed(0)
    model, x = ConvMLP(), torch.randn(2, 3, 6)
    gm = fx.symbolic_trace(model) if tracer == "symbolic_trace" else torch.export.export(model, (x,)).module()
    gm, report = check_against_transform(gm, model, SLConfig(rank=2, density=0.2, seed=4), (x,))
    assert [(layer.name, layer.kind) for layer in report.replaced] == [("c_fc", "Conv1D"), ("c_proj", "Conv1D")]
    assert all(layer.dense_cls is Conv1D for layer in sl_layers(gm).values())
    assert (gm.c_fc.out_features, gm.c_fc.in_features) == (10, 6)  # W^T (out, in), as transform makes it


def test_weights_read_as_x_at_w_outside_conv1d_stay_dense():
    root = nn.Module()
    root.conv, root.odd = Conv1D(5, 4), Conv1D(4, 4)  # the GraphModule keeps their weights in bare holders
    root.mix = nn.Module()
    root.mix.w = _p(4, 3)  # a functional (in, out) weight of a plain module
    root.both = nn.Module()
    root.both.weight = _p(4, 4)
    root.register_buffer("table", torch.randn(4, 2))
    graph = fx.Graph()
    x = graph.placeholder("x")
    conv = graph.call_function(aten.addmm.default, (graph.get_attr("conv.bias"), x, graph.get_attr("conv.weight")))
    odd = graph.call_function(aten.linear.default, (x, graph.get_attr("odd.weight")))
    mix = graph.call_function(aten.mm.default, (x, graph.get_attr("mix.w")))
    both_w = graph.get_attr("both.weight")
    both = graph.call_function(aten.mm.default, (graph.call_function(aten.mm.default, (x, both_w)),
                                                 graph.call_function(aten.t.default, (both_w,))))
    table = graph.call_function(aten.mm.default, (x, graph.get_attr("table")))
    graph.output((conv, odd, mix, both, table))
    for node, path in ((conv, "conv"), (odd, "odd")):  # the owner's class, as tracers record it
        node.meta["nn_module_stack"] = {path: (path, Conv1D)}
    gm = fx.GraphModule(root, graph)
    inputs = torch.randn(3, 4)
    expected = [t.detach().clone() for t in gm(inputs)]

    gm, report = rewrite_linears(gm, SLConfig(rank=2, density=0.25))
    assert [(layer.name, layer.kind, layer.has_bias) for layer in report.replaced] == [("conv", "Conv1D", True)]
    assert report.kept == {  # "table" is a buffer: no linear weight at all, not listed
        "odd": "Conv1D weight (in, out) read as x @ W.T",
        "mix.w": "weight of a module of unknown class read as x @ W: only a Conv1D weight is taken as a linear "
                 "(in, out) weight",
        "both": "weight read both as x @ W.T (nn.Linear layout) and as x @ W (Conv1D layout)",
    }
    assert isinstance(gm.conv, SLLinear) and gm.conv.dense_cls is Conv1D and gm.conv.out_features == 5
    out = gm(inputs)
    for got, want in zip(out[1:], expected[1:]):
        torch.testing.assert_close(got, want)
    w_ref = torch.zeros(5, 4, dtype=torch.float64)  # B = 0 at init: the layer is S plus the moved bias
    w_ref.view(-1)[gm.conv.support.long()] += gm.conv.values.detach().double()
    torch.testing.assert_close(out[0].double(), inputs.double() @ w_ref.T + gm.conv.bias.detach().double())


def test_hf_gpt2_export():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=48, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    torch.manual_seed(0)

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = transformers.GPT2LMHeadModel(config).eval()

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    model, ids = Logits(), torch.randint(0, 48, (1, 6))
    gm = torch.export.export(model, (ids,)).module()
    gm, report = check_against_transform(gm, model, SLConfig(rank=4, alpha=16.0, density=0.05, seed=11), (ids,))
    assert len(report.replaced) == 2 * 4 and {layer.kind for layer in report.replaced} == {"Conv1D"}
    assert report.kept == {"m.lm_head": "output head (SLConfig.head_names)"}
    assert "SL  m.transformer.h.0.attn.c_attn (Conv1D): 48x16" in str(report)
    assert sl_layers(gm)["m.transformer.h.1.mlp.c_fc"].dense_cls is transformers.pytorch_utils.Conv1D

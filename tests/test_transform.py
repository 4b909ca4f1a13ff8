"""transform / merge: selection rules, report, round trip, HF LLaMA, meta device, bad input."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import slcompile
from slcompile import SLConfig, SLLinear
from slcompile.support import layer_seed


class TinyLM(nn.Module):
    def __init__(self, vocab=50, dim=16, tie=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(dim, dim), "up_proj": nn.Linear(dim, 3 * dim),
                                                   "down_proj": nn.Linear(3 * dim, dim)}) for _ in range(2))
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + block["q_proj"](h)
            h = h + block["down_proj"](torch.relu(block["up_proj"](h)))
        return self.lm_head(h)


def _names(report):
    return [layer.name for layer in report.replaced]


def test_default_replaces_every_linear_but_the_head():
    model, report = slcompile.transform(TinyLM(), SLConfig(rank=4, alpha=1.0))
    assert _names(report) == [f"blocks.{i}.{p}" for i in range(2) for p in ("q_proj", "up_proj", "down_proj")]
    assert report.kept == {"lm_head": "output head (SLConfig.head_names)"}
    assert isinstance(model.blocks[1]["down_proj"], SLLinear) and type(model.lm_head) is nn.Linear
    assert report.params_after == sum(p.numel() for p in model.parameters())
    assert report.params_before - report.params_after == report.linear_params_before - report.linear_params_after
    assert "replaced 6 linear layer(s)" in str(report)


def test_targets_exclude_and_regex():
    _, report = slcompile.transform(TinyLM(), SLConfig(rank=2, targets=("up_proj", r"blocks\.1\.q_proj")))
    assert _names(report) == ["blocks.0.up_proj", "blocks.1.q_proj", "blocks.1.up_proj"]
    _, report = slcompile.transform(TinyLM(), SLConfig(rank=2, exclude=(r"blocks\.0\..*",)))
    assert _names(report) == [f"blocks.1.{p}" for p in ("q_proj", "up_proj", "down_proj")]
    with pytest.raises(ValueError, match="targets pattern 'v_proj' matches no module"):
        slcompile.transform(TinyLM(), SLConfig(rank=2, targets=("v_proj",)))


def test_rank_larger_than_a_layer_names_it():
    with pytest.raises(ValueError, match="rank=17 exceeds min.*'blocks.0.q_proj'"):
        slcompile.transform(TinyLM(), SLConfig(rank=17))


def test_rank_ratio_per_layer():
    _, report = slcompile.transform(TinyLM(dim=16), SLConfig(rank_ratio=0.5))
    assert {layer.rank for layer in report.replaced} == {8}


def test_support_depends_only_on_seed_name_and_shape():
    a, _ = slcompile.transform(TinyLM(), SLConfig(rank=2, seed=5))
    b, _ = slcompile.transform(TinyLM(), SLConfig(rank=2, seed=5, targets=("blocks.1.up_proj",)))
    assert torch.equal(a.blocks[1]["up_proj"].support, b.blocks[1]["up_proj"].support)
    assert a.blocks[1]["up_proj"].seed == layer_seed(5, "blocks.1.up_proj")
    assert not torch.equal(a.blocks[0]["up_proj"].support, a.blocks[1]["up_proj"].support)


def test_tied_shared_wrapped_and_mha_linears_are_kept():
    model = TinyLM(tie=True)
    model.extra = nn.Linear(16, 16)
    model.extra2 = nn.Linear(16, 16)
    model.extra2.weight = model.extra.weight
    model.attn = nn.MultiheadAttention(16, 2)
    model.param = nn.Linear(16, 16)
    parametrize.register_parametrization(model.param, "weight", nn.Identity())
    _, report = slcompile.transform(model, SLConfig(rank=2, head_names=("nothing",)))
    assert report.kept["lm_head"] == "weight tied to an embedding"
    # kept means untouched: still the embedding's tensor, so a step on one moves the other
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.embed.weight
    model(torch.tensor([[1, 2]])).sum().backward()
    assert model.embed.weight.grad[[1, 2]].abs().sum() > 0 and model.embed.weight.grad[3:].abs().sum() > 0
    assert report.kept["extra"] == report.kept["extra2"] == "weight shared with another module"
    assert "MultiheadAttention" in report.kept["attn.out_proj"]
    assert "parametrized" in report.kept["param"]
    x = torch.randn(3, 1, 16)
    model.attn(x, x, x)  # still works
    with pytest.raises(ValueError, match="selects 'extra'.*cannot be replaced: weight shared"):
        slcompile.transform(model, SLConfig(rank=2, targets=("extra",)))
    model.lazy = nn.LazyLinear(16)
    _, report = slcompile.transform(model, SLConfig(rank=2))
    assert "lazy module not initialized" in report.kept["lazy"]
    with pytest.raises(ValueError, match="selects 'lazy'.*cannot be replaced: lazy module"):
        slcompile.transform(model, SLConfig(rank=2, targets=("lazy",)))


def test_a_head_is_kept_by_default_and_replaced_when_targeted():
    _, report = slcompile.transform(TinyLM(), SLConfig(rank=2))
    assert report.kept["lm_head"] == "output head (SLConfig.head_names)"
    model, report = slcompile.transform(TinyLM(), SLConfig(rank=2, targets=("lm_head",)))
    assert [r.name for r in report.replaced] == ["lm_head"]


def test_idempotent_and_no_eligible_layer():
    model, _ = slcompile.transform(TinyLM(), SLConfig(rank=2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model2, report = slcompile.transform(model, SLConfig(rank=3, seed=9))
    assert model2 is model and report.replaced == []
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    head_only = nn.Module()
    head_only.lm_head = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="no eligible nn.Linear.*lm_head: output head"):
        slcompile.transform(head_only, SLConfig(rank=2))
    with pytest.raises(ValueError, match="no nn.Linear at all"):
        slcompile.transform(nn.Sequential(nn.ReLU()), SLConfig(rank=2))
    with pytest.raises(TypeError, match="SLConfig"):
        slcompile.transform(TinyLM(), {"rank": 2})


def test_root_linear_is_replaced_and_merged():
    layer, report = slcompile.transform(nn.Linear(8, 6), SLConfig(rank=2))
    assert isinstance(layer, SLLinear) and _names(report) == [""]
    merged = slcompile.merge(layer)
    assert type(merged) is nn.Linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_merge_round_trip_gives_the_same_outputs(dtype):
    torch.manual_seed(0)
    model, _ = slcompile.transform(TinyLM().to(dtype), SLConfig(rank=4, alpha=8.0, density=0.1))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SLLinear):
                m.B.normal_()
    tokens = torch.randint(0, 50, (2, 7))
    expected = model(tokens)
    merged = slcompile.merge(model)
    assert not any(isinstance(m, SLLinear) for m in merged.modules())
    assert merged.blocks[0]["q_proj"].weight.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(merged(tokens), expected, atol=tol, rtol=tol)


def test_meta_device_transform_allocates_nothing():
    with torch.device("meta"):
        model = TinyLM(vocab=32000, dim=1024)
    model, report = slcompile.transform(model, SLConfig(rank=64))
    assert all(p.device.type == "meta" for p in model.parameters())
    assert len(report.replaced) == 6
    model.to_empty(device="cpu")
    assert slcompile.reset_sl_parameters(model) == 6
    fresh, _ = slcompile.transform(TinyLM(vocab=32000, dim=1024), SLConfig(rank=64))
    assert torch.equal(model.blocks[0]["q_proj"].support, fresh.blocks[0]["q_proj"].support)
    assert torch.count_nonzero(model.blocks[0]["q_proj"].B) == 0


def _hf_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def test_hf_llama_transforms_exactly_the_seven_projections():
    model, report = slcompile.transform(_hf_llama(), SLConfig(rank=4, alpha=1.0, density=0.05))
    expected = [f"model.layers.{i}.{p}" for i in range(2) for p in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert _names(report) == expected and list(report.kept) == ["lm_head"]
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    tokens = torch.randint(0, 96, (2, 9))
    out = model(input_ids=tokens, labels=tokens)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.model.layers[0].mlp.down_proj.values.grad is not None
    generated = model.generate(tokens[:, :3], attention_mask=torch.ones(2, 3, dtype=torch.long),
                               max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 7)


@pytest.mark.compile
def test_compiled_fullgraph_equals_eager():
    torch.manual_seed(0)
    model, _ = slcompile.transform(TinyLM(), SLConfig(rank=4, alpha=8.0, density=0.1))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SLLinear):
                m.B.normal_(0, 0.1)
    tokens = torch.randint(0, 50, (2, 7))
    eager_loss = model(tokens).logsumexp(-1).mean()
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    loss = compiled(tokens).logsumexp(-1).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


class Conv1D(nn.Module):
    """GPT-2's Conv1D as transformers writes it: ``y = x @ W + b`` with ``W (in, nf)``."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


class MoE(nn.Module):
    """A router, fused 3-D experts ``(E, out, in)`` and a dense shared expert."""

    def __init__(self, dim=16, experts=4):
        super().__init__()
        self.gate = nn.Linear(dim, experts, bias=False)
        self.experts = nn.Module()
        self.experts.up = nn.Parameter(torch.randn(experts, 2 * dim, dim) * 0.1)
        self.shared = nn.Linear(dim, dim)

    def forward(self, h):
        weights = self.gate(h).softmax(-1)
        per_expert = torch.einsum("...d,eod->...eo", h, self.experts.up)[..., :h.shape[-1]]
        return self.shared(h) + (weights[..., None] * per_expert).sum(-2)


def test_conv1d_is_replaced_and_merged_back_to_conv1d():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(24, 8), nn.GELU(), Conv1D(8, 24))
    model, report = slcompile.transform(model, SLConfig(rank=4, alpha=4.0, density=0.2))
    assert [(r.name, r.in_features, r.out_features, r.has_bias, r.kind) for r in report.replaced] == \
        [("0", 8, 24, True, "Conv1D"), ("2", 24, 8, True, "Conv1D")]
    assert "SL  0 (Conv1D): 24x8 -> rank 4" in str(report)
    assert isinstance(model[0], SLLinear) and model[0].dense_cls is Conv1D
    with torch.no_grad():
        model[0].B.normal_()
    x = torch.randn(2, 5, 8)
    expected, dense = model(x), model[0].dense_weight().detach()
    merged = slcompile.merge(model)
    assert type(merged[0]) is Conv1D and torch.equal(merged[0].weight, dense.T)
    torch.testing.assert_close(merged(x), expected)


def test_output_embeddings_routers_and_fused_experts_are_accounted_for():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = MoE()
            self.attn = nn.MultiheadAttention(16, 2)
            self.to_vocab = nn.Linear(16, 50)

        def get_output_embeddings(self):
            return self.to_vocab

    model, report = slcompile.transform(Model(), SLConfig(rank=2))
    assert [r.name for r in report.replaced] == ["block.shared"]
    assert report.kept["to_vocab"] == "output head (get_output_embeddings())"
    assert report.kept["block.gate"].startswith("MoE router")
    assert report.kept["block.experts.up"].startswith("fused MoE expert weights (4, 32, 16)")
    assert "MultiheadAttention" in report.kept["attn.in_proj_weight"]
    model, report = slcompile.transform(Model(), SLConfig(rank=2, targets=("to_vocab", "gate")))
    assert [r.name for r in report.replaced] == ["block.gate", "to_vocab"]
    with pytest.raises(ValueError, match="selects 'block.experts.up'.*fused MoE expert weights"):
        slcompile.transform(Model(), SLConfig(rank=2, targets=("experts.up",)))

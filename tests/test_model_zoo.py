"""Model zoo: tiny Hugging Face models (random weights, built from configs, nothing downloaded) through
``transform``: the report accounts for every projection weight, forward/backward, a few training
steps, a state_dict round trip into a freshly transformed model, and ``merge`` (same outputs)."""
import pytest
import torch
from torch import nn

import slcompile
from slcompile import SLConfig, SLLinear

transformers = pytest.importorskip("transformers", reason="the model zoo needs transformers")

VOCAB, DIM, FFN, LAYERS, HEADS = 64, 32, 48, 2, 4
LM = dict(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=LAYERS,
          num_attention_heads=HEADS, max_position_embeddings=64)
GPT2 = dict(vocab_size=VOCAB, n_embd=DIM, n_layer=LAYERS, n_head=HEADS, n_positions=64)


def _tokens(generator, labels="tokens"):
    ids = torch.randint(0, VOCAB, (2, 8), generator=generator)
    target = ids if labels == "tokens" else torch.randint(0, 3, (2,), generator=generator)
    return {"input_ids": ids, "labels": target}


def _image(generator):
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=generator),
            "labels": torch.randint(0, 3, (2,), generator=generator)}


# name: (build the model, the batch it trains on, replaced layers, kept names)
ZOO = {
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **LM)),
              _tokens, 14, {"lm_head"}),
    "mistral": (lambda: transformers.MistralForCausalLM(transformers.MistralConfig(num_key_value_heads=2, **LM)),
                _tokens, 14, {"lm_head"}),
    "qwen2": (lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, **LM)),
              _tokens, 14, {"lm_head"}),
    "gemma": (lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(num_key_value_heads=2, head_dim=8, **LM)),
              _tokens, 14, {"lm_head"}),
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)), _tokens, 8, {"lm_head"}),
    "gpt2_cls": (lambda: transformers.GPT2ForSequenceClassification(
        transformers.GPT2Config(num_labels=3, pad_token_id=0, **GPT2)),
        lambda g: _tokens(g, "classes"), 8, {"score"}),
    "gpt_neox": (lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**LM)), _tokens, 8, {"lm_head"}),
    "opt": (lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=DIM, ffn_dim=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        max_position_embeddings=64, word_embed_proj_dim=DIM)), _tokens, 12, {"lm_head"}),
    "bert_cls": (lambda: transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=3, **LM)),
                 lambda g: _tokens(g, "classes"), 13, {"classifier"}),
    "t5": (lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=DIM, d_kv=8, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS,
        decoder_start_token_id=0, pad_token_id=0)),
        _tokens, 32, {"lm_head"}),
    "mixtral": (lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **LM)), _tokens, 8,
        {"lm_head"} | {f"model.layers.{i}.mlp.{p}" for i in range(LAYERS)
                       for p in ("gate", "experts.gate_up_proj", "experts.down_proj")}),
    "vit_cls": (lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        image_size=16, patch_size=4, num_labels=3)), _image, 12, {"classifier"}),
}
CFG = SLConfig(rank_ratio=0.25, alpha=8.0, density=0.05, seed=3)


def _projection_weights(model: nn.Module) -> list[tuple[str, str]]:
    """``(owner module, parameter path)`` of each 2-D or 3-D parameter with no size-1 dimension outside
    embeddings and convolutions (a ViT's class token and position table are ``(1, ...)``)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.Conv2d)):
            continue
        for attr, param in module.named_parameters(recurse=False):
            if param.dim() in (2, 3) and min(param.shape) > 1:
                found.append((name, f"{name}.{attr}"))
    return found


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return ZOO[name][0]()


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_transforms_trains_reloads_and_merges(name):
    _, batch_for, replaced, kept = ZOO[name]
    model = _build(name)
    weights = _projection_weights(model)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    model, report = slcompile.transform(model, CFG)

    # Accounting: every projection weight is replaced or kept with a reason; the heads stay dense.
    names = {layer.name for layer in report.replaced}
    assert len(names) == replaced and set(report.kept) == kept, str(report)
    assert {layer.kind for layer in report.replaced} == {"Conv1D" if name.startswith("gpt2") else "nn.Linear"}
    for owner, path in weights:
        assert owner in names or owner in report.kept or path in report.kept, f"{path} not in the report"
    assert all(isinstance(model.get_submodule(n), SLLinear) for n in names)
    assert all(report.kept.values())
    assert report.params_after == sum(p.numel() for p in model.parameters()) < report.params_before

    # Forward/backward and a few training steps.
    generator = torch.Generator().manual_seed(1)
    batch = batch_for(generator)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        assert all(model.get_submodule(n).values.grad is not None for n in names)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits

    # state_dict round trip into a freshly built and transformed model.
    fresh, _ = slcompile.transform(_build(name), CFG)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, expected, rtol=0, atol=0)

    # merge: the dense modules of the original kinds, same outputs.
    merged = slcompile.merge(model)
    assert {n: type(m).__name__ for n, m in merged.named_modules()} == kinds
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_targets_and_a_targeted_head():
    model, report = slcompile.transform(_build("gpt2_cls"), SLConfig(rank=2, targets=("c_attn", "score")))
    assert [layer.name for layer in report.replaced] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn",
                                                          "score"]
    conv = model.transformer.h[0].attn.c_attn
    assert (conv.in_features, conv.out_features) == (DIM, 3 * DIM)
    assert report.kept["transformer.h.0.mlp.c_fc"] == "not matched by SLConfig.targets"


@pytest.mark.compile
@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_zoo_model_compiles_with_the_backend(name):
    """GPT-2's replaced Conv1D layers and T5, whose forward reads ``self.wo.weight.dtype``."""
    model, _ = slcompile.transform(_build(name), CFG)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, SLLinear):
                layer.B.normal_(0, 0.1)
    batch = ZOO[name][1](torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        torch.testing.assert_close(torch.compile(model, backend="slcompile")(**batch).logits, expected)

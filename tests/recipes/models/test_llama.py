"""The compact LLaMA: shapes, init loss, causality, meta build, checkpointing, HF equivalence."""
import math

import pytest
import torch

from slcompile.model_configs import get_config
from slcompile.recipes.models.llama import Llama, RMSNorm, count_params

TINY = get_config("llama-tiny")


@pytest.fixture
def model() -> Llama:
    torch.manual_seed(0)
    return Llama(TINY)


def random_tokens(batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.vocab_size, (batch, seq), generator=gen)


def test_forward_shapes_and_init_loss(model):
    tokens = random_tokens()
    logits = model(tokens)
    assert logits.shape == (2, 16, TINY.vocab_size) and logits.dtype == torch.float32
    loss = model(tokens, random_tokens(seed=2))
    assert loss.shape == () and torch.isfinite(loss)
    # Near-uniform predictions at init: logits have std ~0.02 * sqrt(dim) = 0.16.
    assert abs(loss.item() - math.log(TINY.vocab_size)) < 0.1


def test_backward_reaches_every_parameter(model):
    model(random_tokens(), random_tokens(seed=2)).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_causal(model):
    tokens = random_tokens()
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % TINY.vocab_size
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10], rtol=0, atol=0)
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_rejects_too_long_sequence(model):
    with pytest.raises(ValueError, match="max_seq_len"):
        model(random_tokens(seq=TINY.max_seq_len + 1))


def test_hf_style_module_names(model):
    names = dict(model.named_modules())
    for suffix in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert isinstance(names[f"layers.1.{suffix}"], torch.nn.Linear)
        assert names[f"layers.1.{suffix}"].bias is None
    assert {"embed_tokens", "norm", "lm_head", "layers.0.input_layernorm",
            "layers.0.post_attention_layernorm"} <= names.keys()
    # RoPE tables are derived from the config, not checkpointed.
    assert not any("rope" in key for key in model.state_dict())


def test_meta_build_of_7b_allocates_nothing_and_counts_params():
    with torch.device("meta"):
        model = Llama(get_config("llama-7b"))
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert round(count_params(model) / 1e6, 2) == 6738.42  # the paper's LLaMA-7B count
    assert count_params(Llama.from_name("llama-60m", device="meta")) == pytest.approx(58.07e6, abs=5e3)


def test_to_empty_then_init_weights_matches_a_direct_build():
    model = Llama.from_name("llama-tiny", device="meta")
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    direct = Llama(TINY)
    # Same RNG stream -> same parameters; RoPE tables (garbage after to_empty) recomputed.
    torch.manual_seed(0)
    direct.init_weights()
    for (name, a), b in zip(model.state_dict().items(), direct.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(model.rope.cos, direct.rope.cos, rtol=0, atol=0)
    weight = model.layers[0].mlp.up_proj.weight
    assert abs(weight.std().item() - 0.02) < 0.002 and abs(weight.mean().item()) < 0.002
    assert torch.equal(model.norm.weight, torch.ones(TINY.dim))


def test_init_weights_leaves_other_modules_alone(model):
    class OwnInitLinear(torch.nn.Linear):
        """Stands in for a layer that replaced a linear and has its own init."""

    replacement = OwnInitLinear(TINY.dim, TINY.dim, bias=False)
    torch.nn.init.constant_(replacement.weight, 3.0)
    model.layers[0].self_attn.q_proj = replacement
    model.init_weights()
    assert torch.all(replacement.weight == 3.0)
    assert type(model.norm) is RMSNorm and torch.all(model.norm.weight == 1.0)


def test_checkpoint_activations_gives_identical_loss_and_grads():
    torch.manual_seed(0)
    plain = Llama(TINY)
    checkpointed = Llama(TINY, checkpoint_activations=True)
    checkpointed.load_state_dict(plain.state_dict())
    tokens, targets = random_tokens(), random_tokens(seed=2)
    losses, saved = [], []
    for m in (plain, checkpointed):
        saved.append(0)

        def count(t: torch.Tensor) -> torch.Tensor:
            saved[-1] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            loss = m(tokens, targets)
        loss.backward()
        losses.append(loss)
    assert saved[1] < saved[0] / 2  # the layers' internals are recomputed, not kept
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)


def test_matches_transformers_llama(model, monkeypatch):
    monkeypatch.setenv("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # transformers may import torchao
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=TINY.vocab_size, hidden_size=TINY.dim, intermediate_size=TINY.intermediate_size,
        num_hidden_layers=TINY.n_layers, num_attention_heads=TINY.n_heads,
        num_key_value_heads=TINY.n_heads, max_position_embeddings=TINY.max_seq_len,
        rms_norm_eps=TINY.norm_eps, rope_theta=TINY.rope_theta, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    state = {(k if k.startswith("lm_head") else f"model.{k}"): v for k, v in model.state_dict().items()}
    hf.load_state_dict(state)
    tokens = random_tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-5)

"""A compact LLaMA decoder (RMSNorm, RoPE, causal SDPA attention, SwiGLU MLP, untied head).

Module names follow Hugging Face's ``LlamaModel`` (``layers.0.self_attn.q_proj``, ...) so that
name-based targeting (SLTrain's q/k/v/o and gate/up/down) and weight loading work the same way;
with the same weights the outputs equal ``transformers.LlamaForCausalLM``'s.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from slcompile.model_configs import LlamaConfig, get_config

INIT_STD = 0.02  # normal init of linears and embeddings (HF LLaMA's initializer_range)


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim; statistics in float32, output in ``x.dtype``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., dim)`` in any float dtype -> same shape and dtype."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Precomputed RoPE tables ``cos``/``sin`` of shape ``(max_seq_len, head_dim)``.

    Non-persistent buffers: they are a pure function of the config, so they stay out of
    checkpoints and are recomputed by :meth:`reset_buffers` after ``to_empty``.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Fill ``cos``/``sin`` (computed in float32, stored in the buffers' dtype and device)."""
        device = self.cos.device
        inv_freq = self.theta ** -(torch.arange(0, self.head_dim, 2, device=device).float()
                                   / self.head_dim)
        angles = torch.outer(torch.arange(self.max_seq_len, device=device).float(), inv_freq)
        # Frequencies repeated over both halves: the "rotate half" layout HF LLaMA checkpoints use.
        angles = torch.cat([angles, angles], dim=-1)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(batch, heads, seq, head_dim)`` by ``cos``/``sin`` ``(seq, head_dim)``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


class Attention(nn.Module):
    """Multi-head causal self-attention with RoPE on queries and keys."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x``: ``(batch, seq, dim)``; ``cos``/``sin``: ``(seq, head_dim)`` -> ``(batch, seq, dim)``."""
        batch, seq, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)

        q = apply_rope(heads(self.q_proj(x)), cos, sin)
        k = apply_rope(heads(self.k_proj(x)), cos, sin)
        out = F.scaled_dot_product_attention(q, k, heads(self.v_proj(x)), is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., dim)`` -> ``(..., dim)``."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention then MLP."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``(batch, seq, dim)`` -> ``(batch, seq, dim)``."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """LLaMA language model. Build large configs on the meta device, then ``to_empty`` +
    :meth:`init_weights`.

    ``checkpoint_activations`` recomputes each decoder layer in backward (non-reentrant
    ``torch.utils.checkpoint``), keeping only layer inputs alive.
    """

    def __init__(self, cfg: LlamaConfig, checkpoint_activations: bool = False):
        super().__init__()
        self.cfg = cfg
        self.checkpoint_activations = checkpoint_activations
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.init_weights()

    @classmethod
    def from_name(cls, name: str, device: torch.device | str | None = None, **kwargs) -> Llama:
        """Build a named config (see ``slcompile.model_configs.CONFIGS``) on ``device``
        (``"meta"`` allocates nothing); ``kwargs`` go to the constructor."""
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return cls(get_config(name), **kwargs)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, 0.02) for linears and embeddings, ones for norms, fresh RoPE tables.

        Exact type checks, not isinstance: modules that replaced the linears (SLTrain layers,
        subclasses with their own init) keep their weights.
        """
        self.rope.reset_buffers()
        for module in self.modules():
            if type(module) in (nn.Linear, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            elif type(module) is RMSNorm:
                nn.init.ones_(module.weight)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens``: int64 ``(batch, seq)`` with ``seq <= cfg.max_seq_len``.

        Returns logits ``(batch, seq, vocab)`` in the model's dtype, or, given ``targets`` (int64
        ``(batch, seq)``, ``-100`` ignored), the mean cross-entropy as a float32 scalar.
        """
        seq = tokens.shape[1]
        if seq > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope.cos[:seq], self.rope.sin[:seq]
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            if self.checkpoint_activations and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        # float32 softmax: bf16 log-probabilities over 32k classes lose the small ones.
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters once); works on the meta device."""
    return sum(p.numel() for p in model.parameters())

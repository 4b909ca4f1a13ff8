"""LLaMA shape configurations: the paper's (60M to 7B, with its rank, alpha and density) plus tiny CPU ones."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a LLaMA decoder (untied head, SwiGLU MLP, RMSNorm, RoPE).

    ``rank``/``alpha``/``density`` are the SLTrain settings the paper uses at this size.
    """

    vocab_size: int = 32000
    dim: int = 512
    intermediate_size: int = 1376
    n_heads: int = 8
    n_layers: int = 8
    max_seq_len: int = 256
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rank: int = 128
    alpha: float = 32.0
    density: float = 0.03

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def linear_shapes(self) -> list[tuple[str, int, int]]:
        """The seven replaceable linears of one decoder layer as ``(name, in, out)``."""
        d, f = self.dim, self.intermediate_size
        return [("q_proj", d, d), ("k_proj", d, d), ("v_proj", d, d), ("o_proj", d, d),
                ("gate_proj", d, f), ("up_proj", d, f), ("down_proj", f, d)]


CONFIGS: dict[str, LlamaConfig] = {
    # CPU-sized configs for tests and the demo; rank/alpha keep the paper's alpha/r = 0.25 at 60M.
    "llama-tiny": LlamaConfig(vocab_size=512, dim=64, intermediate_size=172, n_heads=4, n_layers=2,
                              max_seq_len=64, rank=16, alpha=4.0),
    "llama-mini": LlamaConfig(vocab_size=4096, dim=128, intermediate_size=344, n_heads=4, n_layers=4,
                              max_seq_len=128, rank=32, alpha=8.0),
    # The long CPU quality run: small enough for >= 10 training tokens per parameter in an hour.
    "llama-micro": LlamaConfig(vocab_size=1024, dim=96, intermediate_size=256, n_heads=4, n_layers=4,
                               max_seq_len=128, rank=24, alpha=6.0),
    "llama-60m": LlamaConfig(dim=512, intermediate_size=1376, n_heads=8, n_layers=8, rank=128, alpha=32.0),
    "llama-130m": LlamaConfig(dim=768, intermediate_size=2048, n_heads=12, n_layers=12, rank=256, alpha=16.0),
    "llama-350m": LlamaConfig(dim=1024, intermediate_size=2736, n_heads=16, n_layers=24, rank=256, alpha=16.0),
    "llama-1b": LlamaConfig(dim=2048, intermediate_size=5461, n_heads=32, n_layers=24, rank=512, alpha=8.0),
    "llama-7b": LlamaConfig(dim=4096, intermediate_size=11008, n_heads=32, n_layers=32, rank=1024, alpha=8.0,
                            density=0.05),
}


def get_config(name: str) -> LlamaConfig:
    """Look up a named config; raises ``ValueError`` listing the known names."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(CONFIGS)}") from None

"""Train a HF ``transformers`` LLaMA in the same harness as our own (no download: config only)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def load_hf_llama_config(path: str | Path, vocab_size: int):
    """A ``transformers.LlamaConfig`` from a JSON file, with the tokenizer's ``vocab_size``."""
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("--hf-config needs `pip install transformers`") from exc
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the LlamaConfig JSON {path}: {exc}") from exc
    return transformers.LlamaConfig(**{**values, "vocab_size": vocab_size})


class HFCausalLM(nn.Module):
    """``LlamaForCausalLM`` behind our models' interface: ``forward(tokens, targets=None)``.

    ``targets`` are already shifted (``targets[:, i]`` follows ``tokens[:, i]``), so the loss is
    computed here, not by HF's ``labels`` (which would shift again).
    """

    def __init__(self, config) -> None:
        super().__init__()
        import transformers
        self.model = transformers.LlamaForCausalLM(config)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.model(input_ids=tokens).logits
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

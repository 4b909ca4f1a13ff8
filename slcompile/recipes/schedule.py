"""The paper's learning-rate schedule: linear warmup, then cosine decay to ``min_ratio * lr``."""
from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """LR multiplier for update ``step`` (0-based) of ``total``.

    ``(step + 1) / warmup`` during warmup (so the first update already moves), then a cosine from
    1 at ``step = warmup`` down to ``min_ratio`` at ``step = total - 1``.
    """
    if not 0 <= warmup <= total or total < 1:
        raise ValueError(f"need 0 <= warmup ({warmup}) <= total ({total}) and total >= 1")
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                    min_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`warmup_cosine`; step it exactly once per optimizer update."""
    warmup_cosine(0, warmup, total, min_ratio)  # validate now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total, min_ratio))

"""The paper's learning-rate schedule: linear warmup, then cosine decay to ``min_ratio * lr``;
optionally with a quick recovery after each restart (weight refactorization or momentum reset)."""
from __future__ import annotations

import math
from typing import Sequence

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


RECOVERY_START = 1e-3  # fraction of the target LR the first update after a restart takes


def last_restart(step: int, restart_every: Sequence[int]) -> int:
    """The latest restart at or before update ``step`` (0-based): the largest positive multiple of
    any of ``restart_every`` that is ``<= step``, or 0 (none). A restart ``R`` happens after ``R``
    updates, so update ``R`` is the first with the reset state."""
    return max([step // every * every for every in restart_every], default=0)


def quick_recovery(step: int, warmup: int, total: int, min_ratio: float = 0.1,
                   restart_every: Sequence[int] = (), recovery_steps: int = 0) -> float:
    """:func:`warmup_cosine` with "quick recovery" after restarts (arXiv 2505.22922).

    In the ``recovery_steps`` updates ``R, ..., R + recovery_steps - 1`` after a restart ``R``
    (:func:`last_restart`) the multiplier ramps linearly from ``RECOVERY_START`` to 1 times the
    normal schedule's value at ``R + recovery_steps``, where it rejoins the normal schedule: a
    fresh optimizer state must not take full-size steps before its moments fill up again.
    Outside those windows (and with no restarts or ``recovery_steps = 0``) it is :func:`warmup_cosine`.
    """
    if recovery_steps < 0 or any(every < 1 for every in restart_every):
        raise ValueError(f"need recovery_steps >= 0 ({recovery_steps}) and restart intervals >= 1 ({restart_every})")
    restart = last_restart(step, restart_every)
    if restart == 0 or step >= restart + recovery_steps:
        return warmup_cosine(step, warmup, total, min_ratio)
    target = warmup_cosine(min(restart + recovery_steps, total - 1), warmup, total, min_ratio)
    return target * (RECOVERY_START + (1 - RECOVERY_START) * (step - restart) / recovery_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float = 0.1,
                    restart_every: Sequence[int] = (), recovery_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`quick_recovery` (plain :func:`warmup_cosine` without restarts);
    step it exactly once per optimizer update. It has no state beyond the step count, so a
    resumed run gets the same LRs."""
    restart_every = tuple(restart_every)
    quick_recovery(0, warmup, total, min_ratio, restart_every, recovery_steps)  # validate now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: quick_recovery(step, warmup, total, min_ratio, restart_every, recovery_steps))

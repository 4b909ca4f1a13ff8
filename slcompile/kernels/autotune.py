"""A per-shape choice among interchangeable implementations, timed once on the GPU.

The CUDA implementations of the custom ops (:mod:`slcompile.kernels`) call :func:`pick` with
their candidates: the Triton kernel in each launch configuration of :mod:`.configs`, plus an
ATen composition (cuBLAS ``mm`` with ``index_add`` / ``index_select``) where one exists, so a
tuned call is never slower than the best of them. The first call for a key (op, shapes,
strides, dtypes, ``tl.dot`` precision) runs every candidate under ``triton.testing.do_bench``
and remembers the fastest; every later call reads the cache (no timing, no sync).

Why not ``triton.autotune``: a configuration changes the host's work as well as the launch (the
tile index is built per ``block_n``), and the ATen candidate is no Triton kernel.

No timing, the first candidate (the default) instead: off CUDA, under ``TRITON_INTERPRET=1``,
during CUDA-graph capture (timing would be captured) unless the key is already tuned, and when
``SLCOMPILE_AUTOTUNE=0``. Candidates must be idempotent (each writes its whole result).
"""
from __future__ import annotations

import math
import os
from typing import Callable, Hashable, Mapping

import torch

__all__ = ["clear", "enabled", "pick", "tuned"]

_cache: dict[Hashable, str] = {}


def enabled(device: torch.device) -> bool:
    """Whether calls on ``device`` are tuned (module doc)."""
    return (device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1"
            and os.environ.get("SLCOMPILE_AUTOTUNE", "1") != "0")


def _time(candidate: Callable[[], object]) -> float:
    from triton.runtime.errors import OutOfResources
    from triton.testing import do_bench

    try:
        return do_bench(candidate, warmup=5, rep=25)
    except OutOfResources:  # e.g. a tile whose shared memory this GPU does not have
        return math.inf


def pick(key: Hashable, candidates: Mapping[str, Callable[[], object]], device: torch.device) -> str:
    """The label of the candidate to run for ``key``: the fastest, timed on the first call (module doc)."""
    first = next(iter(candidates))
    if not enabled(device):
        return first
    if key not in _cache:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return first
        times = {label: _time(run) for label, run in candidates.items()}
        _cache[key] = min(times, key=times.get)
    return _cache[key]


def tuned() -> dict[Hashable, str]:
    """A copy of the cache: key -> label of the chosen candidate."""
    return dict(_cache)


def clear() -> None:
    """Forget every choice (the next call per key times again)."""
    _cache.clear()

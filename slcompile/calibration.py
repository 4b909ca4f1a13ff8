"""Cost-model rates measured on the machine at hand: what ``path="auto"`` decides with on CPU.

CPUs differ most in what the path choice turns on, the sparse products against the GEMMs, so a
preset fitted on one machine misplaces the crossover on another. :func:`calibrate` times each rate
of :class:`~slcompile.cost_model.DeviceSpec` with the implementation that runs it, at
``in = out = 512``, ``r = 128``, density 0.03, 512 tokens:

- ``dense_flops``: ``torch.mm``; ``form_flops``: ``slcompile::materialize``; ``bandwidth``: a
  32 MiB ``copy_``;
- ``spmm_*`` and ``sddmm_*``: :data:`slcompile.ops_factored.TORCH_SPARSE`'s products at two
  shapes (``1024 x 1024`` and ``128 x 128``: ~31 and ~4 nonzeros per row), solved for a rate and a
  cost per dense element touched (the model's form);
- ``launch_s``: one eager factored fwd+bwd at a tiny shape over the number of kernels the model
  counts for it.

Medians of a few calls timed round-robin after warm-up, at the process's torch thread count.
:mod:`slcompile.path_policy` decides when to calibrate.
"""
from __future__ import annotations

import functools
import statistics
import time
from dataclasses import replace
from typing import Callable

import torch

from slcompile import cost_model, ops
from slcompile.eager import EagerFactored
from slcompile.ops_factored import TORCH_SPARSE, sparse_index
from slcompile.support import generate_support, nnz_for

__all__ = ["calibrate"]

_TOKENS, _WIDTH, _RANK, _DENSITY = 512, 512, 128, 0.03
_SPARSE_WIDTHS = (1024, 128)  # the sparse products' two shapes: ~31 and ~4 nonzeros per row
_MIN_SECONDS = 1e-7  # floor of a kernel's time less launch (a rate stays finite)


def _median_seconds(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each of ``fns``, timed round-robin (one call of each per round,
    ``warmup`` rounds untimed): a clock ramping up or a noisy neighbour hits them all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _tiny_factored_step(gen: torch.Generator) -> Callable[[], None]:
    """One fwd+bwd of the eager factored path at ``8 x 8``, rank 2, one token: all fixed cost."""
    x, A, B, values = (torch.randn(*shape, generator=gen).requires_grad_()
                       for shape in ((1, 8), (2, 8), (8, 2), (6,)))
    support = generate_support(8, 8, 6, 0)

    def step():
        EagerFactored.apply(x, A, B, values, support, 1.0, None).sum().backward()

    return step


def _sparse_cost(seconds: tuple[float, float], flops: tuple[float, float], elems: tuple[float, float]
                 ) -> tuple[float, float]:
    """``(FLOP/s, seconds per element)`` solving ``t = flops / rate + elems * elem_s`` at two shapes
    (the first the large one); ``elem_s`` clamped to >= 0, the rate kept finite."""
    (t1, t2), (f1, f2), (e1, e2) = seconds, flops, elems
    det = f1 * e2 - f2 * e1
    inv_rate, elem_s = (t1 * e2 - t2 * e1) / det, (f1 * t2 - f2 * t1) / det
    if elem_s < 0 or inv_rate <= 0:
        inv_rate, elem_s = max(t1, _MIN_SECONDS) / f1, 0.0
    return 1.0 / inv_rate, elem_s


def calibrate(repeats: int = 5) -> cost_model.DeviceSpec:
    """A :class:`~slcompile.cost_model.DeviceSpec` named ``"cpu-calibrated"`` measured on this CPU
    in fp32, with ``margin`` 1 (its rates are this machine's, so the cheaper estimate is taken as
    it is). Draws from its own generator: the global RNG is untouched. Needs grad mode (it times
    one backward)."""
    if repeats < 1:
        raise ValueError(f"calibrate needs repeats >= 1, got {repeats!r}")
    gen = torch.Generator().manual_seed(0)
    n, d, rank = _TOKENS, _WIDTH, _RANK
    x, grad_y, weight, A, B = (torch.randn(*s, generator=gen) for s in ((n, d), (n, d), (d, d), (rank, d), (d, rank)))
    support = generate_support(d, d, nnz_for(d, d, _DENSITY), 0)
    values = torch.randn(support.numel(), generator=gen)
    sparse = {}  # width -> (index, support, values, x, grad_y)
    for width in _SPARSE_WIDTHS:
        sup = generate_support(width, width, nnz_for(width, width, _DENSITY), 0)
        sparse[width] = (sparse_index(sup, width, width), sup, torch.randn(sup.numel(), generator=gen),
                         torch.randn(n, width, generator=gen), torch.randn(n, width, generator=gen))
    src = torch.randn(2**23, generator=gen)  # 32 MiB: with dst, beyond a 32 MiB L3
    dst = torch.empty_like(src)
    # Timed on its own: round-robin after the 32 MiB copy it would pay for a cold cache every call.
    launch = _median_seconds({"launch": _tiny_factored_step(gen)}, 4 * repeats)["launch"]
    launch /= len(cost_model.path_kernels("factored", "train"))
    fns = {"dense": lambda: torch.mm(x, weight.t()),
           "form": lambda: ops.materialize(A, B, values, support, 0.5), "copy": lambda: dst.copy_(src)}
    for width, (index, sup, vals, xs, gs) in sparse.items():
        fns[f"spmm{width}"] = functools.partial(TORCH_SPARSE.s_x, index, vals, xs)
        fns[f"sddmm{width}"] = functools.partial(TORCH_SPARSE.sampled, index, sup, gs, xs, vals.dtype)
    seconds = _median_seconds(fns, repeats)

    def rate(flops: float, unit: str) -> float:
        return flops / max(seconds[unit] - launch, _MIN_SECONDS)

    def sparse_cost(unit: str) -> tuple[float, float]:
        widths = _SPARSE_WIDTHS
        return _sparse_cost(tuple(max(seconds[f"{unit}{w}"] - launch, _MIN_SECONDS) for w in widths),
                            tuple(2.0 * n * sparse[w][2].numel() for w in widths), tuple(2.0 * n * w for w in widths))

    (spmm_flops, spmm_elem_s), (sddmm_flops, sddmm_elem_s) = sparse_cost("spmm"), sparse_cost("sddmm")
    return replace(cost_model.DEVICES["cpu"], name="cpu-calibrated", margin=1.0,
                   dense_flops=rate(2 * n * d * d, "dense"), form_flops=rate(2 * d * rank * d + values.numel(), "form"),
                   spmm_flops=spmm_flops, spmm_elem_s=spmm_elem_s, sddmm_flops=sddmm_flops, sddmm_elem_s=sddmm_elem_s,
                   bandwidth=2 * src.nbytes / seconds["copy"], launch_s=launch)

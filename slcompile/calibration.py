"""Cost-model rates measured on the machine at hand: what ``path="auto"`` decides with on CPU.

The ``cpu`` preset of :mod:`slcompile.cost_model` holds rates fitted on one machine, and CPUs
differ most in what the path choice turns on, the sparse products against the GEMMs: fits on
this project's shared 2-core runners gave GEMM 56-88 GFLOP/s and MKL SpMM 4.5-13 GFLOP/s, so the
preset put the factored/materialize crossover of a 512 x 512 layer at 1024 tokens on one runner
while on another factored was faster up to 4096 (``benchmarks/paths_bench.py``).
:func:`calibrate` measures each rate the model uses with the implementation that runs it, at
``in = out = 512``, ``r = 128``, density 0.03, 512 tokens (the sparse products at
``1024 x 1024`` and ``128 x 128``), in about 0.2-0.4 s:

- ``dense_flops``: ``torch.mm`` ``(N, in) @ (in, out)``;
- ``form_flops``: ``slcompile::materialize`` (``B @ A``, scale, ``index_add`` of the values);
- ``spmm_flops`` and ``spmm_elem_s``, ``sddmm_flops`` and ``sddmm_elem_s``:
  :data:`slcompile.ops_factored.TORCH_SPARSE`'s ``S x`` and sampled ``dY^T x`` (MKL CSR, token
  blocks, transposes and casts included) at both shapes: two times, two unknowns per product
  (FLOPs at a rate plus a cost per dense element touched, the model's form; 31 and 3.8 nonzeros
  per row tell them apart). A negative element cost is clamped to 0 and the rate taken from the
  large shape alone;
- ``launch_s``: one forward + backward of the factored path at a tiny shape as eager
  ``SLLinear`` runs it on CPU (:class:`slcompile.eager.EagerFactored`), divided by the number of
  kernels the model counts for it (Python, autograd, index cache lookup), timed in a loop of its own;
- ``bandwidth``: a 32 MiB ``copy_`` (bytes read + written).

Each is the median of a few timed calls, timed round-robin after two warm-up rounds, with
the process's torch thread count; a kernel's rate is its FLOPs over its time less ``launch_s``. :func:`runtime_device` is the
spec ``SLLinear(path="auto")`` and :class:`~slcompile.passes.ChoosePathPass` use for tensors of a
device type: on CPU, :func:`calibrate`'s, measured once per process on first use; elsewhere the
preset of :func:`slcompile.cost_model.device_for` (the CUDA rates are not measured here).
``SLCOMPILE_CALIBRATE=0`` keeps the ``cpu`` preset, for a path choice that does not depend on
timings (both paths compute the same function; they differ in rounding, ~1e-6 relative in fp32).
"""
from __future__ import annotations

import functools
import os
import statistics
import time
from dataclasses import replace
from typing import Callable

import torch
from torch.utils._python_dispatch import _disable_current_modes

from slcompile import cost_model

__all__ = ["calibrate", "runtime_device"]

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
    from slcompile.eager import EagerFactored
    from slcompile.support import generate_support

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
    """A :class:`~slcompile.cost_model.DeviceSpec` named ``"cpu-calibrated"`` measured on this
    CPU (see the module doc), in fp32, with ``margin`` 1: its rates are this machine's, so the
    cheaper estimate is taken as it is (on the runner it was measured on, margin 1 picked the faster
    path at every shape and token count of ``benchmarks/paths_bench.py``, 0.8 lost up to 14%).
    Draws from its own generator: the global RNG is untouched. Needs grad mode (it times one
    backward)."""
    from slcompile import ops
    from slcompile.ops_factored import TORCH_SPARSE, sparse_index
    from slcompile.support import generate_support, nnz_for

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
    # The fixed cost is timed on its own: round-robin after the 32 MiB copy it would pay for a
    # cold cache every call (3-4x what it costs between a model's layers).
    launch = _median_seconds({"launch": _tiny_factored_step(gen)}, 4 * repeats)["launch"]
    launch /= len(cost_model.kernels("factored", "train"))
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


@functools.cache
def runtime_device(device_type: str) -> cost_model.DeviceSpec:
    """The spec the path choice uses for tensors on ``device_type`` (memoized per process):
    ``"cpu"``: :func:`calibrate` (``SLCOMPILE_CALIBRATE=0``: the ``cpu`` preset); else
    :func:`slcompile.cost_model.device_for` (``ValueError`` for a type without a preset)."""
    if device_type == "cpu" and os.environ.get("SLCOMPILE_CALIBRATE", "1") != "0":
        # Whatever mode the first call came in: fp32, grad mode, no autocast, no inference mode,
        # and outside any dispatch mode (fake tensors, FLOP counters must not see or time it).
        with (_disable_current_modes(), torch.inference_mode(False), torch.enable_grad(),
              torch.autocast("cpu", enabled=False)):
            return calibrate()
    return cost_model.device_for(device_type)

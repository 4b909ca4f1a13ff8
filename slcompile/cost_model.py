"""Cost model of the two ways to run an SLTrain linear: pure arithmetic, no tensors.

``N`` tokens, ``W (out, in) = scale * B @ A + S``, ``A (r, in)``, ``nnz`` nonzeros in ``S``:

- ``"materialize"`` (:mod:`slcompile.ops`): form ``W`` (``2 r in out`` FLOPs whatever ``N``), one
  dense GEMM; backward forms ``W`` again and takes ``dA``/``dB``/``dvalues`` from the dense ``dW``.
- ``"factored"`` (:mod:`slcompile.ops_factored`): ``(x A^T) B^T`` plus an SpMM ``S x``; backward
  ``dY B A``, ``dY S``, ``dB`` from a recomputed ``x A^T``, ``dvalues`` as an SDDMM.
- ``"dense"``: ``nn.Linear``, the yardstick (``6 N in out`` FLOPs in training).

:func:`path_kernels` lists each path's kernels with FLOPs and bytes as sympy expressions in
``N, in, out, r, nnz``, ``bpe`` (bytes per element) and ``ib`` (bytes per support index).
:func:`path_time` is a roofline per kernel, ``max(flops / rate, bytes / bandwidth) + elems *
elem_s + launch``, summed; :func:`choose_path` takes factored only below ``margin`` times
materialize. :data:`DEVICES` holds preset rates (assumptions; ``docs/cost_model.md`` says where
each comes from). Which spec an eager call uses is :mod:`slcompile.path_policy`'s business.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Callable, Literal, Sequence

import sympy

from slcompile.support import nnz_for

__all__ = ["DEFAULT_MARGIN", "DEVICES", "DeviceSpec", "Kernel", "PATHS", "choose_path", "crossover_tokens",
           "device_for", "flop_crossover", "flop_ratio", "flops", "kernel_times", "layer_costs", "moved_bytes",
           "path_kernels", "path_time"]

Path = Literal["materialize", "factored", "dense"]
Mode = Literal["train", "forward"]
PATHS = ("materialize", "factored")

# BPE: bytes per element of the compute dtype (not the factor B); IB: bytes per support index.
N, IN, OUT, R, NNZ, BPE, IB = sympy.symbols("N in out r nnz bpe ib", positive=True)
_SYMBOLS = (N, IN, OUT, R, NNZ, BPE, IB)


@dataclass(frozen=True)
class Kernel:
    """One kernel of a path: FLOPs and bytes moved as sympy expressions; ``unit`` picks the rate:
    ``"dense"`` (GEMM), ``"form"`` (forming ``W``: a GEMM over ``K = r``), ``"spmm"``, ``"sddmm"``
    or ``"memory"`` (no arithmetic to speak of)."""

    name: str
    flops: sympy.Expr
    bytes: sympy.Expr
    unit: str
    elems: sympy.Expr = sympy.Integer(0)


def _gemm(name: str, m, k, n) -> Kernel:
    """``(m, k) @ (k, n)``: ``2 m k n`` FLOPs, both operands read and the result written once."""
    return Kernel(name, 2 * m * k * n, BPE * (m * k + k * n + m * n), "dense")


def _form_w(name: str) -> Kernel:
    """``W = scale * B @ A + S`` in one kernel (the sparse values added in the epilogue)."""
    return Kernel(name, 2 * OUT * R * IN + NNZ, BPE * (R * IN + OUT * R + OUT * IN) + NNZ * (BPE + IB), "form")


def _spmm(name: str, rows, cols) -> Kernel:
    """``S (rows, cols) @ X (cols, N)`` over the support: values and indices, ``X`` and the output."""
    return Kernel(name, 2 * N * NNZ, NNZ * (BPE + IB) + BPE * N * (cols + rows), "spmm", N * (cols + rows))


@functools.cache
def path_kernels(path: Path, mode: Mode = "train", recompute_xa: bool = True,
            gather_in_gemm: bool = False) -> tuple[Kernel, ...]:
    """The kernels ``path`` runs, in order. ``recompute_xa``: the factored backward recomputes
    ``x A^T`` (as :mod:`slcompile.ops_factored` does). ``gather_in_gemm``: ``dvalues`` come out
    of a ``dY^T x`` GEMM's epilogue: no gather pass over ``dW`` in the materialize path, and the
    factored path's SDDMM becomes that GEMM at dense rate, storing nothing ``(out, in)``."""
    if path == "dense":
        fwd = [_gemm("y = x W^T", N, IN, OUT)]
        bwd = [_gemm("dx = dY W", N, OUT, IN), _gemm("dW = dY^T x", OUT, N, IN)]
    elif path == "materialize":
        fwd = [_form_w("form W"), _gemm("y = x W^T", N, IN, OUT)]
        grad_w = _gemm("dW = dY^T x", OUT, N, IN)
        if gather_in_gemm:
            gather = [Kernel("dW = dY^T x, dvalues in its epilogue", grad_w.flops, grad_w.bytes + NNZ * (BPE + IB),
                             "dense")]
        else:
            gather = [grad_w, Kernel("dvalues = dW[support]", sympy.Integer(0), NNZ * (2 * BPE + IB), "memory")]
        bwd = [_form_w("form W again"), _gemm("dx = dY W", N, OUT, IN), *gather,
               _gemm("dB = dW A^T", OUT, IN, R), _gemm("dA = B^T dW", R, OUT, IN)]
    elif path == "factored":
        fwd = [_gemm("xa = x A^T", N, IN, R), _gemm("y = xa B^T", N, R, OUT), _spmm("y += S x", OUT, IN)]
        bwd = [_gemm("gb = dY B", N, OUT, R), _gemm("dx = gb A", N, R, IN), _spmm("dx += dY S", IN, OUT),
               *([_gemm("xa = x A^T again", N, IN, R)] if recompute_xa else []),
               _gemm("dB = dY^T xa", OUT, N, R), _gemm("dA = gb^T x", R, N, IN),
               Kernel("dvalues = (dY^T x)[support]", 2 * N * (IN * OUT if gather_in_gemm else NNZ),
                      NNZ * (BPE + IB) + BPE * N * (IN + OUT), "dense" if gather_in_gemm else "sddmm",
                      sympy.Integer(0) if gather_in_gemm else N * (IN + OUT))]
    else:
        raise ValueError(f"unknown path {path!r}: expected one of {(*PATHS, 'dense')}")
    if mode not in ("train", "forward"):
        raise ValueError(f"unknown mode {mode!r}: expected 'train' or 'forward'")
    return tuple(fwd + (bwd if mode == "train" else []))


def flops(path: Path, mode: Mode = "train", recompute_xa: bool = True, gather_in_gemm: bool = False) -> sympy.Expr:
    """Total FLOPs of ``path`` (sympy, in ``N, in, out, r, nnz``)."""
    return sympy.expand(sum(k.flops for k in path_kernels(path, mode, recompute_xa, gather_in_gemm)))


def moved_bytes(path: Path, mode: Mode = "train", recompute_xa: bool = True) -> sympy.Expr:
    """Total bytes moved by ``path`` (sympy, also in ``b`` and ``ib``)."""
    return sympy.expand(sum(k.bytes for k in path_kernels(path, mode, recompute_xa)))


def flop_ratio(path: Path, mode: Mode = "train", recompute_xa: bool = True) -> sympy.Expr:
    """FLOPs of ``path`` over dense's, with ``nnz = density * in * out`` (sympy; ``density`` a symbol)."""
    density = sympy.Symbol("density", positive=True)
    ratio = flops(path, mode, recompute_xa) / flops("dense", mode)
    return sympy.simplify(ratio.subs(NNZ, density * IN * OUT))


def flop_crossover(mode: Mode = "train", recompute_xa: bool = True) -> sympy.Expr:
    """The token count at which both paths need the same FLOPs (sympy in ``in, out, r, nnz``);
    below it the factored path needs fewer. Not positive: factored always needs fewer."""
    (solution,) = sympy.solve(sympy.Eq(flops("materialize", mode), flops("factored", mode, recompute_xa)), N)
    return sympy.simplify(solution)


# The presets' margin: their rates are assumptions, so factored only where it promises a 20% saving.
DEFAULT_MARGIN = 0.8


@dataclass(frozen=True)
class DeviceSpec:
    """Rates of one device: achieved FLOP/s of a GEMM (``dense_flops``), of forming ``W``
    (``form_flops``), of the sparse products over a random support (``spmm_flops``,
    ``sddmm_flops``); ``bandwidth`` in bytes/s; ``launch_s`` per kernel; ``gather_in_gemm``:
    ``dvalues`` come out of a GEMM epilogue (see :func:`path_kernels`); ``margin``: how much
    cheaper factored must look before the default choice takes it (:data:`DEFAULT_MARGIN` for
    assumed rates, 1 for rates measured where they are used); ``spmm_elem_s`` /
    ``sddmm_elem_s``: seconds per dense element a sparse product touches beyond its FLOPs."""

    name: str
    dense_flops: float
    form_flops: float
    spmm_flops: float
    sddmm_flops: float
    bandwidth: float
    launch_s: float
    gather_in_gemm: bool = False
    margin: float = DEFAULT_MARGIN
    spmm_elem_s: float = 0.0
    sddmm_elem_s: float = 0.0

    def elem_s(self, unit: str) -> float:
        return {"spmm": self.spmm_elem_s, "sddmm": self.sddmm_elem_s}.get(unit, 0.0)

    def rate(self, unit: str) -> float:
        return {"dense": self.dense_flops, "form": self.form_flops, "spmm": self.spmm_flops, "sddmm": self.sddmm_flops,
                "memory": math.inf}[unit]


# GPU presets: 70% of the H200's dense bf16 peak for GEMMs and of its FP32 CUDA-core peak for the
# sparse products (a random support does not map onto tensor cores); see docs/cost_model.md.
_H200 = DeviceSpec("h200", dense_flops=690e12, form_flops=465e12, spmm_flops=47e12, sddmm_flops=47e12, bandwidth=4.8e12,
                   launch_s=5e-6)
DEVICES: dict[str, DeviceSpec] = {
    "h200": _H200,
    "h200-cusparse": replace(_H200, name="h200-cusparse", spmm_flops=3.6e12, sddmm_flops=0.5e12),
    "h200-triton": replace(_H200, name="h200-triton", spmm_flops=10e12, gather_in_gemm=True),
    # A stand-in for "a CPU" (one core of a shared CI runner); path="auto" measures instead.
    "cpu": DeviceSpec("cpu", dense_flops=56e9, form_flops=63e9, spmm_flops=4.5e9, sddmm_flops=4.5e9, bandwidth=2.7e9,
                      launch_s=70e-6),
}


def device_for(device: str | DeviceSpec) -> DeviceSpec:
    """A :class:`DeviceSpec` from itself or a preset name in :data:`DEVICES` (a torch device type
    such as ``"cuda"`` is resolved by :func:`slcompile.path_policy.runtime_device`)."""
    if isinstance(device, DeviceSpec):
        return device
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}: expected a DeviceSpec or one of {sorted(DEVICES)}")
    return DEVICES[device]


@functools.cache
def _numeric(path: Path, mode: Mode, recompute_xa: bool, gather_in_gemm: bool
             ) -> tuple[tuple[str, ...], tuple[str, ...], Callable, Callable, Callable]:
    """``(names, units, flops_fn, bytes_fn, elems_fn)``: per-kernel lists as fast functions of the symbols."""
    ks = path_kernels(path, mode, recompute_xa, gather_in_gemm)
    return (tuple(k.name for k in ks), tuple(k.unit for k in ks),
            *(sympy.lambdify(_SYMBOLS, [getattr(k, field) for k in ks], "math") for field in ("flops", "bytes", "elems")))


def kernel_times(path: Path, tokens: int, in_features: int, out_features: int, rank: int, nnz: int,
                 device: str | DeviceSpec = "h200", mode: Mode = "train", dtype_bytes: int = 2,
                 index_bytes: int = 4, recompute_xa: bool = True) -> dict[str, float]:
    """Seconds of each kernel of ``path`` (roofline plus launch), by kernel name."""
    spec = device_for(device)
    names, units, flops_fn, bytes_fn, elems_fn = _numeric(path, mode, recompute_xa, spec.gather_in_gemm)
    values = (tokens, in_features, out_features, rank, nnz, dtype_bytes, index_bytes)
    return {name: max(f / spec.rate(unit), b / spec.bandwidth) + e * spec.elem_s(unit) + spec.launch_s
            for name, unit, f, b, e in zip(names, units, flops_fn(*values), bytes_fn(*values), elems_fn(*values))}


def path_time(path: Path, tokens: int, in_features: int, out_features: int, rank: int, nnz: int,
              device: str | DeviceSpec = "h200", mode: Mode = "train", dtype_bytes: int = 2,
              index_bytes: int = 4, recompute_xa: bool = True) -> float:
    """Estimated seconds of ``path`` for one call of one linear (see the module doc)."""
    return sum(kernel_times(path, tokens, in_features, out_features, rank, nnz, device, mode, dtype_bytes,
                            index_bytes, recompute_xa).values())


def choose_path(tokens: int, in_features: int, out_features: int, rank: int, nnz: int,
                device: str | DeviceSpec = "h200", mode: Mode = "train", dtype_bytes: int = 2,
                margin: float = 1.0) -> Literal["materialize", "factored"]:
    """``"factored"`` if its :func:`path_time` is below ``margin`` times materialize's, else
    ``"materialize"`` (the default path: a tie, or a saving smaller than the model's error
    when ``margin < 1``, keeps it)."""
    args = (tokens, in_features, out_features, rank, nnz, device, mode, dtype_bytes)
    return "factored" if path_time("factored", *args) < margin * path_time("materialize", *args) else "materialize"


def crossover_tokens(in_features: int, out_features: int, rank: int, nnz: int, device: str | DeviceSpec = "h200",
                     mode: Mode = "train", dtype_bytes: int = 2, max_tokens: int = 2**24,
                     margin: float = 1.0) -> int | None:
    """Smallest token count ``N >= 1`` from which :func:`choose_path` says materialize, found by
    bisection (which assumes one crossing: both estimates are increasing, piecewise affine in
    ``N``, and materialize has the larger fixed cost); ``None`` if factored stays cheaper up to
    ``max_tokens``."""
    def pick(n: int) -> str:
        return choose_path(n, in_features, out_features, rank, nnz, device, mode, dtype_bytes, margin)

    if pick(max_tokens) == "factored":
        return None
    lo, hi = 0, max_tokens  # pick(hi) == "materialize"; pick(lo) taken as "factored"
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if pick(mid) == "materialize" else (mid, hi)
    return hi


def layer_costs(shapes: Sequence[tuple[int, int]], rank: int, density: float, tokens: int,
                device: str | DeviceSpec = "h200", mode: Mode = "train", dtype_bytes: int = 2) -> dict:
    """Estimated seconds of a set of linears ``(in, out)`` (e.g. one decoder layer's seven) per
    path, the best per-linear choice, and each as a multiple of dense; nnz = ``int(density * in * out)``."""
    totals = dict.fromkeys(("dense", *PATHS, "chosen"), 0.0)
    picks = []
    for in_f, out_f in shapes:
        nnz = nnz_for(in_f, out_f, density)
        times = {p: path_time(p, tokens, in_f, out_f, rank, nnz, device, mode, dtype_bytes)
                 for p in ("dense", *PATHS)}
        pick = choose_path(tokens, in_f, out_f, rank, nnz, device, mode, dtype_bytes)
        picks.append(pick)
        for key, value in times.items():
            totals[key] += value
        totals["chosen"] += times[pick]
    return {"seconds": totals, "vs_dense": {k: v / totals["dense"] for k, v in totals.items()}, "picks": picks}

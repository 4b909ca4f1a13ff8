"""Cost model of the two ways to run an SLTrain linear, and the choice between them.

Paths (``N`` tokens, ``W (out, in) = scale * B @ A + S``, ``A (r, in)``, ``nnz`` nonzeros in ``S``):

- ``"materialize"`` (``slcompile::sl_linear``, :mod:`slcompile.ops`): form ``W`` (``2 r in out``
  FLOPs whatever ``N``), one dense GEMM; in training ``W`` is formed again in backward and
  ``dA``/``dB`` come from the dense ``dW``.
- ``"factored"`` (``slcompile::sl_linear_factored``, :mod:`slcompile.ops_factored`): never form
  ``W``: ``(x A^T) B^T`` plus a sparse product ``S x`` (SpMM), in backward ``dY B A``, ``dY S``
  (SpMM), ``dB`` from a recomputed ``x A^T``, ``dvalues`` as an SDDMM over the support.
- ``"dense"``: ``nn.Linear``, the yardstick every ratio divides by (``6 N in out`` FLOPs in training).

:func:`kernels` lists each path's kernels with FLOPs and bytes moved as sympy expressions in
``N``, ``in``, ``out``, ``r``, ``nnz``, ``b`` (bytes per element of the compute dtype) and
``ib`` (bytes per support index, 4). ``mode="train"`` is forward + backward (all gradients),
``mode="forward"`` the forward alone (inference, decoding). FLOP totals, training, as a
multiple of dense ``6 N in out``::

    materialize  1 + 4 r / (3 N)                                (DESIGN.md section 4)
    factored     r (4 in / 3 + out) / (in out) + density         (x A^T recomputed in backward;
                 r (in + out) / (in out) + density if it were saved: DESIGN.md's floor)

Time (:func:`path_time`): a roofline per kernel, ``max(flops / rate, bytes / bandwidth) +
elems * elem_s + launch``, summed over the path's kernels, where ``rate`` is the device's rate
for the kernel's ``unit`` (GEMM, forming ``W``, SpMM, SDDMM). Kernels are assumed not to overlap
and caches not to help (bytes are compulsory traffic: each operand read once, each result
written once; a random gather counts its element, not its cache line). ``elems`` (sparse
products only) counts the dense elements a sparse product reads and writes, ``N (rows + cols)``,
and ``elem_s`` is a device's cost per such element beyond the FLOPs: row loops, the CPU path's
token-block copies and transposes. It is what makes a sparse product with few nonzeros per row
slow (on CPU, MKL's SpMM ran at 4.6 GFLOP/s at ``128 x 128``, 3.8 nonzeros per row, against 12
at ``512 x 512``); it is measured on CPU (:mod:`slcompile.calibration`) and 0 in the presets.

Devices (:data:`DEVICES`; every number is an assumption, stated with its source):

- ``"h200"``: the path as it could be with our own sparse kernels. GEMMs at 690 TFLOP/s bf16
  (70% of the 989 TFLOP/s dense peak: what REFERENCE.md section 6's dense GEMMs reach,
  0.68-0.72), forming ``W`` at 465 TFLOP/s (section 6's "form W" at r = 1024: 465-470), SpMM and
  SDDMM at 47 TFLOP/s (70% of the H200's 67 TFLOP/s CUDA-core FP32 peak:
  a random support does not map onto tensor cores; DESIGN.md's "CUDA-core speed", optimistic
  for a kernel not written yet), 4.8 TB/s HBM3e, 5 us per kernel.
- ``"h200-cusparse"``: what the factored op runs on CUDA today (torch CSR -> cuSPARSE): the
  same but SpMM at 3.6 TFLOP/s and SDDMM at 0.5 TFLOP/s (fitted to REFERENCE.md section 6:
  SpMM 3.6-3.7 TFLOP/s at every shape, sampled dS 0.22-0.86 TFLOP/s).
- ``"h200-triton"``: what the ops run on CUDA with slcompile's Triton kernels registered
  (:mod:`slcompile.kernels`; none has run on a GPU yet, so every rate is still an assumption):
  the ``h200`` rates, ``dvalues`` from the ``dW`` GEMM's epilogue (``gather_in_gemm``: no gather
  pass in the materialize path; in the factored path a dense-rate GEMM that stores nothing), and
  SpMM at 10 TFLOP/s: the lockstep kernel reads one 128-byte line (64 bf16 tokens) of ``x`` per
  nonzero and token block, ~2 bytes per FMA from L2, and ~10 TB/s of L2 bandwidth bounds it there.
- ``"cpu"``: one core of this project's 2-core CI machine (AMD EPYC, AVX-512, MKL, fp32),
  fitted by ``benchmarks/paths_bench.py`` to eager times of both paths (60m/130m shapes, 1-4096
  tokens): GEMM 56 GFLOP/s, forming ``W`` 63, MKL CSR SpMM/SDDMM 4.5 (blocks of 256 tokens),
  2.7 GB/s copies, 70 us per kernel (dispatch of the several torch calls behind each). Other
  runs on the shared machine fitted 56-88 / 61-83 / 4.5-9.3 GFLOP/s and 47-150 us: the preset is
  a stand-in for "a CPU". What ``SLLinear(path="auto")`` uses on CPU instead is
  :func:`slcompile.calibration.calibrate`'s ``"cpu-calibrated"`` spec, measured on the machine
  it runs on (see :func:`choose_path_for_call`).

:func:`choose_path` picks the cheaper path (``margin < 1``: factored only if that much cheaper);
:func:`crossover_tokens` is the smallest token count from which materialize is chosen
(``None`` when factored stays cheaper up to 2**24 tokens).

What it predicts for one decoder layer (7 linears, bf16, paper rank/density), fwd+bwd, as a
multiple of dense ``nn.Linear`` (``benchmarks/paths_bench.py`` prints the full table)::

    preset         shape  tokens:  1            16           2048         16384
    h200           350M   mat/fac  2.84/2.97    2.83/2.97    1.67/1.67    1.12/1.03
    h200           1B              4.27/2.29    4.25/2.29    1.55/1.15    1.07/0.93
    h200           7B              9.87/1.41    9.83/1.41    1.86/1.25    1.11/1.20
    h200-cusparse  7B              9.87/1.48    9.83/3.60    1.86/29.1    1.11/29.8
    h200-triton    7B              9.76/1.41    9.72/1.52    1.84/3.10    1.11/3.09

(materialize at 1B/7B, 2k/8k/16k tokens: 1.55/1.15/1.08 and 1.86/1.22/1.11, against
REFERENCE.md section 5's measured reference 1.45/1.15/1.03 and 1.77/1.22/1.11; at 350M the
measured 2.35-1.80 is launch and memory bound beyond this model.) With library sparse kernels
(``h200-cusparse``) the factored path wins only below ~40-60 tokens in training at 1B/7B (per
shape; ~70-170 in forward); with a CUDA-core SpMM/SDDMM at 70% of FP32 peak (``h200``) it
would win at every paper token count at 1B (1.15/0.97/0.93x dense at 2k/8k/16k) and up to
5k-16k tokens at 7B (1.25/1.20/1.20x dense); with our Triton kernels as modelled
(``h200-triton``: SpMM bound by L2 gathers) only below ~20-40 tokens. What bounds the factored
path: its two SpMMs (``4 N nnz`` FLOPs in training) cannot use tensor cores on a random
support, so they cost ``density * tensor rate / CUDA-core rate`` of a dense GEMM each (0.05 *
989 / 67 = 0.74 at 7B even at FP32 peak): beating dense needs a support with tile structure,
which is a different method.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Callable, Literal, Sequence

import sympy

__all__ = ["DEFAULT_MARGIN", "DEVICES", "DeviceSpec", "Kernel", "PATHS", "choose_path", "choose_path_for_call",
           "crossover_tokens", "device_for",
           "flop_crossover", "flop_ratio", "flops", "kernel_times", "kernels", "layer_costs", "moved_bytes",
           "path_time"]

Path = Literal["materialize", "factored", "dense"]
Mode = Literal["train", "forward"]
PATHS = ("materialize", "factored")

N, IN, OUT, R, NNZ, B, IB = sympy.symbols("N in out r nnz b ib", positive=True)
_SYMBOLS = (N, IN, OUT, R, NNZ, B, IB)


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
    return Kernel(name, 2 * m * k * n, B * (m * k + k * n + m * n), "dense")


def _form_w(name: str) -> Kernel:
    """``W = scale * B @ A + S`` in one kernel (the sparse values added in the epilogue)."""
    return Kernel(name, 2 * OUT * R * IN + NNZ, B * (R * IN + OUT * R + OUT * IN) + NNZ * (B + IB), "form")


def _spmm(name: str, rows, cols) -> Kernel:
    """``S (rows, cols) @ X (cols, N)`` over the support: values and indices, ``X`` and the output."""
    return Kernel(name, 2 * N * NNZ, NNZ * (B + IB) + B * N * (cols + rows), "spmm", N * (cols + rows))


@functools.cache
def kernels(path: Path, mode: Mode = "train", recompute_xa: bool = True,
            gather_in_gemm: bool = False) -> tuple[Kernel, ...]:
    """The kernels ``path`` runs, in order. ``recompute_xa``: the factored backward recomputes
    ``x A^T`` (what :mod:`slcompile.ops_factored` does) rather than reading a saved one.
    ``gather_in_gemm``: ``dvalues`` come out of a ``dY^T x`` GEMM's epilogue
    (:mod:`slcompile.kernels.grad_weight`): the materialize path has no gather pass over ``dW``,
    and the factored path's SDDMM is that GEMM at dense rate, ``2 N in out`` FLOPs, storing
    nothing ``(out, in)``."""
    if path == "dense":
        fwd = [_gemm("y = x W^T", N, IN, OUT)]
        bwd = [_gemm("dx = dY W", N, OUT, IN), _gemm("dW = dY^T x", OUT, N, IN)]
    elif path == "materialize":
        fwd = [_form_w("form W"), _gemm("y = x W^T", N, IN, OUT)]
        grad_w = _gemm("dW = dY^T x", OUT, N, IN)
        if gather_in_gemm:
            gather = [Kernel("dW = dY^T x, dvalues in its epilogue", grad_w.flops, grad_w.bytes + NNZ * (B + IB),
                             "dense")]
        else:
            gather = [grad_w, Kernel("dvalues = dW[support]", sympy.Integer(0), NNZ * (2 * B + IB), "memory")]
        bwd = [_form_w("form W again"), _gemm("dx = dY W", N, OUT, IN), *gather,
               _gemm("dB = dW A^T", OUT, IN, R), _gemm("dA = B^T dW", R, OUT, IN)]
    elif path == "factored":
        fwd = [_gemm("xa = x A^T", N, IN, R), _gemm("y = xa B^T", N, R, OUT), _spmm("y += S x", OUT, IN)]
        bwd = [_gemm("gb = dY B", N, OUT, R), _gemm("dx = gb A", N, R, IN), _spmm("dx += dY S", IN, OUT),
               *([_gemm("xa = x A^T again", N, IN, R)] if recompute_xa else []),
               _gemm("dB = dY^T xa", OUT, N, R), _gemm("dA = gb^T x", R, N, IN),
               Kernel("dvalues = (dY^T x)[support]", 2 * N * (IN * OUT if gather_in_gemm else NNZ),
                      NNZ * (B + IB) + B * N * (IN + OUT), "dense" if gather_in_gemm else "sddmm",
                      sympy.Integer(0) if gather_in_gemm else N * (IN + OUT))]
    else:
        raise ValueError(f"unknown path {path!r}: expected one of {(*PATHS, 'dense')}")
    if mode not in ("train", "forward"):
        raise ValueError(f"unknown mode {mode!r}: expected 'train' or 'forward'")
    return tuple(fwd + (bwd if mode == "train" else []))


def flops(path: Path, mode: Mode = "train", recompute_xa: bool = True, gather_in_gemm: bool = False) -> sympy.Expr:
    """Total FLOPs of ``path`` (sympy, in ``N, in, out, r, nnz``)."""
    return sympy.expand(sum(k.flops for k in kernels(path, mode, recompute_xa, gather_in_gemm)))


def moved_bytes(path: Path, mode: Mode = "train", recompute_xa: bool = True) -> sympy.Expr:
    """Total bytes moved by ``path`` (sympy, also in ``b`` and ``ib``)."""
    return sympy.expand(sum(k.bytes for k in kernels(path, mode, recompute_xa)))


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


# Factored only where the model promises a 20% saving: on CPU its estimate of factored/materialize
# ran 0.1-0.2 low near the crossover (benchmarks/paths_bench.py); materialize is the path tuned
# and measured for training, so an uncertain call goes its way (the presets' margin).
DEFAULT_MARGIN = 0.8


@dataclass(frozen=True)
class DeviceSpec:
    """Rates of one device (see the module doc for where each default comes from).

    ``dense_flops``: achieved FLOP/s of a large GEMM in the compute dtype; ``form_flops``: of
    forming ``W = scale * B @ A + S`` (a GEMM with ``K = r``, often slower); ``spmm_flops`` /
    ``sddmm_flops``: achieved FLOP/s of the sparse products over a random support;
    ``bandwidth``: bytes/s; ``launch_s``: fixed cost per kernel (launch, dispatch);
    ``gather_in_gemm``: ``dvalues`` come out of a GEMM epilogue (see :func:`kernels`);
    ``margin``: how much cheaper factored must look on this spec before the default choice
    (:func:`choose_path_for_call`, :class:`~slcompile.passes.ChoosePathPass`) takes it:
    :data:`DEFAULT_MARGIN` for the presets (assumed rates, or another machine's fit), 1 for rates
    measured where they are used (:func:`slcompile.calibration.calibrate`);
    ``spmm_elem_s`` / ``sddmm_elem_s``: seconds per dense element a sparse product reads or
    writes, beyond its FLOPs (see the module doc; 0 where not measured)."""

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


_H200 = DeviceSpec("h200", dense_flops=690e12, form_flops=465e12, spmm_flops=47e12, sddmm_flops=47e12, bandwidth=4.8e12,
                   launch_s=5e-6)
DEVICES: dict[str, DeviceSpec] = {
    "h200": _H200,
    "h200-cusparse": replace(_H200, name="h200-cusparse", spmm_flops=3.6e12, sddmm_flops=0.5e12),
    "h200-triton": replace(_H200, name="h200-triton", spmm_flops=10e12, gather_in_gemm=True),
    "cpu": DeviceSpec("cpu", dense_flops=56e9, form_flops=63e9, spmm_flops=4.5e9, sddmm_flops=4.5e9, bandwidth=2.7e9,
                      launch_s=70e-6),
}


def device_for(device: str | DeviceSpec) -> DeviceSpec:
    """A :class:`DeviceSpec` from itself, a name in :data:`DEVICES`, or a torch device type:
    ``"cuda"`` -> what runs there: ``"h200-triton"`` when slcompile's Triton kernels are
    registered (:func:`slcompile.kernels.cuda_kernels_registered`), else ``"h200-cusparse"``;
    ``"cpu"`` -> ``"cpu"``."""
    if isinstance(device, DeviceSpec):
        return device
    name = str(device)
    if name == "cuda":
        from slcompile.kernels import cuda_kernels_registered  # lazy: the model itself needs no kernels

        name = "h200-triton" if cuda_kernels_registered() else "h200-cusparse"
    if name not in DEVICES:
        raise ValueError(f"unknown device {device!r}: expected a DeviceSpec or one of {sorted(DEVICES)} or 'cuda'")
    return DEVICES[name]


@functools.cache
def _numeric(path: Path, mode: Mode, recompute_xa: bool, gather_in_gemm: bool
             ) -> tuple[tuple[str, ...], tuple[str, ...], Callable, Callable, Callable]:
    """``(names, units, flops_fn, bytes_fn, elems_fn)``: per-kernel lists as fast functions of the symbols."""
    ks = kernels(path, mode, recompute_xa, gather_in_gemm)
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


@functools.lru_cache(maxsize=4096)
def choose_path_for_call(tokens: int, in_features: int, out_features: int, rank: int, nnz: int, device_type: str,
                         mode: Mode, dtype_bytes: int) -> Literal["materialize", "factored"]:
    """:func:`choose_path` on the spec of a torch device type
    (:func:`slcompile.calibration.runtime_device`: on CPU measured once per process, else the
    preset) at that spec's ``margin``, memoized: what ``SLLinear(path="auto")`` asks on every call
    (a few microseconds the first time a shape is seen, a dict lookup after). Device types
    without a preset get ``"materialize"``."""
    from slcompile.calibration import runtime_device  # lazy: calibrating runs the ops

    try:
        device = runtime_device(device_type)
    except ValueError:
        return "materialize"
    return choose_path(tokens, in_features, out_features, rank, nnz, device, mode, dtype_bytes, device.margin)


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
    from slcompile.support import nnz_for

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

"""Triton kernels, one file per op, each a ``@triton.jit`` kernel plus a host function, and their
registration as the CUDA implementations of our custom ops:

- :mod:`.materialize`: ``W = scale * B @ A + S`` in one kernel (tiled GEMM over the rank, sparse
  values added in the epilogue) -> ``slcompile::materialize`` (so ``sl_linear`` forms ``W`` with it);
- :mod:`.grad_weight`: ``dW = dY^T X`` with ``dvalues = dW[support]`` gathered in the GEMM's
  epilogue -> the ``dW`` step of ``slcompile::sl_linear_backward`` (``dA``/``dB`` from ``dW`` by
  cuBLAS) and, without storing ``dW``, the tensor-core SDDMM of
  ``slcompile::sl_linear_factored_backward``;
- :mod:`.spmm`: ``dense @ S^T`` over a CSR pattern -> the sparse products of
  ``slcompile::sl_linear_factored`` and its backward (``x S^T``, ``dY S``), instead of cuSPARSE.

:mod:`.tile_index` (the support in tile order), :mod:`.tiles` (shared ``@triton.jit`` tile GEMM and
support lookup) and :mod:`.host` (shared checks) serve them.

Eager CUDA calls tune themselves (:mod:`.autotune`): the first call per shape and dtype times
the kernel in each launch configuration of :mod:`.configs` and, for ``materialize`` and the
``dW`` step, the ATen composition (cuBLAS ``mm`` with ``index_add`` / ``index_select``), and
every later call runs the fastest. Under ``TRITON_INTERPRET=1`` and in CPU tests the first
candidate (the kernel's default configuration) runs, untimed.

Importing this package registers the CUDA implementations but does not import Triton: the
kernel modules are imported on the first CUDA call, so a CPU-only process never pays for them.
A call whose dtypes the kernels do not take (float64, mixed) runs the torch reference instead.
On CPU the kernels run in Triton's interpreter: ``TRITON_INTERPRET=1`` must be set before
Triton is first imported (``torch._dynamo`` imports it), see ``tests/kernels/kernel_cases.py``.
Nothing is registered when Triton is not installed, or when ``SLCOMPILE_TRITON=0``: the ops
then run their torch implementation on CUDA too. The CPU implementation is always torch.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Mapping
from functools import partial
from typing import Callable, Optional

import torch
from torch import Tensor

from slcompile import ops, ops_factored
from slcompile.kernels import autotune, configs
from slcompile.kernels.host import SUPPORTED_DTYPES, aligned, dot_precision

__all__ = ["CUDA_IMPLEMENTATIONS", "TRITON_SPARSE", "cuda_kernels_registered", "kernel_dtypes", "register_cuda_kernels",
           "triton_grad_weight"]

_registered = False


def kernel_dtypes(*tensors: Tensor) -> bool:
    """Whether the kernels take these operands: one dtype among :data:`SUPPORTED_DTYPES`."""
    return len({t.dtype for t in tensors}) == 1 and tensors[0].dtype in SUPPORTED_DTYPES


def _label(config: dict) -> str:
    """A launch configuration as a candidate label, e.g. ``block_m=128 block_n=128 ... num_stages=3``."""
    return " ".join(f"{k}={v}" for k, v in config.items())


class _Candidates(Mapping):
    """``label -> zero-argument callable``, each made on first access from its launch
    configuration (``None``: the ATen route): a call whose key is tuned builds only the one it runs."""

    def __init__(self, offers: dict[str, Optional[dict]], make: Callable[[Optional[dict]], Callable[[], object]]):
        self._offers, self._make, self._made = offers, make, {}

    def __getitem__(self, label: str) -> Callable[[], object]:
        if label not in self._made:
            self._made[label] = self._make(self._offers[label])
        return self._made[label]

    def __iter__(self):
        return iter(self._offers)

    def __len__(self) -> int:
        return len(self._offers)


def _tuned(op: str, operands: tuple[Tensor, ...], candidates: Mapping[str, Callable[[], object]]):
    """Run the candidate :func:`.autotune.pick` chooses for ``op`` on these operands' shapes,
    strides and dtypes (and the ``tl.dot`` precision, which changes with torch's TF32 setting)."""
    # The offered labels are part of the key: alignment (data pointers) changes what is offered.
    key = (op, dot_precision(operands[0].dtype), tuple(candidates),
           *((t.shape, t.stride(), t.dtype) for t in operands))
    return candidates[autotune.pick(key, candidates, operands[0].device)]()


@functools.lru_cache(maxsize=None)
def _offers(listed: str, dtype: torch.dtype, precision: str, is_aligned: bool, with_aten: bool
            ) -> dict[str, Optional[dict]]:
    """``label -> launch keywords`` of every configuration of ``configs.<listed>`` offered for
    these operands (the default first), plus ``"aten": None`` if ``with_aten``. Cached: the same
    few keys recur on every call."""
    offered = {_label(c): c for c in configs.offered(getattr(configs, listed), dtype, precision, is_aligned)}
    return {**offered, "aten": None} if with_aten else offered


def _kernel_candidates(host: Callable, listed: str, operands: tuple[Tensor, ...], sizes: tuple[int, ...],
                       *args, aten: Optional[Callable[[], object]] = None, **kwargs) -> _Candidates:
    """The Triton host function ``host(*args, **kwargs)`` in each configuration of
    ``configs.<listed>`` it offers for ``operands`` (their dtype, and whether they and ``sizes``
    are aligned: :func:`.host.aligned`), then ``aten`` if given."""
    dtype = operands[0].dtype
    offers = _offers(listed, dtype, dot_precision(dtype), aligned(operands, sizes), aten is not None)
    return _Candidates(offers, lambda c: aten if c is None else partial(host, *args, **kwargs, **c))


def _aten(body: Callable, *args):
    """A torch composition as a candidate (autocast off: the op's dtypes are its operands')."""
    def run():
        with ops.autocast_disabled("cuda"):
            return body(*args)
    return run


def _materialize_cuda(A: Tensor, B: Tensor, values: Tensor, support: Tensor, scale: float) -> Tensor:
    from slcompile.kernels import materialize as kernel

    if not kernel_dtypes(A, B, values):
        with ops.autocast_disabled(A.device.type):  # the torch body of the op (e.g. float64)
            return ops.materialized_weight(A, B, values, support, scale)
    candidates = _kernel_candidates(kernel.materialize, "MATERIALIZE", (A, B, values, support),
                                    (*B.shape, A.shape[1]), A, B, values, support, scale,
                                    aten=_aten(ops.materialized_weight, A, B, values, support, scale))
    return _tuned("materialize", (A, B, values, support), candidates)


def triton_grad_weight(grad_y2d: Tensor, x2d: Tensor, support: Tensor,
                       out: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
    """``(dW, dvalues)`` of :func:`slcompile.ops.grad_weight_and_values` (same arguments) by the tuned
    fastest of the Triton kernel's configurations and the ATen composition (CUDA, kernel dtypes)."""
    from slcompile.kernels.grad_weight import grad_weight

    candidates = _kernel_candidates(grad_weight, "GRAD_WEIGHT", (grad_y2d, x2d, support),
                                    (x2d.shape[0], grad_y2d.shape[1], x2d.shape[1]), grad_y2d, x2d, support, out=out,
                                    aten=_aten(ops.grad_weight_and_values, grad_y2d, x2d, support, out))
    return _tuned("grad_weight", (grad_y2d, x2d, support), candidates)


def _sl_linear_backward_cuda(grad_y: Tensor, x: Tensor, A: Tensor, B: Tensor, values: Tensor, support: Tensor,
                             scale: float, need_dx: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grad_weight = triton_grad_weight if kernel_dtypes(grad_y, x, A, B, values) else ops.grad_weight_and_values
    return ops.materialized_backward(grad_y, x, A, B, values, support, scale, need_dx, grad_weight)


_SPMM_OFFERS = {_label(c): c for c in configs.SPMM}


def _spmm(crow: Tensor, col: Tensor, csr_values: Tensor, dense: Tensor) -> Tensor:
    from slcompile.kernels.spmm import spmm

    candidates = _Candidates(_SPMM_OFFERS, lambda c: partial(spmm, crow, col, csr_values, dense, **c))
    return _tuned("spmm", (crow, col, csr_values, dense), candidates)


def _triton_s_x(index: ops_factored.SparseIndex, values: Tensor, x2d: Tensor) -> Tensor:
    return _spmm(index.crow, index.col, index.csr_values(values), x2d)


def _triton_dy_s(index: ops_factored.SparseIndex, values: Tensor, g2d: Tensor) -> Tensor:
    return _spmm(index.t_crow, index.t_col, index.csr_t_values(values), g2d)


def _triton_sampled(index: ops_factored.SparseIndex, support: Tensor, g2d: Tensor, x2d: Tensor,
                    dtype: torch.dtype) -> Tensor:
    from slcompile.kernels.grad_weight import grad_weight

    candidates = _kernel_candidates(grad_weight, "SDDMM", (g2d, x2d, support),
                                    (x2d.shape[0], g2d.shape[1], x2d.shape[1]), g2d, x2d, support, write_dw=False,
                                    values_dtype=dtype)
    return _tuned(f"sddmm {dtype}", (g2d, x2d, support), candidates)[1]


TRITON_SPARSE = ops_factored.SparseProducts(_triton_s_x, _triton_dy_s, _triton_sampled)


def _factored_cuda(x: Tensor, A: Tensor, B: Tensor, values: Tensor, support: Tensor, scale: float,
                   bias: Optional[Tensor] = None) -> Tensor:
    sparse = TRITON_SPARSE if kernel_dtypes(x, A, B, values) else ops_factored.TORCH_SPARSE
    return ops_factored.factored_forward(x, A, B, values, support, scale, bias, sparse)


def _factored_backward_cuda(grad_y: Tensor, x: Tensor, A: Tensor, B: Tensor, values: Tensor, support: Tensor,
                            scale: float, need_dx: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    sparse = TRITON_SPARSE if kernel_dtypes(grad_y, x, A, B, values) else ops_factored.TORCH_SPARSE
    return ops_factored.factored_backward(grad_y, x, A, B, values, support, scale, need_dx, sparse)


CUDA_IMPLEMENTATIONS = {
    "slcompile::materialize": _materialize_cuda,
    "slcompile::sl_linear_backward": _sl_linear_backward_cuda,
    "slcompile::sl_linear_factored": _factored_cuda,
    "slcompile::sl_linear_factored_backward": _factored_backward_cuda,
}


def register_cuda_kernels() -> bool:
    """Register the Triton kernels as CUDA implementations (idempotent); True if registered."""
    global _registered
    if _registered:
        return True
    if os.environ.get("SLCOMPILE_TRITON", "1") == "0" or importlib.util.find_spec("triton") is None:
        return False
    for op, implementation in CUDA_IMPLEMENTATIONS.items():
        torch.library.register_kernel(op, "cuda", implementation)
    _registered = True
    return True


def cuda_kernels_registered() -> bool:
    """Whether :func:`register_cuda_kernels` registered the Triton kernels in this process."""
    return _registered


register_cuda_kernels()

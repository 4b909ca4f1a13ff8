"""Triton kernels, one file per op, each a ``@triton.jit`` kernel plus a host function:

- :mod:`slcompile.kernels.materialize`: ``W = scale * B @ A + S`` in one kernel (tiled GEMM over
  the rank, sparse values added in the epilogue); registered here as the CUDA implementation of
  ``slcompile::materialize`` (so ``sl_linear`` and ``sl_linear_backward`` use it on CUDA).
- :mod:`slcompile.kernels.gather`: ``dvalues = dW.view(-1)[support]`` (host ``gather_flat``).
  Not registered: the backward (``ops._factor_grads``) gathers with torch indexing, which a
  standalone Triton gather does not beat; the gain needs the gather fused into a Triton ``dW``
  GEMM's epilogue (not done).

Importing this package registers the CUDA implementations but does not import Triton: the
kernel modules are imported on the first CUDA call, so a CPU-only process never pays for them.
On CPU the kernels run in Triton's interpreter: ``TRITON_INTERPRET=1`` must be set before
Triton is first imported (``torch._dynamo`` imports it), see ``tests/kernels/kernel_cases.py``.
Nothing is registered when Triton is not installed, or when ``SLCOMPILE_TRITON=0``: the ops
then run their torch implementation on CUDA too. The CPU implementation is always torch.
"""
from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from slcompile import ops

__all__ = ["cuda_kernels_registered", "register_cuda_kernels"]

_registered = False


def _materialize_cuda(A: Tensor, B: Tensor, values: Tensor, support: Tensor, scale: float) -> Tensor:
    from slcompile.kernels import materialize as kernel

    if not (A.dtype == B.dtype == values.dtype) or A.dtype not in kernel.SUPPORTED_DTYPES:
        return ops.materialize._init_fn(A, B, values, support, scale)  # the torch reference (e.g. float64)
    return kernel.materialize(A, B, values, support, scale)


def register_cuda_kernels() -> bool:
    """Register the Triton kernels as CUDA implementations (idempotent); True if registered."""
    global _registered
    if _registered:
        return True
    if os.environ.get("SLCOMPILE_TRITON", "1") == "0" or importlib.util.find_spec("triton") is None:
        return False
    torch.library.register_kernel("slcompile::materialize", "cuda", _materialize_cuda)
    _registered = True
    return True


def cuda_kernels_registered() -> bool:
    """Whether :func:`register_cuda_kernels` registered the Triton kernels in this process."""
    return _registered


register_cuda_kernels()

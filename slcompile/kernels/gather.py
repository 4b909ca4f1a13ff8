"""Triton kernel: ``dvalues = dW.view(-1)[support]`` (the gradient of the sparse values).

A 1-D blocked gather: program ``p`` reads ``index[p * BLOCK : (p + 1) * BLOCK]`` and loads
those elements of ``src`` (addressed through its two strides, so a transposed or sliced ``dW``
needs no copy). Memory bound: ``nnz`` index reads, ``nnz`` scattered reads, ``nnz`` writes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["gather_flat"]


@triton.jit
def _gather_kernel(src_ptr, index_ptr, out_ptr, n, n_cols, stride_r, stride_c, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    flat = tl.load(index_ptr + offs, mask=ok, other=0).to(tl.int64)
    src = tl.load(src_ptr + (flat // n_cols) * stride_r + (flat % n_cols) * stride_c, mask=ok)
    tl.store(out_ptr + offs, src, mask=ok)


def gather_flat(src: Tensor, index: Tensor, *, out: Tensor | None = None, block: int = 1024) -> Tensor:
    """``src.reshape(-1)[index]`` for a 2-D ``src (rows, cols)`` of any strides (host function).

    ``index (n,)`` int32 or int64 row-major flat indices, each in ``[0, rows * cols)`` (not
    checked: out-of-range indices read out of bounds). ``out``: optional ``(n,)`` destination of
    ``src``'s dtype. Returns ``(n,)`` in ``src``'s dtype.
    """
    if src.dim() != 2:
        raise ValueError(f"gather_flat expects a 2-D src, got shape {tuple(src.shape)}")
    if index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"gather_flat expects a 1-D int32/int64 index, got {tuple(index.shape)} {index.dtype}")
    n = index.numel()
    if out is None:
        out = torch.empty(n, device=src.device, dtype=src.dtype)
    elif out.shape != (n,) or out.dtype != src.dtype or (n and out.stride(0) != 1):
        raise ValueError(f"out must be a contiguous ({n},) {src.dtype} tensor, got {tuple(out.shape)} {out.dtype}")
    if n == 0:
        return out
    index = index.contiguous()
    _gather_kernel[(triton.cdiv(n, block),)](src, index, out, n, src.shape[1], src.stride(0), src.stride(1),
                                             BLOCK=block)
    return out

"""Triton kernel: ``W = scale * B @ A + S`` in one pass.

One program computes one ``(BLOCK_M, BLOCK_N)`` tile of ``W (out, in)``: a tiled GEMM over the
rank (``tl.dot`` of ``B[rows, k:k+BLOCK_K]`` and ``A[k:k+BLOCK_K, cols]``, fp32 accumulator),
then an epilogue that adds the sparse values falling in the tile *in registers*, so ``W`` is
written once and never read back.

Tile index (the "tile-friendly order" of the support): the support is sorted row-major, so the
entries of row ``m`` whose column lies in column tile ``c`` form the contiguous range
``[tile_ptr[m, c], tile_ptr[m, c + 1])`` of the support. ``tile_ptr (out, n_col_tiles + 1)``
int32 is built once per support with ``torch.searchsorted`` and cached (it is ``4 * out *
(in / BLOCK_N + 1)`` bytes: a few percent of the int32 support at paper densities). The epilogue
walks the rows of its tile in lockstep: step ``k`` takes the ``k``-th entry of every row (a
``(BLOCK_M,)`` vector of columns and values) and adds it with a one-hot compare against the
tile's columns; the step count is the largest per-row count in the tile (a handful at
densities of a few percent). Duplicated positions (allowed by ``index_add``) are summed.

An unsorted support (e.g. an index a user wrote, matched by the pattern pass) is sorted once
into a cached copy; its values are then permuted on every call.

Dtypes: ``A``, ``B``, ``values`` and ``W`` share one of fp16, bf16, fp32; the sum is formed in
fp32 and rounded once. fp32 uses IEEE products unless ``torch.backends.cuda.matmul.allow_tf32``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["SUPPORTED_DTYPES", "TileIndex", "materialize", "tile_index"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _materialize_kernel(
    a_ptr, b_ptr, values_ptr, support_ptr, tile_ptr_ptr, w_ptr,
    out_features, in_features, rank, n_col_tiles, scale,
    stride_ar, stride_ai, stride_bo, stride_br, stride_wo, stride_wi,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < out_features
    col_ok = cols < in_features
    ks = tl.arange(0, BLOCK_K)

    # Low-rank part: acc = B[rows, :] @ A[:, cols] over the rank, masked loads pad with zeros.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, rank, BLOCK_K):
        k_ok = (k0 + ks) < rank
        b = tl.load(b_ptr + rows[:, None] * stride_bo + (k0 + ks)[None, :] * stride_br,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_ptr + (k0 + ks)[:, None] * stride_ar + cols[None, :] * stride_ai,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(b, a, acc, input_precision=INPUT_PRECISION)
    acc = acc * scale

    # Sparse part: row m's entries in this column tile are support[start[m]:end[m]].
    ptr_row = tile_ptr_ptr + rows * (n_col_tiles + 1) + pid_n
    start = tl.load(ptr_row, mask=row_ok, other=0)
    count = tl.load(ptr_row + 1, mask=row_ok, other=0) - start
    row_base = rows.to(tl.int64) * in_features + pid_n * BLOCK_N  # flat index of the tile's column 0
    local_cols = tl.arange(0, BLOCK_N)
    for k in range(0, tl.max(count, axis=0)):
        has = k < count
        flat = tl.load(support_ptr + start + k, mask=has, other=0).to(tl.int64)
        val = tl.load(values_ptr + start + k, mask=has, other=0.0).to(tl.float32)
        hit = ((flat - row_base)[:, None] == local_cols[None, :]) & has[:, None]
        acc += tl.where(hit, val[:, None], 0.0)

    tl.store(w_ptr + rows[:, None] * stride_wo + cols[None, :] * stride_wi,
             acc.to(w_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@dataclass(frozen=True)
class TileIndex:
    """The support in tile order for one ``(out, in, BLOCK_N)``.

    ``support``: sorted flat indices (the support itself when it already was sorted);
    ``perm``: ``None`` if sorted, else the permutation that sorts it (``values[perm]``);
    ``tile_ptr (out, n_col_tiles + 1)`` int32: row ``m``'s entries in column tile ``c`` are
    ``support[tile_ptr[m, c]:tile_ptr[m, c + 1]]``.
    """

    support: Tensor
    perm: Tensor | None
    tile_ptr: Tensor
    block_n: int


_CACHE: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def tile_index(support: Tensor, out_features: int, in_features: int, block_n: int) -> TileIndex:
    """Build (or fetch from a per-support-tensor cache) the :class:`TileIndex` of ``support``.

    The cache entry is keyed on the tensor object and checked against its version counter and
    the shape, so an in-place change of the support rebuilds it (inference tensors, which have
    no version counter, are not cached). Building it checks once whether ``support`` is sorted
    (a device sync on CUDA): pass the persistent support buffer, not a fresh ``.long()`` copy.
    """
    cacheable = not support.is_inference()  # inference tensors have no version counter
    key = (support._version if cacheable else None, support.numel(), out_features, in_features, block_n)
    cached = _CACHE.get(support) if cacheable else None
    if cached is not None and cached[0] == key:
        return cached[1]
    flat = support.reshape(-1)
    perm = None
    if flat.numel() > 1 and not bool((flat[1:] >= flat[:-1]).all()):
        flat, perm = torch.sort(flat, stable=True)
    n_col_tiles = triton.cdiv(in_features, block_n)
    col_starts = torch.arange(n_col_tiles + 1, device=flat.device, dtype=torch.int64) * block_n
    col_starts[-1] = in_features
    bounds = torch.arange(out_features, device=flat.device, dtype=torch.int64)[:, None] * in_features + col_starts
    tile_ptr = torch.searchsorted(flat, bounds.to(flat.dtype), out_int32=True)
    index = TileIndex(flat, perm, tile_ptr, block_n)
    if cacheable:
        _CACHE[support] = (key, index)
    return index


def _check(A: Tensor, B: Tensor, values: Tensor, support: Tensor) -> None:
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"materialize expects A (r, in) and B (out, r), got {tuple(A.shape)} and {tuple(B.shape)}")
    if values.shape != support.shape or values.dim() != 1:
        raise ValueError(f"materialize expects values and support (nnz,), got {tuple(values.shape)} "
                         f"and {tuple(support.shape)}")
    if not (A.dtype == B.dtype == values.dtype) or A.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"materialize kernel needs A, B, values of one dtype in {SUPPORTED_DTYPES}, "
                        f"got {A.dtype}, {B.dtype}, {values.dtype}")
    if support.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"support must be int32 or int64, got {support.dtype}")


def materialize(A: Tensor, B: Tensor, values: Tensor, support: Tensor, scale: float, *,
                out: Tensor | None = None, block_m: int = 64, block_n: int = 64, block_k: int = 32,
                num_warps: int = 4) -> Tensor:
    """``W (out, in) = scale * B @ A + S`` with the Triton kernel (host function).

    ``A (r, in)``, ``B (out, r)`` (any strides), ``values (nnz,)``, ``support (nnz,)`` int32 or
    int64 flat row-major indices into ``(out, in)`` (sorted or not; duplicates are summed).
    ``out``: optional ``(out, in)`` destination of the same dtype, any strides (e.g. a view
    into a larger buffer). Blocks must be powers of two >= 16. Returns ``W``.
    """
    _check(A, B, values, support)
    out_features, in_features = B.shape[0], A.shape[1]
    if out is None:
        out = torch.empty(out_features, in_features, device=A.device, dtype=A.dtype)
    elif out.shape != (out_features, in_features) or out.dtype != A.dtype:
        raise ValueError(f"out must be ({out_features}, {in_features}) {A.dtype}, got {tuple(out.shape)} {out.dtype}")
    if out.numel() == 0:
        return out
    index = tile_index(support, out_features, in_features, block_n)
    if index.perm is not None:
        values = values[index.perm]
    values = values.contiguous()
    # input_precision only matters for fp32 operands: IEEE products unless TF32 is allowed.
    precision = "ieee" if A.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
    grid = (triton.cdiv(out_features, block_m), triton.cdiv(in_features, block_n))
    _materialize_kernel[grid](
        A, B, values, index.support, index.tile_ptr, out,
        out_features, in_features, A.shape[0], index.tile_ptr.shape[1] - 1, float(scale),
        A.stride(0), A.stride(1), B.stride(0), B.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, INPUT_PRECISION=precision,
        num_warps=num_warps,
    )
    return out

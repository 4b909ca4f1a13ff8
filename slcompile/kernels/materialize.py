"""Triton kernel: ``W = scale * B @ A + S`` in one pass.

One program computes one ``(BLOCK_M, BLOCK_N)`` tile of ``W (out, in)``: a tiled GEMM over the
rank (``tl.dot`` of ``B[rows, k:k+BLOCK_K]`` and ``A[k:k+BLOCK_K, cols]``, fp32 accumulator),
then an epilogue that adds the sparse values falling in the tile *in registers*, so ``W`` is
written once and never read back.

The epilogue walks the support in tile order (:mod:`slcompile.kernels.tile_index`): step ``k``
takes the ``k``-th entry of every row of the tile (a ``(BLOCK_M,)`` vector of columns and
values) and adds it with a one-hot compare against the tile's columns. Duplicated positions
(allowed by ``index_add``) are summed.

An unsorted support (e.g. an index a user wrote, matched by the pattern pass) is sorted once
into a cached copy; its values are then permuted on every call.

Dtypes: ``A``, ``B``, ``values`` and ``W`` share one of fp16, bf16, fp32; the sum is formed in
fp32 and rounded once. fp32 runs TF32 tensor cores when torch allows TF32 matmuls, else IEEE
products.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from slcompile.kernels.host import SUPPORTED_DTYPES, check_blocks, check_index, dot_precision
from slcompile.kernels.tile_index import tile_index
from slcompile.kernels.tiles import tile_matmul, tile_support_range

__all__ = ["materialize"]


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

    # Low-rank part: acc = B[rows, :] @ A[:, cols] over the rank.
    acc = tile_matmul(b_ptr, a_ptr, rows, cols, row_ok, col_ok, rank, stride_bo, stride_br, stride_ar, stride_ai,
                      BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION) * scale

    # Sparse part, added in registers.
    start, count, row_base = tile_support_range(tile_ptr_ptr, rows, row_ok, pid_n, n_col_tiles, in_features, BLOCK_N)
    local_cols = tl.arange(0, BLOCK_N)
    for k in range(0, tl.max(count, axis=0)):
        has = k < count
        flat = tl.load(support_ptr + start + k, mask=has, other=0).to(tl.int64)
        val = tl.load(values_ptr + start + k, mask=has, other=0.0).to(tl.float32)
        hit = ((flat - row_base)[:, None] == local_cols[None, :]) & has[:, None]
        acc += tl.where(hit, val[:, None], 0.0)

    tl.store(w_ptr + rows.to(tl.int64)[:, None] * stride_wo + cols.to(tl.int64)[None, :] * stride_wi,
             acc.to(w_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _check(A: Tensor, B: Tensor, values: Tensor, support: Tensor) -> None:
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"materialize expects A (r, in) and B (out, r), got {tuple(A.shape)} and {tuple(B.shape)}")
    if values.shape != support.shape or values.dim() != 1:
        raise ValueError(f"materialize expects values and support (nnz,), got {tuple(values.shape)} "
                         f"and {tuple(support.shape)}")
    if not (A.dtype == B.dtype == values.dtype) or A.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"materialize kernel needs A, B, values of one dtype in {SUPPORTED_DTYPES}, "
                        f"got {A.dtype}, {B.dtype}, {values.dtype}")
    check_index("support", support)


def materialize(A: Tensor, B: Tensor, values: Tensor, support: Tensor, scale: float, *,
                out: Tensor | None = None, block_m: int = 64, block_n: int = 64, block_k: int = 32,
                num_warps: int = 4) -> Tensor:
    """``W (out, in) = scale * B @ A + S`` with the Triton kernel (host function).

    ``A (r, in)``, ``B (out, r)`` (any strides), ``values (nnz,)``, ``support (nnz,)`` int32 or
    int64 flat row-major indices into ``(out, in)`` (sorted or not; duplicates are summed).
    ``out``: optional ``(out, in)`` destination of the same dtype, any strides (e.g. a view
    into a larger buffer). Blocks: powers of two in [16, 256] (``ValueError`` otherwise). Returns ``W``.
    """
    check_blocks("materialize", num_warps, block_m=block_m, block_n=block_n, block_k=block_k)
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
    precision = dot_precision(A.dtype)
    grid = (triton.cdiv(out_features, block_m), triton.cdiv(in_features, block_n))
    _materialize_kernel[grid](
        A, B, values, index.support, index.tile_ptr, out,
        out_features, in_features, A.shape[0], index.n_col_tiles, float(scale),
        A.stride(0), A.stride(1), B.stride(0), B.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, INPUT_PRECISION=precision,
        num_warps=num_warps,
    )
    return out

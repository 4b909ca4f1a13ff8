"""``@triton.jit`` building blocks of the tiled kernels (:mod:`.materialize`, :mod:`.grad_weight`).

- :func:`tile_matmul`: the fp32 ``(BLOCK_M, BLOCK_N)`` tile ``left[rows, :] @ right[:, cols]``
  over a reduction of length ``K`` (masked loads pad with zeros; 64-bit offsets);
- :func:`tile_support_range`: where the support entries of the tile's rows lie
  (:mod:`.tile_index`): per row ``start`` and ``count``, and the flat index of the tile's column 0.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_matmul(left_ptr, right_ptr, rows, cols, row_ok, col_ok, K,
                stride_left_row, stride_left_k, stride_right_k, stride_right_col,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                INPUT_PRECISION: tl.constexpr):
    # Offsets in int64: index * stride passes 2**31 from 195k tokens of width 11008 (the reduction
    # of grad_weight), or for a column-major operand; the pointers then step by BLOCK_K rows.
    ks = tl.arange(0, BLOCK_K)
    ks64 = ks.to(tl.int64)
    left_ptrs = left_ptr + rows.to(tl.int64)[:, None] * stride_left_row + ks64[None, :] * stride_left_k
    right_ptrs = right_ptr + ks64[:, None] * stride_right_k + cols.to(tl.int64)[None, :] * stride_right_col
    left_step = BLOCK_K * tl.cast(stride_left_k, tl.int64)
    right_step = BLOCK_K * tl.cast(stride_right_k, tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        left = tl.load(left_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        right = tl.load(right_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(left, right, acc, input_precision=INPUT_PRECISION)
        left_ptrs += left_step
        right_ptrs += right_step
    return acc


@triton.jit
def tile_support_range(tile_ptr_ptr, rows, row_ok, pid_n, n_col_tiles, in_features, BLOCK_N: tl.constexpr):
    # Row m's entries in column tile pid_n are support[start[m]:start[m] + count[m]].
    ptr_row = tile_ptr_ptr + rows * (n_col_tiles + 1) + pid_n
    start = tl.load(ptr_row, mask=row_ok, other=0)
    count = tl.load(ptr_row + 1, mask=row_ok, other=0) - start
    row_base = rows.to(tl.int64) * in_features + pid_n * BLOCK_N  # flat index of the tile's column 0
    return start, count, row_base

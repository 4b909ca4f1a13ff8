"""``@triton.jit`` building blocks of the tiled kernels (:mod:`.materialize`, :mod:`.grad_weight`).

- :func:`tile_matmul`: the fp32 ``(BLOCK_M, BLOCK_N)`` tile ``left[rows, :] @ right[:, cols]``
  over a reduction of length ``K`` (masked loads pad with zeros);
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
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        left = tl.load(left_ptr + rows[:, None] * stride_left_row + (k0 + ks)[None, :] * stride_left_k,
                       mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        right = tl.load(right_ptr + (k0 + ks)[:, None] * stride_right_k + cols[None, :] * stride_right_col,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(left, right, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def tile_support_range(tile_ptr_ptr, rows, row_ok, pid_n, n_col_tiles, in_features, BLOCK_N: tl.constexpr):
    # Row m's entries in column tile pid_n are support[start[m]:start[m] + count[m]].
    ptr_row = tile_ptr_ptr + rows * (n_col_tiles + 1) + pid_n
    start = tl.load(ptr_row, mask=row_ok, other=0)
    count = tl.load(ptr_row + 1, mask=row_ok, other=0) - start
    row_base = rows.to(tl.int64) * in_features + pid_n * BLOCK_N  # flat index of the tile's column 0
    return start, count, row_base

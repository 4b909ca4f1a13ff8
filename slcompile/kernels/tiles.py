"""``@triton.jit`` building blocks of the tiled kernels (:mod:`.materialize`, :mod:`.grad_weight`).

- :func:`tile_coords`: the ``(pid_m, pid_n)`` tile of a 1-D program id in grouped order
  (``GROUP_M`` row tiles sweep the column tiles together, so the operand panels they share stay
  in L2: for ``grad_weight`` at 7B/8k, ``dY`` and ``X`` are read ``~out/(GROUP_M*BLOCK_M)``
  times instead of once per row tile);
- :func:`tile_matmul`: the fp32 ``(BLOCK_M, BLOCK_N)`` tile ``left[rows, :] @ right[:, cols]``
  over a reduction of length ``K`` (masked loads pad with zeros; 64-bit offsets);
- :func:`tile_support_range`: where the support entries of the tile's rows lie
  (:mod:`.tile_index`): per row ``start`` and ``count``, and the flat index of the tile's column 0;
- :func:`tile_entries`: a ``(BLOCK_M, CHUNK)`` chunk of those entries as int32 columns local to
  the tile (0 where a row has no entry, with the mask): the sparse epilogues cost
  ``O(BLOCK_M * max count)`` element operations, not ``O(BLOCK_M * BLOCK_N * max count)``.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_coords(pid, n_row_tiles, n_col_tiles, GROUP_M: tl.constexpr):
    per_group = GROUP_M * n_col_tiles
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(n_row_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


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
    # Row m's entries in column tile pid_n are support[start[m]:start[m] + count[m]]; a masked row has none.
    ptr_row = tile_ptr_ptr + rows * (n_col_tiles + 1) + pid_n
    start = tl.load(ptr_row, mask=row_ok, other=0)
    count = tl.load(ptr_row + 1, mask=row_ok, other=0) - start
    row_base = rows.to(tl.int64) * in_features + pid_n * BLOCK_N  # flat index of the tile's column 0
    return start, count, row_base


@triton.jit
def tile_entries(support_ptr, start, count, row_base, k0, CHUNK: tl.constexpr):
    # Entries k0 .. k0 + CHUNK - 1 of every row: positions in the sorted support (BLOCK_M, CHUNK),
    # their mask, and their columns local to the tile in int32 (the row base subtracted once per
    # entry in the support's width; masked entries read nothing and give column 0).
    ks = k0 + tl.arange(0, CHUNK)
    has = ks[None, :] < count[:, None]
    pos = start[:, None] + ks[None, :]
    flat = tl.load(support_ptr + pos, mask=has, other=0)
    local = tl.where(has, (flat - row_base[:, None]).to(tl.int32), 0)
    return pos, has, local

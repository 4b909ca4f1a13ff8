"""Triton kernel: ``W = scale * B @ A + S`` in one pass.

One program computes one ``(BLOCK_M, BLOCK_N)`` tile of ``W (out, in)`` (tiles in grouped order,
:func:`~.tiles.tile_coords`): a tiled GEMM over the rank (``tl.dot`` of ``B[rows, k:k+BLOCK_K]``
and ``A[k:k+BLOCK_K, cols]``, fp32 accumulator), stored once, then a sparse epilogue that adds
the tile's support values onto the stored tile with ``tl.atomic_add`` (after a CTA barrier, so
the tile's own store is visible; the lines are still in L2).

The epilogue walks the support in tile order (:mod:`slcompile.kernels.tile_index`): chunk ``k``
takes entries ``k .. k + CHUNK - 1`` of every row (a ``(BLOCK_M, CHUNK)`` block of int32 local
columns and values) and issues one masked atomic add per entry. Its cost grows with the tile's
nonzeros (``BLOCK_M * max count`` lanes), not with ``BLOCK_M * BLOCK_N`` per step as a one-hot
add into the register tile does (Triton has no scatter into a register tensor). Duplicated
positions (allowed by ``index_add``) are summed by the atomics.

An unsorted support (e.g. an index a user wrote, matched by the pattern pass) is sorted once
into a cached copy; its values are then permuted on every call.

Dtypes: ``A``, ``B``, ``values`` and ``W`` share one of fp16, bf16, fp32. ``scale * B @ A`` is
formed in fp32 and rounded once; where a value lands, that sum is rounded again (the atomic adds
in ``W``'s dtype): at most one extra half-ulp on those ``density`` of the entries. fp32 runs TF32
tensor cores when torch allows TF32 matmuls, else IEEE products.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from slcompile.kernels import configs
from slcompile.kernels.host import SUPPORTED_DTYPES, aligned, check_blocks, check_index, dot_precision
from slcompile.kernels.tile_index import tile_index
from slcompile.kernels.tiles import tile_coords, tile_entries, tile_matmul, tile_support_range

__all__ = ["CHUNK", "GROUP_M", "materialize"]

GROUP_M = 8  # row tiles per launch group (tiles.tile_coords)
CHUNK = 8  # support entries per row per epilogue step: about density * BLOCK_N = 6.4 at 0.05, 128


@triton.jit
def _materialize_kernel(
    a_ptr, b_ptr, values_ptr, support_ptr, tile_ptr_ptr, w_ptr,
    out_features, in_features, rank, n_col_tiles, scale,
    stride_ar, stride_ai, stride_bo, stride_br, stride_wo, stride_wi,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, GROUP_M: tl.constexpr, CHUNK: tl.constexpr,
):
    pid_m, pid_n = tile_coords(tl.program_id(0), tl.cdiv(out_features, BLOCK_M), n_col_tiles, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < out_features
    col_ok = cols < in_features
    row_offsets = rows.to(tl.int64) * stride_wo

    # Low-rank part: acc = B[rows, :] @ A[:, cols] over the rank, stored.
    acc = tile_matmul(b_ptr, a_ptr, rows, cols, row_ok, col_ok, rank, stride_bo, stride_br, stride_ar, stride_ai,
                      BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION) * scale
    tl.store(w_ptr + row_offsets[:, None] + cols.to(tl.int64)[None, :] * stride_wi,
             acc.to(w_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    tl.debug_barrier()  # the tile's store, by other threads of this program, before the adds

    # Sparse part: one atomic add per support entry of the tile.
    start, count, row_base = tile_support_range(tile_ptr_ptr, rows, row_ok, pid_n, n_col_tiles, in_features, BLOCK_N)
    for k0 in range(0, tl.max(count, axis=0), CHUNK):
        pos, has, local = tile_entries(support_ptr, start, count, row_base, k0, CHUNK)
        val = tl.load(values_ptr + pos, mask=has, other=0.0)
        w_at = w_ptr + row_offsets[:, None] + (pid_n * BLOCK_N + local).to(tl.int64) * stride_wi
        tl.atomic_add(w_at, val.to(w_ptr.dtype.element_ty), mask=has, sem="relaxed")


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
                out: Tensor | None = None, **launch: int) -> Tensor:
    """``W (out, in) = scale * B @ A + S`` with the Triton kernel (host function).

    ``A (r, in)``, ``B (out, r)`` (any strides), ``values (nnz,)``, ``support (nnz,)`` int32 or
    int64 flat row-major indices into ``(out, in)`` (sorted or not; duplicates are summed).
    ``out``: optional ``(out, in)`` destination of the same dtype, any strides (e.g. a view
    into a larger buffer). ``launch``: any of ``block_m``, ``block_n``, ``block_k`` (powers of two
    in [16, 256], ``ValueError`` otherwise), ``num_warps``, ``num_stages``, ``maxnreg``, over the
    default of :data:`.configs.MATERIALIZE` for the operands. Returns ``W``.
    """
    unknown = set(launch) - set(configs.default(configs.MATERIALIZE, A.dtype, "tf32", True))
    if unknown:
        raise TypeError(f"materialize got unexpected launch arguments {sorted(unknown)}")
    _check(A, B, values, support)
    out_features, in_features = B.shape[0], A.shape[1]
    if out is None:
        out = torch.empty(out_features, in_features, device=A.device, dtype=A.dtype)
    elif out.shape != (out_features, in_features) or out.dtype != A.dtype:
        raise ValueError(f"out must be ({out_features}, {in_features}) {A.dtype}, got {tuple(out.shape)} {out.dtype}")
    if out.numel() == 0:
        return out
    precision = dot_precision(A.dtype)
    is_aligned = aligned((A, B, values, support, out), (out_features, in_features, A.shape[0]))
    config = {**configs.default(configs.MATERIALIZE, A.dtype, precision, is_aligned), **launch}
    block_m, block_n, block_k = config["block_m"], config["block_n"], config["block_k"]
    check_blocks("materialize", config["num_warps"], block_m=block_m, block_n=block_n, block_k=block_k)
    index = tile_index(support, out_features, in_features, block_n)
    if index.perm is not None:
        values = values[index.perm]
    values = values.contiguous()
    grid = (triton.cdiv(out_features, block_m) * index.n_col_tiles,)
    _materialize_kernel[grid](
        A, B, values, index.support, index.tile_ptr, out,
        out_features, in_features, A.shape[0], index.n_col_tiles, float(scale),
        A.stride(0), A.stride(1), B.stride(0), B.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, INPUT_PRECISION=precision, GROUP_M=GROUP_M,
        CHUNK=CHUNK, num_warps=config["num_warps"], num_stages=config["num_stages"], maxnreg=config["maxnreg"],
    )
    return out

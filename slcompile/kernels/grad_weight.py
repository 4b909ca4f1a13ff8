"""Triton kernel: ``dW = dY^T @ X`` with ``dvalues = dW.view(-1)[support]`` gathered in the epilogue.

One program computes one ``(BLOCK_M, BLOCK_N)`` tile of ``dW (out, in)`` (tiles in grouped order,
:func:`~.tiles.tile_coords`: ``GROUP_M`` row tiles share the panels of ``X`` in L2): a tiled
GEMM over the tokens (``tl.dot`` of ``dY^T[rows, t:t+BLOCK_K]`` and ``X[t:t+BLOCK_K, cols]``,
fp32 accumulator), then an epilogue that gathers the support entries falling in the tile
(:mod:`slcompile.kernels.tile_index`): chunk ``k`` takes entries ``k .. k + CHUNK - 1`` of every
row as int32 columns local to the tile. Where it picks them from:

- the stored ``dW`` tile (``write_dw`` and ``dvalues`` in ``dW``'s dtype, the materialize
  path): after a CTA barrier, one masked load per entry from lines still in L2, a few dozen
  instructions per chunk; the accumulator is dead once stored, so the epilogue adds no
  registers to the GEMM's (two 128 x 128 blocks fit an SM, ``benchmarks/kernels_sm90.py``);
- else the fp32 accumulator, with ``tl.gather`` along the tile's columns: Triton writes the
  whole accumulator to shared memory for it on every chunk (about 900 instructions per chunk
  at 128 x 128, 8 warps; Triton cannot keep it there across chunks), still ~5x fewer than a
  one-hot compare per entry step.

Either way the cost grows with ``BLOCK_M * max count`` and ``dvalues`` costs no pass over
``dW``; it is rounded once from fp32 (or equals the rounded ``dW``, which is the same value).

``write_dw``:

- ``True`` (the materialize path's backward): the tile is also stored, for ``dA = scale B^T dW``
  and ``dB = scale dW A^T``.
- ``False`` (the factored path's backward): ``dW`` is never stored: the kernel is an SDDMM
  (``(dY^T X)`` sampled at the support) run on tensor cores. It does ``2 N in out`` FLOPs for
  ``2 N nnz`` useful ones, i.e. ``1 / density`` times more, but at tensor-core rate and without
  any ``(out, in)`` transient; a gather-based SDDMM instead reads ``2 N`` scattered elements
  per nonzero.

Dtypes: ``dY`` and ``X`` share one of fp16, bf16, fp32; ``dW`` is written in that dtype,
``dvalues`` in the one asked for. fp32 runs TF32 tensor cores when torch allows TF32 matmuls,
else IEEE products.
Repeated support positions each receive the gradient at their position (as ``index_select``).
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

__all__ = ["CHUNK", "GROUP_M", "grad_weight"]

GROUP_M = 8  # row tiles per launch group (tiles.tile_coords)
CHUNK = 8  # support entries per row per epilogue step: about density * BLOCK_N = 6.4 at 0.05, 128


@triton.jit
def _grad_weight_kernel(
    g_ptr, x_ptr, support_ptr, tile_ptr_ptr, dw_ptr, dvalues_ptr,
    tokens, out_features, in_features, n_col_tiles,
    stride_gt, stride_go, stride_xt, stride_xi, stride_wo, stride_wi,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    WRITE_DW: tl.constexpr, FROM_DW: tl.constexpr, INPUT_PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid_m, pid_n = tile_coords(tl.program_id(0), tl.cdiv(out_features, BLOCK_M), n_col_tiles, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < out_features
    col_ok = cols < in_features
    row_offsets = rows.to(tl.int64) * stride_wo

    # acc = dY[:, rows]^T @ X[:, cols] over the tokens.
    acc = tile_matmul(g_ptr, x_ptr, rows, cols, row_ok, col_ok, tokens, stride_go, stride_gt, stride_xt, stride_xi,
                      BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)

    if WRITE_DW:
        tl.store(dw_ptr + row_offsets[:, None] + cols.to(tl.int64)[None, :] * stride_wi,
                 acc.to(dw_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    if FROM_DW:
        tl.debug_barrier()  # the tile's store, by other threads of this program, before the loads

    # Gather: from the stored tile (FROM_DW: dvalues in dW's dtype, so the same rounding), else from
    # the accumulator in registers.
    start, count, row_base = tile_support_range(tile_ptr_ptr, rows, row_ok, pid_n, n_col_tiles, in_features, BLOCK_N)
    for k0 in range(0, tl.max(count, axis=0), CHUNK):
        pos, has, local = tile_entries(support_ptr, start, count, row_base, k0, CHUNK)
        if FROM_DW:
            picked = tl.load(dw_ptr + row_offsets[:, None] + (pid_n * BLOCK_N + local).to(tl.int64) * stride_wi,
                             mask=has)
        else:
            picked = tl.gather(acc, local, axis=1)
        tl.store(dvalues_ptr + pos, picked.to(dvalues_ptr.dtype.element_ty), mask=has)


def grad_weight(grad_y: Tensor, x: Tensor, support: Tensor, *, write_dw: bool = True,
                values_dtype: torch.dtype | None = None, out: tuple[Tensor, Tensor] | None = None,
                **launch: int) -> tuple[Tensor | None, Tensor]:
    """``(dW, dvalues)``: ``dW (out, in) = grad_y^T @ x`` and ``dvalues (nnz,) = dW.view(-1)[support]``.

    ``grad_y (N, out)`` and ``x (N, in)``: 2-D, any strides, one dtype of fp16/bf16/fp32.
    ``support (nnz,)`` int32/int64 flat row-major indices into ``(out, in)``, any order, each in
    range (not checked). ``dW`` is ``None`` when ``write_dw`` is False (nothing ``(out, in)`` is
    allocated). ``values_dtype``: dtype of ``dvalues`` (default ``grad_y``'s). ``launch``: any of
    ``block_m``, ``block_n``, ``block_k`` (powers of two in [16, 256], ``ValueError`` otherwise),
    ``num_warps``, ``num_stages``, ``maxnreg``, over the default of :data:`.configs.GRAD_WEIGHT` (``write_dw``)
    or :data:`.configs.SDDMM` for the operands. ``out``: optional ``(dW, dvalues)`` destinations
    (``write_dw`` only; ``dW (out, in)`` any strides, ``dvalues (nnz,)`` contiguous, ``grad_y``'s
    dtype), written and returned. ``N == 0`` gives zeros.
    """
    listed = configs.GRAD_WEIGHT if write_dw else configs.SDDMM
    unknown = set(launch) - set(configs.default(listed, x.dtype, "tf32", True))
    if unknown:
        raise TypeError(f"grad_weight got unexpected launch arguments {sorted(unknown)}")
    if grad_y.dim() != 2 or x.dim() != 2 or grad_y.shape[0] != x.shape[0]:
        raise ValueError(f"grad_weight expects grad_y (N, out) and x (N, in), got {tuple(grad_y.shape)} "
                         f"and {tuple(x.shape)}")
    if grad_y.dtype != x.dtype or x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"grad_weight needs grad_y and x of one dtype in {SUPPORTED_DTYPES}, "
                        f"got {grad_y.dtype} and {x.dtype}")
    check_index("support", support)
    tokens, out_features, in_features = x.shape[0], grad_y.shape[1], x.shape[1]
    if out is None:
        dw = torch.empty(out_features, in_features, device=x.device, dtype=x.dtype) if write_dw else None
        dvalues = torch.empty(support.numel(), device=x.device, dtype=values_dtype or grad_y.dtype)
    else:
        dw, dvalues = out
        if not write_dw or values_dtype not in (None, x.dtype):
            raise ValueError("grad_weight: out is for write_dw=True with dvalues in grad_y's dtype")
        if dw.shape != (out_features, in_features) or dvalues.shape != support.shape or not dvalues.is_contiguous() \
                or dw.dtype != x.dtype or dvalues.dtype != x.dtype:
            raise ValueError(f"grad_weight: out must be dW ({out_features}, {in_features}) and contiguous dvalues "
                             f"{tuple(support.shape)}, both {x.dtype}; got {tuple(dw.shape)} {dw.dtype} and "
                             f"{tuple(dvalues.shape)} {dvalues.dtype}")
    if out_features * in_features == 0:
        return dw, dvalues.zero_()
    precision = dot_precision(x.dtype)
    is_aligned = aligned((grad_y, x, support), (tokens, out_features, in_features))
    config = {**configs.default(listed, x.dtype, precision, is_aligned), **launch}
    block_m, block_n, block_k = config["block_m"], config["block_n"], config["block_k"]
    check_blocks("grad_weight", config["num_warps"], block_m=block_m, block_n=block_n, block_k=block_k)
    index = tile_index(support, out_features, in_features, block_n)
    from_dw = write_dw and dvalues.dtype == dw.dtype
    dw_arg = dw if write_dw else dvalues  # never written when WRITE_DW is False
    grid = (triton.cdiv(out_features, block_m) * index.n_col_tiles,)
    _grad_weight_kernel[grid](
        grad_y, x, index.support, index.tile_ptr, dw_arg, dvalues,
        tokens, out_features, in_features, index.n_col_tiles,
        grad_y.stride(0), grad_y.stride(1), x.stride(0), x.stride(1),
        dw.stride(0) if write_dw else 0, dw.stride(1) if write_dw else 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, WRITE_DW=write_dw,
        FROM_DW=from_dw, INPUT_PRECISION=precision, GROUP_M=GROUP_M, CHUNK=CHUNK,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
        maxnreg=config["maxnreg"] if from_dw else None,  # configs.GRAD_WEIGHT: the cap is for this epilogue
    )
    if index.perm is not None:  # computed in sorted order: put each back at its own position
        dvalues.copy_(torch.empty_like(dvalues).index_copy_(0, index.perm, dvalues))
    return dw, dvalues

"""Triton kernel: ``dW = dY^T @ X`` with ``dvalues = dW.view(-1)[support]`` gathered in the epilogue.

One program computes one ``(BLOCK_M, BLOCK_N)`` tile of ``dW (out, in)``: a tiled GEMM over the
tokens (``tl.dot`` of ``dY^T[rows, t:t+BLOCK_K]`` and ``X[t:t+BLOCK_K, cols]``, fp32
accumulator), then an epilogue that reads the support entries falling in the tile *from the
accumulator in registers* (:mod:`slcompile.kernels.tile_index`: step ``k`` takes the ``k``-th
entry of every row, a one-hot compare against the tile's columns and a row sum pick it out).
So ``dvalues`` costs no pass over ``dW`` and is rounded once, from fp32.

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

from slcompile.kernels.host import SUPPORTED_DTYPES, check_blocks, check_index, dot_precision
from slcompile.kernels.tile_index import tile_index
from slcompile.kernels.tiles import tile_matmul, tile_support_range

__all__ = ["BLOCKS", "grad_weight"]

# Launch configuration per ``tl.dot`` precision ("tf32": every tensor-core dot, bf16/fp16 too).
# IEEE fp32 products run on the FMA units with the operand tiles in registers: a 128 x 128 tile
# spills on sm_90a, 64 x 128 does not (benchmarks/kernels_sm90.py).
BLOCKS = {"tf32": dict(block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=3),
          "ieee": dict(block_m=64, block_n=128, block_k=32, num_warps=8, num_stages=3)}


@triton.jit
def _grad_weight_kernel(
    g_ptr, x_ptr, support_ptr, tile_ptr_ptr, dw_ptr, dvalues_ptr,
    tokens, out_features, in_features, n_col_tiles,
    stride_gt, stride_go, stride_xt, stride_xi, stride_wo, stride_wi,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    WRITE_DW: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < out_features
    col_ok = cols < in_features

    # acc = dY[:, rows]^T @ X[:, cols] over the tokens.
    acc = tile_matmul(g_ptr, x_ptr, rows, cols, row_ok, col_ok, tokens, stride_go, stride_gt, stride_xt, stride_xi,
                      BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)

    if WRITE_DW:
        tl.store(dw_ptr + rows.to(tl.int64)[:, None] * stride_wo + cols.to(tl.int64)[None, :] * stride_wi,
                 acc.to(dw_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    # Gather, from the accumulator in registers.
    start, count, row_base = tile_support_range(tile_ptr_ptr, rows, row_ok, pid_n, n_col_tiles, in_features, BLOCK_N)
    local_cols = tl.arange(0, BLOCK_N)
    for k in range(0, tl.max(count, axis=0)):
        has = k < count
        flat = tl.load(support_ptr + start + k, mask=has, other=0).to(tl.int64)
        hit = (flat - row_base)[:, None] == local_cols[None, :]
        picked = tl.sum(tl.where(hit, acc, 0.0), axis=1)
        tl.store(dvalues_ptr + start + k, picked.to(dvalues_ptr.dtype.element_ty), mask=has)


def grad_weight(grad_y: Tensor, x: Tensor, support: Tensor, *, write_dw: bool = True,
                values_dtype: torch.dtype | None = None, **launch: int) -> tuple[Tensor | None, Tensor]:
    """``(dW, dvalues)``: ``dW (out, in) = grad_y^T @ x`` and ``dvalues (nnz,) = dW.view(-1)[support]``.

    ``grad_y (N, out)`` and ``x (N, in)``: 2-D, any strides, one dtype of fp16/bf16/fp32.
    ``support (nnz,)`` int32/int64 flat row-major indices into ``(out, in)``, any order, each in
    range (not checked). ``dW`` is ``None`` when ``write_dw`` is False (nothing ``(out, in)`` is
    allocated). ``values_dtype``: dtype of ``dvalues`` (default ``grad_y``'s). ``launch``: any of
    ``block_m``, ``block_n``, ``block_k`` (powers of two in [16, 256], ``ValueError`` otherwise),
    ``num_warps``, ``num_stages``, over :data:`BLOCKS` for the dot precision. ``N == 0`` gives zeros.
    """
    unknown = set(launch) - set(BLOCKS["tf32"])
    if unknown:
        raise TypeError(f"grad_weight got unexpected launch arguments {sorted(unknown)}")
    precision = dot_precision(x.dtype)
    config = {**BLOCKS[precision], **launch}
    block_m, block_n, block_k = config["block_m"], config["block_n"], config["block_k"]
    check_blocks("grad_weight", config["num_warps"], block_m=block_m, block_n=block_n, block_k=block_k)
    if grad_y.dim() != 2 or x.dim() != 2 or grad_y.shape[0] != x.shape[0]:
        raise ValueError(f"grad_weight expects grad_y (N, out) and x (N, in), got {tuple(grad_y.shape)} "
                         f"and {tuple(x.shape)}")
    if grad_y.dtype != x.dtype or x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"grad_weight needs grad_y and x of one dtype in {SUPPORTED_DTYPES}, "
                        f"got {grad_y.dtype} and {x.dtype}")
    check_index("support", support)
    tokens, out_features, in_features = x.shape[0], grad_y.shape[1], x.shape[1]
    dw = torch.empty(out_features, in_features, device=x.device, dtype=x.dtype) if write_dw else None
    dvalues = torch.empty(support.numel(), device=x.device, dtype=values_dtype or grad_y.dtype)
    if out_features * in_features == 0:
        return dw, dvalues
    index = tile_index(support, out_features, in_features, block_n)
    dw_arg = dw if write_dw else dvalues  # never written when WRITE_DW is False
    grid = (triton.cdiv(out_features, block_m), triton.cdiv(in_features, block_n))
    _grad_weight_kernel[grid](
        grad_y, x, index.support, index.tile_ptr, dw_arg, dvalues,
        tokens, out_features, in_features, index.n_col_tiles,
        grad_y.stride(0), grad_y.stride(1), x.stride(0), x.stride(1),
        dw.stride(0) if write_dw else 0, dw.stride(1) if write_dw else 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, WRITE_DW=write_dw,
        INPUT_PRECISION=precision, num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    if index.perm is not None:  # computed in sorted order: put each back at its own position
        dvalues = torch.empty_like(dvalues).index_copy_(0, index.perm, dvalues)
    return dw, dvalues

"""Triton kernel: ``out (N, rows) = dense (N, k) @ S^T`` for a CSR matrix ``S (rows, k)``.

The sparse products of the factored path: ``x @ S^T`` (``S (out, in)``) in forward and
``dY @ S`` (the CSR of ``S^T``) in backward, each added to its low-rank term by ``addmm``, with ``S``'s random support: no tensor-core
shape, so CUDA-core FMAs.

One program owns ``BLOCK_R`` rows of ``S`` and ``BLOCK_T`` tokens: an fp32 ``(BLOCK_T, BLOCK_R)``
accumulator. It walks its rows in lockstep (step ``k`` takes the ``k``-th nonzero of every row:
a ``(BLOCK_R,)`` vector of columns and values) and adds ``dense[tokens, col] * value``. Rows of a
uniform random support hold nearly the same count (binomial: ``density * k`` give or take its
square root), so the lockstep wastes little. Each step gathers ``BLOCK_T`` tokens of ``BLOCK_R``
random columns: the host makes the token axis contiguous so those reads are coalesced
(a transposed copy of ``dense``, ``N * k`` elements padded to 16-element columns, when it is not
already: :func:`token_major`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from slcompile.kernels import configs
from slcompile.kernels.host import SUPPORTED_DTYPES, check_blocks, check_index

__all__ = ["spmm", "token_major"]


@triton.jit
def _spmm_kernel(
    crow_ptr, col_ptr, val_ptr, dense_ptr, out_ptr,
    n_rows, tokens,
    stride_dk, stride_dt, stride_ot, stride_or,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_t = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    ts = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_rows
    t_ok = ts < tokens
    ts64 = ts.to(tl.int64)  # token * stride passes 2**31 from 195k tokens of width 11008
    start = tl.load(crow_ptr + rows, mask=row_ok, other=0)
    count = tl.load(crow_ptr + rows + 1, mask=row_ok, other=0) - start

    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k in range(0, tl.max(count, axis=0)):
        has = k < count
        col = tl.load(col_ptr + start + k, mask=has, other=0).to(tl.int64)
        val = tl.load(val_ptr + start + k, mask=has, other=0.0).to(tl.float32)
        d = tl.load(dense_ptr + col[None, :] * stride_dk + ts64[:, None] * stride_dt,
                    mask=t_ok[:, None] & has[None, :], other=0.0)
        acc += d.to(tl.float32) * val[None, :]

    out_ptrs = out_ptr + ts64[:, None] * stride_ot + rows.to(tl.int64)[None, :] * stride_or
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & row_ok[None, :])


def token_major(dense: Tensor) -> Tensor:
    """A copy of ``dense (N, k)`` with the token axis contiguous (coalesced gathers, module doc)
    and each column's start a multiple of 16 elements apart: Triton then knows the stride is
    divisible by 16 and vectorizes the gathers (an odd ``N`` such as 2047 otherwise takes 4x
    the instructions per step on sm_90a, benchmarks/kernels_sm90.py)."""
    padded = -(-dense.shape[0] // 16) * 16
    out = torch.empty(dense.shape[1], padded, device=dense.device, dtype=dense.dtype)[:, :dense.shape[0]]
    return out.copy_(dense.t()).t()


def spmm(crow: Tensor, col: Tensor, values: Tensor, dense: Tensor, *, out: Tensor | None = None,
         **launch: int) -> Tensor:
    """``out (N, rows) = dense (N, k) @ S^T`` for ``S (rows, k)`` in CSR.

    ``crow (rows + 1,)``, ``col (nnz,)`` int32/int64 (columns in ``[0, k)``, not checked),
    ``values (nnz,)`` in CSR order, any float dtype (products in fp32). ``dense``: 2-D, one dtype
    of fp16/bf16/fp32, any strides. ``out``: optional ``(N, rows)`` destination of ``dense``'s dtype,
    any strides. ``launch``: any of ``block_r``, ``block_t`` (powers of two in [16, 256],
    ``ValueError`` otherwise), ``num_warps``, over :data:`.configs.SPMM`'s default. Returns ``out``.
    """
    unknown = set(launch) - set(configs.SPMM[0])
    if unknown:
        raise TypeError(f"spmm got unexpected launch arguments {sorted(unknown)}")
    config = {**configs.SPMM[0], **launch}
    block_r, block_t, num_warps = config["block_r"], config["block_t"], config["num_warps"]
    check_blocks("spmm", num_warps, block_r=block_r, block_t=block_t)
    check_index("crow", crow)
    check_index("col", col)
    if dense.dim() != 2 or dense.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"spmm expects a 2-D dense operand of a dtype in {SUPPORTED_DTYPES}, "
                        f"got {tuple(dense.shape)} {dense.dtype}")
    if values.shape != col.shape:
        raise ValueError(f"spmm expects values and col of one shape (nnz,), got {tuple(values.shape)} "
                         f"and {tuple(col.shape)}")
    tokens, n_rows = dense.shape[0], crow.numel() - 1
    if out is None:
        out = torch.empty(tokens, n_rows, device=dense.device, dtype=dense.dtype)
    elif out.shape != (tokens, n_rows) or out.dtype != dense.dtype:
        raise ValueError(f"out must be ({tokens}, {n_rows}) {dense.dtype}, got {tuple(out.shape)} {out.dtype}")
    if out.numel() == 0:
        return out
    if dense.stride(0) != 1 and tokens > 1:
        dense = token_major(dense)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(tokens, block_t))
    _spmm_kernel[grid](
        crow, col, values, dense, out, n_rows, tokens,
        dense.stride(1), dense.stride(0), out.stride(0), out.stride(1),
        BLOCK_R=block_r, BLOCK_T=block_t, num_warps=num_warps,
    )
    return out

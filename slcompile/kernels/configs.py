"""Launch configurations of the Triton kernels: what the tuner chooses among (:mod:`.autotune`),
what the sm_90a proof compiles (``benchmarks/kernels_sm90.py``), and the default each host
function launches with: the first configuration offered (used under ``TRITON_INTERPRET``, in
tests, and wherever tuning is off).

A configuration is a dict of the host function's launch keywords (``maxnreg``: a register cap
per thread). The tiled kernels (:mod:`.materialize`; :mod:`.grad_weight` writing ``dW``, and
as the SDDMM) have one list per operand kind (:func:`operand_kind`):

- ``half`` (bf16/fp16 on wgmma): up to 128 x 256 tiles with ``BLOCK_K`` 64, 8 warps, 3-4
  stages (4 stages of 128 x 256 x 64 would need 256 KB of shared memory: not offered);
- ``tf32`` (fp32 operands on TF32 wgmma): the same tiles with ``BLOCK_K`` 32 (fp32 stages take
  twice the shared memory);
- ``ieee`` (fp32 products on the FMA units, operand tiles in registers): at most 64 x 128,
  larger tiles spill on sm_90a.

Configurations marked *aligned* are offered only when every size and stride is 1 or a multiple
of 16 and every pointer 16-byte aligned (:func:`.host.aligned`): Triton then loads with 16-byte
vectors straight into shared memory; otherwise the loads go through registers and these tiles
spill on sm_90a. :mod:`.spmm` has one list (no ``tl.dot``; the dtype changes the load width).
"""
from __future__ import annotations

import torch

__all__ = ["GRAD_WEIGHT", "MATERIALIZE", "SDDMM", "SPMM", "default", "offered", "operand_kind"]

ALIGNED = "aligned"


def _tiles(*configs: tuple) -> list[dict]:
    """``(block_m, block_n, block_k, num_warps, num_stages[, maxnreg])`` rows, ``ALIGNED`` after
    a row's numbers marks it aligned-only."""
    keys = ("block_m", "block_n", "block_k", "num_warps", "num_stages", "maxnreg")
    return [{**dict(zip(keys, (v for v in c if v != ALIGNED))), ALIGNED: ALIGNED in c} for c in configs]


MATERIALIZE = {
    "half": _tiles((128, 128, 64, 8, 3), (64, 64, 32, 4, 3), (128, 64, 64, 4, 4), (128, 128, 64, 8, 4),
                   (128, 256, 64, 8, 3, ALIGNED)),
    "tf32": _tiles((128, 128, 32, 8, 3), (64, 64, 32, 4, 3), (128, 64, 32, 4, 4), (128, 128, 32, 8, 4),
                   (128, 256, 32, 8, 3, ALIGNED)),
    "ieee": _tiles((64, 64, 32, 4, 3), (32, 64, 32, 4, 3), (64, 128, 32, 8, 3)),
}
# grad_weight writing dW (dvalues read back from it). maxnreg 128: two 8-warp blocks per SM, so
# one block's epilogue overlaps the other's GEMM (it binds only on that read-back epilogue,
# grad_weight.py). At unaligned widths every 128 x 128 tile spills: 128 x 64 x 64 is the default.
GRAD_WEIGHT = {
    "half": _tiles((128, 128, 64, 8, 3, 128, ALIGNED), (128, 64, 64, 4, 4), (128, 128, 32, 8, 3, ALIGNED),
                   (128, 128, 64, 8, 3, ALIGNED), (128, 128, 64, 8, 4, 128, ALIGNED), (128, 256, 64, 8, 3, ALIGNED)),
    "tf32": _tiles((128, 128, 32, 8, 3, 128, ALIGNED), (128, 128, 32, 8, 3), (128, 64, 32, 4, 4),
                   (128, 256, 32, 8, 3, ALIGNED)),
    "ieee": _tiles((64, 64, 32, 4, 3), (32, 64, 32, 4, 3)),
}
# grad_weight without dW (the SDDMM): the accumulator gather holds more registers, so smaller
# tiles (128 x 128 x 64 spills at unaligned widths, 128 x 256 everywhere). tf32 128 x 128 x 32 is
# spill-free with Triton 3.9 but spills with 3.6, so it is offered to the tuner, not the default.
SDDMM = {
    "half": _tiles((128, 64, 64, 4, 4), (64, 64, 64, 4, 3), (128, 64, 32, 4, 3)),
    "tf32": _tiles((128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (64, 64, 32, 4, 3)),
    "ieee": _tiles((64, 64, 32, 4, 3), (32, 64, 32, 4, 3)),
}
SPMM = [dict(block_r=32, block_t=64, num_warps=4), dict(block_r=64, block_t=64, num_warps=4),
        dict(block_r=32, block_t=128, num_warps=4), dict(block_r=64, block_t=128, num_warps=8)]


def operand_kind(dtype: torch.dtype, precision: str) -> str:
    """``half``, ``tf32`` or ``ieee``: which configuration list a tiled kernel takes for operands of
    ``dtype`` multiplied with ``tl.dot`` precision ``precision`` (:func:`.host.dot_precision`)."""
    return "half" if dtype != torch.float32 else precision


def offered(configs: dict[str, list[dict]], dtype: torch.dtype, precision: str, aligned: bool) -> list[dict]:
    """The launch keywords of every configuration a tiled kernel offers for these operands, the
    default first (``maxnreg`` always present, ``None`` for no cap)."""
    return [{"maxnreg": None, **{k: v for k, v in c.items() if k != ALIGNED}}
            for c in configs[operand_kind(dtype, precision)] if aligned or not c[ALIGNED]]


def default(configs: dict[str, list[dict]], dtype: torch.dtype, precision: str, aligned: bool) -> dict:
    """The default configuration of a tiled kernel for these operands."""
    return offered(configs, dtype, precision, aligned)[0]

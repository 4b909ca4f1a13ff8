"""What the host functions of the kernels share: dtypes, the ``tl.dot`` precision, argument checks."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BLOCK_RANGE", "INDEX_DTYPES", "SUPPORTED_DTYPES", "aligned", "check_blocks", "check_index", "dot_precision"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
# Block sizes a host function accepts: powers of two (tl.arange), >= 16 (tl.dot's smallest tile),
# <= 256 (larger tiles overflow registers or shared memory).
BLOCK_RANGE = (16, 256)


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot``; it matters for fp32 operands only: TF32 tensor cores when
    torch allows them for its own fp32 matmuls, else IEEE products. Read through
    ``torch.backends.cuda.matmul.fp32_precision``, which follows both the legacy
    ``allow_tf32`` / ``set_float32_matmul_precision`` and the newer ``fp32_precision`` settings
    (reading ``allow_tf32`` raises once the newer API was used)."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "ieee"


def check_blocks(kernel: str, num_warps: int, **blocks: int) -> None:
    """Each block size a power of two in :data:`BLOCK_RANGE`, ``num_warps`` a power of two in
    [1, 16]: a ``ValueError`` here rather than a Triton compile error (or a silent wrong tile)."""
    low, high = BLOCK_RANGE
    for name, size in {**blocks, "num_warps": num_warps}.items():
        lo, hi = (1, 16) if name == "num_warps" else (low, high)
        if not isinstance(size, int) or not lo <= size <= hi or size & (size - 1):
            raise ValueError(f"{kernel}: {name} must be a power of two in [{lo}, {hi}], got {size!r}")


def check_index(name: str, index: Tensor) -> None:
    """``index`` must be a 1-D int32/int64 tensor."""
    if index.dim() != 1 or index.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be a 1-D int32 or int64 tensor, got shape {tuple(index.shape)} {index.dtype}")


def aligned(tensors: tuple[Tensor, ...], sizes: tuple[int, ...] = ()) -> bool:
    """Whether Triton specializes a launch on these operands as 16-byte aligned: every pointer a
    multiple of 16 bytes, every stride of ``tensors`` and every size in ``sizes`` 1 or a multiple
    of 16 (:mod:`.configs`: some tiles are offered only then)."""
    ints = (*sizes, *(s for t in tensors for s in t.stride()))
    return all(t.data_ptr() % 16 == 0 for t in tensors) and all(i == 1 or i % 16 == 0 for i in ints)

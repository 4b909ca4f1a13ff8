"""What the host functions of the kernels share: dtypes, the ``tl.dot`` precision, index checks."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["INDEX_DTYPES", "SUPPORTED_DTYPES", "check_index", "dot_precision"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot``; it matters for fp32 operands only: IEEE products unless
    ``torch.backends.cuda.matmul.allow_tf32`` (torch's own rule for fp32 matmuls)."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def check_index(name: str, index: Tensor) -> None:
    """``index`` must be a 1-D int32/int64 tensor."""
    if index.dim() != 1 or index.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be a 1-D int32 or int64 tensor, got shape {tuple(index.shape)} {index.dtype}")

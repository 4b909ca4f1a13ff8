"""The kernels' host-side rules that need no Triton: the ``tl.dot`` precision follows torch's TF32
setting (either API), block sizes are checked before any launch."""
from __future__ import annotations

import pytest
import torch

from slcompile.kernels.host import check_blocks, dot_precision


@pytest.fixture
def tf32_setting():
    """Restores torch's fp32 matmul precision after the test (both APIs share one setting)."""
    before = torch.backends.cuda.matmul.fp32_precision
    yield torch.backends.cuda.matmul
    torch.backends.cuda.matmul.fp32_precision = before


@pytest.mark.parametrize("enable,expect", [
    (lambda m: None, "ieee"),
    (lambda m: setattr(m, "allow_tf32", True), "tf32"),  # the legacy flag
    (lambda m: torch.set_float32_matmul_precision("high"), "tf32"),
    (lambda m: setattr(m, "fp32_precision", "tf32"), "tf32"),  # the newer API: allow_tf32 would raise
    (lambda m: (setattr(m, "allow_tf32", True), setattr(m, "fp32_precision", "ieee")), "ieee"),
])
def test_fp32_dot_precision_follows_torch(tf32_setting, enable, expect):
    tf32_setting.fp32_precision = "ieee"
    enable(tf32_setting)
    assert dot_precision(torch.float32) == expect
    assert dot_precision(torch.bfloat16) == dot_precision(torch.float16) == "tf32"  # ignored by tl.dot there


@pytest.mark.parametrize("blocks,num_warps", [({"block_m": 48}, 4), ({"block_n": 8}, 4), ({"block_k": 512}, 4),
                                              ({"block_m": 64.0}, 4), ({"block_m": 64}, 3), ({"block_m": 64}, 32)])
def test_check_blocks_rejects(blocks, num_warps):
    with pytest.raises(ValueError, match="power of two"):
        check_blocks("k", num_warps, **blocks)


def test_check_blocks_accepts_the_range():
    check_blocks("k", 1, block_m=16, block_n=256, block_k=32)
    check_blocks("k", 16, block_r=128)

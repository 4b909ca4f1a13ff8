"""Triton kernel cases against the float64 torch reference (run by ``test_kernels.py``).

``TRITON_INTERPRET`` is read when Triton is imported (its standard library is ``@triton.jit``
code too) and when a kernel is decorated, and ``torch._dynamo`` / ``torch._inductor`` import
Triton: a pytest session that already compiled something cannot switch to the interpreter.
So ``test_kernels.py`` runs this file in a fresh interpreter, with ``TRITON_INTERPRET=1`` on a
machine without CUDA (CPU tensors, fp32/fp16 only: the interpreter's bf16 arithmetic is wrong)
and compiled on the GPU otherwise (bf16 too). Run it directly for per-case output:
``TRITON_INTERPRET=1 .venv/bin/pytest tests/kernels/kernel_cases.py``.

Odd sizes (1, 7, 33, 130), several block shapes (more than one tile per axis) and outputs
written into a strided window of a larger sentinel-filled buffer catch unmasked accesses.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, strategies as st

from slcompile import ops
from slcompile.support import generate_support

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") == "0"
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("kernel cases need CUDA or TRITON_INTERPRET=1 (tests/kernels/test_kernels.py sets it)",
                allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed (pip install triton==3.9.0 --no-deps)")

from slcompile.kernels import gather as gather_kernel  # noqa: E402  (after the TRITON_INTERPRET check)
from slcompile.kernels import materialize as materialize_kernel  # noqa: E402

SENTINEL = 12345.0
SIZES = st.sampled_from([1, 7, 16, 33, 64, 130])
BLOCKS = st.sampled_from([16, 32, 64])
kernels = SimpleNamespace(materialize=materialize_kernel, gather=gather_kernel, device="cuda" if ON_GPU else "cpu",
                          dtypes=[torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else []))


def tolerance(dtype, magnitude):
    eps = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    return 4 * eps * magnitude + 1e-6


def factors(out_f, in_f, rank, density, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(rank, in_f, generator=gen).to(device, dtype)
    B = torch.randn(out_f, rank, generator=gen).to(device, dtype)
    nnz = int(density * in_f * out_f)
    support = generate_support(out_f, in_f, nnz, seed, device=device)
    values = torch.randn(nnz, generator=gen).to(device, dtype)
    return A, B, values, support


def check_weight(weight, A, B, values, support, scale):
    ref = ops.materialize(A.cpu().double(), B.cpu().double(), values.cpu().double(), support.cpu(), scale)
    magnitude = abs(scale) * (B.cpu().double().abs() @ A.cpu().double().abs()) + ref.abs()
    err = (weight.cpu().double() - ref).abs()
    assert bool((err <= tolerance(weight.dtype, magnitude)).all()), f"max error {err.max().item():.3g}"


def guarded(rows, cols, dtype, device, transpose=False):
    """A ``(rows, cols)`` window, strided inside a sentinel-filled buffer, and the buffer."""
    if transpose:  # column-major window
        buf = torch.full((cols + 5, rows + 3), SENTINEL, dtype=dtype, device=device)
        return buf[2:2 + cols, 1:1 + rows].t(), buf
    buf = torch.full((rows + 3, cols + 5), SENTINEL, dtype=dtype, device=device)
    return buf[1:1 + rows, 2:2 + cols], buf


def assert_guard_intact(buf, window):
    """Everything in ``buf`` outside ``window`` still holds the sentinel."""
    outside = buf.clone()
    outside.as_strided(window.shape, window.stride(), window.storage_offset()).fill_(SENTINEL)
    assert bool((outside == SENTINEL).all()), "kernel wrote outside its output"


@given(out_f=SIZES, in_f=SIZES, rank=st.sampled_from([1, 7, 16, 33]), density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
       blocks=st.tuples(BLOCKS, BLOCKS, st.sampled_from([16, 32])), half=st.booleans(), seed=st.integers(0, 3))
def test_materialize_matches_reference(out_f, in_f, rank, density, blocks, half, seed):
    dtype = torch.float16 if half else torch.float32
    A, B, values, support = factors(out_f, in_f, rank, density, dtype, kernels.device, seed)
    out, buf = guarded(out_f, in_f, dtype, kernels.device, transpose=seed % 2 == 1)
    block_m, block_n, block_k = blocks
    weight = kernels.materialize.materialize(A, B, values, support, 0.25, out=out, block_m=block_m,
                                             block_n=block_n, block_k=block_k)
    assert weight.data_ptr() == out.data_ptr()
    check_weight(weight, A, B, values, support, 0.25)
    assert_guard_intact(buf, out)


def test_materialize_all_dtypes_strided_inputs():
    for dtype in kernels.dtypes:
        A, B, values, support = factors(33, 130, 7, 0.1, dtype, kernels.device)
        A_t = A.t().contiguous().t()  # column-major A and B: the kernel reads through strides
        B_t = B.t().contiguous().t()
        weight = kernels.materialize.materialize(A_t, B_t, values, support, 4.0)
        assert weight.shape == (33, 130) and weight.dtype == dtype
        check_weight(weight, A, B, values, support, 4.0)


def test_materialize_unsorted_duplicate_int64_support():
    """An index written by a user (pattern pass): any order, int64, repeated positions summed."""
    A, B, values, support = factors(7, 33, 7, 0.3, torch.float32, kernels.device)
    perm = torch.randperm(support.numel(), generator=torch.Generator().manual_seed(1)).to(kernels.device)
    index = torch.cat([support[perm], support[:5]]).long()
    vals = torch.cat([values[perm], values[:5] * 3])
    weight = kernels.materialize.materialize(A, B, vals, index, 0.5)
    check_weight(weight, A, B, vals, index, 0.5)


def test_tile_index_cached_and_invalidated():
    mod = kernels.materialize
    _, _, _, support = factors(33, 130, 1, 0.1, torch.float32, kernels.device)
    first = mod.tile_index(support, 33, 130, 32)
    assert mod.tile_index(support, 33, 130, 32) is first
    assert first.perm is None and first.support.data_ptr() == support.data_ptr()  # no copy when sorted
    ptr = first.tile_ptr.cpu().long()
    assert ptr.shape == (33, 6) and int(ptr[-1, -1]) == support.numel()
    flat = support.cpu().long()
    for m, c in [(0, 0), (5, 2), (32, 4)]:
        chunk = flat[ptr[m, c]:ptr[m, c + 1]]
        assert bool(((chunk // 130 == m) & (chunk % 130 // 32 == c)).all())
    support.add_(0)  # bumps the version counter: the index is rebuilt
    assert mod.tile_index(support, 33, 130, 32) is not first


def test_materialize_rejects_bad_arguments():
    A, B, values, support = factors(7, 33, 4, 0.3, torch.float32, kernels.device)
    with pytest.raises(ValueError, match="A \\(r, in\\)"):
        kernels.materialize.materialize(A, B.t(), values, support, 1.0)
    with pytest.raises(TypeError, match="one dtype"):
        kernels.materialize.materialize(A, B, values.double(), support, 1.0)
    with pytest.raises(ValueError, match="out must be"):
        kernels.materialize.materialize(A, B, values, support, 1.0, out=torch.empty(33, 7, device=kernels.device))


@given(rows=SIZES, cols=SIZES, density=st.sampled_from([0.05, 0.3, 1.0]), block=st.sampled_from([64, 1024]),
       half=st.booleans(), transpose=st.booleans())
def test_gather_matches_indexing(rows, cols, density, block, half, transpose):
    dtype = torch.float16 if half else torch.float32
    src = torch.randn(rows, cols).to(kernels.device, dtype)
    if transpose:
        src = src.t().contiguous().t()
    index = generate_support(rows, cols, max(1, int(density * rows * cols)), 0, device=kernels.device)
    out = torch.full((index.numel() + 7,), SENTINEL, dtype=dtype, device=kernels.device)
    got = kernels.gather.gather_flat(src, index, out=out[3:3 + index.numel()], block=block)
    assert torch.equal(got.cpu(), src.reshape(-1)[index.long()].cpu())
    assert bool((out[:3] == SENTINEL).all()) and bool((out[3 + index.numel():] == SENTINEL).all())


def test_gather_empty_and_int64():
    src = torch.randn(7, 33, device=kernels.device)
    assert kernels.gather.gather_flat(src, torch.empty(0, dtype=torch.int32, device=kernels.device)).numel() == 0
    index = torch.tensor([230, 0, 5, 5], device=kernels.device)
    assert torch.equal(kernels.gather.gather_flat(src, index), src.reshape(-1)[index])


def test_cuda_registration_dispatches_to_the_kernel():
    """The function registered for CUDA runs the Triton kernel, and the torch reference for float64."""
    import slcompile.kernels as package

    assert package.cuda_kernels_registered()
    A, B, values, support = factors(7, 33, 4, 0.3, torch.float32, kernels.device)
    check_weight(package._materialize_cuda(A, B, values, support, 2.0), A, B, values, support, 2.0)
    A, B, values = A.double(), B.double(), values.double()
    torch.testing.assert_close(package._materialize_cuda(A, B, values, support, 2.0),
                               ops.materialize(A, B, values, support, 2.0))


def test_inference_tensor_support_is_not_cached():
    A, B, values, support = factors(7, 33, 4, 0.3, torch.float32, kernels.device)
    with torch.inference_mode():
        frozen = support.clone()
        weight = kernels.materialize.materialize(A, B, values, frozen, 2.0)
    check_weight(weight, A, B, values, support, 2.0)
    assert kernels.materialize._CACHE.get(frozen) is None

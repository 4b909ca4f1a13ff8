"""Helpers shared by the test modules (importable as ``helpers``: ``tests/`` is on ``sys.path``
through its ``conftest.py``): float64 dense references, tiny SLTrain models, a training loop's parts."""
from __future__ import annotations

import io

import torch
from torch import nn

from slcompile import SLLinear


def dense_reference_weight(A, B, values, support, scale):
    """Float64 ``W = scale * B @ A + S`` built with plain differentiable torch ops."""
    weight = scale * B.double() @ A.double()
    flat = torch.zeros(weight.numel(), dtype=torch.float64, device=weight.device)
    flat = flat.index_put((support.long(),), values.double(), accumulate=True)
    return weight + flat.view_as(weight)


def tiny_model(dtype: torch.dtype = torch.float32, dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """Two SLLinear layers (with ``B`` made nonzero so every factor gets gradients) and a LayerNorm."""
    torch.manual_seed(seed)
    model = nn.Sequential(SLLinear(16, 32, rank=4, alpha=4.0, density=0.25, seed=1), nn.GELU(), nn.Dropout(dropout),
                          SLLinear(32, 8, rank=4, alpha=4.0, density=0.25, seed=2), nn.LayerNorm(8))
    with torch.no_grad():
        for layer in (model[0], model[3]):
            layer.B.normal_(0.0, 0.5)
    return model.to(dtype)


def batches(n: int, size: int = 12, dtype: torch.dtype = torch.float32, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 16, generator=gen).to(dtype), torch.randn(size, 8, generator=gen).to(dtype))
            for _ in range(n)]


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).float().pow(2).mean()


def assert_same_params(a: nn.Module, b: nn.Module, atol: float = 0.0, rtol: float = 0.0) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def save_load(obj):
    """``torch.load(torch.save(obj))`` through memory (weights_only, as a resume would)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)

"""Baselines trained in the same harness as SLTrain: pure low-rank layers (``W = scale * B @ A``).

Two inits of the low-rank baseline:

- ``"paper"``: ``A`` kaiming-uniform, ``B = 0`` (the SLTrain init without ``S``). With every
  projection of a LLaMA low-rank, ``B = 0`` makes every gradient of ``A`` and ``B`` exactly zero
  (each layer's output, hence each upstream gradient, vanishes): only embeddings, norms and head
  train. Kept to reproduce the paper's baseline, not as a fair one.
- ``"matched"`` (default, the fair baseline): ``A`` kaiming-uniform and ``B`` normal, with ``B``'s
  std chosen so that ``scale * B @ A`` has the std of the dense weight it replaces.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from slcompile.config import SLConfig
from slcompile.transform import ReplacedLayer, TransformReport, count_parameters, select_linears, swap_module

LOWRANK_INITS = ("matched", "paper")


class LowRankLinear(nn.Module):
    """``y (..., out) = scale * (x (..., in) @ A.T) @ B.T + bias`` with ``A (r, in)``, ``B (out, r)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int, alpha: float = 32.0,
                 init: str = "matched", target_std: float | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if init not in LOWRANK_INITS:
            raise ValueError(f"LowRankLinear init must be one of {LOWRANK_INITS}, got {init!r}")
        SLConfig(rank=rank, alpha=alpha).rank_for(in_features, out_features)
        self.in_features, self.out_features, self.rank, self.alpha = in_features, out_features, rank, float(alpha)
        self.scale, self.init = self.alpha / rank, init
        # Default target: nn.Linear's own init std, 1/sqrt(3 * in).
        self.target_std = target_std if target_std is not None else 1 / math.sqrt(3 * in_features)
        factory = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.B = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if self.init == "paper":
            nn.init.zeros_(self.B)
        else:
            # std(scale * (B @ A)_ij) = scale * sqrt(r) * std(A) * std(B), std(A) = 1/sqrt(3 in).
            std_a = 1 / math.sqrt(3 * self.in_features)
            nn.init.normal_(self.B, std=self.target_std / (self.scale * math.sqrt(self.rank) * std_a))

    def dense_weight(self) -> Tensor:
        return self.scale * self.B @ self.A

    def forward(self, x: Tensor) -> Tensor:
        out = nn.functional.linear(nn.functional.linear(x, self.A), self.B) * self.scale
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, init={self.init!r}, bias={self.bias is not None}")


def to_lowrank(model: nn.Module, cfg: SLConfig, init: str = "matched") -> tuple[nn.Module, TransformReport]:
    """Replace the linears ``transform`` would replace by :class:`LowRankLinear` (no sparse term).

    With ``init="matched"`` each product is scaled like the weight it replaces (its measured std).
    """
    report = TransformReport(params_before=count_parameters(model))
    chosen, report.kept = select_linears(model, cfg)
    for name, linear in chosen:
        weight = linear.weight
        std = None if weight.device.type == "meta" else float(weight.detach().float().std())
        layer = LowRankLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              rank=cfg.rank_for(linear.in_features, linear.out_features, name), alpha=cfg.alpha,
                              init=init, target_std=std, device=weight.device, dtype=weight.dtype)
        model = swap_module(model, name, layer)
        report.replaced.append(ReplacedLayer(name, layer.in_features, layer.out_features, layer.rank, 0,
                                             layer.bias is not None))
    report.params_after = count_parameters(model)
    return model, report

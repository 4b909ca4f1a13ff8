"""Module swap: ``transform`` turns eligible ``nn.Linear`` modules into ``SLLinear``; ``merge`` undoes it.

Selection (torchao style: one config, one handler per module kind) happens in
:func:`select_linears`, shared with the FX pass so both entry points replace the same layers
with the same supports.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from slcompile.config import SLConfig
from slcompile.layers import SLLinear
from slcompile.support import layer_seed, nnz_for


def matches(pattern: str, name: str) -> bool:
    """True if ``pattern`` is ``name``, a trailing dotted part of it, or a regex fullmatching it."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


@dataclass(frozen=True)
class ReplacedLayer:
    """One replaced layer: its name, shape and parameter counts before/after."""

    name: str
    in_features: int
    out_features: int
    rank: int
    nnz: int
    has_bias: bool

    @property
    def params_before(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.has_bias else 0)

    @property
    def params_after(self) -> int:
        return (self.rank * (self.in_features + self.out_features) + self.nnz
                + (self.out_features if self.has_bias else 0))


@dataclass
class TransformReport:
    """What ``transform`` (or the FX pass) did: replaced layers, kept linears with the reason,
    and the model's parameter counts before and after."""

    replaced: list[ReplacedLayer] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0

    @property
    def linear_params_before(self) -> int:
        return sum(layer.params_before for layer in self.replaced)

    @property
    def linear_params_after(self) -> int:
        return sum(layer.params_after for layer in self.replaced)

    def __str__(self) -> str:
        lines = [f"slcompile: replaced {len(self.replaced)} linear layer(s), kept {len(self.kept)}"]
        for layer in self.replaced:
            lines.append(f"  SL  {layer.name}: {layer.out_features}x{layer.in_features} -> rank {layer.rank}, "
                         f"nnz {layer.nnz} ({layer.params_before:,} -> {layer.params_after:,} params)")
        lines += [f"  --  {name}: {reason}" for name, reason in self.kept.items()]
        if self.replaced:
            lines.append(f"  replaced linears: {self.linear_params_before:,} -> {self.linear_params_after:,} params "
                         f"({self.linear_params_after / self.linear_params_before:.3f}x)")
        lines.append(f"  model: {self.params_before:,} -> {self.params_after:,} params"
                     + (f" ({self.params_after / self.params_before:.3f}x)" if self.params_before else ""))
        return "\n".join(lines)


def count_parameters(model: nn.Module) -> int:
    """Elements of ``model``'s parameters (a lazy module's uninitialized ones count 0)."""
    return sum(0 if isinstance(p, nn.parameter.UninitializedParameter) else p.numel() for p in model.parameters())


def shared_weights(model: nn.Module) -> tuple[set[int], set[int]]:
    """Ids of embedding weights, and of parameters registered in more than one place."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return embeddings, {pid for pid, count in seen.items() if count > 1}


def linear_keep_reason(name: str, weight: torch.Tensor, cfg: SLConfig, tied: set[int], shared: set[int],
                       wrapped_reason: str | None = None) -> str | None:
    """Why the linear ``name`` with ``weight`` stays dense under ``cfg``, or None to replace it.

    Raises ``ValueError`` if ``cfg.targets`` explicitly asks for a layer that cannot be replaced.
    """
    if any(matches(p, name) for p in cfg.exclude):
        return "excluded by SLConfig.exclude"
    if cfg.targets is None:
        if any(matches(p, name) for p in cfg.head_names):
            return "output head (SLConfig.head_names)"
        if id(weight) in tied:
            return "weight tied to an embedding"
        targeted = False
    else:
        if not any(matches(p, name) for p in cfg.targets):
            return "not matched by SLConfig.targets"
        targeted = True
    reason = wrapped_reason
    if reason is None and type(weight) is not nn.Parameter:
        reason = f"weight is a {type(weight).__name__}, wrapped by another tool"
    if reason is None and id(weight) in shared:
        reason = "weight shared with another module"
    if reason is not None and targeted:
        raise ValueError(f"SLConfig.targets selects {name!r}, which cannot be replaced: {reason}")
    return reason


def linear_wrapped_reason(linear: nn.Linear) -> str | None:
    """Why the ``nn.Linear`` module ``linear`` cannot be swapped (another tool uses it), or None."""
    if isinstance(linear.weight, nn.parameter.UninitializedParameter):
        return "lazy module not initialized yet (run one forward pass first)"
    if isinstance(linear, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return "used through its .weight by nn.MultiheadAttention"
    if parametrize.is_parametrized(linear):
        return "module is parametrized (torch.nn.utils.parametrize)"
    return None


def check_targets_used(cfg: SLConfig, names: list[str]) -> None:
    """``ValueError`` for a ``targets`` pattern that matches no module name."""
    for pattern in cfg.targets or ():
        if not any(matches(pattern, name) for name in names):
            raise ValueError(f"SLConfig.targets pattern {pattern!r} matches no module of the model")


def select_linears(model: nn.Module, cfg: SLConfig) -> tuple[list[tuple[str, nn.Linear]], dict[str, str]]:
    """The ``nn.Linear`` modules of ``model`` to replace, and ``{name: reason}`` for those kept."""
    names = [name for name, _ in model.named_modules()]
    check_targets_used(cfg, names)
    tied, shared = shared_weights(model)
    chosen, kept = [], {}
    for name, module in model.named_modules():
        if isinstance(module, SLLinear):
            kept[name] = "already an SLLinear"
            continue
        if not isinstance(module, nn.Linear):
            continue
        reason = linear_keep_reason(name, module.weight, cfg, tied, shared, linear_wrapped_reason(module))
        if reason is None:
            chosen.append((name, module))
        else:
            kept[name] = reason
    return chosen, kept


def build_sl_linear(name: str, linear: nn.Linear, cfg: SLConfig) -> SLLinear:
    """The ``SLLinear`` that replaces ``linear`` (called ``name``) under ``cfg``."""
    rank = cfg.rank_for(linear.in_features, linear.out_features, name)
    return SLLinear.from_linear(linear, rank=rank, alpha=cfg.alpha, density=cfg.density,
                                seed=layer_seed(cfg.seed, name), path=cfg.path)


def describe(name: str, layer: SLLinear) -> ReplacedLayer:
    return ReplacedLayer(name, layer.in_features, layer.out_features, layer.rank,
                         nnz_for(layer.in_features, layer.out_features, layer.density), layer.bias is not None)


def swap_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` in ``model``; returns the (possibly new) root."""
    if not name:
        return new
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return model


def transform(model: nn.Module, cfg: SLConfig) -> tuple[nn.Module, TransformReport]:
    """Replace the eligible ``nn.Linear`` modules of ``model`` by ``SLLinear``, in place.

    Each layer's support depends only on ``(cfg.seed, module name, shape)``. Works on the meta
    device (nothing is allocated; call ``slcompile.reset_sl_parameters`` after ``to_empty``).
    Idempotent: ``SLLinear`` modules are left alone. Returns the model (a new object only when
    the root itself was an ``nn.Linear``) and a :class:`TransformReport`.

    Raises ``ValueError`` if nothing is eligible and the model holds no ``SLLinear`` either.
    """
    if not isinstance(cfg, SLConfig):
        raise TypeError(f"transform expects an SLConfig, got {type(cfg).__name__}")
    report = TransformReport(params_before=count_parameters(model))
    chosen, report.kept = select_linears(model, cfg)
    already = any(isinstance(m, SLLinear) for m in model.modules())
    if not chosen and not already:
        kept = "; ".join(f"{n or '<root>'}: {r}" for n, r in report.kept.items()) or "no nn.Linear at all"
        raise ValueError(f"transform found no eligible nn.Linear in {type(model).__name__} ({kept})")
    for name, linear in chosen:
        layer = build_sl_linear(name, linear, cfg)
        model = swap_module(model, name, layer)
        report.replaced.append(describe(name, layer))
    report.params_after = count_parameters(model)
    return model, report


def merge(model: nn.Module) -> nn.Module:
    """Replace every ``SLLinear`` by an ``nn.Linear`` holding its dense ``W`` (same outputs).

    In place; returns the model (a new object only when the root itself was an ``SLLinear``).
    """
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, SLLinear)]:
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=layer.A.device, dtype=layer.A.dtype)
        with torch.no_grad():
            linear.weight.copy_(layer.dense_weight())
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        model = swap_module(model, name, linear)
    return model

"""Module swap: ``transform`` turns eligible linear layers into ``SLLinear``; ``merge`` undoes it.

Linear-like module kinds (torchao style: one config, one handler per module kind, see
:data:`LINEAR_KINDS`): ``nn.Linear`` (``y = x W^T + b``, ``W (out, in)``) and GPT-2's ``Conv1D``
(``transformers.pytorch_utils.Conv1D``, recognised by class name and attributes, not imported:
``y = x W + b``, ``W (in, out)``). Selection happens in :func:`select_linears`, shared with the FX
pass (through :func:`linear_keep_reason`) so both entry points replace the same layers with the
same supports. Every other 2-D or stacked 3-D projection weight (fused MoE experts, routers,
``nn.MultiheadAttention``'s ``in_proj_weight``, ...) is listed in ``report.kept`` with its reason.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from slcompile.config import SLConfig
from slcompile.layers import SLLinear
from slcompile.support import layer_seed, nnz_for


@dataclass(frozen=True)
class LinearKind:
    """How ``transform`` and ``merge`` handle one kind of linear-like module.

    ``recognise(module)``: True for a module of this kind; ``of_class(cls)``: True for a class of it
    (``merge`` looks up ``SLLinear.dense_cls``). ``as_linear(module)``: an ``nn.Linear`` with the module's
    weight as ``(out, in)`` and its bias (the module itself, or a template on the meta device holding a
    transposed view), all that :func:`build_sl_linear` reads. ``rebuild(cls, weight, bias)``: a module
    of this kind computing ``x weight^T + bias`` for ``weight (out, in)``, ``bias (out,)`` or None.
    """

    name: str
    recognise: Callable[[nn.Module], bool]
    of_class: Callable[[type], bool]
    as_linear: Callable[[nn.Module], nn.Linear]
    rebuild: Callable[[type, torch.Tensor, torch.Tensor | None], nn.Module]


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` (or a copy of it): class ``Conv1D`` with ``nf`` outputs and ``weight (in, nf)``."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)
            and isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == module.nf)


def _conv1d_as_linear(conv: nn.Module) -> nn.Linear:
    in_features, out_features = conv.weight.shape
    template = nn.Linear(in_features, out_features, bias=conv.bias is not None, device="meta")
    template.weight = nn.Parameter(conv.weight.detach().t(), requires_grad=conv.weight.requires_grad)
    template.bias = conv.bias
    return template


def _rebuild_linear(cls: type, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A plain ``nn.Linear`` (whatever subclass ``cls`` was) holding ``weight`` and ``bias``."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _rebuild_conv1d(cls: type, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    with torch.device("meta"):  # no random init of a weight about to be overwritten
        conv = cls(weight.shape[0], weight.shape[1])  # Conv1D(nf, nx)
    conv = conv.to_empty(device=weight.device).to(weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight.t())
        if bias is None:
            conv.bias.zero_()
        else:
            conv.bias.copy_(bias)
    return conv


LINEAR_KINDS = (
    LinearKind("nn.Linear", lambda m: isinstance(m, nn.Linear), lambda cls: issubclass(cls, nn.Linear),
               lambda m: m, _rebuild_linear),
    LinearKind("Conv1D", _is_conv1d, lambda cls: cls.__name__ == "Conv1D", _conv1d_as_linear, _rebuild_conv1d),
)


def linear_kind(module: nn.Module) -> LinearKind | None:
    """The :class:`LinearKind` of ``module``, or None if it is no linear-like module ``transform`` handles."""
    return next((kind for kind in LINEAR_KINDS if kind.recognise(module)), None)


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
    """One replaced layer: its name, shape, the kind of module it was and parameter counts before/after."""

    name: str
    in_features: int
    out_features: int
    rank: int
    nnz: int
    has_bias: bool
    kind: str = "nn.Linear"

    @property
    def params_before(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.has_bias else 0)

    @property
    def params_after(self) -> int:
        return (self.rank * (self.in_features + self.out_features) + self.nnz
                + (self.out_features if self.has_bias else 0))


@dataclass
class TransformReport:
    """What ``transform`` (or the FX pass) did: replaced layers, ``kept`` (``{name: reason}`` for every
    linear-like layer or other projection weight left dense) and the model's parameter counts."""

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
            kind = "" if layer.kind == "nn.Linear" else f" ({layer.kind})"
            lines.append(f"  SL  {layer.name}{kind}: {layer.out_features}x{layer.in_features} -> rank {layer.rank}, "
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
                       wrapped_reason: str | None = None, default_reason: str | None = None) -> str | None:
    """Why the linear ``name`` with ``weight`` stays dense under ``cfg``, or None to replace it.

    ``wrapped_reason``: why it cannot be replaced at all; ``default_reason``: why the default selection
    (``targets=None``) keeps it though it could be replaced (an output head, an MoE router).
    Raises ``ValueError`` if ``cfg.targets`` explicitly asks for a layer that cannot be replaced.
    """
    if any(matches(p, name) for p in cfg.exclude):
        return "excluded by SLConfig.exclude"
    if cfg.targets is None:
        if any(matches(p, name) for p in cfg.head_names):
            return "output head (SLConfig.head_names)"
        if default_reason is not None:
            return default_reason
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


def linear_wrapped_reason(linear: nn.Module) -> str | None:
    """Why the linear-like module ``linear`` cannot be swapped (another tool uses it), or None."""
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


def default_keep_reasons(model: nn.Module) -> dict[int, str]:
    """``{id(module): reason}`` for the linear-like modules the default selection keeps dense though it
    could replace them: ``model.get_output_embeddings()`` (if the model has it) and MoE routers (children
    named ``*gate*`` or ``*router*`` of a module with an ``experts`` child)."""
    reasons = {}
    for parent in model.modules():
        if isinstance(getattr(parent, "experts", None), nn.Module):
            for name, child in parent.named_children():
                if "gate" in name or "router" in name:
                    reasons[id(child)] = "MoE router: its top-k choice stays dense"
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, nn.Module):
        reasons[id(head)] = "output head (get_output_embeddings())"
    return reasons


# Modules whose parameters are no projection weights (a parametrization's original is reported with its module).
_NOT_PROJECTIONS = (nn.Embedding, nn.EmbeddingBag, nn.modules.conv._ConvNd, parametrize.ParametrizationList)


def _projection_like(attr: str, param: torch.Tensor) -> bool:
    """True for a 2-D or stacked 3-D weight with no size-1 dimension whose name does not say embedding or
    token (a class token ``(1, 1, d)`` or position embedding ``(1, n, d)`` is no projection)."""
    return param.dim() in (2, 3) and min(param.shape) > 1 and not re.search("emb|token", attr)


def unsupported_reason(path: str, module: nn.Module, param: torch.Tensor) -> str:
    """Why the projection-like parameter at ``path``, of ``module`` (no linear-like module), stays dense."""
    owner = type(module).__name__
    if param.dim() == 3 and "expert" in f"{path}.{owner}".lower():
        return f"fused MoE expert weights {tuple(param.shape)} of {owner}: not supported, stays dense"
    if param.dim() == 3:
        return f"stacked 3-D weight {tuple(param.shape)} of {owner}: not supported, stays dense"
    return f"{tuple(param.shape)} weight of {owner}, neither nn.Linear nor Conv1D: not supported, stays dense"


def select_linears(model: nn.Module, cfg: SLConfig) -> tuple[list[tuple[str, nn.Linear]], dict[str, str]]:
    """The linear-like modules of ``model`` to replace, each as ``(name, nn.Linear)`` (the module, or for
    a ``Conv1D`` a transposed view, see :class:`LinearKind`), and ``{name: reason}`` for every one kept
    and every other projection-like weight (2-D or stacked 3-D parameter outside embeddings and
    convolutions: under its module's name if it is the ``weight``, else under the parameter's path)."""
    tied, shared = shared_weights(model)
    defaults = default_keep_reasons(model)
    chosen, kept = [], {}
    for name, module in model.named_modules():
        if isinstance(module, SLLinear):
            kept[name] = "already an SLLinear"
            continue
        kind = linear_kind(module)
        if kind is not None:
            reason = linear_keep_reason(name, module.weight, cfg, tied, shared, linear_wrapped_reason(module),
                                        defaults.get(id(module)))
            if reason is None:
                chosen.append((name, kind.as_linear(module)))
            else:
                kept[name] = reason
            continue
        if isinstance(module, _NOT_PROJECTIONS):
            continue
        for attr, param in module.named_parameters(recurse=False):
            if _projection_like(attr, param) and id(param) not in tied:
                path = f"{name}.{attr}" if name else attr
                pname = name if attr == "weight" else path
                kept[pname] = linear_keep_reason(pname, param, cfg, tied, shared,
                                                 unsupported_reason(path, module, param), defaults.get(id(module)))
    check_targets_used(cfg, [name for name, _ in model.named_modules()] + list(kept))
    return chosen, kept


def build_sl_linear(name: str, linear: nn.Linear, cfg: SLConfig) -> SLLinear:
    """The ``SLLinear`` that replaces ``linear`` (called ``name``; an ``nn.Linear`` or a view of one) under ``cfg``."""
    rank = cfg.rank_for(linear.in_features, linear.out_features, name)
    return SLLinear.from_linear(linear, rank=rank, alpha=cfg.alpha, density=cfg.density,
                                seed=layer_seed(cfg.seed, name), path=cfg.path)


def describe(name: str, layer: SLLinear) -> ReplacedLayer:
    kind = next(k.name for k in LINEAR_KINDS if k.of_class(layer.dense_cls))
    return ReplacedLayer(name, layer.in_features, layer.out_features, layer.rank,
                         nnz_for(layer.in_features, layer.out_features, layer.density), layer.bias is not None, kind)


def swap_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` in ``model``; returns the (possibly new) root."""
    if not name:
        return new
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return model


def transform(model: nn.Module, cfg: SLConfig) -> tuple[nn.Module, TransformReport]:
    """Replace the eligible linear-like modules of ``model`` (``nn.Linear``, ``Conv1D``) by ``SLLinear``, in place.

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
        raise ValueError(f"transform found no eligible nn.Linear or Conv1D in {type(model).__name__} ({kept})")
    for name, linear in chosen:
        layer = build_sl_linear(name, linear, cfg)
        layer.dense_cls = type(model.get_submodule(name) if name else model)
        model = swap_module(model, name, layer)
        report.replaced.append(describe(name, layer))
    report.params_after = count_parameters(model)
    return model, report


def merge(model: nn.Module) -> nn.Module:
    """Replace every ``SLLinear`` by a dense module holding its ``W`` (same outputs): an ``nn.Linear``,
    or a ``Conv1D`` (weight ``W^T``) where ``transform`` replaced one (``SLLinear.dense_cls``).

    In place; returns the model (a new object only when the root itself was an ``SLLinear``).
    """
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, SLLinear)]:
        kind = next(k for k in LINEAR_KINDS if k.of_class(layer.dense_cls))
        with torch.no_grad():
            dense = kind.rebuild(layer.dense_cls, layer.dense_weight(), layer.bias)
        model = swap_module(model, name, dense)
    return model

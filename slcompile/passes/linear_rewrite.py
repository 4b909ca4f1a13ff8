"""FX pass: rewrite the eligible linear nodes of a ``GraphModule`` into ``slcompile::sl_linear``.

Graph forms recognised as a linear ``y = x @ W.T + bias`` with ``W (out, in)``:

- ``call_module`` to an ``nn.Linear`` (``torch.fx.symbolic_trace``);
- ``call_function`` ``F.linear`` (== ``torch._C._nn.linear``, symbolic_trace of functional code) and
  ``aten.linear.default`` (``torch.export.export(model, args).module()``): ``(input, weight, bias=None)``;
- ``aten.mm.default(x, Wt)`` and ``aten.addmm.default(bias, x, Wt)`` (beta = alpha = 1, ``bias (out,)``)
  with ``Wt = aten.t / aten.permute(.., [1, 0]) / aten.transpose(.., 0, 1)`` of a ``get_attr``, and
  ``aten.bmm.default(x, view(expand(Wt, [b, in, out])))``: what ``run_decompositions()`` makes of an
  exported ``aten.linear`` (the ``bmm`` form for a non-contiguous 3-D input; the ``view``s it puts around
  the 2-D ``mm`` stay, ``sl_linear`` takes the same ``x`` as the matrix product);
- GPT-2's ``Conv1D`` (``y = x @ W + bias``, ``W (in, out)``): ``aten.addmm(bias, view(x), W)`` (export) or
  ``torch.addmm`` (symbolic_trace), ``mm`` without bias, with ``W`` a plain ``get_attr`` of a parameter (no
  transpose). Rewritten as the linear with weight ``W^T`` only when the weight's owner is a ``Conv1D``: the
  module itself, or the class the node's ``nn_module_stack`` records (tracing and export keep weights in
  bare ``nn.Module`` holders). Any other parameter read as ``x @ W`` stays dense with a reason: nothing
  says it is a linear layer's weight (``transform`` keeps it too).

A node is rewritten when its weight is a ``get_attr`` of an ``nn.Parameter`` of the GraphModule (or the
weight of the called ``nn.Linear``) and the selection rules of :func:`slcompile.transform` pick it
(:func:`~slcompile.transform.linear_keep_reason`: targets, exclude, head names, tied to an embedding,
shared, wrapped). ``torch.export``: ``ExportedProgram.module()`` (torch 2.13) turns the lifted parameters
back into ``get_attr`` nodes under their original paths; the graph of ``ExportedProgram.graph_module``
takes them as placeholders (graph inputs) and is left alone, with that reason.

Layer name (support seed ``layer_seed(cfg.seed, name)`` and selection): the owner module path for a
parameter called ``weight`` (``"layers.0.q_proj"`` for ``"layers.0.q_proj.weight"``, the target of a
``call_module``), else the parameter's full path (``"mlp.w1"``: one module may hold several functional
weights). A traced or exported model thus gets exactly the supports ``transform`` gives the eager one.

Rewrite: an ``SLLinear`` from :func:`~slcompile.transform.build_sl_linear` is installed at the layer name
(``dense_cls`` = the owner's class where it is linear-like, so ``merge`` and the report name a ``Conv1D``),
replacing the owner when it is an ``nn.Linear``, a ``Conv1D`` or a bare holder module with nothing but
``weight`` and ``bias`` (the bias moves into the ``SLLinear`` at the same path, as ``transform`` does), otherwise at the
weight's own path (the parameter becomes that submodule). Each use becomes
``sl_linear(x, <path>.A, <path>.B, <path>.values, <path>.support, scale, bias)`` and the dense weight is
deleted. A weight read by several linear nodes (a module called twice) is replaced once and shared by
all of them; a weight that any other node reads (or a module called as a whole) stays dense.

Left dense, with a reason in ``report.kept`` (under the layer name, or ``"node <name>"`` when the weight
has none): weights computed at run time or passed as graph inputs (placeholders), buffers and constants,
parametrized weights, a parameter read as ``x @ W`` whose owner is no ``Conv1D``, a ``Conv1D`` weight
read as ``x @ W.T``, a weight read both ways, the rules of ``transform``. Not recognised as linears at
all: ``x @ W.T`` written as ``matmul`` / ``operator.matmul`` / ``.t()`` methods (symbolic_trace of
``x @ self.w.T``), ``mm``/``addmm`` whose second operand is neither a transposed ``get_attr`` as above
nor a plain ``get_attr`` of a parameter (``x @ buffer`` is a table lookup, not a layer), ``bmm`` of an
untransposed weight, ``addmm`` with ``beta``/``alpha`` != 1. The inserted op does no autocast: dtypes
are whatever the graph's own casts make them.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import reduce

import torch
from torch import fx, nn
from torch.nn import functional as F

from slcompile.config import SLConfig
from slcompile.layers import SLLinear
from slcompile.transform import (LINEAR_KINDS, TransformReport, count_parameters, shared_weights, swap_module,
                                 build_sl_linear, check_targets_used, describe, linear_keep_reason, linear_kind,
                                 linear_wrapped_reason)
from slcompile.passes.nodes import SL_LINEAR

__all__ = ["rewrite_linears"]

aten = torch.ops.aten
_LINEAR_FNS = {F.linear, aten.linear.default}  # (input, weight, bias=None); F.linear is torch._C._nn.linear
_MM = {aten.mm.default, torch.mm}  # torch.*: symbolic_trace of Conv1D's torch.addmm(bias, x, W)
_ADDMM = {aten.addmm.default, torch.addmm}
_EMBEDDING_WEIGHT_ARG = {F.embedding: 1, aten.embedding.default: 0}
_PARAMETRIZED = "module is parametrized (torch.nn.utils.parametrize)"
# Where each linear form takes its input and bias: (position, keyword).
_INPUT_AND_BIAS = {"module": ((0, "input"), None), "linear": ((0, "input"), (2, "bias")),
                   "mm": ((0, "self"), None), "addmm": ((1, "mat1"), (0, "self")), "bmm": ((0, "self"), None)}


@dataclass
class _LinearNode:
    """One node computing ``x @ W.T + bias``, and where its weight comes from.

    ``x`` and ``bias`` are read from the node's arguments when needed: rewriting an earlier node
    replaces the node they point to.
    """

    node: fx.Node
    form: str  # a key of _INPUT_AND_BIAS
    weight: object = None  # node giving W (out, in), or W^T (in, out) if transposed; None for a call_module
    weight_chain: tuple[fx.Node, ...] = ()  # nodes from the linear node back to W: t(W) for an mm, ...
    module: str | None = None  # the called nn.Linear (call_module)
    module_bias: str | None = None  # path of that nn.Linear's bias, if it has one
    transposed: bool = False  # x @ W for a weight stored (in, out), as GPT-2's Conv1D does

    @property
    def x(self) -> fx.Node:
        return _arg(self.node, *_INPUT_AND_BIAS[self.form][0])

    @property
    def bias(self) -> fx.Node | str | None:
        """The bias node, or the bias parameter's path for a call_module."""
        if self.module is not None:
            return self.module_bias
        spec = _INPUT_AND_BIAS[self.form][1]
        return None if spec is None else _arg(self.node, *spec)


@dataclass
class _Layer:
    """A weight parameter (``path``) and the linear nodes that read it."""

    path: str
    uses: list[_LinearNode] = field(default_factory=list)


def _arg(node: fx.Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _fetch(gm: nn.Module, target: str):
    return reduce(getattr, target.split("."), gm) if target else gm


def _untransposed(node) -> fx.Node | None:
    """``W`` if ``node`` is ``t(W)``, ``permute(W, [1, 0])`` or ``transpose(W, 0, 1)`` of a ``get_attr``."""
    if not _is_call(node, aten.t.default, aten.permute.default, aten.transpose.int):
        return None
    if node.target is aten.permute.default:
        swapped = [d % 2 for d in node.args[1]] == [1, 0]
    elif node.target is aten.transpose.int:
        swapped = {d % 2 for d in node.args[1:3]} == {0, 1}
    else:  # aten.t
        swapped = True
    source = node.args[0] if swapped else None
    return source if isinstance(source, fx.Node) and source.op == "get_attr" else None


def _as_linear(gm: fx.GraphModule, node: fx.Node) -> _LinearNode | None:
    """The linear computed by ``node``, or None if it is no linear form handled here."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not isinstance(module, nn.Linear):
            return None
        bias = None if module.bias is None else f"{node.target}.bias"
        return _LinearNode(node, "module", module=node.target, module_bias=bias)
    if node.op != "call_function":
        return None
    if node.target in _LINEAR_FNS:
        return _LinearNode(node, "linear", _arg(node, 1, "weight"))
    if node.target in _MM:
        form, chain = "mm", [_arg(node, 1, "mat2")]
    elif node.target in _ADDMM and node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1:
        form, chain = "addmm", [_arg(node, 2, "mat2")]
    elif node.target is aten.bmm.default:
        form, chain = "bmm", _batch_broadcast(_arg(node, 1, "mat2"))
    else:
        return None
    weight = _untransposed(chain[-1]) if chain else None
    if weight is None and form != "bmm" and _is_parameter(gm, chain[-1]):
        return _LinearNode(node, form, chain[-1], transposed=True)  # x @ W, W (in, out): Conv1D
    if weight is None:
        return None
    if form == "bmm" and not _broadcasts_matrix(gm, chain[-2], weight):
        return None
    return _LinearNode(node, form, weight, tuple(chain))


def _is_parameter(gm: fx.GraphModule, node) -> bool:
    """``node`` is a ``get_attr`` of an ``nn.Parameter`` (a buffer read as ``x @ buf`` is no linear weight)."""
    return (isinstance(node, fx.Node) and node.op == "get_attr"
            and isinstance(_fetch(gm, node.target), nn.Parameter))


def _batch_broadcast(node) -> list[fx.Node]:
    """``[view, expand, Wt]`` (or ``[expand, Wt]``) if ``node`` is ``view(expand(Wt, [b, in, out]), [b, in, out])``:
    how an exported ``linear`` of a non-contiguous 3-D input decomposes into ``bmm``; else ``[]``."""
    chain = []
    if _is_call(node, aten.view.default, aten._unsafe_view.default, aten.reshape.default):
        chain.append(node)
        node = node.args[0]
    if not _is_call(node, aten.expand.default) or len(node.args[1]) != 3:
        return []
    if chain and list(chain[0].args[1]) != list(node.args[1]):
        return []
    return chain + [node, node.args[0]]


def _broadcasts_matrix(gm: fx.GraphModule, expand: fx.Node, weight: fx.Node) -> bool:
    """True if ``expand`` only adds a batch dimension to ``W.T`` (no broadcast of a size-1 dim of W)."""
    value = _fetch(gm, weight.target)
    return (isinstance(value, torch.Tensor) and value.dim() == 2
            and list(expand.args[1][1:]) == [value.shape[1], value.shape[0]])


def _is_call(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _unnamed_reason(weight) -> str:
    """Why a linear whose weight is no ``get_attr`` stays dense."""
    if isinstance(weight, fx.Node) and weight.op == "placeholder":
        return (f"weight is the graph input {weight.name!r}, not a get_attr of a parameter "
                "(for torch.export pass ExportedProgram.module(), whose parameters are get_attr nodes)")
    if isinstance(weight, fx.Node):
        return f"weight is computed at run time (by node {weight.name!r}), not a constant parameter"
    return f"weight is {weight!r}, not a graph node"


def _layer_name(path: str) -> tuple[str, str | None]:
    """The layer name of the weight parameter at ``path``, and a reason to keep it if parametrized."""
    head, parametrized, _ = f".{path}".partition(".parametrizations.")
    if parametrized:
        return head[1:], _PARAMETRIZED
    owner, _, attr = path.rpartition(".")
    return (owner if attr == "weight" else path), None


def _stray_use(gm: fx.GraphModule, layer: _Layer) -> str | None:
    """A node other than ``layer``'s linear nodes that reads its weight, described; or None."""
    linear_nodes = {use.node for use in layer.uses}
    chains = {n for use in layer.uses for n in use.weight_chain}
    allowed = linear_nodes | chains
    for node in gm.graph.nodes:
        if node.op == "call_module" and layer.path.startswith(node.target + ".") and node not in linear_nodes:
            return f"weight also used inside module {node.target!r} (called by node {node.name!r})"
        if (node.op == "get_attr" and node.target == layer.path) or node in chains:
            for reader in node.users:
                if reader not in allowed:
                    return f"weight also used by node {reader.name!r} ({reader.target})"
    for use in layer.uses:
        if any(isinstance(n, fx.Node) and n.op == "get_attr" and n.target == layer.path for n in (use.x, use.bias)):
            return f"weight also used as input or bias of node {use.node.name!r}"
    return None


def _keep_reason(gm: fx.GraphModule, layer: _Layer, cfg: SLConfig, tied: set[int], shared: set[int]) -> str | None:
    """Why ``layer`` stays dense (``transform``'s rules plus the graph's own), or None to rewrite it."""
    name, wrapped = _layer_name(layer.path)
    weight = _fetch(gm, layer.path)
    if wrapped is None:
        wrapped = next((linear_wrapped_reason(gm.get_submodule(use.module)) for use in layer.uses
                        if use.module is not None), None)
    if wrapped is None and not isinstance(weight, nn.Parameter):
        wrapped = f"weight is a {type(weight).__name__} (buffer or constant), not an nn.Parameter"
    if wrapped is None and weight.dim() != 2:
        wrapped = f"weight has shape {tuple(weight.shape)}, not (out, in)"
    if wrapped is None:
        wrapped = _layout_reason(gm, layer)
    if wrapped is None:
        wrapped = _stray_use(gm, layer)
    if wrapped is None and any(not _is_vector(gm, use.bias, weight.shape[int(use.transposed)]) for use in layer.uses
                               if use.form == "addmm"):
        wrapped = "addmm bias is not an (out,) vector"
    return linear_keep_reason(name, weight, cfg, tied, shared, wrapped)


def _owner_class(gm: fx.GraphModule, layer: _Layer) -> type | None:
    """The class of the module owning ``layer``'s weight: the module itself where the graph keeps it (a
    ``call_module``, a hand-built graph), else the class its linear nodes' ``nn_module_stack`` records
    (``symbolic_trace`` and ``torch.export`` keep the weight in a bare ``nn.Module`` holder); None if unknown."""
    owner_path = layer.path.rpartition(".")[0]
    owner = gm.get_submodule(owner_path)
    if type(owner) is not nn.Module and not isinstance(owner, fx.GraphModule):
        return type(owner)
    for use in layer.uses:
        for path, cls in use.node.meta.get("nn_module_stack", {}).values():
            if path == owner_path and isinstance(cls, str):  # torch.export: "package.module.Class"
                module_name, _, name = cls.rpartition(".")
                cls = getattr(sys.modules.get(module_name), name, None)  # already imported by the model
            if path == owner_path and isinstance(cls, type):
                return cls
    return None


def _stores_transposed(cls: type | None) -> bool:
    """Modules of ``cls`` store their weight ``(in, out)`` and compute ``x @ W`` (GPT-2's ``Conv1D``)."""
    return cls is not None and any(kind.name == "Conv1D" and kind.of_class(cls) for kind in LINEAR_KINDS)


def _layout_reason(gm: fx.GraphModule, layer: _Layer) -> str | None:
    """Why ``layer``'s weight is not read the way its owner stores it, or None.

    ``x @ W`` is a linear with weight ``W^T`` only for a ``Conv1D`` weight: any other parameter read that way
    (an ``(in, out)`` functional weight, an attention table) is not known to be a linear layer's, so it stays
    dense, as ``transform`` keeps it; and a ``Conv1D`` weight read as ``x @ W.T`` is no ``Conv1D`` product.
    """
    ways = {use.transposed for use in layer.uses}
    if ways == {True, False}:
        return "weight read both as x @ W.T (nn.Linear layout) and as x @ W (Conv1D layout)"
    cls = _owner_class(gm, layer)
    owner = "a module of unknown class" if cls is None else cls.__name__
    if ways == {True} and not _stores_transposed(cls):
        return f"weight of {owner} read as x @ W: only a Conv1D weight is taken as a linear (in, out) weight"
    if ways == {False} and _stores_transposed(cls):
        return "Conv1D weight (in, out) read as x @ W.T"
    return None


def _is_vector(gm: fx.GraphModule, node, size: int) -> bool:
    value = _fetch(gm, node.target) if node.op == "get_attr" else node.meta.get("val")
    return isinstance(value, torch.Tensor) and tuple(value.shape) == (size,)


def _embedding_weights(gm: fx.GraphModule) -> set[int]:
    """Ids of the parameters that embedding nodes of the graph read (tied weights of an exported model)."""
    ids = set()
    for node in gm.graph.nodes:
        index = _EMBEDDING_WEIGHT_ARG.get(node.target) if node.op == "call_function" else None
        weight = None if index is None or len(node.args) <= index else node.args[index]
        if isinstance(weight, fx.Node) and weight.op == "get_attr":
            ids.add(id(_fetch(gm, weight.target)))
    return ids


def _select(gm: fx.GraphModule, cfg: SLConfig) -> tuple[list[tuple[str, _Layer]], dict[str, str]]:
    """The layers to rewrite as ``(name, layer)``, and ``{name: reason}`` for the linears kept."""
    layers: dict[str, _Layer] = {}
    kept: dict[str, str] = {name: "already an SLLinear" for name, m in gm.named_modules() if isinstance(m, SLLinear)}
    for node in gm.graph.nodes:
        linear = _as_linear(gm, node)
        if linear is None:
            continue
        if linear.module is not None:
            path = f"{linear.module}.weight"
        elif isinstance(linear.weight, fx.Node) and linear.weight.op == "get_attr":
            path = linear.weight.target
        else:
            kept[f"node {node.name}"] = _unnamed_reason(linear.weight)
            continue
        layers.setdefault(path, _Layer(path)).uses.append(linear)
    check_targets_used(cfg, [name for name, _ in gm.named_modules()] + [_layer_name(p)[0] for p in layers])
    tied, shared = shared_weights(gm)
    tied |= _embedding_weights(gm)
    chosen = []
    for path, layer in layers.items():
        reason = _keep_reason(gm, layer, cfg, tied, shared)
        if reason is None:
            chosen.append((_layer_name(path)[0], layer))
        else:
            kept[_layer_name(path)[0]] = reason
    return chosen, kept


def _replaceable_owner(gm: fx.GraphModule, owner_path: str) -> bool:
    """True if the module at ``owner_path`` holds nothing but ``weight``/``bias`` parameters, which the
    graph reads only through them (an ``nn.Linear``, a ``Conv1D`` or a bare holder made by tracing/export)."""
    owner = gm.get_submodule(owner_path)
    if not (linear_kind(owner) is not None or type(owner) is nn.Module):
        return False
    if next(owner.children(), None) is not None or next(owner.buffers(recurse=False), None) is not None:
        return False
    if not {name for name, _ in owner.named_parameters(recurse=False)} <= {"weight", "bias"}:
        return False
    allowed = {owner_path, f"{owner_path}.weight", f"{owner_path}.bias"}
    return not any(node.op in ("get_attr", "call_module") and node.target.startswith(owner_path + ".")
                   and node.target not in allowed for node in gm.graph.nodes)


def _install(gm: fx.GraphModule, name: str, layer: _Layer, cfg: SLConfig) -> tuple[str, SLLinear]:
    """Build the ``SLLinear`` of ``layer`` and put it in ``gm`` (deleting the dense weight); returns its path."""
    weight = _fetch(gm, layer.path)
    owner_path, _, attr = layer.path.rpartition(".")
    replace_owner = bool(owner_path) and attr == "weight" and _replaceable_owner(gm, owner_path)
    bias = dict(gm.get_submodule(owner_path).named_parameters(recurse=False)).get("bias") if replace_owner else None
    if layer.uses[0].transposed:  # W (in, out): the template holds W^T (out, in), as transform's Conv1D view
        weight = nn.Parameter(weight.detach().t(), requires_grad=weight.requires_grad)
    out_features, in_features = weight.shape
    template = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    template.weight = weight  # build_sl_linear reads shape, device, dtype and bias from its template
    if bias is not None:
        template.bias = bias
    sl = build_sl_linear(name, template, cfg)
    owner_cls = _owner_class(gm, layer) if attr == "weight" else None
    if owner_cls is not None and any(kind.of_class(owner_cls) for kind in LINEAR_KINDS):
        sl.dense_cls = owner_cls  # merge gives back this kind of module, the report names it
    if not replace_owner:
        delattr(gm.get_submodule(owner_path), attr)  # the parameter's slot becomes the SLLinear submodule
    path = owner_path if replace_owner else layer.path
    swap_module(gm, path, sl)
    return path, sl


def _rewrite_use(graph: fx.Graph, use: _LinearNode, path: str, sl: SLLinear) -> None:
    """Replace the linear node ``use`` by ``sl_linear`` reading the ``SLLinear`` at ``path``."""
    with graph.inserting_before(use.node):
        factors = [graph.get_attr(f"{path}.{attr}") for attr in ("A", "B", "values", "support")]
        bias = graph.get_attr(use.bias) if isinstance(use.bias, str) else use.bias
        args = (use.x, *factors, sl.scale) + (() if bias is None else (bias,))
        new = graph.call_function(SL_LINEAR, args)
    new.meta.update(use.node.meta)  # same output: keeps val, stack_trace, nn_module_stack
    use.node.replace_all_uses_with(new)
    graph.erase_node(use.node)
    for node in use.weight_chain:  # from the linear node back to W: each is unused once the next is gone
        if not node.users:
            graph.erase_node(node)


def rewrite_linears(gm: fx.GraphModule, cfg: SLConfig) -> tuple[fx.GraphModule, TransformReport]:
    """Rewrite every eligible linear node of ``gm`` into ``slcompile::sl_linear``, in place.

    Selection, names, supports and init are those of :func:`slcompile.transform` on the eager model
    (see the module docstring for the graph forms). Idempotent: ``sl_linear`` nodes and ``SLLinear``
    submodules are left alone. Returns ``gm`` (recompiled) and a :class:`TransformReport`.

    Raises ``ValueError`` if no node is eligible and ``gm`` holds no ``sl_linear``/``SLLinear`` either.
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"rewrite_linears expects a torch.fx.GraphModule, got {type(gm).__name__}")
    if not isinstance(cfg, SLConfig):
        raise TypeError(f"rewrite_linears expects an SLConfig, got {type(cfg).__name__}")
    report = TransformReport(params_before=count_parameters(gm))
    chosen, report.kept = _select(gm, cfg)
    already = (any(node.target is SL_LINEAR for node in gm.graph.nodes)
               or any(isinstance(m, SLLinear) for m in gm.modules()))
    if not chosen and not already:
        kept = "; ".join(f"{n or '<root>'}: {r}" for n, r in report.kept.items()) or "no linear node at all"
        raise ValueError(f"rewrite_linears found no eligible linear node in the graph ({kept})")
    for name, layer in chosen:
        path, sl = _install(gm, name, layer, cfg)
        for use in layer.uses:
            _rewrite_use(gm.graph, use, path, sl)
        for node in [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == layer.path]:
            gm.graph.erase_node(node)  # all its readers were rewritten (or it had none)
        report.replaced.append(describe(name, sl))
    gm.graph.lint()
    gm.recompile()
    report.params_after = count_parameters(gm)
    return gm, report

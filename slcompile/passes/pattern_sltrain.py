"""FX pass: recognize SLTrain written with ordinary torch ops and call ``slcompile::sl_linear``.

Where it runs: on the **Dynamo graph** (torch-level ops, before AOTAutograd), inside the
``slcompile`` backend (:mod:`slcompile.backend`) before ``compile_fx``; so the registered
autograd of ``sl_linear`` applies (only ``x`` saved, ``W`` recomputed in backward) instead of
whatever autograd would save for the hand-written product (``W`` and an int64 index).

Recognized, with ``s`` any product/quotient of Python numbers (``s`` on ``A``, on ``B`` or on the
product, any number of times), ``@`` any of ``operator.matmul`` / ``torch.mm`` / ``torch.matmul``
/ ``.mm`` / ``.matmul`` on 2-D operands, ``flat(.)`` a ``view(-1)`` / ``reshape(-1)`` /
``flatten()`` and ``unflat(.)`` any ``view`` / ``reshape`` / ``view_as`` back to ``(out, in)``::

    L = s * B @ A                                    # B (out, r), A (r, in)
    W = unflat(scatter(flat(L), idx, values))        # form 1: add into the low-rank product
    W = L + unflat(scatter(zeros(out * in), idx, values))   # form 2: separate dense S (either order)
    y = F.linear(x, W, bias)   or   y = x @ W.t()  (.T, .mT, .transpose(0, 1), .permute(1, 0))

where ``scatter(t, idx, v)`` is an accumulating scatter along dim 0 with a 1-D integer ``idx`` and
1-D ``v`` of the same length: ``t.index_add(0, idx, v)`` (no ``alpha``), ``t.index_put((idx,), v,
accumulate=True)`` or ``t.scatter_add(0, idx, v)`` (method or ``torch.`` function), and
``zeros`` is ``torch.zeros`` / ``zeros_like`` / ``new_zeros``. Accumulation makes the forms equal
to ``sl_linear`` for any index in ``[0, out * in)`` (repeated positions add up in both; negative
indices, which ``index_put`` wraps, are not supported by the op). A widening ``.long()`` /
``.to(torch.int64)`` of an int32 index is dropped (the op takes int32 as is).

In-place scatters (``index_add_`` / ``index_put_(.., accumulate=True)`` / ``scatter_add_``) count as
the functional ones where nothing else can see the mutation: on a fresh tensor read only by the
pattern, either in a chain (``L.view(-1).scatter_add_(0, idx, v).view(out, in)``) or updating ``W``
(or the zeros of form 2) before the linear reads it, as the SLTrain authors write it::

    W = B.mm(A * s)                       # or (B @ A) * s
    W.view(-1).scatter_add_(0, idx, values)
    y = F.linear(x, W, bias)

``autograd.Function``: Dynamo records ``Fn.apply(...)`` as one ``autograd_function_apply`` node whose
forward and backward are subgraphs. When the forward returns one tensor and is nothing but one of the
forms above on its inputs (the authors' layer; recognised by structure, not by name), the call becomes
``sl_linear`` on the call's operands: ``sl_linear``'s backward replaces the function's, which is
assumed to be the gradient of its forward (turn the pass off, ``pattern_sltrain=False``, for a
function with a deliberately different backward).

A match becomes ``sl_linear(x, A, B, values, idx, s, bias)`` and the matched nodes are erased.
Left alone, with a note naming the reason where the graph is close to a match: intermediate results
used elsewhere (``W`` returned or read twice would then be computed twice), dtype mismatches, an
in-place update that is not an accumulating scatter, comes after a read of ``W`` or whose result is
used, non-accumulating ``index_put``, an ``autograd.Function`` forward that computes more than the
linear, linears under autocast (``sl_linear`` does no autocast, so the output dtype would change),
symbolic shapes that cannot be proven equal.
"""
from __future__ import annotations

import collections
import operator
from dataclasses import dataclass

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx.experimental.symbolic_shapes import statically_known_true

from slcompile.passes.nodes import SL_LINEAR, node_value

__all__ = ["SLTrainPatternPass"]


# Normalized names of the torch-level calls Dynamo records (call_function targets and call_method names).
_FUNCTIONS = {
    operator.matmul: "matmul", torch.matmul: "matmul", torch.mm: "matmul",
    operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div", torch.true_divide: "div",
    operator.add: "add", torch.add: "add",
    torch.reshape: "reshape", torch.flatten: "flatten",
    torch.index_add: "index_add", torch.index_put: "index_put", torch.scatter_add: "scatter_add",
    torch.zeros: "zeros", torch.zeros_like: "zeros",
    torch.nn.functional.linear: "linear", torch.t: "t", torch.transpose: "transpose", torch.permute: "permute",
}
_METHODS = {
    "matmul": "matmul", "mm": "matmul", "__matmul__": "matmul",
    "mul": "mul", "__mul__": "mul", "__rmul__": "mul", "div": "div", "__truediv__": "div",
    "add": "add", "__add__": "add", "__radd__": "add",
    "view": "reshape", "reshape": "reshape", "view_as": "reshape", "flatten": "flatten",
    "index_add": "index_add", "index_put": "index_put", "scatter_add": "scatter_add",
    "index_add_": "index_add", "index_put_": "index_put", "scatter_add_": "scatter_add",
    "new_zeros": "zeros", "t": "t", "transpose": "transpose", "permute": "permute",
    "long": "to_int", "to": "to_int",
}
_AUTOGRAD_FUNCTION = torch.ops.higher_order.autograd_function_apply
_GRAD_MODE = {torch._C._set_grad_enabled}
_AUTOCAST = {torch.amp.autocast_mode._enter_autocast: 1, torch.amp.autocast_mode._exit_autocast: -1}


def _kind(node) -> str | None:
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function":
        if node.target is getattr and node.args[1] in ("T", "mT"):
            return "t"
        return _FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _METHODS.get(node.target)
    return None



def _same(a, b) -> bool:
    return statically_known_true(a == b)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class _NoMatch(Exception):
    """Why a candidate linear is not an SLTrain product (a note for the report)."""


@dataclass
class _Match:
    x: fx.Node
    A: fx.Node
    B: fx.Node
    values: fx.Node
    index: fx.Node
    scale: float
    bias: object
    erase: list[fx.Node]  # matched nodes, consumer first: erased in this order once unused


class SLTrainPatternPass(CustomGraphPass):
    """Rewrite hand-written SLTrain linears of a Dynamo graph into ``slcompile::sl_linear``.

    Call on ``gm.graph`` (then ``gm.recompile()``). ``counts['sl_linear']`` counts rewrites,
    ``counts['graphs']`` graphs seen; ``notes`` says why near-misses were left alone.
    """

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.notes: list[str] = []

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,), extra=type(self).__name__)

    def __call__(self, graph: fx.Graph) -> None:
        self.counts["graphs"] += 1
        ambient = torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")
        depth = 0
        for node in list(graph.nodes):
            depth += _AUTOCAST.get(node.target, 0) if node.op == "call_function" else 0
            function = node.op == "call_function" and node.target is _AUTOGRAD_FUNCTION
            consumer = _function_output(node) if function else _consumer(node)
            if consumer is None:
                continue
            try:
                match = _function_match(node, *consumer) if function else _match(node, *consumer)
                if ambient or depth > 0:
                    raise _NoMatch("under autocast (sl_linear does no autocast)")
            except _NoMatch as why:
                if str(why):
                    self.notes.append(f"{node.name}: {why}")
                continue
            (_rewrite_function if function else _rewrite)(graph, node, match)
            self.counts["sl_linear"] += 1


def _function_output(node: fx.Node) -> tuple[fx.GraphModule, fx.Node, tuple] | None:
    """``(forward graph module, its output, consumer)`` if the ``autograd_function_apply`` ``node`` (an
    ``autograd.Function`` as Dynamo records it) returns one tensor that its forward computes by a linear
    (``_consumer``); the forward output is ``((out, *mutated), saved_for_backward)``: torch 2.11's
    Dynamo also returns the intermediates the forward modified in place (``scatter_add_``), which the
    Function's caller never reads (:func:`_function_match` checks that only ``out`` is used)."""
    body = node.args[0] if node.args else None
    if not (isinstance(body, fx.Node) and body.op == "get_attr"):
        return None
    forward = getattr(node.graph.owning_module, body.target, None)
    if not isinstance(forward, fx.GraphModule):
        return None
    result = forward.graph.output_node().args[0]
    outputs = result[0] if isinstance(result, (tuple, list)) and result else None
    if not isinstance(outputs, (tuple, list)) or not outputs:
        return None
    consumer = _consumer(outputs[0])
    return None if consumer is None else (forward, outputs[0], consumer)


def _function_match(node: fx.Node, forward: fx.GraphModule, out: fx.Node, consumer: tuple) -> _Match:
    """The SLTrain linear that the ``autograd.Function`` ``node`` computes, by the structure of its forward
    (its backward is replaced by ``sl_linear``'s); operands are ``node``'s, matched to the forward's inputs."""
    output = forward.graph.output_node()
    match = _match(out, *consumer, readers=(output,))
    extra = [n for n in forward.graph.nodes if n.op not in ("placeholder", "output") and n not in match.erase
             and n.target not in _GRAD_MODE]
    if extra:
        raise _NoMatch(f"the autograd.Function forward also computes {extra[0].name} ({extra[0].target})")
    if not node.users or any(user.target is not operator.getitem or user.args[1] != 0 for user in node.users):
        raise _NoMatch("the autograd.Function output is used other than as its single tensor")
    inputs = {p: arg for p, arg in zip(forward.graph.find_nodes(op="placeholder"), node.args[2:])}
    operands = {}
    for name in ("x", "A", "B", "values", "index", "bias"):
        value = getattr(match, name)
        if value is not None and value not in inputs:
            raise _NoMatch(f"{name} ({value.name}) is computed inside the autograd.Function forward")
        operands[name] = None if value is None else inputs[value]
    return _Match(**operands, scale=match.scale, erase=[])


def _consumer(node: fx.Node) -> tuple[fx.Node, fx.Node, object, list[fx.Node]] | None:
    """``(x, W, bias, extra nodes)`` if ``node`` is ``linear(x, W, bias)`` or ``x @ W.t()``."""
    kind = _kind(node)
    if kind == "linear":
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        x = node.args[0] if node.args else node.kwargs.get("input")
        return x, weight, bias, []
    if kind == "matmul" and len(node.args) == 2 and not node.kwargs and _is_transpose(node.args[1]):
        return node.args[0], node.args[1].args[0], None, [node.args[1]]
    return None


def _is_transpose(node) -> bool:
    kind = _kind(node)
    val = node_value(node)
    if kind is None or val is None or val.dim() != 2:
        return False
    rest = [a for a in node.args[1:] if a not in ("T", "mT")]
    if node.kwargs:
        return False
    return (kind == "t" and not rest) or (kind == "transpose" and sorted(a % 2 for a in rest) == [0, 1]) or (
        kind == "permute" and [a % 2 for a in (rest[0] if len(rest) == 1 else rest)] == [1, 0])


def _single_use(node: fx.Node, what: str, chain: list[fx.Node]) -> fx.Node:
    """``node`` if every node reading it (other than for its shape) is already matched (in ``chain``):
    then it is erased with the match; otherwise the rewrite would compute it twice."""
    if not isinstance(node, fx.Node):
        raise _NoMatch("")
    users = [u for u in node.users if not _shape_only(u, node)]
    outside = [u for u in users if u not in chain]
    if outside:
        raise _NoMatch(f"{what} ({node.name}) has {len(users)} users ({', '.join(u.name for u in outside)} "
                       "outside the pattern): rewriting would compute it twice")
    return node


def _shape_only(user: fx.Node, node: fx.Node) -> bool:
    """``user`` reads only ``node``'s shape (``t.view_as(node)``)."""
    return user.op == "call_method" and user.target == "view_as" and user.args[0] is not node


def _peel_views(node, chain: list[fx.Node]) -> fx.Node:
    while _kind(node) in ("reshape", "flatten"):
        chain.append(_single_use(node, "a view in the weight", chain))
        node = node.args[0]
    return node


def _scatter(node, chain: list[fx.Node]) -> tuple[fx.Node, fx.Node, fx.Node]:
    """``(base, idx, values)`` of an accumulating dim-0 scatter ``node`` (after views)."""
    node = _peel_views(node, chain)
    if _kind(node) not in ("index_add", "index_put", "scatter_add"):
        node = _in_place_scatter(node, chain) or node
    kind = _kind(node)
    args, kwargs = list(node.args), dict(node.kwargs)
    if kind in ("index_add", "scatter_add"):
        if len(args) != 4 or args[1] not in (0, -1) or kwargs:
            raise _NoMatch("")
        base, idx, values = args[0], args[2], args[3]
    elif kind == "index_put":
        if len(args) == 4 and "accumulate" not in kwargs:
            kwargs["accumulate"] = args.pop()
        one_index = len(args) == 3 and isinstance(args[1], (tuple, list)) and len(args[1]) == 1
        if not one_index or kwargs != {"accumulate": True}:
            raise _NoMatch(f"{node.name}: index_put is not an accumulating 1-index put")
        base, idx, values = args[0], args[1][0], args[2]
    else:
        raise _NoMatch("")
    chain.append(_single_use(node, "the scatter", chain))
    idx_val, values_val, base_val = node_value(idx), node_value(values), node_value(base)
    if (idx_val is None or values_val is None or base_val is None or base_val.dim() != 1 or idx_val.dim() != 1
            or values_val.dim() != 1 or idx_val.dtype not in (torch.int32, torch.int64)
            or not _same(idx_val.shape[0], values_val.shape[0])):
        raise _NoMatch(f"{node.name}: scatter operands are not a 1-D index and values of one length")
    return base, _plain_index(idx, chain), values


def _in_place(node) -> bool:
    """``node`` is an in-place method call (``t.index_add_(...)``, ``t.add_(...)``)."""
    return (isinstance(node, fx.Node) and node.op == "call_method" and node.target.endswith("_")
            and not node.target.startswith("__"))


def _in_place_scatter(node: fx.Node, chain: list[fx.Node]) -> fx.Node | None:
    """The in-place accumulating scatter updating ``node`` (directly, or through a ``view(-1)`` of it)
    before the matched nodes read it, or None if nothing updates ``node`` in place.

    The update (and that view) join ``chain``: ``W = s * B @ A; W.view(-1).scatter_add_(0, idx, v)``
    then reads as ``W = unflat(scatter_add(flat(s * B @ A), idx, v))``. Raises ``_NoMatch`` for an
    update that is not equivalent to that: another in-place op, several updates, an update whose
    result is used, or one coming after a reader of ``node``.
    """
    views = [v for v in node.users if _kind(v) in ("reshape", "flatten") and v.args[0] is node]
    updates = [(u, None) for u in node.users if _in_place(u) and u.args[0] is node]
    updates += [(u, v) for v in views for u in v.users if _in_place(u) and u.args[0] is v]
    if not updates:
        return None
    update, view = updates[0]
    if update in chain:
        return update
    if len(updates) > 1:
        raise _NoMatch(f"{node.name} is updated in place {len(updates)} times "
                       f"({', '.join(u.target for u, _ in updates)})")
    if _kind(update) not in ("index_add", "index_put", "scatter_add"):
        raise _NoMatch(f"{node.name} is updated in place by {update.target} ({update.name}), "
                       "not by an accumulating scatter")
    if any(user not in chain for user in update.users):  # the Function's forward output may list it (2.11)
        raise _NoMatch(f"the result of the in-place {update.target} ({update.name}) is used")
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    early = [u for u in node.users if u not in (update, view) and order[u] < order[update]]
    if early:
        raise _NoMatch(f"{early[0].name} reads {node.name} before the in-place {update.target} ({update.name}) "
                       "updates it")
    chain += [update] + ([view] if view is not None else [])
    return update


def _plain_index(idx: fx.Node, chain: list[fx.Node]) -> fx.Node:
    """The int32/int64 tensor under widening casts of ``idx`` (``sl_linear`` takes int32 as is).

    The casts join ``chain``: they are erased if nothing else uses them.
    """
    while _kind(idx) == "to_int" and isinstance(idx.args[0], fx.Node):
        extra = list(idx.args[1:]) + list(idx.kwargs.values())
        if idx.target not in ("long", "to") or (idx.target == "to" and extra != [torch.int64]):
            break
        source = node_value(idx.args[0])
        if source is None or source.dtype not in (torch.int32, torch.int64):
            break
        chain.append(idx)
        idx = idx.args[0]
    return idx


def _low_rank(node, chain: list[fx.Node]) -> tuple[fx.Node, fx.Node, float]:
    """``(B, A, s)`` of ``s * B @ A`` (after views)."""
    node = _peel_views(node, chain)
    node, scale = _scaled(node, chain)
    if _kind(node) != "matmul" or len(node.args) != 2 or node.kwargs:
        raise _NoMatch("")
    chain.append(_single_use(node, "the low-rank product", chain))
    left, s_left = _scaled(node.args[0], chain)
    right, s_right = _scaled(node.args[1], chain)
    b_val, a_val = node_value(left), node_value(right)
    if b_val is None or a_val is None or b_val.dim() != 2 or a_val.dim() != 2:
        raise _NoMatch(f"{node.name}: the product's operands are not 2-D")
    return left, right, scale * s_left * s_right


def _scaled(node, chain: list[fx.Node]) -> tuple[fx.Node, float]:
    """Peel multiplications/divisions by Python numbers: ``(tensor node, factor)``."""
    scale = 1.0
    while _kind(node) in ("mul", "div") and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        if _kind(node) == "mul" and _is_number(a) and isinstance(b, fx.Node):
            factor, inner = a, b
        elif _is_number(b) and isinstance(a, fx.Node):
            factor, inner = b, a
            if _kind(node) == "div":
                if factor == 0:
                    break
                factor = 1.0 / factor
        else:
            break
        chain.append(_single_use(node, "a scaling", chain))
        scale, node = scale * factor, inner
    return node, scale


def _match(consumer: fx.Node, x, weight, bias, extra: list[fx.Node], readers: tuple[fx.Node, ...] = ()) -> _Match:
    """The SLTrain product that ``consumer`` (a linear of ``x`` and ``weight``) computes.

    ``readers``: nodes outside the match allowed to read matched nodes (an ``autograd.Function``'s
    forward output saving ``W`` for its backward, which the rewrite replaces).
    """
    chain = [*readers, consumer, *extra]
    for node in extra:
        _single_use(node, "the transposed weight", chain)
    weight_val, x_val = node_value(weight), node_value(x)
    if weight_val is None or x_val is None or weight_val.dim() != 2:
        raise _NoMatch("")
    _in_place_scatter(weight, chain)  # W = L; W.view(-1).scatter_add_(0, idx, values): flat(W) joins the chain
    _single_use(weight, "the weight", chain)
    top = _peel_views(weight, list(chain))
    if _kind(top) == "add" and len(top.args) == 2 and not top.kwargs:
        _peel_views(weight, chain)
        chain.append(_single_use(top, "the sum L + S", chain))
        B, A, scale, idx, values = _form_two(top, chain)
    else:
        base, idx, values = _scatter(weight, chain)
        B, A, scale = _low_rank(_flat(base, chain), chain)
    out_f, in_f = node_value(B).shape[0], node_value(A).shape[1]
    low = node_value(B)
    if not (_same(weight_val.shape[0], out_f) and _same(weight_val.shape[1], in_f)):
        raise _NoMatch(f"{weight.name}: the weight is not viewed back to (out, in) = ({out_f}, {in_f})")
    if not (low.dtype == node_value(A).dtype == node_value(values).dtype == x_val.dtype == weight_val.dtype):
        raise _NoMatch(f"{consumer.name}: x, A, B, values differ in dtype")
    return _Match(x, A, B, values, idx, float(scale), bias, chain[len(readers):])


def _flat(base, chain: list[fx.Node]) -> fx.Node:
    """The 2-D tensor that ``base`` flattens (``view(-1)`` / ``reshape(-1)`` / ``flatten()``)."""
    if _kind(base) not in ("reshape", "flatten"):
        raise _NoMatch("")
    chain.append(_single_use(base, "the flattened product", chain))
    source = base.args[0]
    source_val = node_value(source)
    if source_val is None or source_val.dim() != 2:
        raise _NoMatch(f"{base.name}: does not flatten a 2-D product")
    return source


def _form_two(top: fx.Node, chain: list[fx.Node]):
    """``L + unflat(scatter(zeros, idx, values))`` in either order."""
    reasons = []
    for low, sparse in (top.args, top.args[::-1]):
        trial = list(chain)
        try:
            base, idx, values = _scatter(sparse, trial)
            if _kind(base) != "zeros":
                raise _NoMatch("the scatter target is not zeros")
            trial.append(_single_use(base, "the zeros", trial))
            B, A, scale = _low_rank(low, trial)
        except _NoMatch as why:
            reasons.append(str(why))
            continue
        chain[:] = trial
        return B, A, scale, idx, values
    raise _NoMatch(next((r for r in reasons if r), ""))


def _insert(graph: fx.Graph, before: fx.Node, match: _Match, meta: dict) -> fx.Node:
    """``sl_linear`` of ``match`` inserted before ``before``, with the output metadata of ``meta``."""
    with graph.inserting_before(before):
        args = (match.x, match.A, match.B, match.values, match.index, match.scale)
        node = graph.call_function(SL_LINEAR, args + ((match.bias,) if match.bias is not None else ()))
    node.meta.update({k: v for k, v in meta.items() if k in ("example_value", "val", "stack_trace",
                                                             "nn_module_stack", "source_fn_stack")})
    return node


def _rewrite_function(graph: fx.Graph, apply: fx.Node, match: _Match) -> None:
    """Replace the ``autograd.Function`` call ``apply`` (and its ``[0]``) by ``sl_linear``; drop its
    forward and backward subgraphs once no other call uses them."""
    getters = list(apply.users)
    node = _insert(graph, apply, match, getters[0].meta)
    for getter in getters:
        getter.replace_all_uses_with(node)
        graph.erase_node(getter)
    bodies = [b for b in apply.args[:2] if isinstance(b, fx.Node)]
    graph.erase_node(apply)
    for body in bodies:
        if not body.users:
            graph.erase_node(body)
        if not graph.find_nodes(op="get_attr", target=body.target):  # Dynamo may share a body between calls
            graph.owning_module.delete_submodule(body.target)


def _rewrite(graph: fx.Graph, consumer: fx.Node, match: _Match) -> None:
    node = _insert(graph, consumer, match, consumer.meta)
    consumer.replace_all_uses_with(node)
    alive = list(dict.fromkeys(match.erase))  # a node may be matched twice (flat(W) of an in-place update)
    while True:  # erase matched nodes once unused (a shape-only use may come later in the chain)
        dead = [old for old in alive if not old.users]
        if not dead:
            break
        for old in dead:
            graph.erase_node(old)
            alive.remove(old)

"""Inductor post-grad pass: one GEMM for the ``sl_linear`` calls that read the same input.

Where it runs: ``torch._inductor.config.post_grad_custom_post_pass`` (set by the ``slcompile``
backend, :mod:`slcompile.backend`), i.e. on the forward (and inference) graphs after
AOTAutograd, where SLTrain linears are ``slcompile.sl_linear.default`` nodes. The backward
graph holds ``sl_linear_backward`` nodes and is left as is (forward-only fusion).

A group of ``k >= min_group`` ``sl_linear`` nodes with the same input ``x`` (q/k/v of
attention, gate/up of a gated MLP), one dtype and static shapes becomes::

    W_i = slcompile.materialize(A_i, B_i, values_i, support_i, scale_i)   # each (out_i, in)
    y   = addmm(cat(bias_i), x.reshape(-1, in), cat(W_i).T)              # one GEMM (mm without bias)
    y_i = y.reshape(*x.shape[:-1], sum(out_i))[..., o_i:o_i + out_i]     # views: no copy

Same values as the separate calls (the GEMM sums in the same order per output column); memory:
the ``W_i`` and their concatenation are transients of the forward only (backward still
recomputes each ``W_i``), and each ``y_i`` is a view of the fused output, so a saved ``y_i``
keeps the whole fused output alive until backward (q, k, v and gate/up are all saved by their
consumers anyway). Members missing a bias get zeros in the concatenated bias.
"""
from __future__ import annotations

import collections
import functools

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.pattern_matcher import stable_topological_sort

from slcompile.passes.nodes import SL_LINEAR

__all__ = ["FuseSharedInputPass"]

aten = torch.ops.aten
MATERIALIZE = torch.ops.slcompile.materialize.default


class FuseSharedInputPass(CustomGraphPass):
    """Fuse ``sl_linear`` nodes sharing their input into one materialize-cat-GEMM-split.

    ``counts['groups']`` / ``counts['sl_linear']``: groups fused and linears in them;
    ``counts['graphs']``: graphs seen; ``notes``: groups left alone and why.
    """

    def __init__(self, min_group: int = 2) -> None:
        if isinstance(min_group, bool) or not isinstance(min_group, int) or min_group < 2:
            raise ValueError(f"fuse_min_group must be an int >= 2, got {min_group!r}")
        self.min_group = min_group
        self.counts: collections.Counter = collections.Counter()
        self.notes: list[str] = []

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,), extra=f"{type(self).__name__}:min_group={self.min_group}")

    def __call__(self, graph: fx.Graph) -> None:
        self.counts["graphs"] += 1
        groups: dict[fx.Node, list[fx.Node]] = collections.defaultdict(list)
        for node in graph.nodes:
            if node.op == "call_function" and node.target is SL_LINEAR and isinstance(node.args[0], fx.Node):
                groups[node.args[0]].append(node)
        changed = False
        for x, members in groups.items():
            if len(members) < self.min_group:
                continue
            reason = _unfusable(x, members)
            if reason is not None:
                self.notes.append(f"{', '.join(m.name for m in members)}: {reason}")
                continue
            _fuse(graph, x, members)
            self.counts["groups"] += 1
            self.counts["sl_linear"] += len(members)
            changed = True
        if changed:
            stable_topological_sort(graph)  # a member's users may precede the fused GEMM
            graph.lint()


def _args(node: fx.Node) -> tuple:
    """``(x, A, B, values, support, scale, bias)`` of an ``sl_linear`` node."""
    names = ("x", "A", "B", "values", "support", "scale", "bias")
    args = list(node.args) + [node.kwargs.get(n) for n in names[len(node.args):]]
    return tuple(args)


def _unfusable(x: fx.Node, members: list[fx.Node]) -> str | None:
    x_val = x.meta.get("val")
    if not isinstance(x_val, torch.Tensor) or any(not isinstance(s, int) for s in x_val.shape):
        return "input shape is not static"
    for node in members:
        _, A, B, values, support, scale, bias = _args(node)
        tensors = [t for t in (A, B, values, bias) if t is not None]
        vals = [t.meta.get("val") if isinstance(t, fx.Node) else None for t in tensors]
        if any(not isinstance(v, torch.Tensor) for v in vals) or not isinstance(scale, (int, float)):
            return "operands without fake values, or a non-constant scale"
        if any(v.dtype != x_val.dtype or v.device != x_val.device for v in vals):
            return "operands differ in dtype or device"
        if any(not isinstance(s, int) for v in vals for s in v.shape):
            return "parameter shapes are not static"
    # No member may depend on another's output (the fused GEMM computes them all at once).
    later = set()
    frontier = list(members)
    while frontier:
        for user in frontier.pop().users:
            if user not in later:
                later.add(user)
                frontier.append(user)
    if any(arg in later for node in members for arg in node.all_input_nodes):
        return "one linear's operands depend on another's output"
    return None


def _emit(graph: fx.Graph, fake_mode, target, *args, **kwargs) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` with its fake value in ``meta['val']``."""
    node = graph.call_function(target, args, kwargs)
    fake = lambda a: a.meta["val"] if isinstance(a, fx.Node) else a  # noqa: E731
    vals = [[fake(b) for b in a] if isinstance(a, (list, tuple)) else fake(a) for a in args]
    with fake_mode:
        node.meta["val"] = target(*vals, **kwargs)
    return node


def _fuse(graph: fx.Graph, x: fx.Node, members: list[fx.Node]) -> None:
    """Emit the fused computation after the last member and reroute each member's users."""
    x_val = x.meta["val"]
    outs = [_args(node)[2].meta["val"].shape[0] for node in members]
    with graph.inserting_before(members[-1].next):
        emit = functools.partial(_emit, graph, x_val.fake_mode)
        weights = [emit(MATERIALIZE, *_args(node)[1:6]) for node in members]
        weight_t = emit(aten.permute.default, emit(aten.cat.default, weights, 0), [1, 0])
        x2d = emit(aten.reshape.default, x, [-1, x_val.shape[-1]])
        biases = [_args(node)[6] for node in members]
        if all(b is None for b in biases):
            y2d = emit(aten.mm.default, x2d, weight_t)
        else:
            parts = [emit(aten.full.default, [out], 0.0, dtype=x_val.dtype, device=x_val.device) if b is None else b
                     for b, out in zip(biases, outs)]
            y2d = emit(aten.addmm.default, emit(aten.cat.default, parts, 0), x2d, weight_t)
        y = emit(aten.reshape.default, y2d, [*x_val.shape[:-1], sum(outs)])
        start = 0
        for node, out in zip(members, outs):
            node.replace_all_uses_with(emit(aten.slice.Tensor, y, x_val.dim() - 1, start, start + out))
            start += out
    for node in members:
        graph.erase_node(node)

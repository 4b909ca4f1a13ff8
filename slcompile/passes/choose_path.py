"""FX pass: run each ``sl_linear`` as ``sl_linear_factored`` where the cost model says it is cheaper.

Where it runs: on the **Dynamo graph** (before AOTAutograd), inside the ``slcompile`` backend
(:mod:`slcompile.backend`, option ``choose_path``) after the pattern pass. It must run before
AOTAutograd: a custom op's backward is fixed when autograd traces it (``sl_linear`` brings
``sl_linear_backward``, ``sl_linear_factored`` brings ``sl_linear_factored_backward``), so
swapping a forward node in a post-grad graph would pair it with the other path's backward.

For each ``slcompile.sl_linear`` node with static shapes, :func:`slcompile.cost_model.choose_path`
decides from the node's fake tensors: tokens ``N`` = the product of ``x``'s leading dimensions,
``in``/``out``/``r``/``nnz`` from ``A``, ``B`` and ``values``, the dtype's bytes, ``mode="train"``
if the node's output requires grad (else ``"forward"``), and the device: the pass's ``device``
(a :class:`~slcompile.cost_model.DeviceSpec` or preset name) or, by default, the spec eager
``SLLinear(path="auto")`` uses for the tensors' device type
(:func:`slcompile.path_policy.runtime_device`: on CPU rates measured on this machine, on CUDA
the ``h200-triton`` preset with our Triton kernels, ``h200-cusparse`` without); factored is
chosen only if estimated below ``margin`` times materialize (default: the spec's own ``margin``,
:data:`DEFAULT_MARGIN` = 0.8 for a preset, 1 for measured rates). Both ops take the same
arguments, so a rewrite only changes the node's target. Left alone (counted, with a note): symbolic shapes (``dynamic=True`` or a
recompile after a shape change: one graph then serves every ``N``, and materialize is the path
whose cost does not blow up with ``N``), and devices without a preset.
"""
from __future__ import annotations

import collections
import math

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from slcompile import cost_model, ops_factored  # noqa: F401  (registers slcompile::sl_linear_factored)
from slcompile.path_policy import runtime_device
from slcompile.passes.nodes import SL_LINEAR, node_value

__all__ = ["DEFAULT_MARGIN", "ChoosePathPass", "SL_LINEAR_FACTORED"]

SL_LINEAR_FACTORED = torch.ops.slcompile.sl_linear_factored.default
DEFAULT_MARGIN = cost_model.DEFAULT_MARGIN



class ChoosePathPass(CustomGraphPass):
    """Swap ``sl_linear`` for ``sl_linear_factored`` on a Dynamo graph where it is estimated faster.

    ``device``: a :class:`~slcompile.cost_model.DeviceSpec` or preset name for every node, or
    ``None`` (each node's tensor device type picks its spec, as in eager). ``margin``: factored
    only if estimated below ``margin`` times materialize (``None``: the spec's ``margin``). Call on ``gm.graph`` (then
    ``gm.recompile()``). ``counts``: ``factored`` / ``materialize`` decisions, ``dynamic`` nodes
    kept for symbolic shapes, ``graphs`` seen; ``notes``: one line per node and why.
    """

    def __init__(self, device: str | cost_model.DeviceSpec | None = None, margin: float | None = None) -> None:
        if margin is not None and not 0 < margin <= 1:
            raise ValueError(f"choose_path margin must lie in (0, 1], got {margin!r}")
        self.device = None if device is None else cost_model.device_for(device)
        self.margin = margin
        self.counts: collections.Counter = collections.Counter()
        self.notes: list[str] = []

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__, cost_model.__file__),
                                  extra=f"{type(self).__name__}:{self.device!r}:{self.margin!r}")

    def __call__(self, graph: fx.Graph) -> None:
        self.counts["graphs"] += 1
        for node in graph.nodes:
            if node.op == "call_function" and node.target is SL_LINEAR:
                if self._decide(node) == "factored":
                    node.target = SL_LINEAR_FACTORED

    def _decide(self, node: fx.Node) -> str:
        x, A, B, values = (node_value(arg) for arg in node.args[:4])
        out = node_value(node)
        if not all(isinstance(t, torch.Tensor) for t in (x, A, B, values, out)):
            self.notes.append(f"{node.name}: operands without fake values: kept materialize")
            self.counts["materialize"] += 1
            return "materialize"
        dims = [*x.shape, *A.shape, *B.shape, *values.shape]
        if not all(isinstance(d, int) for d in dims):
            self.notes.append(f"{node.name}: symbolic shapes: kept materialize")
            self.counts["dynamic"] += 1
            return "materialize"
        try:
            device = self.device or runtime_device(x.device.type)
        except ValueError:
            self.notes.append(f"{node.name}: no cost-model preset for device {x.device.type!r}: kept materialize")
            self.counts["materialize"] += 1
            return "materialize"
        mode = "train" if out.requires_grad else "forward"
        shape = (math.prod(x.shape[:-1]), A.shape[1], B.shape[0], A.shape[0], values.shape[0])
        times = {path: cost_model.path_time(path, *shape, device, mode, x.dtype.itemsize)
                 for path in cost_model.PATHS}
        margin = device.margin if self.margin is None else self.margin
        path = cost_model.choose_path(*shape, device, mode, x.dtype.itemsize, margin)
        self.counts[path] += 1
        self.notes.append(f"{node.name}: N={shape[0]} {shape[1]}x{shape[2]} r={shape[3]} nnz={shape[4]} "
                          f"({mode}, {device.name}, margin {margin}): materialize {1e6 * times['materialize']:.1f} us, "
                          f"factored {1e6 * times['factored']:.1f} us -> {path}")
        return path

"""What the FX passes share about graph nodes: the op they rewrite and a node's fake value."""
from __future__ import annotations

import torch
from torch import fx

from slcompile import ops  # noqa: F401  (registers slcompile::sl_linear)

__all__ = ["SL_LINEAR", "node_value"]

SL_LINEAR = torch.ops.slcompile.sl_linear.default


def node_value(node):
    """The fake tensor (or value) a traced node carries: Dynamo's ``example_value``, else the
    ``val`` of make_fx/AOT graphs; ``None`` for a non-node argument or a node without one."""
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None

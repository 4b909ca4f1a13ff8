"""FX graph passes of slcompile.

- :func:`rewrite_linears` (:mod:`slcompile.passes.linear_rewrite`): rewrite the eligible linear nodes
  of a ``torch.fx.GraphModule`` (``symbolic_trace`` or ``torch.export(...).module()``) into
  ``slcompile::sl_linear``, with the same selection and supports as :func:`slcompile.transform`.
"""
from slcompile.passes.linear_rewrite import rewrite_linears

__all__ = ["rewrite_linears"]

"""FX graph passes of slcompile.

- :func:`rewrite_linears` (:mod:`slcompile.passes.linear_rewrite`): rewrite the eligible linear nodes
  (``nn.Linear`` and GPT-2 ``Conv1D`` products) of a ``torch.fx.GraphModule`` (``symbolic_trace`` or
  ``torch.export(...).module()``) into ``slcompile::sl_linear``, with the same selection and supports
  as :func:`slcompile.transform`.
- :class:`SLTrainPatternPass` (:mod:`slcompile.passes.pattern_sltrain`): on a Dynamo graph, an
  SLTrain product written with plain torch ops (``F.linear(x, s * B @ A + scatter(values))``, also
  with an in-place ``scatter_add_``) or as an ``autograd.Function`` with that forward becomes one
  ``slcompile::sl_linear`` (used by the ``slcompile`` backend before AOTAutograd).
- :class:`ChoosePathPass` (:mod:`slcompile.passes.choose_path`): on a Dynamo graph, each
  ``sl_linear`` becomes ``sl_linear_factored`` where :mod:`slcompile.cost_model` estimates the
  factored path (``W`` never formed) faster, e.g. at few tokens.
- :class:`FuseSharedInputPass` (:mod:`slcompile.passes.fuse_shared_input`): Inductor post-grad pass
  fusing ``sl_linear`` calls that read the same input (q/k/v, gate/up) into one GEMM.
"""
from slcompile.passes.choose_path import ChoosePathPass
from slcompile.passes.fuse_shared_input import FuseSharedInputPass
from slcompile.passes.linear_rewrite import rewrite_linears
from slcompile.passes.pattern_sltrain import SLTrainPatternPass

__all__ = ["ChoosePathPass", "FuseSharedInputPass", "SLTrainPatternPass", "rewrite_linears"]

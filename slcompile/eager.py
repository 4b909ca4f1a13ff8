"""The eager CPU fast path of ``SLLinear``: the custom ops' bodies under a plain ``autograd.Function``.

A call through ``torch.library`` custom ops pays the dispatcher and their autograd wrapper, a
fixed cost per call that dominates at small widths (``benchmarks/layer_cpu.py`` times both).
Eager CPU calls therefore run the very same bodies (:func:`slcompile.ops.materialized_forward`
/ ``materialized_backward``, :func:`slcompile.ops_factored.factored_forward` /
``factored_backward``) wired by the ops' own ``setup_context`` and ``make_backward``: same saved
tensors, same results. Everything :func:`can_run` refuses (CUDA, ``torch.compile``, FX and
dispatch-mode tracing, functorch transforms, tensor subclasses) calls the custom ops. Double
backward raises, as for the ops.

The Functions use the ``forward(ctx, ...)`` form: with a separate ``setup_context``,
``Function.apply`` binds the arguments through ``inspect.signature`` on every call.

Under ``torch.func`` transforms (``grad``, ``vmap``, per-sample gradients as
``vmap(grad(...))``) neither can run: the custom ops' autograd wrapper and the ``forward(ctx,
...)`` form are refused by functorch, so :class:`FuncMaterialized` (a separate
``setup_context``, ``generate_vmap_rule``) runs the materialize path's torch bodies on every
device. Always that path: the factored path's sparse CSR products do not support functorch;
the two paths give the same values.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from slcompile import ops, ops_factored

__all__ = ["EagerFactored", "EagerMaterialized", "FuncMaterialized", "can_run", "functorch_active"]

_PLAIN = (Tensor, nn.Parameter)  # no subclass: its dispatch must see the op


def can_run(x: Tensor, *params: Tensor | None) -> bool:
    """Whether the Functions here may stand in for the custom ops on this call: CPU, plain tensors,
    nothing compiling, tracing (make_fx, fake or functional tensors) or transforming (vmap, grad)."""
    # torch has no public query for an active dispatch mode or functorch transform.
    return (x.device.type == "cpu" and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0 and not functorch_active()
            and all(type(t) in _PLAIN for t in (x, *params) if t is not None))


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ...) is active."""
    return torch._C._are_functorch_transforms_active()


class _EagerSLLinear(torch.autograd.Function):
    """``apply(x, A, B, values, support, scale, bias) -> y``; subclasses name the path's
    ``body(x, A, B, values, support, scale, bias) -> y``, ``grads(ctx, grad_y)``
    (:func:`slcompile.ops.make_backward` over the path's backward body) and ``op_grads`` (the
    same over the path's backward custom op, for ``create_graph=True``)."""

    @staticmethod
    def forward(ctx, x, A, B, values, support, scale, bias=None):
        ops.setup_context(ctx, (x, A, B, values, support, scale, bias), None)
        return ctx._forward_cls.body(x, A, B, values, support, scale, bias)

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():
            # create_graph=True: through the backward custom op, so that differentiating these
            # gradients raises (no autograd formula) instead of silently treating them as constants.
            return ctx._forward_cls.op_grads(ctx, grad_y)
        return ctx._forward_cls.grads(ctx, grad_y)


class EagerMaterialized(_EagerSLLinear):
    """``slcompile::sl_linear`` and its backward (the materialize path) without the dispatcher."""

    body = staticmethod(functools.partial(ops.materialized_forward, form_weight=ops.materialized_weight))
    grads = staticmethod(ops.make_backward(functools.partial(ops.materialized_backward,
                                                             form_weight=ops.materialized_weight)))
    op_grads = staticmethod(ops.make_backward(ops.sl_linear_backward))


class EagerFactored(_EagerSLLinear):
    """``slcompile::sl_linear_factored`` and its backward without the dispatcher."""

    body = staticmethod(functools.partial(ops_factored.factored_forward, sparse=ops_factored.TORCH_SPARSE))
    grads = staticmethod(ops.make_backward(functools.partial(ops_factored.factored_backward,
                                                             sparse=ops_factored.TORCH_SPARSE)))
    op_grads = staticmethod(ops.make_backward(ops_factored.sl_linear_factored_backward))


class FuncMaterialized(torch.autograd.Function):
    """The materialize path for ``torch.func`` transforms (module doc): ``apply(x, A, B, values,
    support, scale, bias) -> y``, the torch bodies of ``sl_linear`` and its backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, A, B, values, support, scale, bias):
        return EagerMaterialized.body(x, A, B, values, support, scale, bias)

    setup_context = staticmethod(ops.setup_context)
    backward = staticmethod(EagerMaterialized.grads)

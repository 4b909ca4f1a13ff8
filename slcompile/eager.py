"""The eager CPU fast path of ``SLLinear``: the custom ops' bodies under a plain ``autograd.Function``.

A call through ``torch.library`` custom ops pays the dispatcher and their autograd wrapper:
``sl_linear`` forward + backward at an 8 x 8 layer on one CPU core takes ~200 us, this path
~125 us, the same product in plain differentiable torch ops ~90 us (fixed costs that matter at
the demo's 128-wide llama-mini, ``benchmarks/layer_cpu.py``). Eager calls on CPU therefore run the very same
bodies (:func:`slcompile.ops.materialized_forward` / ``materialized_backward``,
:func:`slcompile.ops_factored.factored_forward` / ``factored_backward`` with the torch sparse
products) under an ``autograd.Function`` wired by the ops' own ``setup_context`` and
``make_backward``: same saved tensors (``x`` and the parameters), same results, one call instead
of three dispatcher hops. On CUDA, under ``torch.compile`` and in FX traces ``SLLinear`` calls
the custom ops (their CUDA implementations are the Triton kernels of :mod:`slcompile.kernels`;
Dynamo needs them opaque). Double backward raises, as for the ops.

The Functions use the ``forward(ctx, ...)`` form, not a separate ``setup_context``: with one,
``Function.apply`` binds the arguments through ``inspect.signature`` on every call (~30 us per
fwd+bwd here, more than forming ``W`` at the demo's shapes). That form does not support functorch transforms, which
``SLLinear`` routes to the custom ops (``vmap`` works there through torch's fallback;
``torch.func.grad`` does not: ``custom_op`` autograd does not support it).
"""
from __future__ import annotations

import functools

import torch

from slcompile import ops, ops_factored

__all__ = ["EagerFactored", "EagerMaterialized"]


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

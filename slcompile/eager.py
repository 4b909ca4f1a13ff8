"""The eager CPU fast path of ``SLLinear``: the custom ops' bodies under a plain ``autograd.Function``.

A call through ``torch.library`` custom ops pays the dispatcher and their autograd wrapper
(``sl_linear`` forward + backward: ~115 us at an 8 x 8 layer on one CPU core against ~60 us for
the same product in plain differentiable torch ops, ``benchmarks/layer_cpu.py`` at the demo's
128-wide llama-mini: 5-10% of a layer's time). Eager calls on CPU therefore run the very same
bodies (:func:`slcompile.ops.materialized_forward` / ``materialized_backward``,
:func:`slcompile.ops_factored.factored_forward` / ``factored_backward`` with the torch sparse
products) under an ``autograd.Function`` wired by the ops' own ``setup_context`` and
``make_backward``: same saved tensors (``x`` and the parameters), same results, one call instead
of three dispatcher hops. On CUDA, under ``torch.compile`` and in FX traces ``SLLinear`` calls
the custom ops (their CUDA implementations are the Triton kernels of :mod:`slcompile.kernels`;
Dynamo needs them opaque). Double backward raises, as for the ops.
"""
from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable

from slcompile import ops, ops_factored

__all__ = ["EagerFactored", "EagerMaterialized"]


# make_backward's backward(ctx, grad_y) over each path's backward body (torch products only).
_materialized_backward = ops.make_backward(functools.partial(ops.materialized_backward,
                                                             form_weight=ops.materialized_weight))
_factored_backward = ops.make_backward(functools.partial(ops_factored.factored_backward,
                                                         sparse=ops_factored.TORCH_SPARSE))


class EagerMaterialized(torch.autograd.Function):
    """``slcompile::sl_linear`` and its backward (the materialize path) without the dispatcher:
    ``EagerMaterialized.apply(x, A, B, values, support, scale, bias)``."""

    @staticmethod
    def forward(x, A, B, values, support, scale, bias):
        return ops.materialized_forward(x, A, B, values, support, scale, bias, form_weight=ops.materialized_weight)

    setup_context = staticmethod(ops.setup_context)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        return _materialized_backward(ctx, grad_y)


class EagerFactored(torch.autograd.Function):
    """``slcompile::sl_linear_factored`` and its backward without the dispatcher:
    ``EagerFactored.apply(x, A, B, values, support, scale, bias)``."""

    @staticmethod
    def forward(x, A, B, values, support, scale, bias):
        return ops_factored.factored_forward(x, A, B, values, support, scale, bias, ops_factored.TORCH_SPARSE)

    setup_context = staticmethod(ops.setup_context)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        return _factored_backward(ctx, grad_y)

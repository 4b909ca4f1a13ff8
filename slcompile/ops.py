"""The SLTrain linear as ``torch.library`` custom ops: the one reference implementation.

``y = x @ W.T + bias`` with ``W = scale * B @ A + S`` where ``S`` has ``values`` at the flat
positions ``support``.

Memory plan (``docs/compute.md``): forward materializes ``W`` in the compute dtype, runs one
GEMM and drops ``W``; autograd saves only ``x`` and the (already resident) parameters, so
activation memory equals ``nn.Linear``'s. Backward recomputes ``W`` for ``dX`` and frees it
before forming the dense ``dW`` that yields ``dA``, ``dB`` and ``dvalues = dW[support]``.

Eager CPU calls of ``SLLinear`` run these bodies as an ``autograd.Function``
(:mod:`slcompile.eager`); everything else (tracing, ``torch.compile``, CUDA) calls the ops.

Ops (opaque to Dynamo/Inductor, so ``torch.compile(fullgraph=True)`` keeps them whole):
- ``slcompile::materialize(A, B, values, support, scale) -> W``
- ``slcompile::sl_linear(x, A, B, values, support, scale, bias?) -> y``
- ``slcompile::sl_linear_backward(grad_y, x, A, B, values, support, scale, need_dx) -> (dx, dA, dB, dvalues)``
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
from torch import Tensor

from slcompile._compat import autocast_available

__all__ = ["grad_weight_and_values", "materialize", "materialized_backward", "materialized_forward",
           "materialized_weight", "sl_linear", "sl_linear_backward"]


def autocast_disabled(device_type: str):
    """A context with autocast off on ``device_type`` (a no-op context where it is off already):
    the ops are opaque to autocast (``SLLinear`` casts their operands), so the products inside
    must compute in the operands' dtype (MKL's sparse kernels have no bf16; the fake
    implementations promise the operands' dtype)."""
    if autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_off(body):
    """``body(tensor, ...)`` run under :func:`autocast_disabled` on its first argument's device."""
    @functools.wraps(body)
    def run(*args, **kwargs):
        with autocast_disabled(args[0].device.type):
            return body(*args, **kwargs)

    return run


def scaled_mm(a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``scale * a @ b`` as one GEMM (BLAS alpha: no second pass over the result). ``beta=0``
    ignores the dummy input."""
    return torch.addmm(a.new_empty((1, 1)), a, b, beta=0, alpha=scale)


def materialized_weight(A: Tensor, B: Tensor, values: Tensor, support: Tensor, scale: float) -> Tensor:
    """The torch body of ``slcompile::materialize`` (see there): ``S`` scattered into zeros, then
    ``scale * B @ A`` accumulated onto it by the GEMM itself (beta=1)."""
    weight = A.new_zeros(B.shape[0], A.shape[1])
    weight.view(-1).index_add_(0, support, values)
    return weight.addmm_(B, A, alpha=scale)


@torch.library.custom_op("slcompile::materialize", mutates_args=())
def materialize(A: Tensor, B: Tensor, values: Tensor, support: Tensor, scale: float) -> Tensor:
    """Dense ``W = scale * B @ A + S``.

    Shapes: ``A (r, in)``, ``B (out, r)``, ``values (nnz,)``, ``support (nnz,)`` int32 flat
    indices into ``(out, in)``. Returns ``(out, in)`` in the parameters' dtype.
    """
    with autocast_disabled(A.device.type):
        return materialized_weight(A, B, values, support, scale)


@materialize.register_fake
def _(A, B, values, support, scale):
    return A.new_empty(B.shape[0], A.shape[1])


def grad_weight_and_values(grad_y2d: Tensor, x2d: Tensor, support: Tensor,
                           out: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
    """``(dW, dvalues)``: the dense ``dW (out, in) = dY^T @ x`` and ``dvalues = dW.view(-1)[support]``
    (torch reference; :mod:`slcompile.kernels.grad_weight` fuses the gather into the GEMM on CUDA).
    ``out``: optional ``(dW, dvalues)`` destinations (``dW`` contiguous), written and returned."""
    if out is None:
        grad_w = torch.mm(grad_y2d.t(), x2d)
        return grad_w, grad_w.view(-1).index_select(0, support)  # index_select: [] with int32 indices is slow on CPU
    grad_w, grad_values = out
    torch.mm(grad_y2d.t(), x2d, out=grad_w)
    return grad_w, torch.index_select(grad_w.view(-1), 0, support, out=grad_values)


def _low_rank_grads(grad_w: Tensor, A: Tensor, B: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Chain rule through ``W = scale * B @ A + S``: ``(dA, dB)`` from ``dW (out, in)``."""
    return scaled_mm(B.t(), grad_w, scale), scaled_mm(grad_w, A.t(), scale)


def _materialize_setup_context(ctx, inputs, output):
    A, B, values, support, scale = inputs
    ctx.save_for_backward(A, B, support)
    ctx.scale = scale


def _materialize_backward(ctx, grad_w):
    A, B, support = ctx.saved_tensors
    grad_w = grad_w.contiguous()
    with autocast_disabled(A.device.type):
        grad_a, grad_b = _low_rank_grads(grad_w, A, B, ctx.scale)
    return grad_a, grad_b, grad_w.view(-1).index_select(0, support), None, None


materialize.register_autograd(_materialize_backward, setup_context=_materialize_setup_context)


@autocast_off
def materialized_forward(x: Tensor, A: Tensor, B: Tensor, values: Tensor, support: Tensor, scale: float,
                         bias: Optional[Tensor] = None, form_weight=materialize) -> Tensor:
    """The body of ``sl_linear``; ``form_weight(A, B, values, support, scale) -> W``."""
    y2d = torch.nn.functional.linear(x.reshape(-1, A.shape[1]), form_weight(A, B, values, support, scale), bias)
    return unflatten_rows(y2d, x.shape[:-1])


def unflatten_rows(y2d: Tensor, batch_shape: torch.Size) -> Tensor:
    """``y2d (N, out)`` as ``(*batch_shape, out)``, not a view: callers may modify a layer's output in
    place, as ``nn.Linear``'s (autograd refuses in-place ops on a view made inside a Function)."""
    return torch.ops.aten._unsafe_view(y2d, (*batch_shape, y2d.shape[-1]))


@torch.library.custom_op("slcompile::sl_linear", mutates_args=())
def sl_linear(x: Tensor, A: Tensor, B: Tensor, values: Tensor, support: Tensor, scale: float,
              bias: Optional[Tensor] = None) -> Tensor:
    """``y (..., out) = x (..., in) @ W.T + bias``; ``W`` is formed and dropped (never saved)."""
    return materialized_forward(x, A, B, values, support, scale, bias)


@sl_linear.register_fake
def _(x, A, B, values, support, scale, bias=None):
    return x.new_empty(*x.shape[:-1], B.shape[0])


@autocast_off
def materialized_backward(grad_y: Tensor, x: Tensor, A: Tensor, B: Tensor, values: Tensor, support: Tensor,
                          scale: float, need_dx: bool, grad_weight=grad_weight_and_values, form_weight=materialize
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The body of ``sl_linear_backward``; ``grad_weight(dY2d, x2d, support) -> (dW, dvalues)``,
    ``form_weight`` as in :func:`materialized_forward`."""
    in_features, out_features = A.shape[1], B.shape[0]
    x2d, g2d = x.reshape(-1, in_features), grad_y.reshape(-1, out_features)
    if need_dx:
        weight = form_weight(A, B, values, support, scale)
        grad_x = torch.mm(g2d, weight).view(x.shape)
        del weight  # free W before the dense dW exists: peak holds one (out, in) transient
    else:
        grad_x = x.new_empty(0)
    grad_w, grad_values = grad_weight(g2d, x2d, support)
    grad_a, grad_b = _low_rank_grads(grad_w, A, B, scale)
    return grad_x, grad_a, grad_b, grad_values


@torch.library.custom_op("slcompile::sl_linear_backward", mutates_args=())
def sl_linear_backward(grad_y: Tensor, x: Tensor, A: Tensor, B: Tensor, values: Tensor, support: Tensor,
                       scale: float, need_dx: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``sl_linear`` w.r.t. ``x``, ``A``, ``B``, ``values`` (bias is a plain sum).

    ``grad_y (..., out)``, ``x (..., in)``. ``dx`` is an empty tensor when ``need_dx`` is False.
    """
    return materialized_backward(grad_y, x, A, B, values, support, scale, need_dx)


@sl_linear_backward.register_fake
def _(grad_y, x, A, B, values, support, scale, need_dx):
    grad_x = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return grad_x, torch.empty_like(A), torch.empty_like(B), torch.empty_like(values)


def setup_context(ctx, inputs, output):
    x, A, B, values, support, scale, bias = inputs
    ctx.save_for_backward(x, A, B, values, support)
    ctx.scale = scale
    ctx.has_bias = bias is not None


def make_backward(backward_op):
    """The autograd backward of an ``sl_linear``-shaped op whose gradients ``backward_op`` computes
    as ``(dx, dA, dB, dvalues)`` from ``(grad_y, x, A, B, values, support, scale, need_dx)``."""

    def backward(ctx, grad_y):
        x, A, B, values, support = ctx.saved_tensors
        needs = ctx.needs_input_grad  # one flag per input actually passed (bias may be omitted)
        grads = backward_op(grad_y, x, A, B, values, support, ctx.scale, needs[0])
        grads = [grad if need else None for grad, need in zip(grads, needs)] + [None, None]
        if len(needs) > 6:
            grads.append(grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.has_bias and needs[6] else None)
        return tuple(grads)

    return backward


sl_linear.register_autograd(make_backward(sl_linear_backward), setup_context=setup_context)

"""FLOP formulas of the ``slcompile::`` custom ops for ``torch.utils.flop_counter.FlopCounterMode``.

Without them the counter (and MFU tools built on it) sees 0 FLOPs for every ``SLLinear``. A
multiply-add counts 2, as torch's ``mm`` formula does; the kernels counted per op are those of
:func:`slcompile.cost_model.path_kernels` (``tests/test_flops.py`` checks the totals agree), with the
input-gradient kernels left out when ``need_dx`` is False. Shapes: ``x (..., in)``, ``A (r, in)``,
``B (out, r)``, ``values (nnz,)``; ``N`` is the product of ``x``'s leading dimensions.
"""
from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from slcompile import ops, ops_factored  # noqa: F401  (the ops must exist before registering)

__all__ = ["factored_backward_flops", "factored_flops", "materialize_flops", "sl_linear_backward_flops",
           "sl_linear_flops"]


def _dims(x_shape, A_shape, B_shape, values_shape) -> tuple[int, int, int, int, int]:
    """``(N, in, out, r, nnz)``."""
    return math.prod(x_shape[:-1]), A_shape[1], B_shape[0], A_shape[0], values_shape[0]


def _form_w(in_f: int, out_f: int, r: int, nnz: int) -> int:
    return 2 * out_f * r * in_f + nnz  # scale * B @ A, plus the scattered values


@register_flop_formula(torch.ops.slcompile.materialize)
def materialize_flops(A_shape, B_shape, values_shape, support_shape, scale, *, out_shape=None, **kwargs) -> int:
    return _form_w(A_shape[1], B_shape[0], A_shape[0], values_shape[0])


@register_flop_formula(torch.ops.slcompile.sl_linear)
def sl_linear_flops(x_shape, A_shape, B_shape, values_shape, support_shape, scale, bias_shape=None, *,
                    out_shape=None, **kwargs) -> int:
    n, in_f, out_f, r, nnz = _dims(x_shape, A_shape, B_shape, values_shape)
    return _form_w(in_f, out_f, r, nnz) + 2 * n * in_f * out_f


@register_flop_formula(torch.ops.slcompile.sl_linear_backward)
def sl_linear_backward_flops(grad_y_shape, x_shape, A_shape, B_shape, values_shape, support_shape, scale,
                             need_dx, *, out_shape=None, **kwargs) -> int:
    n, in_f, out_f, r, nnz = _dims(x_shape, A_shape, B_shape, values_shape)
    grads = 2 * out_f * n * in_f + 2 * 2 * r * out_f * in_f  # dW = dY^T x; dA, dB from dW
    return grads + (_form_w(in_f, out_f, r, nnz) + 2 * n * out_f * in_f if need_dx else 0)  # W again; dY W


@register_flop_formula(torch.ops.slcompile.sl_linear_factored)
def factored_flops(x_shape, A_shape, B_shape, values_shape, support_shape, scale, bias_shape=None, *,
                   out_shape=None, **kwargs) -> int:
    n, in_f, out_f, r, nnz = _dims(x_shape, A_shape, B_shape, values_shape)
    return 2 * n * r * (in_f + out_f) + 2 * n * nnz  # (x A^T) B^T + S x


@register_flop_formula(torch.ops.slcompile.sl_linear_factored_backward)
def factored_backward_flops(grad_y_shape, x_shape, A_shape, B_shape, values_shape, support_shape, scale,
                            need_dx, *, out_shape=None, **kwargs) -> int:
    n, in_f, out_f, r, nnz = _dims(x_shape, A_shape, B_shape, values_shape)
    # dY B; x A^T again; dB = dY^T (x A^T); dA = (dY B)^T x; dvalues sampled at the support.
    grads = 2 * n * out_f * r + 2 * n * in_f * r + 2 * out_f * n * r + 2 * r * n * in_f + 2 * n * nnz
    return grads + (2 * n * r * in_f + 2 * n * nnz if need_dx else 0)  # dx = (dY B) A + dY S

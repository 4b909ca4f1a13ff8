"""Techniques that close part of the gap between factored and full-rank pretraining, usable from
any training loop (arXiv 2505.22922, "Scalable Parameter and Memory Efficient Pretraining for
LLM"):

- :func:`refactorize_` re-balances the factors of every factored layer from their product,
  leaving ``W`` unchanged;
- :func:`reset_moments_` clears the AdamW states of chosen parameters (momentum reset);
- :func:`param_groups` gives the sparse ``values`` and the factors ``A``/``B`` their own learning
  rates (``slcompile.optim.build(..., lr_values=, lr_factors=)`` uses it).

A *factored layer* is any module with 2-D parameters ``A (r, in)``, ``B (out, r)`` and a float
``scale`` whose weight is ``scale * B @ A`` (+ a term that does not involve ``A`` or ``B``): :class:`slcompile.SLLinear`
(plus ``values`` on a fixed sparse support) and the low-rank baseline of the recipes. Typical loop::

    if step % 1000 == 0:
        refactorize_(model)
        reset_moments_(opt, factor_params(model)[0])   # their moments are in the old basis
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from slcompile._validate import check_number
from slcompile.optim.int8_weights import Int8Weight

__all__ = ["factor_params", "factored_layers", "param_groups", "refactorize_", "reset_moments_"]


def factored_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every factored layer of ``model`` (see the module docstring)."""
    found = []
    for name, module in model.named_modules():
        a, b = getattr(module, "A", None), getattr(module, "B", None)
        if (isinstance(a, nn.Parameter) and isinstance(b, nn.Parameter) and a.ndim == b.ndim == 2
                and b.shape[1] == a.shape[0] and hasattr(module, "scale")):
            found.append((name, module))
    return found


def factor_params(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """``(factors, values)``: the ``A`` and ``B`` of every factored layer, and the sparse ``values``
    of those that have them (``SLLinear``), in module order."""
    layers = [module for _, module in factored_layers(model)]
    factors = [p for module in layers for p in (module.A, module.B)]
    values = [module.values for module in layers if isinstance(getattr(module, "values", None), nn.Parameter)]
    return factors, values


def param_groups(model: nn.Module, lr: float, *, lr_factors: float = 1.0,
                 lr_values: float = 1.0) -> list[dict[str, Any]]:
    """Param groups of the trainable parameters of ``model`` for any torch optimizer.

    One group ``{"params", "lr": lr}`` when both multipliers are 1 (the layout of a plain
    ``AdamW(model.parameters())``, so checkpoints keep their indices); otherwise up to three, in
    this order: every other parameter at ``lr``, ``A``/``B`` at ``lr * lr_factors``, ``values`` at
    ``lr * lr_values``. Empty groups are left out (no trainable parameter: ``[]``, which torch
    optimizers refuse as an empty parameter list). An LR scheduler scales each group's own
    initial LR, so the ratios hold through the schedule.
    """
    check_number("lr_factors", lr_factors, 0.0)
    check_number("lr_values", lr_values, 0.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if lr_factors == 1.0 and lr_values == 1.0:
        groups = [(trainable, lr)]
    else:
        factors, values = factor_params(model)
        special = {id(p) for p in factors + values}
        groups = [([p for p in trainable if id(p) not in special], lr),
                  ([p for p in factors if p.requires_grad], lr * lr_factors),
                  ([p for p in values if p.requires_grad], lr * lr_values)]
    return [{"params": params, "lr": group_lr} for params, group_lr in groups if params]


def _plain(param: Tensor) -> Tensor:
    """The value of a parameter as a plain tensor (dequantized for an ``Int8Weight``)."""
    return param.dequantize() if isinstance(param, Int8Weight) else param.detach()


@torch.no_grad()
def refactorize_(model: nn.Module) -> dict[str, float]:
    """Re-balance the factors of every factored layer of ``model`` in place; returns
    ``{layer name: max |W_after - W_before|}`` (the max over the ``(out, in)`` weight).

    Per layer, in fp32 (fp64 for fp64 factors): ``P = B @ A`` (out, in), reduced SVD
    ``P = U diag(S) Vh``, then ``B = U[:, :r] diag(sqrt(S[:r]))`` and ``A = diag(sqrt(S[:r])) Vh[:r]``,
    cast back to the parameters' dtype. ``P`` has rank <= r, so it is unchanged up to float
    rounding (and casting); ``scale`` and ``values`` are untouched, so ``W`` is too. Afterwards the
    factors are balanced (``B^T B == A A^T == diag(S[:r])``), which is the point: training drifts
    them apart in norm, and the update of one factor scales with the norm of the other.

    A layer with ``P == 0`` (``B = 0`` at SLTrain's init) is left as is: its SVD would zero ``A``
    too, and with both factors zero their gradients vanish for good. For the same reason, each
    direction with a zero singular value (rank of ``P`` below ``r``) ends with a zero row of ``A``
    and column of ``B``, as in the study's procedure.

    ``Int8Weight`` factors are dequantized, re-balanced and requantized (round to nearest, new
    per-row scales), so ``W`` moves by up to the quantization error, which the returned value
    reports. Sharded (``DTensor``) factors are refused: the SVD needs the whole product.
    """
    deltas = {}
    for name, layer in factored_layers(model):
        if any(type(p).__name__ == "DTensor" for p in (layer.A, layer.B)):
            raise NotImplementedError(f"refactorize_: layer {name!r} has sharded (DTensor) factors; "
                                      "refactorization needs the whole B @ A (unshard first, or use DDP)")
        a, b = _plain(layer.A), _plain(layer.B)
        compute = torch.promote_types(a.dtype, torch.float32)
        product = b.to(compute) @ a.to(compute)
        if not product.any():
            deltas[name] = 0.0
            continue
        u, s, vh = torch.linalg.svd(product, full_matrices=False)
        root = s[:a.shape[0]].sqrt()
        new_b, new_a = u[:, :a.shape[0]] * root, root[:, None] * vh[:a.shape[0]]
        for param, new in ((layer.A, new_a), (layer.B, new_b)):
            if isinstance(param, Int8Weight):
                param.requantize_(new, stochastic=False)
            else:
                param.copy_(new)
        after = _plain(layer.B).to(compute) @ _plain(layer.A).to(compute)
        deltas[name] = float(layer.scale * (after - product).abs().max())
    return deltas


def reset_moments_(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> int:
    """Momentum reset: clear the optimizer state of each of ``params``; returns how many had one.

    Works for any optimizer that creates its state lazily when ``state[p]`` is empty (all of
    ``torch.optim``, torchao's ``AdamW8bit``/``AdamW4bit``) and for
    :class:`~slcompile.optim.PerLayerOptimizer` (its ``state[p]`` is the inner optimizer's dict).
    The next update then starts these parameters afresh, exactly as a rebuilt optimizer would:
    moments zero and step count 0, so Adam's bias correction restarts too (zeroing the moments
    alone would make the next update ``(1 - beta1) / sqrt(1 - beta2)`` times Adam's first step,
    3.2x at the default betas). Clearing rather than zeroing in place also needs no knowledge of the
    quantized layouts (torchao's ``OptimState8bit`` codes index a nonlinear map).
    """
    cleared = 0
    for param in params:
        state = optimizer.state.get(param)
        if state:
            state.clear()
            cleared += 1
    return cleared

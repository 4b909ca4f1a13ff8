"""Optimizers for SLTrain pretraining: AdamW fused into backward, 8/4-bit states, int8 weights.

``opt = slcompile.optim.build(model, lr=3e-3, per_layer=True, state_bits=8)`` returns a
:class:`PerLayerOptimizer` (a ``torch.optim.Optimizer``: ``step``, ``zero_grad``, ``state_dict``,
``load_state_dict``, ``param_groups``; LR schedulers accept it). See :mod:`.per_layer` for the
contract (gradient accumulation, clipping, checkpoints), :mod:`.lowbit` for the torchao states
and :mod:`.int8_weights` for int8 storage of ``A``, ``B``, ``values``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from torch import Tensor, nn

from slcompile.optim.int8_weights import Int8Weight, quantize_int8, quantize_weights
from slcompile.optim.per_layer import PerLayerOptimizer
from slcompile.optim.refactor import factor_params, param_groups, refactorize_, reset_moments_

__all__ = ["Int8Weight", "OPTIMIZERS", "PerLayerOptimizer", "build", "factor_params", "param_groups",
           "quantize_int8", "quantize_weights", "refactorize_", "reset_moments_"]

OPTIMIZERS = ("adamw",)


def build(model: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]], optimizer: str = "adamw", *,
          lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.0, per_layer: bool = True, state_bits: int = 32,
          accumulation_steps: int = 1, max_grad_norm: float | None = None, clip: str = "global",
          int8_weights: bool | Callable[[str, Tensor], bool] = False,
          compile_step: bool = True, lr_factors: float = 1.0, lr_values: float = 1.0, data_parallel: Any = None,
          dense_state_dict: bool = False) -> PerLayerOptimizer:
    """The optimizer for ``model`` (its trainable parameters) or for explicit params/param groups.

    ``optimizer``: only ``"adamw"`` (decoupled weight decay; the paper uses ``weight_decay=0``).
    ``int8_weights``: first store ``A``, ``B``, ``values`` of every ``SLLinear`` of ``model`` as
    int8 (``True``), or those for which ``int8_weights(qualified_name, param)`` is true; needs a
    module. ``lr_factors``, ``lr_values``: multipliers (>= 0) of ``lr`` for ``A``/``B`` and for
    the sparse ``values`` of the factored layers (:func:`.refactor.param_groups`; need a module
    unless both are 1). Other arguments: :class:`PerLayerOptimizer`.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if int8_weights is not False:
        if not isinstance(model, nn.Module):
            raise ValueError("int8_weights needs the model (an nn.Module), not a list of parameters")
        if int8_weights is not True and not callable(int8_weights):
            raise ValueError(f"int8_weights must be a bool or a callable(name, param) -> bool, got {int8_weights!r}")
        quantize_weights(model, predicate=None if int8_weights is True else int8_weights)
    if isinstance(model, nn.Module):
        params = param_groups(model, lr, lr_factors=lr_factors, lr_values=lr_values)
    elif lr_factors != 1.0 or lr_values != 1.0:
        raise ValueError("lr_factors/lr_values need the model (an nn.Module), not a list of parameters")
    else:
        params = model
    return PerLayerOptimizer(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             state_bits=state_bits, per_layer=per_layer, accumulation_steps=accumulation_steps,
                             max_grad_norm=max_grad_norm, clip=clip, compile_step=compile_step,
                             data_parallel=data_parallel, dense_state_dict=dense_state_dict)

"""The inner AdamW of one parameter: ``torch.optim.AdamW`` (32-bit states) or torchao's
``AdamW8bit`` / ``AdamW4bit`` (block-wise quantized states; not our own quantizer).

torchao facts that shape the use (torchao 0.18.0):
- only tensors with ``numel >= 4096`` and ``numel % block_size == 0`` get quantized states
  (block 256 for 8-bit, 128 for 4-bit); smaller ones (biases, norms) keep plain states of the
  parameter's dtype. SLTrain's ``values`` (``nnz = int(density * in * out)``) are almost never a
  multiple of the block: :func:`state_numel` tells the optimizer to step such a tensor through a
  flat stand-in zero-padded to the next multiple, so its states are quantized too (the padding
  has zero gradient and zero value, which AdamW keeps at zero);
- its step is ``torch.compile``-d per parameter shape (``fullgraph=True, dynamic=False``): the
  first step compiles once per distinct shape (seconds on a CPU), later ones are fast.
  ``compile_step=False`` runs the same math eagerly (for tests and tiny CPU runs);
- its ``lr`` lives in a tensor (``group["lr"].fill_``), which :func:`sync_hyperparams` handles;
- the states are tensor subclasses that ``torch.save``/``torch.load(weights_only=True)`` accept.

torchao is imported lazily: 32-bit states never need it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["BLOCK_SIZES", "HYPERPARAMS", "STATE_BITS", "make_adamw", "state_numel", "step_context",
           "sync_hyperparams"]

STATE_BITS = (32, 8, 4)
HYPERPARAMS = ("lr", "betas", "eps", "weight_decay")
BLOCK_SIZES = {8: 256, 4: 128}   # torchao's defaults: elements per quantization scale
MIN_QUANTIZED_NUMEL = 4096        # torchao (after bitsandbytes) keeps smaller tensors' states plain


def state_numel(numel: int, state_bits: int) -> int:
    """Elements the states of a ``numel``-element tensor should span: ``numel``, or for a tensor
    torchao would leave unquantized only because ``numel`` is not a multiple of the block, the
    next multiple (the tensor is then stepped as a zero-padded flat copy)."""
    if state_bits == 32 or numel < MIN_QUANTIZED_NUMEL:
        return numel
    block = BLOCK_SIZES[state_bits]
    return -(-numel // block) * block


def _torchao_adamw(state_bits: int) -> type[Optimizer]:
    if not torch.cuda.is_available():
        # torchao's compiled extensions are CUDA-only and only warn on a CPU build.
        os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    try:
        from torchao.optim import AdamW4bit, AdamW8bit
    except ImportError as err:
        raise ImportError(f"state_bits={state_bits} uses torchao's AdamW{state_bits}bit: "
                          "pip install torchao==0.18.0 (or use state_bits=32)") from err
    return AdamW8bit if state_bits == 8 else AdamW4bit


def make_adamw(params: Iterable[Tensor], state_bits: int, *, lr: float, betas: tuple[float, float],
               eps: float, weight_decay: float) -> Optimizer:
    """An AdamW over ``params`` with states of ``state_bits`` bits (32, 8 or 4)."""
    if state_bits == 32:
        # foreach=False: the single-tensor path, the one an ordinary CPU AdamW takes too.
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
    if state_bits in (8, 4):
        return _torchao_adamw(state_bits)(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                          block_size=BLOCK_SIZES[state_bits])
    raise ValueError(f"state_bits must be one of {STATE_BITS}, got {state_bits!r}")


def sync_hyperparams(inner: Optimizer, group: dict[str, Any]) -> None:
    """Copy ``lr``, ``betas``, ``eps``, ``weight_decay`` of ``group`` into ``inner``'s only group
    (in place where the inner optimizer keeps a tensor, as torchao does for ``lr``)."""
    inner_group = inner.param_groups[0]
    for key in HYPERPARAMS:
        value, current = group[key], inner_group[key]
        if isinstance(current, Tensor):
            current.fill_(value)
        else:
            inner_group[key] = value


def step_context(state_bits: int, compile_step: bool) -> contextlib.AbstractContextManager:
    """Where to run an inner step: as is, or with torchao's internal ``torch.compile`` forced eager."""
    if state_bits == 32 or compile_step:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")

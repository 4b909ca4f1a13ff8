"""int8 storage for the trainable factors ``A``, ``B`` and ``values`` of :class:`slcompile.SLLinear`.

Design (the simplest one that works with our custom op and the per-layer optimizer):

- :class:`Int8Weight` is a tensor subclass that *looks* like a floating-point tensor (its dtype is
  the original one, fp32 or bf16) but holds only ``codes`` (int8, same shape) and ``scale``
  (fp32): per row for 2-D tensors (``(rows, 1)``: ``A (r, in)`` and ``B (out, r)`` get one scale
  per row), per tensor for 1-D ones (``values (nnz,)``, shape ``(1,)``). Symmetric, codes in
  ``[-127, 127]``, ``x ~= codes * scale`` with ``scale = absmax / 127`` (``1`` for an all-zero row,
  e.g. the initial ``B``). Memory: 1 byte per element plus 4 bytes per row.
- Any op that reads it (``slcompile::sl_linear``, its backward, ``materialize``, ``.to``, ...)
  sees the dequantized tensor: ``__torch_dispatch__`` dequantizes and runs the op, so the forward
  equals the layer with dequantized weights, and autograd delivers an ordinary floating-point
  ``.grad`` of the same shape and dtype to the (leaf) parameter. torchao's int8 training subclass
  only implements ``F.linear``, which our layer never calls; this one is op-agnostic.
- Updates: the optimizer (:mod:`slcompile.optim`) dequantizes one parameter at a time into a
  transient full-precision tensor, steps it there (Adam math, weight decay and all in fp32/bf16)
  and writes it back with :meth:`Int8Weight.requantize_` using **stochastic rounding**
  (``floor(x / scale + U[0, 1))``, unbiased, so updates far below one quantization step still
  move the weight in expectation). One rounding per update, never one per Adam sub-operation.
- Arbitrary in-place arithmetic (e.g. a plain ``torch.optim.AdamW`` doing ``p.mul_``) raises:
  it would round to nearest after every op and silently stall training. ``copy_`` (checkpoint
  loading) and the init ops (``zero_``, ``fill_``, ``uniform_``, ``normal_``) round to nearest.

The stochastic rounding draws from the global torch RNG (seed it for reproducible runs).
Tested in eager mode; ``torch.compile(model, backend="aot_eager")`` with ``Int8Weight``
parameters ran in a smoke check, Inductor is untested.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

__all__ = ["Int8Weight", "quantize_int8", "quantize_weights"]

_QMAX = 127
_ROUND_TO_NEAREST_INPLACE = {"copy_", "zero_", "fill_", "uniform_", "normal_"}


def quantize_int8(x: Tensor, *, stochastic: bool, generator: torch.Generator | None = None
                  ) -> tuple[Tensor, Tensor]:
    """Symmetric int8 codes and fp32 scale of ``x`` (per row if ``x.ndim >= 2``, else per tensor).

    Returns ``(codes, scale)``: ``codes`` int8 of ``x.shape``; ``scale`` fp32 ``(*x.shape[:-1], 1)``
    for ``ndim >= 2``, ``(1,)`` otherwise. ``stochastic`` rounds ``x / scale`` down or up with
    probability given by the fractional part (unbiased); otherwise to nearest.
    """
    xf = x.detach().float()
    if xf.ndim >= 2:
        absmax = xf.abs().amax(dim=-1, keepdim=True)
    else:
        absmax = xf.abs().amax().reshape(1)
    scale = torch.where(absmax > 0, absmax / _QMAX, torch.ones_like(absmax))
    scaled = xf / scale
    if stochastic:
        scaled = torch.floor(scaled.add_(torch.rand(scaled.shape, generator=generator, device=scaled.device)))
    else:
        scaled = torch.round(scaled)
    return scaled.clamp_(-_QMAX, _QMAX).to(torch.int8), scale


class Int8Weight(Tensor):
    """A tensor stored as int8 ``codes`` times fp32 ``scale`` that acts as its dequantized value.

    ``dtype`` is the appearance dtype (what :meth:`dequantize` returns and what gradients have).
    Build one with :meth:`from_float`; wrap it in ``nn.Parameter`` to train it.
    """

    codes: Tensor
    scale: Tensor

    @staticmethod
    def __new__(cls, codes: Tensor, scale: Tensor, dtype: torch.dtype, requires_grad: bool = False):
        return Tensor._make_wrapper_subclass(cls, codes.shape, dtype=dtype, device=codes.device,
                                             requires_grad=requires_grad)

    def __init__(self, codes: Tensor, scale: Tensor, dtype: torch.dtype, requires_grad: bool = False):
        if codes.dtype != torch.int8 or scale.dtype != torch.float32:
            raise TypeError(f"Int8Weight needs int8 codes and fp32 scale, got {codes.dtype} and {scale.dtype}")
        self.codes, self.scale = codes, scale

    @classmethod
    def from_float(cls, x: Tensor) -> "Int8Weight":
        """Quantize a floating-point tensor (round to nearest); the result has ``x.dtype``."""
        if not x.is_floating_point():
            raise TypeError(f"Int8Weight.from_float needs a floating-point tensor, got {x.dtype}")
        codes, scale = quantize_int8(x, stochastic=False)
        return cls(codes, scale, x.dtype)

    def dequantize(self) -> Tensor:
        """The value as a plain tensor of ``self.dtype`` and ``self.shape``."""
        return (self.codes.float() * self.scale).to(self.dtype)

    @torch.no_grad()
    def requantize_(self, x: Tensor, *, stochastic: bool = True,
                    generator: torch.Generator | None = None) -> "Int8Weight":
        """Store ``x`` (same shape) in place: new codes and scales, stochastic rounding by default."""
        if x.shape != self.shape:
            raise ValueError(f"Int8Weight.requantize_: shape {tuple(x.shape)} != {tuple(self.shape)}")
        codes, scale = quantize_int8(x, stochastic=stochastic, generator=generator)
        self.codes.copy_(codes)
        self.scale.copy_(scale)
        return self

    def __repr__(self) -> str:
        return (f"Int8Weight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
                f"scales={tuple(self.scale.shape)}, requires_grad={self.requires_grad})")

    def __tensor_flatten__(self):
        return ["codes", "scale"], (self.dtype,)

    @staticmethod
    def __tensor_unflatten__(inner_tensors, ctx, outer_size, outer_stride):
        return Int8Weight(inner_tensors["codes"], inner_tensors["scale"], ctx[0])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            src = args[0]
            return Int8Weight(src.codes, src.scale, src.dtype)
        if func._schema.is_mutable and isinstance(args[0], Int8Weight):
            return _inplace(func, args, kwargs)

        def plain(t):
            return t.dequantize() if isinstance(t, Int8Weight) else t

        return func(*tree_map(plain, args), **tree_map(plain, kwargs))


def _inplace(func, args, kwargs) -> Int8Weight:
    """In-place op on an ``Int8Weight``: only copies and init ops, rounded to nearest."""
    dst = args[0]
    name = func.overloadpacket.__name__
    if name not in _ROUND_TO_NEAREST_INPLACE:
        raise NotImplementedError(
            f"Int8Weight does not support in-place aten.{name}: update int8 weights through "
            "slcompile.optim.build(...), which dequantizes, steps in full precision and requantizes "
            "with stochastic rounding (a plain torch optimizer would round every sub-operation)")
    if name == "copy_" and isinstance(args[1], Int8Weight) and args[1].shape == dst.shape:
        dst.codes.copy_(args[1].codes)
        dst.scale.copy_(args[1].scale)
        return dst
    value = dst.dequantize()
    rest = tuple(a.dequantize() if isinstance(a, Int8Weight) else a for a in args[1:])
    func(value, *rest, **kwargs)
    return dst.requantize_(value, stochastic=False)


_FACTORS = ("A", "B", "values")


def quantize_weights(model: nn.Module, names: Iterable[str] = _FACTORS,
                     predicate: Callable[[str, Tensor], bool] | None = None) -> list[str]:
    """Store the chosen factors of every :class:`slcompile.SLLinear` of ``model`` as int8, in place.

    ``names``: which of ``A``, ``B``, ``values`` (default all three). ``predicate(qualified_name,
    param)`` can skip single parameters (e.g. keep one layer in full precision). Already
    quantized parameters are left alone. Call before building the optimizer (it holds the
    parameter objects). Returns the qualified names of the parameters quantized now.
    """
    from slcompile.layers import SLLinear

    names = tuple(names)
    unknown = sorted(set(names) - set(_FACTORS))
    if unknown:
        raise ValueError(f"quantize_weights: names must be among {_FACTORS}, got {unknown}")
    done = []
    for module_name, module in model.named_modules():
        if not isinstance(module, SLLinear):
            continue
        for name in names:
            param = getattr(module, name)
            qualified = f"{module_name}.{name}" if module_name else name
            if isinstance(param, Int8Weight) or (predicate is not None and not predicate(qualified, param)):
                continue
            setattr(module, name, nn.Parameter(Int8Weight.from_float(param.detach()),
                                               requires_grad=param.requires_grad))
            done.append(qualified)
    return done


# torch.save stores a wrapper subclass as its class, metadata and __dict__ (codes, scale: plain
# tensors); allow-list the class so checkpoints load with torch.load(weights_only=True).
torch.serialization.add_safe_globals([Int8Weight])

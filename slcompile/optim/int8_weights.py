"""int8 storage for the trainable factors ``A``, ``B`` and ``values`` of :class:`slcompile.SLLinear`.

Design (the simplest one that works with our custom op and the per-layer optimizer):

- :class:`Int8Weight` is a tensor subclass that *looks* like a floating-point tensor (its dtype is
  the original one, fp32 or bf16) but holds only ``codes`` (int8, same shape) and ``scale``
  (fp32): per row for 2-D tensors (``(rows, 1)``: ``A (r, in)`` and ``B (out, r)`` get one scale
  per row), per tensor for 1-D ones (``values (nnz,)``, shape ``(1,)``; ``(k,)`` after an FSDP2
  all-gather: one scale per contiguous block of ``ceil(nnz / k)``, see below). Symmetric, codes in
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
  A write into a slice of a 1-D tensor (``values[a:b].copy_(x)``) requantizes the whole tensor,
  whose scale the slice shares (the entries around it keep their values to rounding).

- FSDP2 (``fully_shard``, dim-0 shards): the row ops FSDP2 applies to a parameter (``split``,
  ``slice``, ``as_strided`` of whole rows, ``new_zeros``, ``view``) act on ``codes`` and on the
  scale rows, so a shard is an ``Int8Weight`` of its rows with their per-row scales.
  ``fsdp_pre_all_gather`` hands FSDP2 ``codes`` (int8) and ``scale`` (fp32) to all-gather, and
  ``fsdp_post_all_gather`` rebuilds the unsharded ``Int8Weight`` from them: int8 on the wire.
  A ``values`` shard keeps its own per-tensor scale (requantized from its own entries), so the
  gathered ``values`` has one scale per shard, i.e. per block of ``ceil(nnz / world)`` entries,
  FSDP2's chunk size. A replicated per-tensor scale would need an all-reduce of the absmax in
  every update of every shard, and a fixed block size would not line up with FSDP2's chunks.
- ``state_dict()`` holds the dequantized dense tensors (``DTensor`` shards under FSDP2), which
  ``load_state_dict`` requantizes (``copy_``, round to nearest): checkpoints of any layout
  (one process, DDP, FSDP2 on any world size) load into any other, as the optimizer states do.
  Saving a checkpoint thus costs one transient full-precision copy of the int8 factors.

The stochastic rounding draws from the global torch RNG (seed it for reproducible runs); an
FSDP2 shard draws noise of its own shape, so it does not draw the same numbers as one process.
Tested in eager mode; ``torch.compile(model, backend="aot_eager")`` with ``Int8Weight``
parameters ran in a smoke check, Inductor is untested.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_map

__all__ = ["Int8Weight", "quantize_int8", "quantize_weights"]

_QMAX = 127
_ROUND_TO_NEAREST_INPLACE = {"copy_", "zero_", "fill_", "uniform_", "normal_"}


def _block_scales(scale: Tensor, numel: int) -> Tensor:
    """The ``(numel,)`` scale of each entry of a 1-D tensor: ``scale (k,)`` per block of ``ceil(numel / k)``."""
    return scale.repeat_interleave(math.ceil(numel / len(scale)))[:numel] if len(scale) > 1 else scale


def quantize_int8(x: Tensor, *, stochastic: bool, generator: torch.Generator | None = None, blocks: int = 1
                  ) -> tuple[Tensor, Tensor]:
    """Symmetric int8 codes and fp32 scale of ``x`` (per row if ``x.ndim >= 2``, else per block).

    Returns ``(codes, scale)``: ``codes`` int8 of ``x.shape``; ``scale`` fp32 ``(*x.shape[:-1], 1)``
    for ``ndim >= 2``, ``(blocks,)`` otherwise (blocks of ``ceil(numel / blocks)`` entries, the
    last one shorter; ``1``: per tensor). ``stochastic`` rounds ``x / scale`` down or up with
    probability given by the fractional part (unbiased); otherwise to nearest.
    """
    xf = x.detach().float()
    if xf.ndim >= 2:
        absmax = xf.abs().amax(dim=-1, keepdim=True)
    else:
        block = max(1, math.ceil(xf.numel() / blocks))
        absmax = torch.nn.functional.pad(xf.abs(), (0, blocks * block - xf.numel())).view(blocks, block).amax(1)
    scale = torch.where(absmax > 0, absmax / _QMAX, torch.ones_like(absmax))
    scaled = xf / (scale if xf.ndim >= 2 else _block_scales(scale, xf.numel()))
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
        scale = self.scale if self.ndim >= 2 else _block_scales(self.scale, self.numel())
        return (self.codes.float() * scale).to(self.dtype)

    @torch.no_grad()
    def requantize_(self, x: Tensor, *, stochastic: bool = True,
                    generator: torch.Generator | None = None) -> "Int8Weight":
        """Store ``x`` (same shape) in place: new codes and scales, stochastic rounding by default."""
        if x.shape != self.shape:
            raise ValueError(f"Int8Weight.requantize_: shape {tuple(x.shape)} != {tuple(self.shape)}")
        whole, start = self._scale_owner()
        if whole is not None:  # part of a 1-D tensor: its scale also decodes the entries around it
            value = whole.dequantize()
            value[start:start + self.numel()] = x.to(value.dtype)
            whole.requantize_(value, stochastic=stochastic, generator=generator)
            return self
        codes, scale = quantize_int8(x, stochastic=stochastic, generator=generator,
                                     blocks=len(self.scale) if self.ndim == 1 else 1)
        self.codes.copy_(codes)
        self.scale.copy_(scale)
        return self

    def _scale_owner(self) -> tuple["Int8Weight | None", int]:
        """For a slice of a 1-D tensor (``values[a:b]``), ``(the whole tensor, where the slice
        starts)``: the slice shares its scales, so requantizing only the slice would rescale its
        neighbours' codes. ``(None, 0)`` otherwise. (Views made in ``__torch_dispatch__`` have no
        ``_base``: :func:`_rows` records the owner.)"""
        owner = getattr(self, "_owner", None)
        if owner is None:
            return None, 0
        codes, start = owner
        return Int8Weight(codes, self.scale, self.dtype), start

    def _scale_free(self) -> bool:
        """Whether new scales may be written without requantizing anything else: not a slice of a
        1-D tensor, or one whose other entries are all zero (FSDP2's padded shard)."""
        whole, start = self._scale_owner()
        if whole is None:
            return True
        rest = torch.cat([whole.codes[:start], whole.codes[start + self.numel():]])
        return not bool(rest.any())

    def __repr__(self) -> str:
        return (f"Int8Weight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
                f"scales={tuple(self.scale.shape)}, requires_grad={self.requires_grad})")

    def untyped_storage(self):
        """The codes' storage (FSDP2 compares storages when it re-pads a replaced shard)."""
        return self.codes.untyped_storage()

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy
                            ) -> tuple[tuple[Tensor, Tensor], None]:
        """FSDP2's all-gather inputs: ``codes`` (int8, this shard's rows) and ``scale`` (fp32, its
        rows' scales; ``(1,)`` for a 1-D shard), padded to FSDP2's chunk of ``ceil(rows / world)``
        rows (zero codes, unit scales) on a shorter last shard."""
        codes, scale = self.codes, self.scale
        missing = math.ceil(outer_size[0] / mesh.size()) - codes.shape[0]
        if missing > 0:
            codes = torch.cat([codes, codes.new_zeros(missing, *codes.shape[1:])])
            if codes.ndim >= 2:
                scale = torch.cat([scale, scale.new_ones(missing, *scale.shape[1:])])
        return (codes, scale), None

    def fsdp_post_all_gather(self, all_gather_outputs: tuple[Tensor, Tensor], metadata: Any,
                             param_dtype: torch.dtype, *, out: Tensor | None = None
                             ) -> tuple["Int8Weight", tuple[Tensor, Tensor]] | None:
        """The unsharded ``Int8Weight`` over FSDP2's all-gather outputs (``codes (world * chunk, ...)``
        int8, ``scale`` fp32: per row, or ``(world,)`` for 1-D; FSDP2 cuts the padding rows with
        ``as_strided``). Later all-gathers refill the same outputs, which ``out`` already views."""
        if out is not None:
            return None
        codes, scale = all_gather_outputs
        return Int8Weight(codes, scale, param_dtype), (codes, scale)

    def __tensor_flatten__(self):
        return ["codes", "scale"], (self.dtype,)

    @staticmethod
    def __tensor_unflatten__(inner_tensors, ctx, outer_size, outer_stride):
        return Int8Weight(inner_tensors["codes"], inner_tensors["scale"], ctx[0])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return _alias(args[0])
        if func in _ROW_OPS:
            return _ROW_OPS[func](*args, **kwargs)
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
    if name == "copy_" and isinstance(args[1], Int8Weight) and args[1].shape == dst.shape \
            and dst._scale_free():
        dst.codes.copy_(args[1].codes)
        dst.scale.copy_(args[1].scale)
        return dst
    value = dst.dequantize()
    rest = tuple(a.dequantize() if isinstance(a, Int8Weight) else a for a in args[1:])
    func(value, *rest, **kwargs)
    return dst.requantize_(value, stochastic=False)


def _alias(src: Int8Weight) -> Int8Weight:
    """``src`` again (detach, alias, a view of its own shape), a slice's owner included."""
    out = Int8Weight(src.codes, src.scale, src.dtype)
    out._owner = getattr(src, "_owner", None)
    return out


def _rows(src: Int8Weight, start: int, stop: int) -> Int8Weight:
    """Rows ``[start, stop)`` of ``src`` as a view (codes and their scales); a 1-D tensor keeps its
    scales, which must then still cover the same blocks, and records the whole tensor it is part of."""
    codes = src.codes[start:stop]
    if src.ndim >= 2:
        return Int8Weight(codes, src.scale[start:stop], src.dtype)
    if not (len(src.scale) == 1 or (start == 0 and math.ceil(len(codes) / len(src.scale))
                                    == math.ceil(len(src.codes) / len(src.scale)))):
        raise NotImplementedError(f"Int8Weight: rows {start}:{stop} of a 1-D tensor with {len(src.scale)} block scales")
    out = Int8Weight(codes, src.scale, src.dtype)
    whole, offset = getattr(src, "_owner", None) or (src.codes, 0)
    if len(codes) != len(whole):
        out._owner = (whole, offset + start)
    return out


def _split(src: Int8Weight, size: int, dim: int = 0) -> list[Int8Weight]:
    if dim != 0:
        raise NotImplementedError("Int8Weight: split along dim 0 only (FSDP2's shard dim)")
    return [_rows(src, start, min(start + size, src.shape[0])) for start in range(0, src.shape[0], size)]


def _slice(src: Int8Weight, dim: int = 0, start: int | None = None, end: int | None = None, step: int = 1
           ) -> Int8Weight:
    if dim != 0 or step != 1:
        raise NotImplementedError("Int8Weight: slices of whole rows only (dim 0, step 1)")
    start, end, _ = slice(start, end).indices(src.shape[0])
    return _rows(src, start, max(start, end))


def _as_strided(src: Int8Weight, size, stride, storage_offset: int | None = None) -> Int8Weight:
    row = math.prod(src.shape[1:])
    offset = storage_offset or 0
    if tuple(size[1:]) != tuple(src.shape[1:]) or tuple(stride) != tuple(torch.empty(size, device="meta").stride()) \
            or offset % max(row, 1):
        raise NotImplementedError(f"Int8Weight: as_strided to whole contiguous rows only, got {size} {stride} {offset}")
    return _rows(src, offset // max(row, 1), offset // max(row, 1) + size[0])


def _view(src: Int8Weight, size) -> Tensor:
    """Same shape or flat (``view(-1)``): an alias of ``src`` of its own shape. FSDP2 keeps a shard's
    ``view(-1)`` as its flat data, which it only reads for parameters without an all-gather
    extension; per-row scales cannot be flattened. Any other shape: the dequantized tensor's view."""
    if len(size) == 1 and size[0] in (-1, src.numel()) or tuple(size) == tuple(src.shape):
        return _alias(src)
    return src.dequantize().view(size)


def _new_zeros(src: Int8Weight, size, *, dtype=None, layout=None, device=None, pin_memory=None) -> Int8Weight:
    """Zeros of ``size`` stored like ``src`` (FSDP2's padded shard): zero codes, unit scales."""
    device = device or src.device
    scale_shape = (*size[:-1], 1) if len(size) >= 2 else (1,)
    return Int8Weight(torch.zeros(size, dtype=torch.int8, device=device),
                      torch.ones(scale_shape, dtype=torch.float32, device=device), dtype or src.dtype)


_aten = torch.ops.aten
_ROW_OPS = {_aten.split.Tensor: _split, _aten.slice.Tensor: _slice, _aten.as_strided.default: _as_strided,
            _aten.view.default: _view, _aten.new_zeros.default: _new_zeros}

_FACTORS = ("A", "B", "values")


def _dense_state_dict(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata) -> None:
    """State-dict post-hook: each ``Int8Weight`` factor (or ``DTensor`` of ``Int8Weight`` shards)
    leaves as its dequantized tensor of the same shape, dtype and placement."""
    for name in _FACTORS:
        value = state_dict.get(prefix + name)
        local = value.to_local() if isinstance(value, DTensor) else value
        if not isinstance(local, Int8Weight):
            continue
        dense = local.dequantize()
        state_dict[prefix + name] = (DTensor.from_local(dense, value.device_mesh, value.placements, run_check=False,
                                                        shape=value.shape, stride=value.stride())
                                     if isinstance(value, DTensor) else dense)


def _is_int8(param: Tensor) -> bool:
    return isinstance(param.to_local() if isinstance(param, DTensor) else param, Int8Weight)


def _quantized(param: Tensor) -> Tensor:
    """``Int8Weight.from_float(param)``; for a ``DTensor`` (FSDP2 shard), a ``DTensor`` of the same
    placement over its quantized local shard (FSDP2 picks up the new parameter at its lazy init)."""
    if not isinstance(param, DTensor):
        return Int8Weight.from_float(param)
    return DTensor.from_local(Int8Weight.from_float(param.to_local()), param.device_mesh, param.placements,
                              run_check=False, shape=param.shape, stride=param.stride())


def quantize_weights(model: nn.Module, names: Iterable[str] = _FACTORS,
                     predicate: Callable[[str, Tensor], bool] | None = None) -> list[str]:
    """Store the chosen factors of every :class:`slcompile.SLLinear` of ``model`` as int8, in place.

    ``names``: which of ``A``, ``B``, ``values`` (default all three). ``predicate(qualified_name,
    param)`` can skip single parameters (e.g. keep one layer in full precision). Already
    quantized parameters are left alone. Call before building the optimizer (it holds the
    parameter objects); under FSDP2, after ``fully_shard`` and before the first forward (each
    shard is quantized: a 1-D shard gets its own scale). Returns the qualified names of the parameters quantized now.
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
            if _is_int8(param) or (predicate is not None and not predicate(qualified, param)):
                continue
            if not any(_is_int8(getattr(module, n)) for n in _FACTORS):
                module.register_state_dict_post_hook(_dense_state_dict)
            setattr(module, name, nn.Parameter(_quantized(param.detach()), requires_grad=param.requires_grad))
            done.append(qualified)
    return done


# torch.save stores a wrapper subclass as its class, metadata and __dict__ (codes, scale: plain
# tensors); allow-list the class so checkpoints load with torch.load(weights_only=True).
torch.serialization.add_safe_globals([Int8Weight])

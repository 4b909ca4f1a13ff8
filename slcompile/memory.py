"""Parameter counts and a symbolic (sympy) model of training memory, with a batch-size planner.

Everything here is arithmetic on the model's shape: no tensors are allocated.

- :func:`param_count` reproduces the paper's parameter counts exactly.
- :func:`memory_model` returns a :class:`MemoryBreakdown` of sympy expressions in bytes, symbolic
  in batch ``b``, sequence ``s`` and the shape (``dim``, ``intermediate``, ``layers``, ``vocab``,
  ``heads``, ``rank``, ``density``), for ``full`` / ``lowrank`` / ``sltrain`` training of the LLaMA
  in :mod:`slcompile.recipes.models` with AdamW.
- :func:`evaluate` and :func:`estimate` turn it into numbers; :func:`plan` solves the peak for the
  largest micro-batch that fits a budget; :func:`plan_settings` lists the settings that fit.

What each term counts and why is in ``docs/memory.md`` and in the comment next to the term: one
device, live tensors only (no CUDA context or allocator cache), AdamW states in 32/16/8/4 bits,
optional int8 weights, int64/int32/regenerated support, optional checkpointing, and the peak as
the largest of a few moments of one training step (``MemoryBreakdown.phases``). ``world_size``
gives one rank's bytes under FSDP2 (parameters, gradients and optimizer states sharded).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from types import MappingProxyType
from typing import Mapping, Union

import sympy

from slcompile._validate import check_bool, check_int, check_number
from slcompile.model_configs import LlamaConfig, get_config
from slcompile.optim.lowbit import BLOCK_SIZES, MIN_QUANTIZED_NUMEL, state_numel
from slcompile.support import nnz_for

METHODS = ("full", "lowrank", "sltrain")
STATE_BITS = (32, 16, 8, 4)
WEIGHT_DTYPES = ("bf16", "fp32", "int8")
WEIGHT_SCALES = ("row", "tensor")
INDEX_BYTES = (8, 4, 0)
COMPUTE_DTYPES = ("bf16", "fp32")
DEVICES = ("cuda", "cpu")
_DTYPE_BYTES = {"bf16": 2, "fp32": 4}

# torchao/optim (adam.py, subclass_8bit.py, subclass_4bit.py): which tensors get low-bit states,
# the block size of their fp32 scales and the length of the per-tensor fp32 lookup table.
_QUANT_QMAP = {8: 256, 4: 16}

b, s = sympy.symbols("b s", positive=True, integer=True)
dim, intermediate, layers, vocab, heads, rank = sympy.symbols(
    "dim intermediate layers vocab heads rank", positive=True, integer=True)
density = sympy.Symbol("density", positive=True)
SYMBOLS: Mapping[str, sympy.Symbol] = MappingProxyType(
    {sym.name: sym for sym in (b, s, dim, intermediate, layers, vocab, heads, rank, density)})

ConfigLike = Union[LlamaConfig, str]
Breakdown = Union["MemoryBreakdown", sympy.Expr]


class _Count(sympy.Function):
    """A non-negative integer known only once its arguments are numbers (counts and byte sizes)."""

    is_integer = True
    is_nonnegative = True


class _Nnz(_Count):
    """``nnz = int(density * in * out)`` (Python's float product, truncated) once all are numbers.

    Delegated to :func:`slcompile.support.nnz_for` so the count is the layers' own, bit for bit; a
    symbolic ``floor`` would multiply in sympy's order and precision instead of Python's.
    """

    @classmethod
    def eval(cls, dens, fan_in, fan_out):
        if dens.is_number and fan_in.is_number and fan_out.is_number:
            return sympy.Integer(nnz_for(int(fan_in), int(fan_out), float(dens)))
        return None


class _LowBitStepBytes(_Count):
    """Bytes torchao's compiled 8/4-bit step (``compile_step=True``) of one ``numel``-element tensor
    allocates while it runs; ``cpu`` is 1 for Inductor's CPU kernel, 0 for CUDA.

    Over ``P``, the padded state length (:func:`state_numel`), Inductor's CPU kernel allocates the
    block-normalized fp32 ``exp_avg`` and ``exp_avg_sq`` and their new fp32 block scales
    (``8 P + 8 P / block``), and for 4-bit also both states' codes unpacked to uint8 (``2 P``)
    and the new codes as int64 before packing (``16 P``). On CUDA one fp32 copy (``4 P``) is
    assumed (not measured). A tensor under 4096 elements keeps plain states, stepped in place.
    """

    @classmethod
    def eval(cls, numel, bits, cpu):
        if not numel.is_number:
            return None
        n, bits = int(numel), int(bits)
        if n < MIN_QUANTIZED_NUMEL:
            return sympy.Integer(0)
        padded = state_numel(n, bits)
        if not int(cpu):
            return sympy.Integer(4 * padded)
        fp32 = 2 * 4 * padded + 2 * 4 * (padded // BLOCK_SIZES[bits])
        codes = 0 if bits == 8 else 2 * padded + 2 * 8 * padded
        return sympy.Integer(fp32 + codes)


class _PaddedCopyBytes(_Count):
    """Bytes of the zero-padded flat copies of value and gradient (``elem`` bytes per element)
    through which ``slcompile.optim`` steps a tensor whose low-bit state length is padded
    (:func:`state_numel`); 0 if it is not padded."""

    @classmethod
    def eval(cls, numel, bits, elem):
        if not numel.is_number:
            return None
        n = int(numel)
        padded = state_numel(n, int(bits))
        return sympy.Integer(2 * int(elem) * padded if padded > n else 0)


class _LowBitStateBytes(_Count):
    """Bytes of one torchao 8/4-bit Adam state of a tensor with ``numel`` elements.

    Quantized (codes + one fp32 scale per block + fp32 lookup table, over ``numel`` padded to a
    whole block as ``slcompile.optim`` does) when ``numel >= 4096``; otherwise a plain tensor of
    ``fallback`` bytes per element.
    """

    @classmethod
    def eval(cls, numel, bits, fallback):
        if not numel.is_number:
            return None
        n, bits = int(numel), int(bits)
        padded = state_numel(n, bits)
        if n >= MIN_QUANTIZED_NUMEL:
            return sympy.Integer(padded * bits // 8 + 4 * (padded // BLOCK_SIZES[bits]) + 4 * _QUANT_QMAP[bits])
        return sympy.Integer(n * int(fallback))


@dataclass(frozen=True)
class _Tensor:
    """One kind of trainable tensor: ``count`` copies of ``numel`` elements in ``rows`` rows."""

    numel: sympy.Expr
    count: sympy.Expr
    rows: sympy.Expr
    in_linear: bool  # part of one of the seven replaceable linears (int8-able)


def _linear_shapes() -> list[tuple[str, sympy.Expr, sympy.Expr]]:
    # The config's own list evaluated on symbols, so the seven linears are defined once.
    return LlamaConfig(dim=dim, intermediate_size=intermediate).linear_shapes()


def _tensors(method: str) -> list[_Tensor]:
    """The model's trainable tensors: untied embedding and head, RMSNorms, the seven linears."""
    tensors = [_Tensor(vocab * dim, sympy.Integer(1), vocab, False),  # embedding
               _Tensor(vocab * dim, sympy.Integer(1), vocab, False),  # lm_head
               _Tensor(dim, 2 * layers + 1, sympy.Integer(1), False)]  # 2 norms per layer + final
    for _, fan_in, fan_out in _linear_shapes():
        if method == "full":
            tensors.append(_Tensor(fan_in * fan_out, layers, fan_out, True))
            continue
        tensors.append(_Tensor(rank * fan_in, layers, rank, True))  # A (r, in)
        tensors.append(_Tensor(fan_out * rank, layers, fan_out, True))  # B (out, r)
        if method == "sltrain":
            tensors.append(_Tensor(_Nnz(density, fan_in, fan_out), layers, sympy.Integer(1), True))
    return tensors


def _update_bytes(t: _Tensor, *, state_bits: int, elem: int, compute_bytes: int, int8: bool,
                  cpu: bool) -> sympy.Expr:
    """What one single-tensor update of ``t`` allocates beyond its gradient, at its most: torch's
    single-tensor AdamW (16/32-bit states) or ``slcompile.optim``'s ``_Slot.update`` around
    torchao's compiled step (8/4-bit). ``elem``: bytes per element of the parameter (as the
    optimizer sees it) and of its gradient; ``int8``: ``t`` is stored as an ``Int8Weight``."""
    if state_bits >= 16:
        # torch's single-tensor AdamW: sqrt(exp_avg_sq) and its quotient by the bias correction
        # are both alive before the in-place add_(eps): two state-dtype copies.
        step, padded_copies = 2 * t.numel * (state_bits // 8), sympy.Integer(0)
    else:
        step = _LowBitStepBytes(t.numel, state_bits, int(cpu))
        padded_copies = _PaddedCopyBytes(t.numel, state_bits, elem)
    if not int8:
        return padded_copies + step
    # An Int8Weight is stepped through its dequantized value (compute dtype; alive during the
    # whole update, as are the padded copies) and written back by Int8Weight.requantize_ (eager,
    # stochastic): an fp32 copy of the value (none if it is fp32 already), x / scale and the
    # uniform noise (8 bytes per element), the row absmax and the new scales (2 x 4 per row).
    requantize = 8 * t.numel + (4 * t.numel if compute_bytes == 2 else 0) + 8 * t.rows
    return compute_bytes * t.numel + padded_copies + _max([step, requantize])


@dataclass(frozen=True)
class MemoryBreakdown:
    """Memory of one training step, every field a sympy expression in bytes.

    ``activations`` and ``activations_checkpointed`` are both given; ``phases`` (and so ``peak``)
    use the one selected by ``checkpointing``. ``gradients`` is the most gradient memory alive at
    once (all gradients, or the largest single one with ``per_layer``). ``optimizer_transient``
    is what the optimizer step allocates at its most: all parameters' ``sqrt(exp_avg_sq)`` for a
    foreach step, else the largest single-tensor update (:func:`_update_bytes`). ``phases``:
    ``forward_loss``, then ``backward_head`` and ``backward_layers`` with ``per_layer``, else
    ``backward_top``, ``backward_bottom`` and ``step``.
    """

    parameters: sympy.Expr
    support: sympy.Expr
    optimizer_states: sympy.Expr
    gradients: sympy.Expr
    activations: sympy.Expr
    activations_checkpointed: sympy.Expr
    loss: sympy.Expr
    transient: sympy.Expr
    optimizer_transient: sympy.Expr
    phases: Mapping[str, sympy.Expr]
    peak: sympy.Expr

    def terms(self) -> dict[str, sympy.Expr]:
        """All expressions by name: the fields, then each phase as ``phase_<name>``."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "phases"}
        out.update({f"phase_{name}": expr for name, expr in self.phases.items()})
        return out


def _max(exprs) -> sympy.Expr:
    # Unevaluated: comparing symbolic shapes is slow and undecidable; substituting numbers
    # rebuilds the Max, which then evaluates.
    unique = tuple(dict.fromkeys(sympy.sympify(e) for e in exprs))
    if len(unique) == 1:
        return unique[0]
    return sympy.Max(*unique, evaluate=all(e.is_number for e in unique))


def _choice(name: str, value, allowed: tuple) -> None:
    if not any(type(value) is type(a) and value == a for a in allowed):  # 8.0 and True are not 8, 1
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _resolve_config(model_config: ConfigLike) -> LlamaConfig:
    if isinstance(model_config, str):
        return get_config(model_config)
    if not isinstance(model_config, LlamaConfig):
        raise ValueError(f"model_config must be a LlamaConfig or a config name, got {model_config!r}")
    return model_config


def memory_model(method: str = "sltrain", *, per_layer: bool = False, state_bits: int = 32,
                 weight_dtype: str = "bf16", weight_scale: str = "row", index_bytes: int = 4,
                 compute_dtype: str = "bf16", checkpointing: bool = False, foreach: bool = True,
                 device: str = "cuda", world_size: int = 1) -> MemoryBreakdown:
    """Symbolic memory of one AdamW training step of the LLaMA, in bytes.

    Args:
        method: ``"full"`` (dense linears), ``"lowrank"`` (``B @ A`` only) or ``"sltrain"``.
        per_layer: step each parameter in its gradient hook and free its gradient at once.
        state_bits: AdamW state precision: 32 (fp32), 16 (bf16, torch AdamW on bf16 weights),
            8 or 4 (torchao ``AdamW8bit`` / ``AdamW4bit``).
        weight_dtype: ``"bf16"``, ``"fp32"`` or ``"int8"`` (the seven linears' tensors in int8
            with fp32 scales; everything else in ``compute_dtype``).
        weight_scale: ``"row"`` or ``"tensor"``: one fp32 scale per row or per int8 tensor.
        index_bytes: bytes per nonzero of the stored support: 8 (int64, the reference), 4 (int32,
            ours) or 0 (regenerated from the seed).
        compute_dtype: ``"bf16"`` or ``"fp32"``, the dtype of activations (fp32 needs fp32 weights).
        checkpointing: recompute each decoder layer in backward instead of saving its activations.
        foreach: with ``per_layer=False`` and 16/32-bit states, torch's foreach AdamW (one
            state-dtype copy of all parameters at the step; torch's default on CUDA) or, if
            ``False``, one tensor at a time (``slcompile.optim.build(per_layer=False)``,
            ``torch.optim.AdamW(foreach=False)``: two copies of the largest tensor). Ignored
            where the step is single-tensor anyway (``per_layer=True``, 8/4-bit states).
        device: ``"cuda"`` or ``"cpu"``: whose compiled torchao step transient is counted (8/4-bit
            states only; measured on the CPU, assumed on CUDA, see ``_LowBitStepBytes``).
        world_size: ranks of ``--parallel fsdp2``; the breakdown is one rank's (``b`` is its
            micro-batch). Each trainable tensor is sharded along its first dimension:
            parameters, gradients and optimizer states count ``ceil(numel / world_size)``
            elements per tensor (rank 0's shard when the rows split evenly; quantized states are
            padded and thresholded per shard, as ``slcompile.optim`` does); the SLTrain support
            (a buffer) and activations are not sharded. The backward also holds the largest
            FSDP2 unit (the root: embedding, head, final norm; or one decoder layer) all-gathered
            with its unsharded gradient, and the forward its all-gathered parameters (modeled,
            not measured). ``weight_dtype="int8"`` needs ``per_layer`` here (as the trainer):
            each rank stores its rows' int8 codes and scales, and a gathered unit is int8 too.

    Cached: the same arguments return the same (immutable) breakdown.
    """
    _check_options(method, per_layer, state_bits, weight_dtype, weight_scale, index_bytes,
                   compute_dtype, checkpointing, foreach, device, world_size)
    # foreach only matters for a whole-model step of 16/32-bit states: one cache entry otherwise.
    foreach = foreach and not per_layer and state_bits >= 16
    return _memory_model(method, per_layer, state_bits, weight_dtype, weight_scale, index_bytes,
                         compute_dtype, checkpointing, foreach, device, world_size)


def _check_options(method, per_layer, state_bits, weight_dtype, weight_scale, index_bytes,
                   compute_dtype, checkpointing, foreach, device, world_size) -> None:
    _choice("method", method, METHODS)
    check_bool("per_layer", per_layer)
    _choice("state_bits", state_bits, STATE_BITS)
    _choice("weight_dtype", weight_dtype, WEIGHT_DTYPES)
    _choice("weight_scale", weight_scale, WEIGHT_SCALES)
    _choice("index_bytes", index_bytes, INDEX_BYTES)
    _choice("compute_dtype", compute_dtype, COMPUTE_DTYPES)
    check_bool("checkpointing", checkpointing)
    check_bool("foreach", foreach)
    _choice("device", device, DEVICES)
    check_int("world_size", world_size, 1)
    if world_size > 1 and weight_dtype == "int8" and not per_layer:
        raise ValueError("weight_dtype 'int8' with world_size > 1 needs per_layer=True (the trainer's "
                         "--parallel --int8-weights runs the per-layer optimizer)")
    if compute_dtype == "fp32" and weight_dtype == "bf16":
        raise ValueError("compute_dtype 'fp32' needs weight_dtype 'fp32' or 'int8', got weight_dtype 'bf16'")


def _layer_activations(method: str, c: int) -> sympy.Expr:
    """Bytes autograd saves in one decoder layer of :class:`slcompile.recipes.models.llama.Llama`
    (``c``: bytes per element of the compute dtype)."""
    tokens = b * s
    # Each RMSNorm (statistics in fp32) saves an fp32 copy of its input (in fp32: the input
    # itself), the fp32 rstd per token and its normalized output cast to the compute dtype (for
    # the weight's gradient); its output is saved by the linears it feeds. In the compute dtype:
    # both norms' normalized tensors and outputs, RoPE'd q and k, v and the SDPA output (o_proj's
    # input is a view of it: flash kernels lay it out (b, s, h, hd)): 8 x (tokens, dim); the gate
    # output (SiLU's input), SiLU(gate), up and their product (down's input): 4 x (tokens,
    # intermediate). In fp32: the two input copies (tokens, dim), two rstd and the SDPA
    # logsumexp per head and token.
    saved = c * tokens * (8 * dim + 4 * intermediate) + 4 * tokens * 2 * dim + 4 * (2 * tokens + heads * tokens)
    if method == "lowrank":
        # (x A^T) B^T saves the (tokens, rank) intermediate of each of the seven linears.
        saved += len(_linear_shapes()) * c * tokens * rank
    return saved


def _linear_transient(method: str, c: int, int8: bool) -> sympy.Expr:
    """The largest transient of one linear's backward (int8 weights are dequantized to the
    compute dtype for the GEMMs, one tensor at a time)."""
    shapes = _linear_shapes()
    if method == "sltrain":
        # W = scale * B @ A + S recomputed and the dense dW: two (out, in) compute-dtype matrices.
        return _max(2 * i * o * c + ((rank * (i + o) + _Nnz(density, i, o)) * c if int8 else 0)
                    for _, i, o in shapes)
    per_tensor = {"full": lambda i, o: i * o, "lowrank": lambda i, o: rank * (i + o)}[method]
    return _max(per_tensor(i, o) * c if int8 else sympy.Integer(0) for _, i, o in shapes)


# Validated before the cache: 1 == True would otherwise hit the entry of a valid call.
@lru_cache(maxsize=None)
def _memory_model(method: str, per_layer: bool, state_bits: int, weight_dtype: str,
                  weight_scale: str, index_bytes: int, compute_dtype: str,
                  checkpointing: bool, foreach: bool, device: str, world_size: int) -> MemoryBreakdown:
    """Build :func:`memory_model`'s breakdown from validated options."""
    c = _DTYPE_BYTES[compute_dtype]
    int8 = weight_dtype == "int8"
    # Bytes per element of every non-int8 parameter and of every gradient (torchao's int8
    # weights get their gradients in the compute dtype).
    elem = c if int8 else _DTYPE_BYTES[weight_dtype]
    full_tensors = _tensors(method)
    # One rank's shard of every trainable tensor (FSDP2 shards along the first dimension).
    tensors = [replace(t, numel=sympy.ceiling(t.numel / world_size), rows=sympy.ceiling(t.rows / world_size))
               for t in full_tensors]
    shapes = _linear_shapes()
    tokens = b * s

    def stored_bytes(t: _Tensor) -> sympy.Expr:
        if int8 and t.in_linear:
            return t.numel + 4 * (t.rows if weight_scale == "row" else 1)
        return t.numel * elem

    def state_bytes(t: _Tensor) -> sympy.Expr:
        if state_bits >= 16:
            return 2 * t.numel * (state_bits // 8)
        # torchao's fallback state is zeros_like(param): the parameter's (appearance) dtype.
        return 2 * _LowBitStateBytes(t.numel, state_bits, elem)

    total_numel = sum(t.count * t.numel for t in tensors)
    largest_numel = _max(t.numel for t in tensors)
    layer_numel = sum(t.numel for t in full_tensors if t.in_linear) + 2 * dim  # one decoder layer

    parameters = sum(t.count * stored_bytes(t) for t in tensors)
    # The fixed support of S: one stored flat index per nonzero (none if regenerated).
    support = (index_bytes * layers * sum(_Nnz(density, i, o) for _, i, o in shapes)
               if method == "sltrain" else sympy.Integer(0))
    optimizer_states = sum(t.count * state_bytes(t) for t in tensors)
    all_gradients = elem * total_numel

    layer_activations = _layer_activations(method, c)
    # The final RMSNorm (fp32 input copy, rstd, normalized tensor) and its output, the head's input.
    head_activations = 2 * c * tokens * dim + 4 * tokens * dim + 4 * tokens
    activations = layers * layer_activations + head_activations
    layer_input = c * tokens * dim
    # torch.utils.checkpoint keeps each layer's input; the head's activations are not checkpointed.
    activations_checkpointed = layers * layer_input + head_activations
    saved = activations_checkpointed if checkpointing else activations
    kept_per_layer = layer_input if checkpointing else layer_activations

    # The model computes the loss itself, F.cross_entropy(logits.float(), targets): the fp32
    # logits are freed once log-softmax has saved its fp32 output, and the log-softmax backward
    # holds three fp32 (tokens, vocab) buffers: log-probs, incoming and outgoing gradient.
    loss = 12 * tokens * vocab

    # One decoder layer's backward, beyond saved activations and gradients.
    linear_transient = _linear_transient(method, c, int8)
    # Activation gradients in flight in the MLP backward: d(act), d(SiLU), d(up) over
    # intermediate, plus the incoming and outgoing gradient over dim.
    grad_buffers = c * tokens * (3 * intermediate + 2 * dim)
    # Recomputing a checkpointed layer rebuilds all it saves (one (tokens, dim) too many in fp32,
    # where the norm's input copy is the kept input itself).
    recomputed = layer_activations if checkpointing else sympy.Integer(0)
    transient = linear_transient + grad_buffers + recomputed

    def update_bytes(t: _Tensor) -> sympy.Expr:
        return _update_bytes(t, state_bits=state_bits, elem=elem, compute_bytes=c,
                             int8=int8 and t.in_linear, cpu=device == "cpu")

    if foreach:
        # torch's foreach AdamW: exp_avg_sq.sqrt() for all parameters at once.
        optimizer_transient = total_numel * (state_bits // 8)
    else:
        # One tensor at a time (per layer; or after backward, as slcompile.optim and any 8/4-bit
        # torchao step do): the largest single update.
        optimizer_transient = _max(update_bytes(t) for t in tensors)

    persistent = parameters + support + optimizer_states
    # FSDP2: the largest unit's all-gathered parameters (forward), with its unsharded gradient
    # (backward). int8 weights travel and stay gathered as codes plus scales (a 1-D tensor then
    # has one scale per shard); their gradients arrive in the compute dtype.
    if world_size > 1:
        gathered_layer = (sum(t.numel + 4 * (t.rows if t.rows != 1 and weight_scale == "row" else world_size)
                              for t in full_tensors if t.in_linear) + 2 * dim * elem
                          if int8 else elem * layer_numel)
        gathered = _max([elem * (2 * vocab * dim + dim), gathered_layer])
        gathered_grads = elem * _max([2 * vocab * dim + dim, layer_numel])
    else:
        gathered = gathered_grads = sympy.Integer(0)
    transient = transient + gathered + gathered_grads
    phases = {"forward_loss": persistent + saved + gathered + loss}
    if per_layer:
        gradients = elem * largest_numel
        # The head's gradient arrives first: its update runs while every activation is saved,
        # the loss buffers are freed and the head's matmul backward has also produced the
        # gradient of its input, (tokens, dim) in the compute dtype.
        head = tensors[1]
        phases["backward_head"] = (persistent + saved + c * tokens * dim + gathered + gathered_grads
                                   + elem * head.numel + update_bytes(head))
        # Then one decoder layer at a time: its backward transients, with one of its tensors'
        # gradient and update at once (counted with every activation still saved: an upper
        # bound). The embedding's gradient arrives last, after the activations are freed.
        phases["backward_layers"] = (persistent + saved + transient
                                     + _max(elem * t.numel + update_bytes(t) for t in tensors[2:]))
    else:
        gradients = all_gradients
        # Backward through the top layer: every activation, head + final norm + one layer's grads.
        phases["backward_top"] = (persistent + saved + transient
                                  + elem * (vocab * dim + dim + layer_numel))
        # Backward through the bottom layer: one layer's activations, all grads but the embedding's.
        phases["backward_bottom"] = (persistent + kept_per_layer + transient
                                     + all_gradients - elem * vocab * dim)
        phases["step"] = persistent + all_gradients + optimizer_transient
    return MemoryBreakdown(
        parameters=parameters, support=support, optimizer_states=optimizer_states,
        gradients=gradients, activations=activations,
        activations_checkpointed=activations_checkpointed, loss=loss, transient=transient,
        optimizer_transient=optimizer_transient, phases=MappingProxyType(phases),
        peak=_max(phases.values()))


def shape_values(model_config: ConfigLike, rank: int | None = None,
                 density: float | None = None) -> dict[str, object]:
    """The shape symbols' values for a config (``rank``/``density`` default to the config's)."""
    cfg = _resolve_config(model_config)
    return {"dim": cfg.dim, "intermediate": cfg.intermediate_size, "layers": cfg.n_layers,
            "vocab": cfg.vocab_size, "heads": cfg.n_heads,
            "rank": cfg.rank if rank is None else check_int("rank", rank, 1),
            "density": (cfg.density if density is None
                        else check_number("density", density, 0, 1, open_low=True, open_high=True))}


def _substitute(expr: sympy.Expr, values: Mapping[str, object]) -> sympy.Expr:
    unknown = sorted(set(values) - set(SYMBOLS))
    if unknown:
        raise ValueError(f"unknown symbol(s) {unknown}; known: {', '.join(SYMBOLS)}")
    return expr.xreplace({SYMBOLS[name]: sympy.sympify(v) for name, v in values.items()})


def _to_bytes(expr: sympy.Expr) -> int:
    if expr.free_symbols:
        names = sorted(sym.name for sym in expr.free_symbols)
        raise ValueError(f"missing value(s) for {names}: pass them (or config=...) to evaluate")
    return int(sympy.ceiling(expr))


def evaluate(expr_or_breakdown: Breakdown, config: ConfigLike | None = None,
             **values) -> Union[int, dict[str, int]]:
    """Bytes of an expression, or of every term of a :class:`MemoryBreakdown` (a dict).

    ``values`` map symbol names (``b``, ``s``, ``dim``, ``intermediate``, ``layers``, ``vocab``,
    ``heads``, ``rank``, ``density``) to numbers; ``config`` fills the shape symbols from a
    :class:`LlamaConfig` or its name (explicit ``values`` win).
    """
    if config is not None:
        values = {**shape_values(config), **values}
    if isinstance(expr_or_breakdown, MemoryBreakdown):
        return {name: _to_bytes(_substitute(expr, values))
                for name, expr in expr_or_breakdown.terms().items()}
    return _to_bytes(_substitute(sympy.sympify(expr_or_breakdown), values))


def param_count(model_config: ConfigLike, method: str, rank: int | None = None,
                density: float | None = None) -> int:
    """Trainable parameters of the LLaMA trained with ``method``, as the paper counts them.

    Untied embedding and head, RMSNorm weights (two per layer and a final one), no biases; each of
    the seven linears per layer holds ``in * out`` (full), ``r * (in + out)`` (lowrank), or that
    plus ``int(density * in * out)`` sparse values (sltrain). ``rank``/``density`` default to the
    config's.
    """
    _choice("method", method, METHODS)
    total = sum(t.count * t.numel for t in _tensors(method))
    return evaluate(total, **shape_values(model_config, rank, density))


def estimate(model_config: ConfigLike, method: str, batch: int, seq: int, *,
             rank: int | None = None, density: float | None = None, **options) -> dict[str, int]:
    """Bytes of every term of :func:`memory_model` (``options``) at one micro-batch and sequence.

    Keys: the :class:`MemoryBreakdown` fields (``peak`` included) and ``phase_<name>`` per phase.
    """
    values = shape_values(model_config, rank, density)
    values.update(b=check_int("batch", batch, 1), s=check_int("seq", seq, 1))
    return evaluate(memory_model(method, **options), **values)


def _largest_batch(budget_bytes: int, breakdown: MemoryBreakdown,
                   values: Mapping[str, object]) -> int:
    """Largest integer ``b`` with every phase <= budget (0 if none), solving each phase for ``b``."""
    limits = []
    for phase in breakdown.phases.values():
        expr = sympy.expand(_substitute(phase, values))  # linear in b: a0 + a1 * b
        if not expr.has(b):
            if expr > budget_bytes:
                return 0
            continue
        # Solve for an unconstrained symbol: a negative root (too big even at b = 0) must survive.
        unconstrained = sympy.Symbol("batch")
        (root,) = sympy.solve(sympy.Eq(expr.xreplace({b: unconstrained}), budget_bytes), unconstrained)
        limits.append(max(int(sympy.floor(root)), 0))
    return min(limits)  # never empty: the loss phase grows with the batch


def plan(budget_bytes: int, model_config: ConfigLike, method: str = "sltrain",
         seq: int | None = None, *, rank: int | None = None, density: float | None = None,
         **options) -> int:
    """The largest micro-batch whose modeled peak fits ``budget_bytes``.

    ``seq`` defaults to the config's ``max_seq_len``; ``options`` go to :func:`memory_model`.
    Raises ``ValueError`` naming the largest term if even batch 1 does not fit.
    """
    check_int("budget_bytes", budget_bytes, 0)
    cfg = _resolve_config(model_config)
    seq = cfg.max_seq_len if seq is None else check_int("seq", seq, 1)
    breakdown = memory_model(method, **options)
    values = {**shape_values(cfg, rank, density), "s": seq}
    batch = _largest_batch(budget_bytes, breakdown, values)
    if batch == 0:
        at_one = evaluate(breakdown, **values, b=1)
        unused = "activations" if options.get("checkpointing") else "activations_checkpointed"
        terms = {k: v for k, v in at_one.items()
                 if k not in ("peak", unused) and not k.startswith("phase_")}
        top = max(terms, key=terms.get)
        raise ValueError(f"budget_bytes={budget_bytes} is below the peak at batch 1 "
                         f"({at_one['peak']} bytes); the largest term is {top} ({terms[top]} bytes)")
    return batch


_SWEPT = ("per_layer", "state_bits", "weight_dtype", "checkpointing")


def plan_settings(budget_bytes: int, model_config: ConfigLike, batch: int, seq: int,
                  **options) -> list[dict[str, object]]:
    """The settings that fit ``budget_bytes`` at ``batch x seq``, smallest peak first.

    Sweeps method x per_layer x state_bits x weights (bf16 or int8; int8 only with ``per_layer``
    when ``world_size > 1``) x checkpointing; each row holds those settings and ``peak`` (bytes). ``options`` (e.g.
    ``index_bytes``, ``compute_dtype``, ``rank``, ``world_size``) apply to every setting.
    """
    check_int("budget_bytes", budget_bytes, 0)
    swept = sorted(set(options) & set(_SWEPT))
    if swept:
        raise ValueError(f"plan_settings sweeps {swept} itself; do not pass them")
    rows = []
    for method, per_layer, bits, int8, ckpt in itertools.product(
            METHODS, (False, True), STATE_BITS, (False, True), (False, True)):
        if int8 and not per_layer and options.get("world_size", 1) > 1:
            continue  # int8 weights under FSDP2 need the per-layer optimizer
        peak = estimate(model_config, method, batch, seq, per_layer=per_layer, state_bits=bits,
                        weight_dtype="int8" if int8 else "bf16", checkpointing=ckpt,
                        **options)["peak"]
        if peak <= budget_bytes:
            rows.append({"method": method, "per_layer": per_layer, "state_bits": bits,
                         "int8_weights": int8, "checkpointing": ckpt, "peak": peak})
    return sorted(rows, key=lambda row: row["peak"])

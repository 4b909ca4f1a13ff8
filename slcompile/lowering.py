"""Inductor lowerings that let ``max-autotune`` choose how the SLTrain linear runs, node by node.

Installed only while the ``slcompile`` backend compiles (:func:`installed`, used by
:mod:`slcompile.backend`); plain ``torch.compile`` keeps Inductor's default for our ops, an extern
call (``FallbackKernel``) of each op's registered implementation.

On CUDA under ``max_autotune`` / ``max_autotune_gemm``, for operands of one dtype and static
shapes, three ops are lowered:

- ``slcompile::materialize`` goes through ``autotune_select_algorithm`` with two extern choices
  (:func:`materialize_choices`): ``slcompile_materialize``, the op itself (the Triton kernel with
  its own per-shape tuned configuration, :mod:`slcompile.kernels.autotune`), and
  ``slcompile_materialize_aten`` (:func:`materialize_aten`: ``index_add`` of the values into the
  zeroed output, then cuBLAS ``addmm_`` accumulating ``scale * B @ A`` onto it);
- ``slcompile::sl_linear`` (the materialize path's forward) becomes ``W = materialize(...)`` (the
  node above) and ``y = x @ W^T (+ bias)`` through Inductor's own ``mm``/``addmm`` lowering, which
  under max-autotune times its Triton GEMM templates (epilogue fusion included) against cuBLAS;
- ``slcompile::sl_linear_backward`` becomes ``W`` again (only if ``dx`` is needed), ``dx = dY W``,
  the fused ``dW`` + ``dvalues`` step (:func:`grad_weight_choices`: ``slcompile_grad_weight``, the
  tuned Triton kernel that gathers ``dvalues`` in the GEMM's epilogue, against
  ``slcompile_grad_weight_aten``, cuBLAS ``mm`` then ``index_select``), and
  ``dA = scale * B^T dW``, ``dB = scale * dW A^T`` through Inductor's ``mm``.

So every GEMM of the layer is a node Inductor's autotuner picks an implementation for, and each
fused step of ours competes with its ATen composition: the compiled layer is never slower than
the best of those per node. Both outputs of the ``dW`` step live in one packed buffer
(``dW`` flattened, then ``dvalues`` at :func:`packed_offset`), because a choice has one output
layout; ``dW`` is used as a view of it, ``dvalues`` leaves as an ``nnz``-element copy (a view
returned as ``values.grad`` would keep the dense ``dW`` alive with it). Inductor frees ``W`` after ``dx`` as the opaque op
does, so a layer still holds at most one ``(out, in)`` transient at a time.

Inductor times the choices on synthetic inputs: random integers as ``support`` would index out of
range, so :func:`support_generator` draws a valid one (distinct, sorted, in ``[0, out * in)``).
Anything else (CPU, no max-autotune, mixed dtypes, symbolic shapes) lowers as the default does.

No ``TritonTemplate`` of ours: our kernels read a tile index the host builds once per support
tensor (``kernels/tile_index.py``), which is no graph value, so they enter as extern choices that
tune their own launch configuration (``docs/kernels.md``).

The FX graph cache key holds no lowering, so the backend adds :class:`LoweringKey` (a post-grad
pass that changes nothing; its ``uuid`` hashes this file) to its config patches: a graph compiled
with these lowerings is never served to a compilation without them, or with another version.
"""
from __future__ import annotations

import contextlib
import hashlib
import threading
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor
from torch._inductor.custom_graph_pass import CustomGraphPass

from slcompile import kernels, ops
from slcompile._compat import default_lowering, extern_kernel_choice, selected_node

__all__ = ["EXTERN_CHOICES", "GRAD_WEIGHT_CHOICES", "LOWERED", "MATERIALIZE", "SL_LINEAR", "SL_LINEAR_BACKWARD",
           "TUNED_DEVICES", "LoweringKey", "grad_weight_aten", "grad_weight_choices", "grad_weight_kernel",
           "installed", "lower_materialize", "lower_sl_linear", "lower_sl_linear_backward", "materialize_aten",
           "materialize_choices", "packed_offset", "support_generator"]

aten = torch.ops.aten
MATERIALIZE = torch.ops.slcompile.materialize.default
SL_LINEAR = torch.ops.slcompile.sl_linear.default
SL_LINEAR_BACKWARD = torch.ops.slcompile.sl_linear_backward.default
TUNED_DEVICES = ("cuda",)  # where the autotuner chooses; tests add "cpu" to run the choices without a GPU


def materialize_aten(A: Tensor, B: Tensor, values: Tensor, support: Tensor, *, scale: float, out: Tensor) -> Tensor:
    """The ATen choice: ``out (out, in)`` (contiguous, the operands' dtype) ``= scale * B @ A + S``,
    the values scattered into zeros and the GEMM accumulated onto them (``beta=1``). Autocast off:
    the op's dtype is its operands'."""
    with ops.autocast_disabled(out.device.type):
        out.zero_().view(-1).index_add_(0, support, values)
        return out.addmm_(B, A, alpha=scale)


def packed_offset(out_features: int, in_features: int) -> int:
    """Where ``dvalues`` starts in the packed ``dW`` + ``dvalues`` buffer: after ``dW``, rounded up
    to 16 elements so that it starts 16-byte aligned as ``dW`` does."""
    return -(-out_features * in_features // 16) * 16


def _unpack(grad_y2d: Tensor, x2d: Tensor, support: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    """``(dW (out, in), dvalues (nnz,))``: the views of the packed buffer ``out``."""
    out_features, in_features = grad_y2d.shape[1], x2d.shape[1]
    start = packed_offset(out_features, in_features)
    return (out[:out_features * in_features].view(out_features, in_features),
            out[start:start + support.numel()])


def grad_weight_kernel(grad_y2d: Tensor, x2d: Tensor, support: Tensor, *, out: Tensor) -> Tensor:
    """Our choice for the ``dW`` + ``dvalues`` step into the packed buffer ``out``: on CUDA with
    the kernels registered and their dtypes, the tuned Triton kernel
    (:func:`slcompile.kernels.triton_grad_weight`), else the torch reference."""
    views = _unpack(grad_y2d, x2d, support, out)
    with ops.autocast_disabled(out.device.type):
        if out.is_cuda and kernels.cuda_kernels_registered() and kernels.kernel_dtypes(grad_y2d, x2d):
            kernels.triton_grad_weight(grad_y2d, x2d, support, out=views)
        else:
            ops.grad_weight_and_values(grad_y2d, x2d, support, out=views)
    return out


def grad_weight_aten(grad_y2d: Tensor, x2d: Tensor, support: Tensor, *, out: Tensor) -> Tensor:
    """The ATen choice for the ``dW`` + ``dvalues`` step: cuBLAS ``mm`` into ``dW``, then
    ``index_select`` into ``dvalues`` (views of the packed buffer ``out``)."""
    with ops.autocast_disabled(out.device.type):
        ops.grad_weight_and_values(grad_y2d, x2d, support, out=_unpack(grad_y2d, x2d, support, out))
    return out


def support_generator(numel: int, nnz: int) -> Callable[[object], Tensor]:
    """``input_gen_fns`` entry for ``support``: ``nnz`` distinct sorted int32 indices in
    ``[0, numel)`` on the node's device, as real supports are (``slcompile.support``)."""
    def generate(node) -> Tensor:
        device = node.get_device()
        return torch.randperm(numel, device=device)[:nnz].sort().values.to(torch.int32)
    return generate


def _extern_choices():
    """The ``ExternKernelChoice`` singletons, registered on Inductor's ``extern_kernels`` by name
    when this module is imported: code the FX graph cache serves calls them by that name without
    running the lowering. ``(materialize choices, dW + dvalues choices)``."""
    choice = extern_kernel_choice
    return ((choice(MATERIALIZE, "slcompile_materialize", has_out_variant=False, op_overload=MATERIALIZE,
                    use_fallback_kernel=True),
             choice(materialize_aten, "slcompile_materialize_aten")),
            (choice(grad_weight_kernel, "slcompile_grad_weight"),
             choice(grad_weight_aten, "slcompile_grad_weight_aten")))


EXTERN_CHOICES, GRAD_WEIGHT_CHOICES = _extern_choices()


def materialize_choices(A, B, values, support, scale: float, sizes: tuple[int, int, int]):
    """``(choices, layout, input_gen_fns)`` for ``autotune_select_algorithm`` from realized IR
    buffers ``A (r, in)``, ``B (out, r)``, ``values (nnz,)``, ``support (nnz,)`` int32 and the
    static ``sizes = (out, in, nnz)``. ``layout``: ``W (out, in)`` contiguous in ``A``'s dtype."""
    from torch._inductor.ir import FixedLayout

    out_features, in_features, nnz = sizes
    layout = FixedLayout(A.get_device(), A.get_dtype(), [out_features, in_features])
    inputs = [A, B, values, support]
    choices = [choice.bind(inputs, layout, scale=scale) for choice in EXTERN_CHOICES]
    return choices, layout, {3: support_generator(out_features * in_features, nnz)}


def grad_weight_choices(grad_y2d, x2d, support, sizes: tuple[int, int, int]):
    """``(choices, layout, input_gen_fns)`` of the ``dW`` + ``dvalues`` step from realized IR
    buffers ``grad_y2d (N, out)``, ``x2d (N, in)``, ``support (nnz,)`` and the static
    ``sizes = (out, in, nnz)``. ``layout``: the packed ``(packed_offset(out, in) + nnz,)`` buffer."""
    from torch._inductor.ir import FixedLayout

    out_features, in_features, nnz = sizes
    layout = FixedLayout(x2d.get_device(), x2d.get_dtype(), [packed_offset(out_features, in_features) + nnz])
    choices = [choice.bind([grad_y2d, x2d, support], layout) for choice in GRAD_WEIGHT_CHOICES]
    return choices, layout, {2: support_generator(out_features * in_features, nnz)}


def _static_sizes(A, B, values) -> tuple[int, int, int] | None:
    """``(out, in, nnz)`` as ints, or None when one is symbolic."""
    sizes = (B.get_size()[0], A.get_size()[1], values.get_size()[0])
    try:
        return tuple(int(s) for s in sizes)
    except TypeError:
        return None


def _tuned_sizes(A, B, values, *others) -> tuple[int, int, int] | None:
    """``(out, in, nnz)`` when these IR operands get autotuned choices (module doc), else None."""
    from torch._inductor import config

    tune = (config.max_autotune or config.max_autotune_gemm) and A.get_device().type in TUNED_DEVICES
    operands = (A, B, values, *others)
    if not tune or len({t.get_dtype() for t in operands}) != 1:
        return None
    if not all(isinstance(s, int) or getattr(s, "is_number", False) for t in others for s in t.get_size()):
        return None
    return _static_sizes(A, B, values)


def _select(name: str, choices_for: Callable, operands: list, *args):
    """The autotuned node of ``choices_for(*realized operands, *args)``."""
    from torch._inductor.ir import ExternKernel
    from torch._inductor.select_algorithm import autotune_select_algorithm

    realized = [ExternKernel.require_contiguous(t) for t in operands]
    choices, layout, gen = choices_for(*realized, *args)
    return selected_node(autotune_select_algorithm(name, choices, realized, layout, input_gen_fns=gen))


def lower_materialize(default: Callable, A, B, values, support, scale: float):
    """``slcompile::materialize``: autotuned choices on CUDA under max-autotune, else ``default``."""
    sizes = _tuned_sizes(A, B, values)
    if sizes is None:
        return default(A, B, values, support, scale)
    return _select("slcompile_materialize", materialize_choices, [A, B, values, support], scale, sizes)


def _lowered(op):
    """The lowering of ``op`` in Inductor's table now (ours while :func:`installed`)."""
    from torch._inductor.lowering import lowerings

    return lowerings[op]


def _rows(t, features: int):
    """``t (..., features)`` as ``(N, features)``."""
    return _lowered(aten.reshape)(t, [-1, features])


def _transposed(t):
    return _lowered(aten.permute)(t, [1, 0])


def lower_sl_linear(default: Callable, x, A, B, values, support, scale: float, bias=None):
    """``slcompile::sl_linear``: ``W`` by the lowering of ``materialize``, ``x @ W^T (+ bias)`` by
    Inductor's ``mm``/``addmm`` (autotuned), on CUDA under max-autotune; else ``default``."""
    sizes = _tuned_sizes(A, B, values, x, *(() if bias is None else (bias,)))
    if sizes is None:
        return default(x, A, B, values, support, scale, bias)
    out_features, in_features, _ = sizes
    weight_t = _transposed(_lowered(MATERIALIZE)(A, B, values, support, scale))
    x2d = _rows(x, in_features)
    y2d = _lowered(aten.mm)(x2d, weight_t) if bias is None else _lowered(aten.addmm)(bias, x2d, weight_t)
    return _lowered(aten.reshape)(y2d, [*x.get_size()[:-1], out_features])


def lower_sl_linear_backward(default: Callable, grad_y, x, A, B, values, support, scale: float, need_dx: bool):
    """``slcompile::sl_linear_backward``: ``(dx, dA, dB, dvalues)`` from autotuned nodes (module
    doc) on CUDA under max-autotune; else ``default``."""
    sizes = _tuned_sizes(A, B, values, grad_y, x)
    if sizes is None:
        return default(grad_y, x, A, B, values, support, scale, need_dx)
    out_features, in_features, nnz = sizes
    mm, mul = _lowered(aten.mm), _lowered(aten.mul)
    grad_y2d, x2d = _rows(grad_y, out_features), _rows(x, in_features)
    if need_dx:
        weight = _lowered(MATERIALIZE)(A, B, values, support, scale)
        grad_x = _lowered(aten.reshape)(mm(grad_y2d, weight), list(x.get_size()))
    else:
        grad_x = _lowered(aten.empty)([0], dtype=x.get_dtype(), device=x.get_device())
    packed = _select("slcompile_grad_weight", grad_weight_choices, [grad_y2d, x2d, support], sizes)
    start = packed_offset(out_features, in_features)
    slice_ = _lowered(aten.slice)
    grad_w = _lowered(aten.reshape)(slice_(packed, 0, 0, out_features * in_features), [out_features, in_features])
    # A copy: a view would keep the whole packed buffer (the dense dW) alive as values.grad.
    grad_values = _lowered(aten.clone)(slice_(packed, 0, start, start + nnz))
    grad_a = mul(mm(_transposed(B), grad_w), scale)
    grad_b = mul(mm(grad_w, _transposed(A)), scale)
    return grad_x, grad_a, grad_b, grad_values


# op -> the name of its lowering in this module (looked up when installed, so tests can wrap it)
LOWERED = {MATERIALIZE: "lower_materialize", SL_LINEAR: "lower_sl_linear",
           SL_LINEAR_BACKWARD: "lower_sl_linear_backward"}

_install_lock = threading.Lock()
_install_depth = 0  # compilations inside installed() now; the entries are swapped by the first, restored by the last
_previous: dict = {}


def _entry(op, previous: Callable | None) -> Callable:
    default = previous or default_lowering(op)
    lower = globals()[LOWERED[op]]
    return lambda *args, **kwargs: lower(default, *args, **kwargs)


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """Inductor's lowering table holds our lowerings (:data:`LOWERED`) while any backend
    compilation runs (nested or in other threads: counted under a lock) and exactly its previous
    entries (or none) once the last one ends."""
    from torch._inductor.lowering import lowerings

    global _install_depth
    with _install_lock:
        if _install_depth == 0:
            for op in LOWERED:
                _previous[op] = lowerings.get(op)
                lowerings[op] = _entry(op, _previous[op])
        _install_depth += 1
    try:
        yield
    finally:
        with _install_lock:
            _install_depth -= 1
            if _install_depth == 0:
                for op in LOWERED:
                    previous = _previous.pop(op)
                    if previous is None:
                        lowerings.pop(op, None)
                    else:
                        lowerings[op] = previous


_SOURCE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


class LoweringKey(CustomGraphPass):
    """A post-grad pass that changes nothing; its ``uuid`` (a hash of this file) puts the lowerings
    into Inductor's FX graph cache key (module doc)."""

    def __call__(self, graph) -> None:
        return None

    def uuid(self) -> str:
        return _SOURCE_HASH

"""An Inductor lowering of ``slcompile::materialize`` that lets ``max-autotune`` choose its implementation.

Installed only while the ``slcompile`` backend compiles (:func:`installed`, used by
:mod:`slcompile.backend`); plain ``torch.compile`` keeps Inductor's default for the op, an
extern call (``FallbackKernel``) of its registered implementation.

On CUDA under ``max_autotune`` / ``max_autotune_gemm``, for operands of one dtype and static
shapes, the node goes through ``autotune_select_algorithm`` with two extern choices
(:func:`materialize_choices`):

- ``slcompile_materialize``: the op itself as a ``FallbackKernel`` (the code the default emits),
  i.e. the Triton kernel with its own per-shape tuned configuration (:mod:`slcompile.kernels.autotune`);
- ``slcompile_materialize_aten``: :func:`materialize_aten`, ``index_add`` of the values into the
  zeroed output, then cuBLAS ``addmm_`` accumulating ``scale * B @ A`` onto it.

Inductor times the choices on synthetic inputs: random integers as ``support`` would write out of
range, so :func:`support_generator` draws a valid one (distinct, sorted, in ``[0, out * in)``).
Anything else (CPU, no max-autotune, mixed dtypes, symbolic shapes) lowers as the default does.

No ``TritonTemplate`` choice: the Triton kernel reads a tile index the host builds once per
support tensor (``kernels/tile_index.py``), which is no graph value; a template of the dense
``scale * B @ A`` followed by a scatter would be two nodes, not one choice to compare against
these (``docs/kernels.md``).

The FX graph cache key holds no lowering, so the backend adds :class:`LoweringKey` (a post-grad
pass that changes nothing; its ``uuid`` hashes this file) to its config patches: a graph compiled
with this lowering is never served to a compilation without it, or with another version of it.
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

from slcompile import ops
from slcompile._compat import default_lowering, selected_node

__all__ = ["EXTERN_CHOICES", "MATERIALIZE", "TUNED_DEVICES", "LoweringKey", "installed", "lower_materialize",
           "materialize_aten", "materialize_choices", "support_generator"]

MATERIALIZE = torch.ops.slcompile.materialize.default
TUNED_DEVICES = ("cuda",)  # where the autotuner chooses; tests add "cpu" to run the choices without a GPU


def materialize_aten(A: Tensor, B: Tensor, values: Tensor, support: Tensor, *, scale: float, out: Tensor) -> Tensor:
    """The ATen choice: ``out (out, in)`` (contiguous, the operands' dtype) ``= scale * B @ A + S``,
    the values scattered into zeros and the GEMM accumulated onto them (``beta=1``). Autocast off:
    the op's dtype is its operands'."""
    with ops.autocast_disabled(out.device.type):
        out.zero_().view(-1).index_add_(0, support, values)
        return out.addmm_(B, A, alpha=scale)


def support_generator(numel: int, nnz: int) -> Callable[[object], Tensor]:
    """``input_gen_fns`` entry for ``support``: ``nnz`` distinct sorted int32 indices in
    ``[0, numel)`` on the node's device, as real supports are (``slcompile.support``)."""
    def generate(node) -> Tensor:
        device = node.get_device()
        return torch.randperm(numel, device=device)[:nnz].sort().values.to(torch.int32)
    return generate


def _extern_choices():
    """The two ``ExternKernelChoice`` singletons, registered on Inductor's ``extern_kernels`` by
    name when this module is imported: code the FX graph cache serves calls them by that name
    without running the lowering."""
    from torch._inductor.select_algorithm import ExternKernelChoice

    op = (ExternKernelChoice.lookup("slcompile_materialize")
          or ExternKernelChoice(MATERIALIZE, name="slcompile_materialize", has_out_variant=False,
                                op_overload=MATERIALIZE, use_fallback_kernel=True))
    aten = (ExternKernelChoice.lookup("slcompile_materialize_aten")
            or ExternKernelChoice(materialize_aten, name="slcompile_materialize_aten"))
    return op, aten


EXTERN_CHOICES = _extern_choices()


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


def _static_sizes(A, B, values) -> tuple[int, int, int] | None:
    """``(out, in, nnz)`` as ints, or None when one is symbolic."""
    sizes = (B.get_size()[0], A.get_size()[1], values.get_size()[0])
    try:
        return tuple(int(s) for s in sizes)
    except TypeError:
        return None


def lower_materialize(default: Callable, A, B, values, support, scale: float):
    """The lowering (module doc): autotuned choices on CUDA under max-autotune, else ``default``."""
    from torch._inductor import config
    from torch._inductor.ir import ExternKernel
    from torch._inductor.select_algorithm import autotune_select_algorithm

    sizes = _static_sizes(A, B, values)
    tune = (config.max_autotune or config.max_autotune_gemm) and A.get_device().type in TUNED_DEVICES
    if not tune or sizes is None or len({t.get_dtype() for t in (A, B, values)}) != 1:
        return default(A, B, values, support, scale)
    realized = [ExternKernel.require_contiguous(t) for t in (A, B, values, support)]
    choices, layout, gen = materialize_choices(*realized, scale, sizes)
    return selected_node(autotune_select_algorithm("slcompile_materialize", choices, realized, layout,
                                                   input_gen_fns=gen))


_install_lock = threading.Lock()
_install_depth = 0  # compilations inside installed() now; the entry is swapped by the first, restored by the last
_previous: dict = {}


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """Inductor's lowering table holds :func:`lower_materialize` for ``slcompile::materialize``
    while any backend compilation runs (nested or in other threads: counted under a lock) and
    exactly its previous entry (or none) once the last one ends."""
    from torch._inductor.lowering import lowerings

    global _install_depth
    with _install_lock:
        if _install_depth == 0:
            previous = lowerings.get(MATERIALIZE)
            _previous["entry"] = previous
            default = previous or default_lowering(MATERIALIZE)
            lowerings[MATERIALIZE] = lambda *args, **kwargs: lower_materialize(default, *args, **kwargs)
        _install_depth += 1
    try:
        yield
    finally:
        with _install_lock:
            _install_depth -= 1
            if _install_depth == 0:
                previous = _previous.pop("entry")
                if previous is None:
                    lowerings.pop(MATERIALIZE, None)
                else:
                    lowerings[MATERIALIZE] = previous


_SOURCE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


class LoweringKey(CustomGraphPass):
    """A post-grad pass that changes nothing; its ``uuid`` (a hash of this file) puts the lowering
    into Inductor's FX graph cache key (module doc)."""

    def __call__(self, graph) -> None:
        return None

    def uuid(self) -> str:
        return _SOURCE_HASH

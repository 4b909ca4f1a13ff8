"""Every torch API slcompile uses that differs between torch 2.11 and the newest release.

The supported range is ``torch>=2.11``; ``docs/compat.md`` lists each private torch name the
library touches and the releases it was checked against. Three things differ (and a fourth,
below, for the Inductor lowering):

- Inductor's ``post_grad_custom_post_pass`` takes a list of passes in the releases that have
  ``torch._inductor.custom_graph_pass.get_custom_graph_passes`` (2.13 and 2.14 do); 2.11 takes
  one pass. :func:`chain_post_grad_passes` builds the value for either.
- ``torch.amp.is_autocast_available`` cannot be traced by 2.11's Dynamo (a graph break in every
  ``SLLinear``; an error under ``fullgraph=True``); newer releases fold it to a constant.
  :func:`autocast_available` answers it from the device types autocast has while compiling.
- Registering a ``torch.compile`` backend by name from a source tree with no package entry point
  (:func:`register_dynamo_backend`): the public ``register_backend`` asserts on a duplicate name,
  which the entry point would hit when it imports this package, so the registration steps aside
  once the entry point is known.

:func:`extern_kernel_choice` returns the ``ExternKernelChoice`` registered under a name, making it
once: ``ExternKernelChoice.lookup`` (2.13 on) finds it; 2.11 has no ``lookup`` and asserts on a
second registration of a name, so there the choices made are kept here.

:func:`default_lowering` builds, through private Inductor names (``make_fallback``,
``tag_to_layout_constraint``, ``torch._library.utils.get_layout_constraint_tag``; see
``docs/compat.md`` for the releases they were read in), the lowering Inductor would create implicitly for a custom op; :func:`selected_node`
reads ``autotune_select_algorithm``'s result, ``(node, choice)`` in 2.13, the node in releases
before that change.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch._inductor import custom_graph_pass as _cgp

__all__ = ["PASS_LISTS", "PassChain", "autocast_available", "chain_post_grad_passes", "custom_graph_passes",
           "default_lowering", "extern_kernel_choice", "register_dynamo_backend", "selected_node"]

# post_grad_custom_post_pass may be a list or tuple of passes (not in torch 2.11).
PASS_LISTS = hasattr(_cgp, "get_custom_graph_passes")


def custom_graph_passes(value: Any) -> tuple:
    """The passes an Inductor custom-pass config value holds: ``None`` -> ``()``, one pass ->
    ``(pass,)``, a list/tuple (or a :class:`PassChain`) -> its passes, in order."""
    if value is None:
        return ()
    if isinstance(value, PassChain):
        return value.passes
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value,)


class PassChain(_cgp.CustomGraphPass):
    """Several post-grad passes as the one ``CustomGraphPass`` torch 2.11 accepts: runs them in
    order on the ``fx.Graph``. ``uuid()`` combines theirs, or is ``None`` (no FX graph caching,
    as Inductor does for any uncacheable pass) when one is a plain callable or has none."""

    def __init__(self, passes: Sequence[Callable]):
        self.passes = tuple(passes)

    def __call__(self, graph) -> None:
        for graph_pass in self.passes:
            graph_pass(graph)

    def uuid(self) -> Any:
        ids = [p.uuid() if isinstance(p, _cgp.CustomGraphPass) else None for p in self.passes]
        return None if any(i is None for i in ids) else ("PassChain", *ids)


def chain_post_grad_passes(existing: Any, extra: Sequence[Callable], *, lists: bool | None = None) -> Any:
    """The ``post_grad_custom_post_pass`` value that runs ``existing`` (a value already configured:
    ``None``, one pass or a list) and then ``extra``. A list where torch takes one (``lists``,
    default :data:`PASS_LISTS`), else one pass (a :class:`PassChain` when there are several)."""
    passes = (*custom_graph_passes(existing), *extra)
    if PASS_LISTS if lists is None else lists:
        return list(passes)
    if len(passes) <= 1:
        return passes[0] if passes else None
    return PassChain(passes)


def register_dynamo_backend(name: str, load: Callable[[], Callable]) -> bool:
    """Make ``torch.compile(backend=name)`` work without a package entry point; True if registered.

    ``load()`` returns the backend; it runs at the first lookup, so registering imports neither
    the backend nor Inductor. Idempotent. Nothing is registered when the name is already known
    to Dynamo's registry, e.g. as an installed entry point being loaded right now: its import of
    this package must not register the name first, or ``lookup_backend`` would register it twice
    (an ``AssertionError`` in 2.11-2.15). The lookup then takes the entry point as usual.
    """
    from torch._dynamo.backends import registry

    if name in registry._BACKENDS:
        return False

    def backend(gm, example_inputs, **kwargs):
        return load()(gm, example_inputs, **kwargs)

    backend.__name__ = backend.__qualname__ = name
    registry.register_backend(backend, name=name)
    return True


def default_lowering(op) -> Callable:
    """The lowering Inductor creates for custom op ``op`` the first time a graph holds it
    (``GraphLowering.call_function`` with ``implicit_fallbacks``): a ``FallbackKernel`` call, with
    the layout constraint of the op's tag (default: ``config.custom_op_default_layout_constraint``).
    Registers it in Inductor's lowering table, as that first time would, and returns it."""
    from torch._inductor import lowering
    from torch._library.utils import get_layout_constraint_tag

    constraint = lowering.tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
    lowering.make_fallback(op, layout_constraint=constraint, warn=False)
    return lowering.lowerings[op]


# Device types torch's autocast supports (torch.amp.is_autocast_available's list in 2.11 to 2.15).
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "maia", "ipu", "privateuseone")


def autocast_available(device_type: str) -> bool:
    """``torch.amp.is_autocast_available(device_type)``, traceable by Dynamo on every release."""
    if torch.compiler.is_compiling():
        return device_type in AUTOCAST_DEVICE_TYPES
    return torch.amp.is_autocast_available(device_type)


_extern_choices: dict[str, Any] = {}  # name -> ExternKernelChoice, where torch has no lookup (2.11)


def extern_kernel_choice(kernel: Callable, name: str, **kwargs: Any) -> Any:
    """The ``ExternKernelChoice`` of ``kernel`` registered on Inductor's ``extern_kernels`` as
    ``name`` (``kwargs``: its other constructor arguments), created on the first call only."""
    from torch._inductor import select_algorithm

    choice_cls = select_algorithm.ExternKernelChoice
    lookup = getattr(choice_cls, "lookup", None)
    found = lookup(name) if lookup is not None else _extern_choices.get(name)
    if found is None:
        if lookup is None and hasattr(select_algorithm.extern_kernels, name):
            delattr(select_algorithm.extern_kernels, name)  # left by an earlier import of ours (a reload)
        found = _extern_choices[name] = choice_cls(kernel, name=name, **kwargs)
    return found


def selected_node(result: Any) -> Any:
    """The IR node (a ``TensorBox``) of an ``autotune_select_algorithm`` result (module doc)."""
    return result[0] if isinstance(result, tuple) else result

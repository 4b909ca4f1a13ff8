"""The ``slcompile`` ``torch.compile`` backend: Inductor (``compile_fx``) plus our passes.

    model = torch.compile(model, backend="slcompile")   # registered by `import slcompile` and the entry point
    model = torch.compile(model, backend="slcompile", options={"fuse_shared_input": False})
    model = torch.compile(model, backend=slcompile.backend.make_backend(fuse_shared_input=False))

``torch.compile`` hands a custom backend its ``options`` dict (and ``mode``) as keyword
arguments. Our options (:data:`DEFAULT_OPTIONS`):

- ``pattern_sltrain`` (bool, default True): :class:`~slcompile.passes.pattern_sltrain.SLTrainPatternPass`
  on the Dynamo graph, before AOTAutograd: SLTrain products written with plain torch ops become
  ``slcompile::sl_linear`` (whose autograd saves only ``x``).
- ``fuse_shared_input`` (bool, default False): :class:`~slcompile.passes.fuse_shared_input.FuseSharedInputPass`
  as Inductor's ``post_grad_custom_post_pass``: ``sl_linear`` calls reading the same input
  (q/k/v, gate/up) share one GEMM in the forward graph. Off by default: on CPU it saved no time
  while the concatenated ``W`` raised the fwd+bwd peak (``benchmarks/README.md``, ``layer_bench.py``);
  on a GPU it saves kernel launches at small token counts.
- ``fuse_min_group`` (int >= 2, default 2): smallest group the fusion pass fuses.
- ``choose_path`` (bool, default True): :class:`~slcompile.passes.choose_path.ChoosePathPass`
  on the Dynamo graph, after the pattern pass: each ``sl_linear`` with static shapes becomes
  ``slcompile::sl_linear_factored`` (never forms ``W``) where :mod:`slcompile.cost_model`
  estimates it faster, with the spec eager ``SLLinear(path="auto")`` uses (on CPU rates
  measured on the machine, :mod:`slcompile.calibration`; on CUDA the ``h200-triton`` preset,
  whose margin 0.8 leaves factored to very few tokens, e.g. decoding); measured in
  ``benchmarks/README.md`` (``layer_bench.py``). Off: every ``sl_linear`` stays materialized (what
  ``fuse_shared_input`` needs to find groups).

Every other key is an Inductor config option (``torch._inductor.list_options()``), applied with
``compile_fx(config_patches=...)`` for this compilation only (also for the backward graph,
compiled later); ``mode`` adds ``torch._inductor.list_mode_options(mode)``. The global Inductor
config is never modified; a ``post_grad_custom_post_pass`` already configured runs before ours
(:func:`slcompile._compat.chain_post_grad_passes`: a list where torch takes one, a chained pass on 2.11).

Report: :func:`last_report` returns what the passes did in the latest compilation (counts per
pass, notes on near-misses), updated when the backward graph is compiled; each report is also
logged on the ``slcompile.backend`` logger (INFO). With Inductor's FX graph cache a cache hit
skips the post-grad passes (their counts stay 0): pass ``{"fx_graph_cache": False}`` to see them.
The post-grad pass has ``uuid()`` = hash of its source and options, so cache entries never mix
options.

Lowering: every graph of a backend compilation (forward, inference, and the backward compiled
later) is lowered with :mod:`slcompile.lowering` installed: under ``mode="max-autotune"`` on
CUDA, ``sl_linear`` and its backward become ``materialize``, the ``dW`` + ``dvalues`` step and
plain GEMMs, and Inductor's autotuner picks the implementation of each (our tuned Triton
kernels or their ATen routes; Inductor's GEMM templates or cuBLAS); elsewhere our ops lower as
under plain ``torch.compile``, which never sees the lowering. Its
:class:`~slcompile.lowering.LoweringKey` goes into ``post_grad_custom_pre_pass`` so the FX graph
cache keeps these graphs apart.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import fx

import slcompile.kernels  # noqa: F401  (registers the CUDA Triton kernels of the custom ops)
from slcompile import lowering, ops  # noqa: F401  (ops: registers the slcompile:: custom ops)
from slcompile._compat import chain_post_grad_passes
from slcompile.passes.choose_path import ChoosePathPass
from slcompile.passes.fuse_shared_input import FuseSharedInputPass
from slcompile.passes.pattern_sltrain import SLTrainPatternPass

__all__ = ["DEFAULT_OPTIONS", "BackendReport", "last_report", "make_backend", "post_grad_passes", "slcompile_backend"]

log = logging.getLogger(__name__)

DEFAULT_OPTIONS: dict[str, Any] = {"pattern_sltrain": True, "fuse_shared_input": False, "fuse_min_group": 2,
                                   "choose_path": True}


@dataclass
class BackendReport:
    """What one ``slcompile`` compilation did. ``passes`` maps a pass name to its object, whose
    ``counts`` (rewrites, graphs seen) and ``notes`` (near-misses and why) fill in as the
    forward, and later the backward, graph go through it."""

    options: dict[str, Any]
    inductor_options: dict[str, Any]
    passes: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        return {name: dict(p.counts) for name, p in self.passes.items()}

    def notes(self) -> dict[str, list[str]]:
        return {name: list(p.notes) for name, p in self.passes.items()}

    def __str__(self) -> str:
        lines = [f"slcompile backend: options {self.options}"]
        for name, p in self.passes.items():
            lines.append(f"  {name}: {dict(p.counts) or 'did not run (cache hit?)'}")
            lines += [f"    - {note}" for note in p.notes]
        return "\n".join(lines)


_last: BackendReport | None = None


def last_report() -> BackendReport | None:
    """The report of the latest ``slcompile`` compilation in this process (None before any)."""
    return _last


def _split_options(options: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    ours, inductor = dict(DEFAULT_OPTIONS), {}
    for key, value in (options or {}).items():
        (ours if key in DEFAULT_OPTIONS else inductor)[key] = value
    for key in ("pattern_sltrain", "fuse_shared_input", "choose_path"):
        if not isinstance(ours[key], bool):
            raise ValueError(f"slcompile option {key!r} must be a bool, got {ours[key]!r}")
    return ours, inductor


def post_grad_passes(options: dict[str, Any] | None = None) -> list:
    """The Inductor post-grad ``CustomGraphPass`` objects that ``options`` turn on."""
    ours, _ = _split_options(options)
    return [FuseSharedInputPass(ours["fuse_min_group"])] if ours["fuse_shared_input"] else []


def slcompile_backend(gm: fx.GraphModule, example_inputs: list, *, options: dict[str, Any] | None = None,
                      mode: str | None = None) -> Callable:
    """``torch.compile`` backend: our pre-AOTAutograd passes, then ``compile_fx`` with our post-grad pass."""
    global _last
    from torch._inductor import config as inductor_config, list_mode_options
    from torch._inductor.compile_fx import compile_fx

    ours, inductor = _split_options(options)
    patches = {**(list_mode_options(mode) if mode else {}), **inductor}
    report = BackendReport(ours, dict(inductor))
    if ours["pattern_sltrain"]:
        pattern = report.passes["pattern_sltrain"] = SLTrainPatternPass()
        pattern(gm.graph)
        if pattern.counts["sl_linear"]:
            gm.graph.lint()
            gm.recompile()
    if ours["choose_path"]:
        chooser = report.passes["choose_path"] = ChoosePathPass()
        chooser(gm.graph)
        if chooser.counts["factored"]:
            gm.recompile()
    post = post_grad_passes(ours)
    if post:
        report.passes["fuse_shared_input"] = post[0]
        existing = patches.get("post_grad_custom_post_pass", inductor_config.post_grad_custom_post_pass)
        patches["post_grad_custom_post_pass"] = chain_post_grad_passes(existing, post)
    existing = patches.get("post_grad_custom_pre_pass", inductor_config.post_grad_custom_pre_pass)
    patches["post_grad_custom_pre_pass"] = chain_post_grad_passes(existing, [lowering.LoweringKey()])
    _last = report
    compiled = compile_fx(gm, example_inputs, inner_compile=_inner_compile, config_patches=patches)
    log.info("%s", report)
    return compiled


def _inner_compile(*args: Any, **kwargs: Any):
    """Inductor's ``compile_fx_inner`` (one graph: forward, inference or backward) with the
    lowerings of :mod:`slcompile.lowering` installed."""
    from torch._inductor.compile_fx import compile_fx_inner

    with lowering.installed():
        return compile_fx_inner(*args, **kwargs)


def make_backend(**options: Any) -> Callable:
    """A backend callable with ``options`` bound: ``torch.compile(model, backend=make_backend(...))``."""
    _split_options(options)  # validate now, not at the first call

    def backend(gm: fx.GraphModule, example_inputs: list, **kwargs: Any) -> Callable:
        merged = {**options, **(kwargs.pop("options", None) or {})}
        return slcompile_backend(gm, example_inputs, options=merged, **kwargs)

    backend.__name__ = "slcompile"
    return backend

"""Peak memory of one training step, measured, next to the sympy model (``slcompile.memory``).

For each model config and each method below it trains a few steps (default 3) of the project's
LLaMA (:class:`slcompile.recipes.models.llama.Llama`, loss computed in the model) on random tokens and
measures the last step (``forward``, ``backward``, ``optimizer.step()``, ``zero_grad``), where
every optimizer state already exists. Methods (the paper's memory figure, plus reference points):

| key | model | optimizer |
|---|---|---|
| ``adamw`` | full rank | ``torch.optim.AdamW(foreach=True)``: torch's default on CUDA, states in the weights' dtype |
| ``adamw8-pl`` | full rank | ``slcompile.optim.build(per_layer=True, state_bits=8)`` (torchao ``AdamW8bit``) |
| ``sltrain-adamw`` | SLTrain | ``torch.optim.AdamW(foreach=True)`` (reference point) |
| ``sltrain-adamw-loop`` | SLTrain | ``slcompile.optim.build(per_layer=False, state_bits=32)``: one single-tensor AdamW per parameter, stepped after backward |
| ``sltrain-adamw-pl`` | SLTrain | ``build(per_layer=True, state_bits=32)``: torch's single-tensor AdamW in the gradient hooks |
| ``sltrain-adamw8-pl`` | SLTrain | ``build(per_layer=True, state_bits=8)`` |
| ``sltrain-adamw8-pl-int8`` | SLTrain | the same with ``int8_weights=True`` (``A``, ``B``, ``values`` stored int8) |
| ``sltrain-adamw4-pl`` | SLTrain | ``build(per_layer=True, state_bits=4)`` (torchao ``AdamW4bit``) |

What is measured:

- **steady state** (from the tensors, after the warm-up steps): unique storages of the
  parameters (an ``Int8Weight`` counts its int8 codes and fp32 scales), the integer buffers (the
  SLTrain supports, int32), the optimizer states (torchao's quantized states count codes, block
  scales and lookup table; the scalar ``step`` counters are listed apart), and what the model does
  not count (RoPE tables, the input batch, step counters).
- **peak**, CPU: ``torch.profiler`` (``profile_memory=True``) records every CPU-allocator
  allocation and free of the measured step; replaying them in time order gives the live bytes at
  every instant relative to the step's start (the helper of ``benchmarks/layer_cpu.py``). The
  peak is the steady state plus the largest replayed value. Each phase (``forward``,
  ``backward``, ``step``) is a ``record_function`` range: the peak within each is reported, and
  the blocks live at the peak are grouped by the autograd node / op that allocated them.
  GPU: ``torch.cuda.max_memory_allocated``, reset at the start of each phase.
- **predicted**: :func:`slcompile.memory.estimate` with the matching options: ``method``,
  ``per_layer``, ``state_bits`` (``torch.optim.AdamW`` keeps states in the weights' dtype, so 32
  on bf16 weights is the model's ``16``), ``weight_dtype`` (``int8`` with int8 weights),
  ``compute_dtype``, ``index_bytes=4`` (our int32 supports), ``foreach`` (``True`` only for
  ``torch.optim.AdamW(foreach=True)``; ``slcompile.optim`` steps one tensor at a time),
  ``device`` (the measuring device: the 8/4-bit step transient is Inductor's CPU kernel's on the
  CPU), ``batch``, ``seq``. The relative error is ``(predicted - measured) / measured``.

Also written: the model's predictions at 350M / 1B / 7B (seq 256, micro-batch 1, bf16) for the
same methods, next to the paper's measured peaks (REFERENCE.md section 4).

World-size axis (``--world-sizes 1,2``, CPU, gloo): each rank of ``--parallel fsdp2`` (the
model wrapped by ``slcompile.recipes.distributed.wrap``) reports the bytes of its parameter shards,
gradient shards (after backward, before the step: ``per_layer=False`` keeps them) and optimizer
states, next to :func:`slcompile.memory.estimate` with ``world_size``; the rank holding the most
is compared. Default methods on this axis: ``sltrain-adamw-loop`` and ``sltrain-adamw8-loop``.

    .venv/bin/python benchmarks/memory_bench.py                # CPU: tiny, mini, 60m; fp32 + bf16
    .venv/bin/python benchmarks/memory_bench.py --configs llama-tiny:1x16 --dtypes fp32 --methods adamw
    python benchmarks/memory_bench.py                          # on a CUDA machine: 350m, 1b, 7b, bf16
    .venv/bin/python benchmarks/memory_bench.py --world-sizes 1,2 --configs llama-mini:2x128 --dtypes fp32
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch._C._profiler import _EventType  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_cpu import allocation_events, machine_info, quiet_stderr  # noqa: E402

import slcompile  # noqa: E402
from slcompile import memory  # noqa: E402
from slcompile.layers import reset_sl_parameters  # noqa: E402
from slcompile.model_configs import get_config  # noqa: E402
from slcompile.recipes.models.llama import Llama  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIB, GB = 2**20, 1e9
PHASES = ("forward", "backward", "step")
_MARK = "memory_bench:"


@dataclass(frozen=True)
class Method:
    label: str
    method: str            # slcompile.memory method: "full" or "sltrain"
    optimizer: str         # "torch-foreach" (torch.optim.AdamW) or "slcompile" (slcompile.optim.build)
    per_layer: bool
    state_bits: int        # 32 (torch AdamW: states in the weights' dtype), 8 or 4 (torchao)
    int8_weights: bool = False


METHODS: dict[str, Method] = {
    "adamw": Method("AdamW", "full", "torch-foreach", False, 32),
    "adamw8-pl": Method("8-bit AdamW per-layer", "full", "slcompile", True, 8),
    "sltrain-adamw": Method("SLTrain + AdamW", "sltrain", "torch-foreach", False, 32),
    "sltrain-adamw-loop": Method("SLTrain + AdamW (slcompile, per_layer=False)", "sltrain", "slcompile", False, 32),
    "sltrain-adamw8-loop": Method("SLTrain + 8-bit AdamW (slcompile, per_layer=False)", "sltrain", "slcompile",
                                  False, 8),
    "sltrain-adamw-pl": Method("SLTrain + AdamW per-layer", "sltrain", "slcompile", True, 32),
    "sltrain-adamw8-pl": Method("SLTrain + 8-bit per-layer", "sltrain", "slcompile", True, 8),
    "sltrain-adamw8-pl-int8": Method("SLTrain + 8-bit per-layer + int8 weights", "sltrain", "slcompile", True, 8, True),
    "sltrain-adamw4-pl": Method("SLTrain + 4-bit per-layer", "sltrain", "slcompile", True, 4),
}
# REFERENCE.md section 4: measured peaks (GB) on one A100-80G, 350M / 1B / 7B; batch and
# checkpointing not stated; the reference's SLTrain stores bf16 weights and an int64 support.
PAPER_GB = {"adamw": (4.5, 16.3, 67.4), "adamw8-pl": (3.5, 11.8, 29.4), "sltrain-adamw8-pl": (2.2, 6.8, 18.3)}
PAPER_CONFIGS = ("llama-350m", "llama-1b", "llama-7b")

CPU_DEFAULT = {"configs": "llama-tiny:1x16,llama-tiny:2x64,llama-mini:2x128,llama-60m:1x64", "dtypes": "fp32,bf16"}
GPU_DEFAULT = {"configs": "llama-350m:1x256,llama-1b:1x256,llama-7b:1x256", "dtypes": "bf16"}
SHARDED_METHODS = ("sltrain-adamw-loop", "sltrain-adamw8-loop")
SHARDED_TERMS = ("parameters", "gradients", "optimizer_states")


# -- the model's prediction ----------------------------------------------------------------------
def model_options(m: Method, dtype: str, device: str = "cuda") -> dict:
    """``slcompile.memory.estimate`` options that describe method ``m`` trained in ``dtype`` on
    ``device`` (``"cpu"`` or ``"cuda"``: whose compiled torchao step the model counts)."""
    state_bits = m.state_bits
    if state_bits == 32 and dtype == "bf16":
        state_bits = 16  # torch.optim.AdamW's states are zeros_like(param): bf16 on bf16 weights
    return dict(per_layer=m.per_layer, state_bits=state_bits, weight_dtype="int8" if m.int8_weights else dtype,
                compute_dtype=dtype, index_bytes=4, foreach=m.optimizer == "torch-foreach", device=device)


def predict(config: str, m: Method, dtype: str, batch: int, seq: int, device: str = "cuda",
            **overrides) -> dict[str, int]:
    return memory.estimate(config, m.method, batch, seq, **{**model_options(m, dtype, device), **overrides})


# -- building the model and optimizer --------------------------------------------------------
def build_model(config: str, m: Method, dtype: str, device: str, seed: int = 0) -> nn.Module:
    """The LLaMA of ``config`` (SLTrain-transformed for ``sltrain``), built on meta, cast, then
    materialized on ``device`` and initialized (no fp32 copy of a bf16 model ever exists)."""
    cfg = get_config(config)
    model = Llama.from_name(config, device="meta")
    if m.method == "sltrain":
        model, _ = slcompile.transform(model, slcompile.SLConfig(rank=cfg.rank, alpha=cfg.alpha, density=cfg.density))
    model = model.to(DTYPES[dtype]).to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    reset_sl_parameters(model)
    return model


def build_optimizer(model: nn.Module, m: Method, *, lr: float = 1e-3, compile_step: bool = True):
    if m.optimizer == "torch-foreach":
        return torch.optim.AdamW(model.parameters(), lr=lr, foreach=True)
    return slcompile.optim.build(model, "adamw", lr=lr, per_layer=m.per_layer, state_bits=m.state_bits,
                                 int8_weights=m.int8_weights, compile_step=compile_step)


# -- bytes of tensors ------------------------------------------------------------------------
def _leaves(t: Tensor) -> list[Tensor]:
    """The plain tensors holding ``t``'s data (wrapper subclasses: their inner tensors; a DTensor: its shard)."""
    if isinstance(t, DTensor):
        return _leaves(t.to_local())
    if type(t) not in (Tensor, nn.Parameter, nn.Buffer) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [leaf for name in names for leaf in _leaves(getattr(t, name))]
    return [t]


def storage_bytes(tensors, device: torch.device | None = None) -> int:
    """Bytes of the distinct storages behind ``tensors`` (optionally only those on ``device``)."""
    seen: dict[int, int] = {}
    for t in tensors:
        for leaf in _leaves(t.data if isinstance(t, nn.Parameter) else t):
            if device is not None and leaf.device.type != device.type:
                continue
            storage = leaf.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def steady_state(model: nn.Module, opt: torch.optim.Optimizer, batch: tuple[Tensor, Tensor],
                 device: torch.device) -> dict[str, int]:
    """Bytes that live across steps, by kind, from the tensors themselves."""
    states, counters = [], []
    for state in opt.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                (counters if key == "step" else states).append(value)
    out = {
        "parameters": storage_bytes(model.parameters(), device),
        "support": storage_bytes((b for b in model.buffers() if not b.is_floating_point()), device),
        "optimizer_states": storage_bytes(states, device),
        # Not in the model: RoPE tables, the batch, AdamW step counters, torchao's lr tensors.
        "float_buffers": storage_bytes((b for b in model.buffers() if b.is_floating_point()), device),
        "inputs": storage_bytes(batch, device),
        "step_counters": storage_bytes(counters, device)
        + storage_bytes((g["lr"] for g in _inner_groups(opt) if torch.is_tensor(g["lr"])), device),
    }
    out["modeled"] = out["parameters"] + out["support"] + out["optimizer_states"]
    out["total"] = out["modeled"] + out["float_buffers"] + out["inputs"] + out["step_counters"]
    return out


def _inner_groups(opt):
    slots = getattr(opt, "_slots", None)
    if slots is None:
        return opt.param_groups
    return [g for slot in slots.values() for g in slot.inner.param_groups]


# -- one training step -----------------------------------------------------------------------
def train_step(model: nn.Module, opt, tokens: Tensor, targets: Tensor,
               phase: Callable[[str], contextlib.AbstractContextManager]) -> float:
    with phase("forward"):
        loss = model(tokens, targets)
    with phase("backward"):
        loss.backward()
    with phase("step"):
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.item()


def _cpu_phase(name: str):
    return record_function(_MARK + name)


def _walk(prof):
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        yield event


_GENERIC = ("aten::empty", "aten::new_empty", "aten::resize_", "aten::to", "aten::_to_copy", "aten::copy_")


def _site(event) -> str:
    """Who allocated: the nearest autograd node or phase mark above the op that allocated."""
    op, outer, parent = None, None, event.parent
    while parent is not None:
        name = parent.name
        if op is None and not name.startswith(_GENERIC):
            op = name
        if name.startswith("autograd::engine::evaluate_function: ") and outer is None:
            outer = name.split(": ", 1)[1]
        if name.startswith(_MARK):
            outer = outer or name[len(_MARK):]
            break
        parent = parent.parent
    return f"{outer or '?'} / {op or '?'}"


def replay(prof, top: int = 8) -> dict:
    """Peak, end and per-phase peaks of the live bytes (relative to the profiled call's start),
    live bytes at the end of each phase, and the largest allocation sites live at the peak."""
    ranges = {e.name[len(_MARK):]: (e.start_time_ns, e.end_time_ns) for e in _walk(prof)
              if e.tag == _EventType.TorchOp and e.name.startswith(_MARK)}
    sites = {(e.start_time_ns, e.extra_fields.ptr, e.extra_fields.alloc_size): e for e in _walk(prof)
             if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu"}
    live: dict[int, tuple[int, tuple]] = {}
    current = peak = 0
    at_peak: dict[int, tuple[int, tuple]] = {}
    phase_peak = dict.fromkeys(ranges, 0)
    phase_end = {}
    ends = sorted((end, name) for name, (_, end) in ranges.items())
    for key in allocation_events(prof):
        t, ptr, size = key
        while ends and ends[0][0] < t:
            phase_end[ends.pop(0)[1]] = current
        if size > 0:
            current += size - live.get(ptr, (0,))[0]
            live[ptr] = (size, key)
        elif ptr in live:  # frees of blocks allocated before the call are ignored
            current -= live.pop(ptr)[0]
        for name, (start, end) in ranges.items():
            if start <= t <= end:
                phase_peak[name] = max(phase_peak[name], current)
        if current > peak:
            peak, peak_time, at_peak = current, t, dict(live)
    for _, name in ends:
        phase_end[name] = current
    by_site: dict[str, int] = {}
    for size, key in at_peak.values():
        label = _site(sites[key]) if key in sites else "?"
        by_site[label] = by_site.get(label, 0) + size
    peak_phase = next((n for n, (a, b) in ranges.items() if peak and a <= peak_time <= b), None)
    return {"peak": peak, "end": current, "peak_phase": peak_phase, "phase_peak": phase_peak,
            "phase_end": phase_end,
            "live_at_peak_by_site": dict(sorted(by_site.items(), key=lambda kv: -kv[1])[:top])}


@contextlib.contextmanager
def _cuda_phase(name: str, out: dict):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    try:
        yield
    finally:
        torch.cuda.synchronize()
        out["phase_peak"][name] = torch.cuda.max_memory_allocated()
        out["phase_end"][name] = torch.cuda.memory_allocated()


def measure(config: str, method: str, *, dtype: str = "fp32", batch: int = 1, seq: int = 64, steps: int = 3,
            device: str = "cpu", compile_step: bool = True, seed: int = 0) -> dict:
    """Train ``steps`` steps and measure the last one; returns the measurement and the prediction.

    ``peak_bytes``: steady state (tensors) + the step's peak replayed from the profiler (CPU), or
    ``torch.cuda.max_memory_allocated`` (CUDA). Bytes throughout.
    """
    if steps < 2:
        raise ValueError("steps must be >= 2: optimizer states are created in the first step")
    m = METHODS[method]
    dev = torch.device(device)
    model = build_model(config, m, dtype, device, seed)
    opt = build_optimizer(model, m, compile_step=compile_step)
    gen = torch.Generator().manual_seed(seed)
    vocab = get_config(config).vocab_size
    tokens, targets = (torch.randint(vocab, (batch, seq), generator=gen).to(dev) for _ in range(2))
    started = time.perf_counter()
    for _ in range(steps - 1):
        train_step(model, opt, tokens, targets, lambda name: contextlib.nullcontext())
    warmup_s = time.perf_counter() - started
    steady = steady_state(model, opt, (tokens, targets), dev)
    started = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        start_allocated = torch.cuda.memory_allocated()
        trace = {"phase_peak": {}, "phase_end": {}}
        train_step(model, opt, tokens, targets, lambda name: _cuda_phase(name, trace))
        peak_phase = max(trace["phase_peak"], key=trace["phase_peak"].get)
        peak_bytes = trace["phase_peak"][peak_phase]
        measured = {"peak_bytes": peak_bytes, "start_allocated": start_allocated,
                    "untracked_at_start": start_allocated - steady["total"], "peak_phase": peak_phase,
                    "phase_peak_bytes": trace["phase_peak"], "phase_end_bytes": trace["phase_end"],
                    "max_memory_reserved": torch.cuda.max_memory_reserved()}
    else:
        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            train_step(model, opt, tokens, targets, _cpu_phase)
        trace = replay(prof)
        base = steady["total"]
        measured = {"peak_bytes": base + trace["peak"], "step_peak_delta": trace["peak"],
                    "step_end_delta": trace["end"], "peak_phase": trace["peak_phase"],
                    "phase_peak_bytes": {k: base + v for k, v in trace["phase_peak"].items()},
                    "phase_end_bytes": {k: base + v for k, v in trace["phase_end"].items()},
                    "live_at_peak_by_site": trace["live_at_peak_by_site"]}
    step_s = time.perf_counter() - started
    pred = predict(config, m, dtype, batch, seq, dev.type)
    peak_term = max((k for k in pred if k.startswith("phase_")), key=pred.get)
    return {
        "config": config, "method": method, "label": m.label, "dtype": dtype, "batch": batch, "seq": seq,
        "steps": steps, "device": dev.type, "optimizer": asdict(m), "compile_step": compile_step,
        "model_options": model_options(m, dtype, dev.type), "steady_state_bytes": steady, **measured,
        "predicted": pred, "predicted_peak_phase": peak_term[len("phase_"):],
        "rel_error": (pred["peak"] - measured["peak_bytes"]) / measured["peak_bytes"],
        "steady_rel_error": (pred["parameters"] + pred["support"] + pred["optimizer_states"] - steady["modeled"])
        / steady["modeled"],
        "timing_s": {"warmup_steps": round(warmup_s, 2), "measured_step": round(step_s, 2)},
    }


# -- one rank's share under FSDP2 (the world-size axis) ------------------------------------------
def _sharded_rank(rank: int, world_size: int, init_method: str, config: str, method: str, dtype: str, batch: int,
                  seq: int, steps: int, seed: int, queue) -> None:
    """One rank of :func:`measure_sharded` (a spawned process): bytes of this rank's shards."""
    import torch.distributed as dist
    from slcompile.recipes import distributed
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        m = METHODS[method]
        model = distributed.wrap(build_model(config, m, dtype, "cpu", seed),
                                 distributed.DistContext("fsdp2", rank, world_size))
        opt = build_optimizer(model, m, compile_step=False)
        gen = torch.Generator().manual_seed(seed + rank)
        tokens, targets = (torch.randint(get_config(config).vocab_size, (batch, seq), generator=gen) for _ in range(2))
        for _ in range(steps - 1):
            train_step(model, opt, tokens, targets, lambda name: contextlib.nullcontext())
        model(tokens, targets).backward()
        params = list(model.parameters())
        queue.put((rank, {  # DTensors count their local shard (storage_bytes reads the inner tensor)
            "parameters": storage_bytes(params),
            "gradients": storage_bytes(p.grad for p in params if p.grad is not None),
            "optimizer_states": storage_bytes(v for state in opt.state.values() for k, v in state.items()
                                              if torch.is_tensor(v) and k != "step"),
            "support": storage_bytes(b for b in model.buffers() if not b.is_floating_point()),
        }))
        del model, opt, params
        dist.barrier()  # no rank leaves while another still talks to it
    finally:
        dist.destroy_process_group()
        # FSDP2's device mesh keeps group objects in reference cycles: a gloo group first freed at
        # interpreter exit can abort the process (SIGABRT, "terminate called without an active exception").
        gc.collect()


def measure_sharded(config: str, method: str, world_size: int, *, dtype: str = "fp32", batch: int = 1,
                    seq: int = 64, steps: int = 3, seed: int = 0) -> dict:
    """Per-rank bytes of parameters, gradients and optimizer states under FSDP2 on ``world_size``
    CPU ranks (gloo, spawned processes), next to ``slcompile.memory.estimate(..., world_size=...)``.
    ``rel_error``: per term, ``(predicted - measured) / measured`` for the rank holding the most."""
    import torch.multiprocessing as mp
    if steps < 2:
        raise ValueError("steps must be >= 2: optimizer states are created in the first step")
    queue = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:  # a file store: no port to race for
        mp.start_processes(_sharded_rank, (world_size, f"file://{tmp}/store", config, method, dtype, batch, seq,
                                           steps, seed, queue), nprocs=world_size, start_method="spawn")
    per_rank = [bytes_ for _, bytes_ in sorted(queue.get() for _ in range(world_size))]
    most = {term: max(r[term] for r in per_rank) for term in (*SHARDED_TERMS, "support")}
    pred = predict(config, METHODS[method], dtype, batch, seq, "cpu", world_size=world_size)
    return {"config": config, "method": method, "dtype": dtype, "batch": batch, "seq": seq,
            "world_size": world_size, "per_rank_bytes": per_rank, "max_rank_bytes": most,
            "predicted": {term: pred[term] for term in (*SHARDED_TERMS, "support")},
            "rel_error": {term: (pred[term] - most[term]) / most[term] for term in SHARDED_TERMS}}


def print_sharded(rows: list[dict]) -> None:
    print(f"{'config':<12} {'method':<22} {'ranks':>5} " + " ".join(f"{t + ' MiB':>26}" for t in SHARDED_TERMS))
    for r in rows:
        cells = [f"{r['max_rank_bytes'][t] / MIB:9.3f} / {r['predicted'][t] / MIB:9.3f} ({100 * r['rel_error'][t]:+.1f}%)"
                 for t in SHARDED_TERMS]
        print(f"{r['config']:<12} {r['method']:<22} {r['world_size']:>5} " + " ".join(f"{c:>26}" for c in cells))


# -- the paper's sizes: predictions only -------------------------------------------------------
def paper_predictions(methods: list[str]) -> list[dict]:
    rows = []
    variants = [(key, {}) for key in methods]
    if "sltrain-adamw8-pl" in methods:  # the reference's own layout: int64 support
        variants.append(("sltrain-adamw8-pl", {"index_bytes": 8}))
    for key, overrides in variants:
        m = METHODS[key]
        row = {"method": key, "label": m.label + (" (int64 support)" if overrides else ""),
               "model_options": {**model_options(m, "bf16"), **overrides}, "predicted_gb": {}, "paper_gb": {}}
        for i, config in enumerate(PAPER_CONFIGS):
            row["predicted_gb"][config] = predict(config, m, "bf16", 1, 256, **overrides)["peak"] / GB
            row["paper_gb"][config] = PAPER_GB[key][i] if key in PAPER_GB else None
        rows.append(row)
    return rows


# -- output ----------------------------------------------------------------------------------
def print_table(results: list[dict]) -> None:
    head = (f"{'config':<11}{'dtype':<5}{'b x s':>7}  {'method':<24}{'steady MiB':>11}{'model':>9}"
            f"{'peak MiB':>10}{'model':>9}{'error':>8}  {'peak in':<9}{'model peak in':<15}")
    print(head)
    for r in results:
        if "error" in r:
            print(f"{r['config']:<11}{r['dtype']:<5}{r['batch']:>3} x{r['seq']:<3}  {r['method']:<24}{r['error']}")
            continue
        p = r["predicted"]
        steady_pred = p["parameters"] + p["support"] + p["optimizer_states"]
        print(f"{r['config']:<11}{r['dtype']:<5}{r['batch']:>3} x{r['seq']:<3}  {r['method']:<24}"
              f"{r['steady_state_bytes']['modeled'] / MIB:>11.2f}{steady_pred / MIB:>9.2f}"
              f"{r['peak_bytes'] / MIB:>10.2f}{p['peak'] / MIB:>9.2f}{100 * r['rel_error']:>7.1f}%  "
              f"{str(r['peak_phase']):<9}{r['predicted_peak_phase']:<15}")
    print("steady: parameters + support + optimizer states (measured from the tensors | model); peak: one\n"
          "training step incl. the steady state; error = (model - measured) / measured")


def print_predictions(rows: list[dict]) -> None:
    print(f"\n{'model prediction vs paper, GB (seq 256, batch 1, bf16)':<58}"
          + "".join(f"{c[6:]:>16}" for c in PAPER_CONFIGS))
    for row in rows:
        cells = []
        for c in PAPER_CONFIGS:
            paper = row["paper_gb"][c]
            cells.append(f"{row['predicted_gb'][c]:.2f}" + (f" ({paper})" if paper is not None else " (-)"))
        print(f"{row['label']:<58}" + "".join(f"{cell:>16}" for cell in cells))
    print("(paper: measured on one A100-80G, REFERENCE.md section 4; batch/checkpointing not stated;\n"
          " model: device='cuda', whose 8/4-bit step transient is assumed, not measured)")


def plot(results: list[dict], predictions: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if "error" not in r:
            groups.setdefault((r["config"], r["dtype"], r["batch"], r["seq"]), []).append(r)
    panels = len(groups) + 1
    cols = min(panels, 4)
    nrows = -(-panels // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.8 * cols, 4.4 * nrows), squeeze=False)
    axes = list(axes.flat)
    for ax in axes[panels:]:
        ax.axis("off")
    for ax, ((config, dtype, batch, seq), rows) in zip(axes, groups.items()):
        x = range(len(rows))
        unit = GB if rows[0]["device"] == "cuda" else MIB
        ax.bar([i - 0.2 for i in x], [r["peak_bytes"] / unit for r in rows], 0.4, label="measured")
        ax.bar([i + 0.2 for i in x], [r["predicted"]["peak"] / unit for r in rows], 0.4, label="model")
        for i, r in enumerate(rows):
            ax.text(i, max(r["peak_bytes"], r["predicted"]["peak"]) / unit, f"{100 * r['rel_error']:+.1f}%",
                    ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(x), [r["method"] for r in rows], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("peak memory (" + ("GB" if unit == GB else "MiB") + ")")
        ax.set_title(f"{config} {dtype}, {batch}x{seq}", fontsize=9)
    ax = axes[panels - 1]
    width = 0.8 / max(len(predictions), 1)
    for j, row in enumerate(predictions):
        xs = [i + (j - (len(predictions) - 1) / 2) * width for i in range(len(PAPER_CONFIGS))]
        ax.bar(xs, [row["predicted_gb"][c] for c in PAPER_CONFIGS], width, label=row["method"]
               + (" (int64 support)" if row["model_options"]["index_bytes"] == 8 else ""))
        paper = [row["paper_gb"][c] for c in PAPER_CONFIGS]
        if paper[0] is not None:
            ax.scatter(xs, paper, marker="_", s=120, color="black", zorder=3)
    ax.set_xticks(range(len(PAPER_CONFIGS)), [c[6:] for c in PAPER_CONFIGS])
    ax.set_yscale("log")
    ax.set_ylabel("GB")
    ax.set_title("model at seq 256, batch 1, bf16\n(black: paper, A100)", fontsize=9)
    ax.legend(fontsize=6)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    default = GPU_DEFAULT if cuda else CPU_DEFAULT
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=default["configs"],
                        help="comma-separated name:BATCHxSEQ (llama-* names of slcompile.model_configs)")
    parser.add_argument("--dtypes", default=default["dtypes"], help="comma-separated: fp32, bf16")
    parser.add_argument("--methods", default=None, help=f"comma-separated among {', '.join(METHODS)} (default: all; "
                        f"with --world-sizes: {', '.join(SHARDED_METHODS)})")
    parser.add_argument("--world-sizes", default=None,
                        help="comma-separated FSDP2 world sizes, e.g. 1,2: measure per-rank shards instead (CPU)")
    parser.add_argument("--steps", type=int, default=3, help="training steps; the last one is measured (>= 2)")
    parser.add_argument("--eager-step", action="store_true",
                        help="run torchao's 8-bit step eagerly (compile_step=False): fast to start, more transients")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--out", default=None, help="JSON path (default results/memory_{cpu,gpu}.json)")
    parser.add_argument("--plot", default=None, help="PNG path (default next to the JSON)")
    args = parser.parse_args(argv)
    args.configs = [(name, *map(int, shape.split("x"))) for name, shape in
                    (item.split(":") for item in args.configs.split(",") if item)]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.world_sizes = [int(w) for w in args.world_sizes.split(",") if w] if args.world_sizes else []
    default_methods = SHARDED_METHODS if args.world_sizes else METHODS
    args.methods = [m for m in (args.methods or ",".join(default_methods)).split(",") if m]
    for bad, known in ((set(args.dtypes) - set(DTYPES), DTYPES), (set(args.methods) - set(METHODS), METHODS)):
        if bad:
            parser.error(f"unknown {sorted(bad)}; known: {', '.join(known)}")
    kind = "gpu" if args.device.startswith("cuda") else "cpu"
    args.out = Path(args.out) if args.out else RESULTS / f"memory_{'fsdp2_' if args.world_sizes else ''}{kind}.json"
    args.plot = Path(args.plot) if args.plot else args.out.with_suffix(".png")
    return args


def main_sharded(args: argparse.Namespace) -> dict:
    """The world-size axis: per-rank shards under FSDP2, measured and modeled."""
    started = time.perf_counter()
    rows = [measure_sharded(config, method, world, dtype=dtype, batch=batch, seq=seq, steps=args.steps)
            for config, batch, seq in args.configs for dtype in args.dtypes for method in args.methods
            for world in args.world_sizes]
    report = {
        "benchmark": "memory_bench --world-sizes",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "torchao": _version("torchao"), "machine": machine_info(),
        "settings": {"configs": [f"{c}:{b}x{s}" for c, b, s in args.configs], "dtypes": args.dtypes,
                     "methods": args.methods, "world_sizes": args.world_sizes, "steps": args.steps,
                     "command": " ".join(["python", *sys.argv])},
        "how": {"measured": "each rank (gloo, FSDP2 via slcompile.recipes.distributed.wrap): storage bytes of its "
                            "parameter shards, of its gradient shards after the last backward (before the step), "
                            "of its optimizer states (not the step counters); max_rank_bytes: the rank holding most",
                "predicted": "slcompile.memory.estimate(config, method, batch, seq, world_size=..., **model_options)"},
        "results": rows,
        "runtime_s": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print_sharded(rows)
    print(f"wrote {args.out} ({report['runtime_s']} s)")
    return report


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.world_sizes:
        return main_sharded(args)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = []
    for config, batch, seq in args.configs:
        for dtype in args.dtypes:
            for method in args.methods:
                try:
                    r = measure(config, method, dtype=dtype, batch=batch, seq=seq, steps=args.steps,
                                device=args.device, compile_step=not args.eager_step)
                except torch.OutOfMemoryError as err:  # GPU: skip what does not fit
                    r = {"config": config, "method": method, "dtype": dtype, "batch": batch, "seq": seq,
                         "error": f"out of memory: {str(err).splitlines()[0]}"}
                except ImportError as err:  # e.g. no torchao on the machine
                    r = {"config": config, "method": method, "dtype": dtype, "batch": batch, "seq": seq,
                         "error": f"import error: {err}"}
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                results.append(r)
                print(f"  {config} {dtype} {method}: " + (r.get("error") or
                      f"{r['peak_bytes'] / MIB:.2f} MiB measured, {r['predicted']['peak'] / MIB:.2f} MiB model "
                      f"({100 * r['rel_error']:+.1f}%)"), flush=True)
    predictions = paper_predictions(args.methods)
    device_info = {"cuda": torch.cuda.get_device_name(), "cuda_version": torch.version.cuda} \
        if args.device.startswith("cuda") else {}
    report = {
        "benchmark": "memory_bench",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torchao": _version("torchao"),
        "machine": {**machine_info(), **device_info},
        "settings": {"configs": [f"{c}:{b}x{s}" for c, b, s in args.configs], "dtypes": args.dtypes,
                     "methods": args.methods, "steps": args.steps, "compile_step": not args.eager_step,
                     "threads": torch.get_num_threads(), "device": args.device,
                     "command": " ".join(["python", *sys.argv])},
        "methods": {k: asdict(METHODS[k]) for k in args.methods},
        "how": {
            "peak_cpu": "steady state (tensor storages) + max live bytes of the last step, replayed from "
                        "torch.profiler(profile_memory=True) CPU allocation events",
            "peak_cuda": "torch.cuda.max_memory_allocated over the last step (reset per phase)",
            "predicted": "slcompile.memory.estimate(config, method, batch, seq, **model_options)",
            "rel_error": "(predicted peak - measured peak) / measured peak",
        },
        "results": results,
        "predictions": {"setting": "seq 256, micro-batch 1, bf16 compute and weights (int8 where said), "
                                   "index_bytes 4 unless said, device 'cuda' (the model's assumed CUDA "
                                   "8/4-bit step transient)", "rows": predictions},
        "runtime_s": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print()
    print_table(results)
    print_predictions(predictions)
    plot(results, predictions, args.plot)
    print(f"wrote {args.out} and {args.plot} ({report['runtime_s']} s)")
    return report


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    main()

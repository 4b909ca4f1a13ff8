"""Training loop and CLI: ``python -m slcompile.recipes.train --model llama-mini --method sltrain ...``.

One harness for every method (:data:`METHODS`: ``sltrain``, ``full``, ``lowrank``, ``lowrank-b0``):
same data, tokens, seed and schedule; only the layers and the learning rate differ. A run
directory (locked while a run uses it) holds ``config.json`` (the resolved settings that ran),
``metrics.jsonl`` (one JSON object per log line), ``checkpoint/`` (:mod:`slcompile.recipes.checkpoint`:
verified, code-free, swapped in atomically; a run killed at any moment resumes from its last
checkpoint with the same losses), ``summary.json`` and, with ``--export``, ``model.safetensors``.

Under ``torchrun --nproc_per_node N ... --parallel ddp|fsdp2`` (see :mod:`slcompile.recipes.distributed`)
each rank trains on its slice of the same global batch, rank 0 alone writes the logs, and the
checkpoint holds DCP shards that any world size can resume.

Exit codes of :func:`main`: 0 done, 2 refused or failed with an ``error:`` line, 75
(:data:`EXIT_STOPPED`) stopped by SIGTERM/SIGINT after saving a checkpoint (rerun to resume).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import random
import resource
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional, TextIO

import numpy as np
import torch
from torch import nn

from slcompile.config import SLConfig
from slcompile.layers import SLLinear
from slcompile.model_configs import get_config
from slcompile.optim.lowbit import STATE_BITS
from slcompile.recipes import distributed
from slcompile.recipes.baselines import to_lowrank
from slcompile.recipes.checkpoint import Checkpointer
from slcompile.recipes.data import TOKEN_DTYPES, BatchIterator, TextData, cache_dir, eval_batches, load_text_data
from slcompile.recipes.distributed import DEFAULT_TIMEOUT_S, PARALLEL_MODES, DistContext
from slcompile.recipes.files import RUN_MARKER, atomic_path, check_writable, locked_run_dir
from slcompile.recipes.models.llama import Llama
from slcompile.recipes.schedule import build_scheduler
from slcompile.transform import TransformReport, transform

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EXIT_STOPPED = 75  # EX_TEMPFAIL: a signal stopped the run after a checkpoint; rerunning resumes it
MIN_VOCAB = 257  # byte-level BPE: 256 byte tokens + the end-of-text token
MAX_LR = float(torch.finfo(torch.float32).max)  # the optimizers scale float32 tensors by it


@dataclass(frozen=True)
class Method:
    """What a training method does to the dense model, and which of ``--rank/--alpha/--density`` it reads."""

    apply: Optional[Callable[[nn.Module, SLConfig], tuple[nn.Module, TransformReport]]]
    reads: tuple[str, ...]


METHODS: dict[str, Method] = {
    "sltrain": Method(transform, ("rank", "alpha", "density")),
    "full": Method(None, ()),
    "lowrank": Method(partial(to_lowrank, init="matched"), ("rank", "alpha")),
    "lowrank-b0": Method(partial(to_lowrank, init="paper"), ("rank", "alpha")),
}
FACTOR_FLAGS = ("rank", "alpha", "density")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run. Fields in ``RESUMABLE_FIELDS`` may change on resume."""

    model: str = "llama-mini"
    method: str = "sltrain"
    out: str = "runs/default"
    hf_config: Optional[str] = None  # a transformers LlamaConfig JSON instead of --model
    steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: Optional[int] = None  # default: the model's max_seq_len
    lr: float = 3e-3
    warmup: Optional[int] = None  # default: 10% of steps, as the paper
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip: Optional[float] = None
    dtype: str = "fp32"
    rank: Optional[int] = None  # default: the model config's (paper) rank
    alpha: Optional[float] = None
    density: Optional[float] = None
    corpora: tuple[str, ...] = ("kjv", "shakespeare", "wiki")  # named corpora (the CLI's default: none with --data)
    data: tuple[str, ...] = ()  # your files: paths, globs or folders (slcompile.recipes.data.sources)
    val_data: tuple[str, ...] = ()  # validation files; default: a split by a hash of each document's id
    val_fraction: float = 0.02  # the share of documents the hash split puts in validation
    text_field: str = "text"  # the document field of .jsonl/.json/.parquet files
    data_dtype: str = "uint16"  # the ids' type in pre-tokenized .bin files
    tokenizer: Optional[str] = None  # a tokenizers JSON; default: a byte-level BPE trained on the data
    tokenize_workers: int = 1  # processes that tokenize (once, into the cache)
    vocab_size: int = 4096
    seed: int = 0
    eval_every: int = 50
    eval_rows: int = 128
    log_every: int = 10
    checkpoint_every: int = 100
    threads: Optional[int] = None
    progress: bool = True
    parallel: str = "none"  # "ddp" / "fsdp2" under torchrun
    export: bool = False  # write model.safetensors (merged dense model) at the end
    per_layer: bool = False  # AdamW fused into backward (slcompile.optim), gradients freed per parameter
    state_bits: int = 32  # 32, or 8 / 4 for torchao quantized AdamW states
    int8_weights: bool = False  # SLTrain A, B, values stored as int8 (stochastic rounding)
    compile_step: bool = True  # torch.compile torchao's 8/4-bit step (--no-compile-step: eager, same math)
    checkpoint_activations: bool = False  # recompute each decoder layer in backward
    skip_nonfinite: bool = False  # skip (and count) steps whose loss or gradients are not finite
    dist_timeout: float = DEFAULT_TIMEOUT_S  # seconds a rank waits for the others before failing
    # Closing the quality gap (slcompile.optim.refactor): restarts every N updates, LR multipliers.
    refactor_every: Optional[int] = None  # re-balance A, B from B @ A (W unchanged); their moments are kept
    momentum_reset_every: Optional[int] = None  # clear the AdamW states of A, B
    reset_values: bool = False  # the momentum resets also clear the states of the sparse values
    recovery_steps: int = 0  # after each momentum reset, ramp the LR up from 0.001x over this many updates
    lr_factors_mult: float = 1.0  # A, B train at lr * this
    lr_values_mult: float = 1.0  # the sparse values train at lr * this

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"--parallel must be one of {', '.join(PARALLEL_MODES)}, got {self.parallel!r}")
        positive = {"steps": self.steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "eval_every": self.eval_every, "eval_rows": self.eval_rows, "log_every": self.log_every,
                    "checkpoint_every": self.checkpoint_every, "vocab_size": self.vocab_size,
                    "threads": 1 if self.threads is None else self.threads, "tokenize_workers": self.tokenize_workers}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.vocab_size < MIN_VOCAB:
            raise ValueError(f"--vocab-size must be >= {MIN_VOCAB} (the 256 byte tokens and end-of-text of the "
                             f"byte-level BPE), got {self.vocab_size}")
        if self.data_dtype not in TOKEN_DTYPES:
            raise ValueError(f"--data-dtype must be one of {', '.join(TOKEN_DTYPES)}, got {self.data_dtype!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must lie in [0, 1), got {self.val_fraction!r}")
        if not (math.isfinite(self.lr) and 0 < self.lr <= MAX_LR):
            raise ValueError(f"--lr must be a positive number below {MAX_LR:.3g}, got {self.lr!r}")
        if not (math.isfinite(self.dist_timeout) and self.dist_timeout > 0):
            raise ValueError(f"--dist-timeout must be a positive number of seconds, got {self.dist_timeout!r}")
        ignored = [f"--{name}" for name in FACTOR_FLAGS
                   if getattr(self, name) is not None and name not in METHODS[self.method].reads]
        if ignored:
            raise ValueError(f"--method {self.method} does not use {', '.join(ignored)}: drop the flag")
        if self.warmup is not None and not 0 <= self.warmup <= self.steps:
            raise ValueError(f"--warmup must lie in [0, --steps={self.steps}], got {self.warmup!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"--clip must be > 0, got {self.clip!r}")
        if self.seq_len is not None and self.seq_len < 1:
            raise ValueError(f"--seq-len must be >= 1, got {self.seq_len!r}")
        if self.state_bits not in STATE_BITS:
            raise ValueError(f"--state-bits must be one of {', '.join(map(str, STATE_BITS))}, got {self.state_bits!r}")
        if self.int8_weights and self.method != "sltrain":
            raise ValueError("--int8-weights stores SLTrain's A, B and values: it needs --method sltrain")
        if self.int8_weights and self.parallel != "none" and not self.per_layer:
            raise ValueError(f"--int8-weights with --parallel {self.parallel} needs --per-layer (the int8 weights are "
                             "stepped in each parameter's hook on the averaged gradient or shard; neither DDP's own "
                             "all-reduce nor a step after FSDP2's backward is supported)")
        if self.skip_nonfinite and self.per_layer:
            raise ValueError("--skip-nonfinite cannot skip a --per-layer step: it updates the weights during backward")
        self._check_techniques()

    def _check_techniques(self) -> None:
        """Validate the refactorization / momentum-reset / LR-multiplier flags."""
        for name in ("refactor_every", "momentum_reset_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if isinstance(self.recovery_steps, bool) or not isinstance(self.recovery_steps, int) or self.recovery_steps < 0:
            raise ValueError(f"--recovery-steps must be an integer >= 0, got {self.recovery_steps!r}")
        for name in ("lr_factors_mult", "lr_values_mult"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value!r}")
        used = {"--refactor-every": self.refactor_every is not None,
                "--momentum-reset-every": self.momentum_reset_every is not None,
                "--lr-factors-mult": self.lr_factors_mult != 1.0}
        if self.method == "full" and any(used.values()):
            raise ValueError(f"--method full has no factors A, B: drop {', '.join(k for k, v in used.items() if v)}")
        if self.method != "sltrain" and (self.reset_values or self.lr_values_mult != 1.0):
            raise ValueError(f"--method {self.method} has no sparse values: drop --reset-values / --lr-values-mult")
        if self.momentum_reset_every is None and (self.reset_values or self.recovery_steps):
            raise ValueError("--reset-values and --recovery-steps act at momentum resets: add --momentum-reset-every")
        if self.refactor_every is not None and self.parallel == "fsdp2":
            raise ValueError("--refactor-every needs each layer's whole B @ A: use --parallel ddp, not fsdp2")

    @property
    def uses_memory_stack(self) -> bool:
        return self.per_layer or self.state_bits != 32 or self.int8_weights

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else max(1, self.steps // 10)


# Settings a resumed run may change without changing what it computes. Not `steps`: the
# cosine schedule depends on the total, so a longer run is a different run. `parallel`: DDP,
# FSDP2 and one process compute the same updates (up to float rounding) and read each other's
# distributed checkpoints. `checkpoint_activations`: recomputation gives the same values;
# `compile_step`: the compiled and the eager torchao step do the same math.
# `skip_nonfinite`: finite steps are the same with or without it. `tokenize_workers`: any number
# writes the same token shards.
RESUMABLE_FIELDS = {"out", "eval_every", "log_every", "checkpoint_every", "threads", "progress", "parallel",
                    "export", "checkpoint_activations", "skip_nonfinite", "dist_timeout", "tokenize_workers",
                    "compile_step"}


def check_hf_config(path: str) -> None:
    """Refuse a ``--hf-config`` that ``transformers`` would reject only mid-run (or accept wrongly)."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--hf-config {path}: cannot read it as JSON ({exc})") from exc
    if not isinstance(values, dict):
        raise ValueError(f"--hf-config {path} must hold a JSON object (a LlamaConfig), not a {type(values).__name__}")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "head_dim"):
        value = values.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"--hf-config {path}: {key} must be an integer >= 1, got {value!r}")
    hidden, heads = values.get("hidden_size") or 4096, values.get("num_attention_heads") or 32  # LlamaConfig's defaults
    kv_heads = values.get("num_key_value_heads") or heads
    if values.get("head_dim") is None and hidden % heads:
        raise ValueError(f"--hf-config {path}: num_attention_heads {heads} must divide hidden_size {hidden}")
    if heads % kv_heads:
        raise ValueError(f"--hf-config {path}: num_key_value_heads {kv_heads} must divide num_attention_heads {heads}")
    try:
        from transformers.activations import ACT2FN
    except ImportError as exc:
        raise ValueError("--hf-config needs `pip install transformers`") from exc
    if values.get("hidden_act", "silu") not in ACT2FN:
        raise ValueError(f"--hf-config {path}: unknown hidden_act {values['hidden_act']!r}; known: "
                         f"{', '.join(sorted(ACT2FN))}")


def build_model(cfg: TrainConfig, vocab_size: int) -> tuple[nn.Module, int, dict]:
    """The model for ``cfg`` with its method applied; returns ``(model, seq_len, method_info)``.

    Our LLaMA takes the paper's rank/alpha/density for its size unless overridden; a HF model
    (``--hf-config``) needs ``--rank`` and ``--alpha``. ``method_info`` holds the values used.
    """
    method = METHODS[cfg.method]
    if cfg.hf_config:
        from slcompile.recipes.models.hf import HFCausalLM, load_hf_llama_config
        if method.apply is not None and (cfg.rank is None or cfg.alpha is None):
            raise ValueError("--hf-config needs --rank and --alpha (no paper defaults for an arbitrary shape)")
        hf = load_hf_llama_config(cfg.hf_config, vocab_size)
        model, max_seq = HFCausalLM(hf), hf.max_position_embeddings
        if cfg.checkpoint_activations:
            model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        defaults = {"rank": None, "alpha": None, "density": 0.03}
    else:
        dim_cfg = replace(get_config(cfg.model), vocab_size=vocab_size)
        model, max_seq = Llama(dim_cfg, checkpoint_activations=cfg.checkpoint_activations), dim_cfg.max_seq_len
        defaults = {name: getattr(dim_cfg, name) for name in FACTOR_FLAGS}
    seq_len = cfg.seq_len or max_seq
    if seq_len > max_seq:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's maximum sequence length {max_seq}")
    dtype = DTYPES[cfg.dtype]
    if method.apply is None:
        return model.to(dtype), seq_len, {}
    info = {name: getattr(cfg, name) if getattr(cfg, name) is not None else defaults[name] for name in method.reads}
    model, report = method.apply(model, SLConfig(**{"density": 0.03, **info}, seed=cfg.seed))
    for name, layer in model.named_modules():
        if isinstance(layer, SLLinear) and layer.nnz == 0:
            raise ValueError(f"--density {info['density']} leaves SLLinear {name!r} ({layer.out_features} x "
                             f"{layer.in_features}) without sparse entries (nnz = 0): raise --density to at least "
                             f"{1 / (layer.in_features * layer.out_features):.2g}, or use --method lowrank")
    info.update(linear_params_full=report.linear_params_before, linear_params=report.linear_params_after)
    return model.to(dtype), seq_len, info


def resolve(cfg: TrainConfig, seq_len: int, info: dict) -> TrainConfig:
    """``cfg`` with every default filled in by the value that runs: what ``config.json`` and the
    checkpoint record, so a resume passing a default explicitly is the same run."""
    return replace(cfg, seq_len=seq_len, warmup=cfg.warmup_steps,
                   **{name: info[name] for name in FACTOR_FLAGS if name in info})


def pin_paths(model: nn.Module, tokens: int, dtype: torch.dtype, ctx: DistContext,
              recorded: Optional[dict[str, str]]) -> dict[str, str]:
    """Fix the compute path of every ``SLLinear`` for the whole run; returns ``{name: path}``.

    ``path="auto"`` decides per call from a per-process calibration, so two processes (a run and
    its resume, or two ranks) may pick differently and round differently. Here each layer takes
    the ``recorded`` choice of the run being resumed, or else rank 0's choice for a training
    micro-batch of ``tokens`` tokens.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SLLinear)}
    if recorded is None:
        with torch.enable_grad():
            picks = [layer.path_for(torch.empty(tokens, layer.in_features, dtype=dtype, device=ctx.device))
                     for layer in layers.values()]
        factored = ctx.from_main([p == "factored" for p in picks])
        recorded = {name: "factored" if f else "materialize" for name, f in zip(layers, factored)}
    elif recorded.keys() != layers.keys():
        raise ValueError("the checkpoint's path choices name other SLLinear layers than this model has")
    for name, layer in layers.items():
        layer.path = recorded[name]
    return recorded


def _rng_state() -> dict:
    """Every RNG state as tensors and lists: a checkpoint must load with ``weights_only=True``."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": [version, list(internal), gauss_next]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _config_dict(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))  # tuples -> lists, as stored in checkpoints


def check_resumable(meta: dict, cfg: TrainConfig, where: Path) -> None:
    """Refuse a checkpoint written by a run with other (resolved) settings."""
    saved = {**_config_dict(TrainConfig()), **meta["config"]}  # a setting added since the save: its default
    current = {k: v for k, v in _config_dict(cfg).items() if k not in RESUMABLE_FIELDS}
    mismatched = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if mismatched:
        details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in mismatched.items())
        raise ValueError(f"checkpoint {where} was written by a run with other settings ({details}); "
                         "use the same settings or another --out")


def _truncate_metrics(path: Path, max_step: int) -> None:
    """Drop log lines written after the checkpoint being resumed (they will be redone); a cut last
    line of a killed run is dropped too."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            raise ValueError(f"{path} line {number} is not JSON: remove or fix that line to resume") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path} line {number} has no integer \"step\": remove or fix that line to resume")
        if record["step"] <= max_step:
            kept.append(line + "\n")
    with atomic_path(path) as tmp:
        tmp.write_text("".join(kept))


def _write_json(path: Path, value: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2) + "\n")


def perplexity(loss: float) -> float:
    """``exp(loss)``, infinite past float range (a diverged run reports ``inf``, not ``OverflowError``)."""
    return math.exp(loss) if loss < math.log(sys.float_info.max) else math.inf


@torch.no_grad()
def evaluate(model: nn.Module, rows: np.ndarray, batch_size: int, ctx: DistContext = DistContext()) -> float:
    """Mean next-token cross-entropy over ``rows`` (token-weighted) in the model's own dtype; ranks
    share the batches out."""
    model.eval()
    batches = list(eval_batches(rows, batch_size))
    total, count = 0.0, 0
    for index, counts in distributed.eval_assignment(len(batches), ctx):
        inputs, targets = (t.to(ctx.device) for t in batches[index])
        loss = float(model(inputs, targets))
        if counts:
            total += loss * targets.numel()
            count += targets.numel()
    model.train()
    total, count = ctx.sum([total, count])
    return total / count


def peak_memory_bytes(device: torch.device) -> int:
    """Peak device memory: CUDA allocator peak, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Stopped(Exception):
    """A SIGTERM/SIGINT stopped the run after it saved a checkpoint (rerun the command to resume)."""


@contextlib.contextmanager
def _stop_requests() -> Iterator[list[str]]:
    """Turn SIGTERM/SIGINT into a request (the list gets the signal's name) that the loop honours
    after the current step; a second signal acts as before (kills). Main thread only."""
    requests: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, frame):
        requests.append(signal.Signals(signum).name)
        signal.signal(signum, previous[signum])

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield requests
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass
class Run:
    """A set-up run: the resolved config, the model and its training state, where it writes."""

    cfg: TrainConfig
    ctx: DistContext
    out: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: BatchIterator
    val_rows: np.ndarray
    checkpointer: Checkpointer
    info: dict
    paths: dict[str, str]
    vocab_size: int
    step: int = 0
    tokens: int = 0
    skipped: int = 0
    saved_step: Optional[int] = None
    log: Optional[TextIO] = None

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.cfg.seq_len

    def write(self, record: dict) -> None:
        if self.log is not None:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()


def setup(cfg: TrainConfig, ctx: DistContext, stack: contextlib.ExitStack) -> Run:
    """Everything before the first step, cheapest checks first: settings and model, the data cache
    (filled by rank 0: bad input fails before the run folder is touched), the run folder (locked on
    rank 0 for the life of ``stack``), the checkpoint to resume, the data, the state.

    Each phase fails on every rank or on none (:meth:`DistContext.all_or_none`), so an error on
    one rank is one clear error, not a hang until ``--dist-timeout``.
    """
    with ctx.all_or_none("checking the settings and --out"):
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        ctx.check_batch_size(cfg.batch_size)
        if cfg.export and importlib.util.find_spec("safetensors") is None:
            raise ValueError("--export needs `pip install safetensors`")
        if cfg.hf_config:
            check_hf_config(cfg.hf_config)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        model, seq_len, info = build_model(cfg, cfg.vocab_size)
        cfg = resolve(cfg, seq_len, info)
        out = Path(cfg.out)
        checkpointer = Checkpointer(out, ctx)
        if ctx.is_main:
            check_writable(cache_dir(), "the data cache (SLCOMPILE_CACHE)")
            resuming = (out / RUN_MARKER).exists()  # a run folder, maybe a live run's: refused at once
            if resuming:
                stack.enter_context(locked_run_dir(out))
    with ctx.all_or_none("filling the data cache"):
        if ctx.is_main:  # rank 0 reads every input once (bad input fails here, before --out is touched)
            load_data(cfg, progress=cfg.progress and sys.stderr.isatty())
    with ctx.all_or_none("locking --out"):
        if ctx.is_main:
            if not resuming:  # a new run folder is made only once the data is known to be good
                stack.enter_context(locked_run_dir(out))
            checkpointer.recover()
    with ctx.all_or_none("reading the checkpoint"):
        meta = checkpointer.load_meta() if checkpointer.directory.exists() else None
        if meta is not None:
            check_resumable(meta, cfg, checkpointer.directory)
    with ctx.all_or_none("loading the data and the model state"):
        data = load_data(cfg)  # memory-mapped shards from the cache rank 0 filled
        if cfg.tokenizer is None and data.vocab_size != cfg.vocab_size:
            raise ValueError(f"--vocab-size {cfg.vocab_size}: the tokenizer reached only {data.vocab_size} entries "
                             f"on this data; pass --vocab-size {data.vocab_size}")
        val_rows = data.val[:cfg.eval_rows]
        if len(val_rows) == 0:
            raise ValueError("the validation split is empty: use more data, a larger --val-fraction or a shorter "
                             "--seq-len")
        distributed.verify_supports(model, ctx)
        model = model.to(ctx.device)
        micro_tokens = cfg.batch_size // ctx.world_size * seq_len
        paths = pin_paths(model, micro_tokens, DTYPES[cfg.dtype], ctx, meta["paths"] if meta else None)
        model = distributed.wrap(model, ctx, per_layer=cfg.per_layer)
        optimizer = build_optimizer(model, cfg, ctx)
        scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio,
                                    () if cfg.momentum_reset_every is None else (cfg.momentum_reset_every,),
                                    cfg.recovery_steps)
        batches = BatchIterator(data.train, cfg.batch_size, seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size)
        run = Run(cfg, ctx, out, model, optimizer, scheduler, batches, val_rows, checkpointer, info, paths,
                  data.vocab_size)
        if meta is not None:
            checkpointer.load_state(model, optimizer)
            scheduler.load_state_dict(meta["scheduler"])
            run.batches.load_state_dict(meta["data"])
            _set_rng_state(meta["rng"])  # rank 0's under --parallel: every rank drew the same numbers
            run.step = run.saved_step = meta["step"]
            run.tokens, run.skipped = meta["tokens"], meta["skipped"]
        if ctx.is_main:
            run.log = _open_metrics(out / "metrics.jsonl", run.step if meta else None, stack)
            _write_json(out / "config.json", _config_dict(cfg))
    return run


def load_data(cfg: TrainConfig, progress: bool = False) -> TextData:
    """The run's data: tokenized into the cache on first use, memory-mapped, packed to ``cfg.seq_len``."""
    return load_text_data(cfg.corpora, cfg.vocab_size, cfg.seq_len, cfg.val_fraction, data=cfg.data,
                          val_data=cfg.val_data, text_field=cfg.text_field, data_dtype=cfg.data_dtype,
                          tokenizer=cfg.tokenizer, workers=cfg.tokenize_workers, progress=progress)


def _open_metrics(path: Path, resumed_step: Optional[int], stack: contextlib.ExitStack) -> TextIO:
    """``metrics.jsonl`` for appending (never through a symlink): cut back to ``resumed_step``, or
    emptied for a fresh run."""
    if resumed_step is not None:
        _truncate_metrics(path, resumed_step)
    elif path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    return stack.enter_context(os.fdopen(fd, "a"))


def train_step(run: Run) -> tuple[float, Optional[float], float]:
    """One optimizer step over ``grad_accum`` micro-batches; ``(global mean loss, grad norm, lr)``.

    A non-finite loss or gradient stops the run before the update (or, with
    ``--skip-nonfinite``, skips the update and counts it): the weights stay as last checkpointed.
    """
    cfg, ctx, optimizer = run.cfg, run.ctx, run.optimizer
    # The iterator yields this rank's slice of each global batch (only those rows are read).
    micro_batches = [tuple(t.to(ctx.device) for t in next(run.batches)) for _ in range(cfg.grad_accum)]

    def forward_backward() -> float:
        """All micro-batches of one update; the mean loss (run twice by two-pass clipping)."""
        loss_sum = 0.0
        for micro, (inputs, targets) in enumerate(micro_batches):
            with distributed.gradient_sync(run.model, micro == cfg.grad_accum - 1 or cfg.uses_memory_stack):
                loss = run.model(inputs, targets)
                (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach())
        return loss_sum / cfg.grad_accum

    grad_norm, lr = None, optimizer.param_groups[0]["lr"]
    if cfg.per_layer:  # parameters are updated during backward; step() closes the update (clipping: two passes)
        loss = ctx.mean(optimizer.step(forward_backward))
    else:
        loss = ctx.mean(forward_backward())
        if cfg.clip is not None or cfg.skip_nonfinite:
            grad_norm = distributed.clip_grad_norm(run.params, cfg.clip or math.inf)
    finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
    if not finite and not cfg.skip_nonfinite:
        raise FloatingPointError(f"loss became {loss} (gradient norm {grad_norm}) at step {run.step + 1}; lower --lr "
                                 f"(now {cfg.lr}), or pass --skip-nonfinite; the last checkpoint ({_saved(run)}) "
                                 "was kept")
    if finite and not cfg.per_layer:
        optimizer.step()
    run.skipped += not finite
    run.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.tokens += run.tokens_per_step
    return loss, grad_norm, lr


def restart(run: Run) -> None:
    """After update ``run.step``: refactorize (``--refactor-every``), then clear the optimizer
    states of the factors (and values, ``--reset-values``; ``--momentum-reset-every``) when due.
    Both at the same interval is the procedure of arXiv 2505.22922 (refactor, rebuild the optimizer).

    Runs before the checkpoint of the same step, so a resumed run has the post-restart weights
    and states and meets the next restart at the same step; the LR schedule restarts by itself.
    """
    cfg, done = run.cfg, run.step
    refactor = cfg.refactor_every is not None and done % cfg.refactor_every == 0
    reset = cfg.momentum_reset_every is not None and done % cfg.momentum_reset_every == 0
    if done >= cfg.steps or not (refactor or reset):
        return
    from slcompile.optim import factor_params, refactorize_, reset_moments_
    record = {"step": done}
    if refactor:
        record["refactor_max_dw"] = max(refactorize_(run.model).values(), default=0.0)
    if reset:
        factors, values = factor_params(run.model)
        record["reset_states"] = reset_moments_(run.optimizer, factors + values if cfg.reset_values else factors)
    run.write(record)


def _saved(run: Run) -> str:
    return f"step {run.saved_step}" if run.saved_step is not None else "none yet"


def save_checkpoint(run: Run) -> None:
    """Checkpoint the run, after checking that every parameter is finite: a diverged run never
    overwrites its last good checkpoint."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in run.params]
    if run.ctx.any(not all(bool(torch.isfinite(p.detach()).all()) for p in local)):
        raise FloatingPointError(f"the weights are not finite after step {run.step}: not saved; lower --lr "
                                 f"(now {run.cfg.lr}); the last checkpoint ({_saved(run)}) was kept")
    meta = dict(config=_config_dict(run.cfg), step=run.step, tokens=run.tokens, skipped=run.skipped,
                scheduler=run.scheduler.state_dict(), data=run.batches.state_dict(), rng=_rng_state(), paths=run.paths)
    run.checkpointer.save(run.model, run.optimizer, meta)
    run.saved_step = run.step


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training as ``cfg`` says; returns the summary also written to ``summary.json``.

    With ``cfg.parallel`` ``"ddp"``/``"fsdp2"``, call it on every torchrun rank. Raises
    :class:`Stopped` after checkpointing when a SIGTERM/SIGINT arrives (main thread only).
    """
    with distributed.process_group(cfg.parallel, cfg.dist_timeout) as ctx:
        return _train(cfg, ctx)  # its frame holds the model: gone before the process group is torn down


def _train(cfg: TrainConfig, ctx: DistContext) -> dict:
    with contextlib.ExitStack() as stack, _stop_requests() as stop:
        return _loop(setup(cfg, ctx, stack), stop)


def _loop(run: Run, stop: list[str]) -> dict:
    cfg, ctx = run.cfg, run.ctx
    progress = None
    if cfg.progress and ctx.is_main:
        from tqdm import tqdm
        progress = tqdm(total=cfg.steps, initial=run.step, desc=cfg.method, dynamic_ncols=True,
                        file=sys.stderr)
    start, train_time, val_loss = run.step, 0.0, None
    try:
        while run.step < cfg.steps:
            began = time.perf_counter()
            loss, grad_norm, lr = train_step(run)
            restart(run)
            train_time += time.perf_counter() - began
            done = run.step
            if done % cfg.log_every == 0 or done == cfg.steps:
                run.write({"step": done, "loss": loss, "lr": lr, "tokens": run.tokens, "grad_norm": grad_norm,
                           "skipped_steps": run.skipped,
                           "tokens_per_s": run.tokens_per_step * (done - start) / max(train_time, 1e-9)})
            if done % cfg.eval_every == 0 or done == cfg.steps:
                val_loss = evaluate(run.model, run.val_rows, cfg.batch_size, ctx)
                run.write({"step": done, "val_loss": val_loss, "val_ppl": perplexity(val_loss), "tokens": run.tokens})
            stopping = ctx.any(bool(stop))
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or stopping:
                save_checkpoint(run)
            if progress is not None:
                progress.update(1)
                tokens_per_s = run.tokens_per_step / (time.perf_counter() - began)
                progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}")
            if stopping and done < cfg.steps:
                raise Stopped(f"stopped by {stop[0] if stop else 'a signal on another rank'} after step {done} of "
                              f"{cfg.steps}; the checkpoint in {run.checkpointer.directory} holds it: rerun the same "
                              "command to resume")
    finally:
        if progress is not None:
            progress.close()
    if val_loss is None:  # resumed a finished run: report its last evaluation
        val_loss = evaluate(run.model, run.val_rows, cfg.batch_size, ctx)
    return _finish(run, val_loss, train_time, start)


def _finish(run: Run, val_loss: float, train_time: float, start: int) -> dict:
    """Export (with ``--export``) and write ``summary.json``."""
    cfg, ctx = run.cfg, run.ctx
    if cfg.export:
        distributed.export_safetensors(run.model, lambda: build_model(cfg, run.vocab_size)[0],
                                       run.out / "model.safetensors", ctx,
                                       metadata={"method": cfg.method, "model": cfg.hf_config or cfg.model,
                                                 "step": str(cfg.steps), "seed": str(cfg.seed)})
    summary = {
        "method": cfg.method, "model": cfg.hf_config or cfg.model, "lr": cfg.lr, "steps": cfg.steps,
        "tokens": run.tokens, "seq_len": cfg.seq_len, "trainable_params": sum(p.numel() for p in run.params),
        "total_params": sum(p.numel() for p in run.model.parameters()),
        "state_bytes": _state_bytes(run.params, run.optimizer), "peak_memory_bytes": peak_memory_bytes(ctx.device),
        "tokens_per_s": run.tokens_per_step * (cfg.steps - start) / train_time if train_time else None,
        "val_loss": val_loss, "val_ppl": perplexity(val_loss), "parallel": cfg.parallel,
        "world_size": ctx.world_size, "skipped_steps": run.skipped, "paths": run.paths, **run.info,
    }
    if ctx.is_main:
        _write_json(run.out / "summary.json", summary)
    return summary


def build_optimizer(model: nn.Module, cfg: TrainConfig, ctx: DistContext = DistContext()) -> torch.optim.Optimizer:
    """Plain ``torch.optim.AdamW``, or ``slcompile.optim`` when the memory stack is asked for (under
    ``--parallel``: dense states for DCP; with DDP and ``--per-layer`` it averages the gradients)."""
    from slcompile import optim
    if not cfg.uses_memory_stack:
        return torch.optim.AdamW(optim.param_groups(model, cfg.lr, lr_factors=cfg.lr_factors_mult,
                                                    lr_values=cfg.lr_values_mult), lr=cfg.lr,
                                 weight_decay=cfg.weight_decay)
    return optim.build(model, lr=cfg.lr, lr_factors=cfg.lr_factors_mult, lr_values=cfg.lr_values_mult,
                       weight_decay=cfg.weight_decay, per_layer=cfg.per_layer,
                       state_bits=cfg.state_bits, accumulation_steps=cfg.grad_accum,
                       max_grad_norm=cfg.clip if cfg.per_layer else None, int8_weights=cfg.int8_weights,
                       data_parallel=torch.distributed.group.WORLD if ctx.parallel == "ddp" and cfg.per_layer else None,
                       dense_state_dict=ctx.enabled, compile_step=cfg.compile_step)


def _state_bytes(params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters + one gradient each + optimizer state tensors."""
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    return state + 2 * sum(p.numel() * p.element_size() for p in params)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """CLI flags are the ``TrainConfig`` fields with dashes (``--batch-size``)."""
    parser = argparse.ArgumentParser(prog="python -m slcompile.recipes.train", description=__doc__.split("\n\n")[0])
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name == "corpora":
            parser.add_argument(flag, help=f"comma-separated corpus names (default: {','.join(default)}, or none "
                                "with --data)")
        elif f.name in ("data", "val_data"):
            parser.add_argument(flag, action="append", default=[], metavar="PATH_OR_GLOB",
                                help="repeatable: .txt, .jsonl/.json, .parquet (.gz/.zst), or pre-tokenized .bin/.npy")
        elif isinstance(default, bool):  # --export, --per-layer, --int8-weights; --no-progress
            parser.add_argument("--no-" + flag[2:] if default else flag, dest=f.name,
                                action="store_false" if default else "store_true")
        elif f.name == "parallel":
            parser.add_argument(flag, default=default, choices=PARALLEL_MODES,
                                help="data parallelism under torchrun (gloo on CPU, NCCL on GPU)")
        elif f.name in ("method", "dtype"):
            parser.add_argument(flag, default=default, choices=list(METHODS if f.name == "method" else DTYPES))
        else:
            kind = {"int": int, "float": float}.get(type(default).__name__, str)
            if default is None:
                kind = {"seq_len": int, "warmup": int, "rank": int, "threads": int,
                        "alpha": float, "density": float, "clip": float, "refactor_every": int,
                        "momentum_reset_every": int}.get(f.name, str)
            parser.add_argument(flag, type=kind, default=default)
    args = vars(parser.parse_args(argv))
    corpora = args["corpora"] if args["corpora"] is not None else "" if args["data"] else ",".join(defaults.corpora)
    args.update(corpora=tuple(c for c in corpora.split(",") if c), data=tuple(args["data"]),
                val_data=tuple(args["val_data"]))
    try:
        return TrainConfig(**args)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    """The CLI; the exit code is 0, 2 (an ``error:`` line) or :data:`EXIT_STOPPED`."""
    cfg = parse_args(argv)
    try:
        summary = train(cfg)
    except Stopped as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    except (ValueError, FloatingPointError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The settings of a training run: :class:`TrainConfig` (validated on construction, so every bad
flag fails before data loading or any write), the method registry, the resume rule and the CLI
parser of ``python -m slcompile.train``."""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from slcompile.config import SLConfig
from slcompile.optim.lowbit import STATE_BITS
from slcompile.recipes.baselines import to_lowrank
from slcompile.recipes.data import TOKEN_DTYPES
from slcompile.recipes.distributed import DEFAULT_TIMEOUT_S, PARALLEL_MODES
from slcompile.transform import TransformReport, transform

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
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


def config_dict(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))  # tuples -> lists, as stored in checkpoints


def check_resumable(meta: dict, cfg: TrainConfig, where: Path) -> None:
    """Refuse a checkpoint written by a run with other (resolved) settings."""
    saved = {**config_dict(TrainConfig()), **meta["config"]}  # a setting added since the save: its default
    current = {k: v for k, v in config_dict(cfg).items() if k not in RESUMABLE_FIELDS}
    mismatched = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if mismatched:
        details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in mismatched.items())
        raise ValueError(f"checkpoint {where} was written by a run with other settings ({details}); "
                         "use the same settings or another --out")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """CLI flags are the ``TrainConfig`` fields with dashes (``--batch-size``)."""
    parser = argparse.ArgumentParser(prog="python -m slcompile.recipes.train", description="Train a LLaMA-style model with SLTrain, full-rank or low-rank layers in one harness.")
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

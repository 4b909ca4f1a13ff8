"""Training loop and CLI: ``python -m slcompile.recipes.train --model llama-mini --method sltrain ...``.

One harness for every method (``sltrain``, ``full``, ``lowrank``, ``lowrank-b0``): same data,
tokens, seed and schedule; only the layers and the learning rate differ. A run directory holds
``config.json``, ``metrics.jsonl`` (one JSON object per log line), ``checkpoint.pt`` (written
atomically: a run killed at any moment resumes from its last checkpoint with the same losses),
``summary.json`` and, with ``--export``, ``model.safetensors`` (the merged dense model).

Under ``torchrun --nproc_per_node N ... --parallel ddp|fsdp2`` (see :mod:`slcompile.recipes.distributed`)
each rank trains on its slice of the same global batch, rank 0 alone writes the logs, and the
checkpoint is a sharded ``checkpoint/`` directory that any world size can resume.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from slcompile.recipes.baselines import to_lowrank
from slcompile.config import SLConfig
from slcompile.recipes.data import BatchIterator, eval_batches, load_text_data
from slcompile.recipes.files import atomic_path
from slcompile.recipes import distributed
from slcompile.recipes.distributed import PARALLEL_MODES, DistContext
from slcompile.model_configs import get_config
from slcompile.recipes.models.llama import Llama
from slcompile.recipes.schedule import build_scheduler
from slcompile.transform import transform

METHODS = ("sltrain", "full", "lowrank", "lowrank-b0")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CHECKPOINT_VERSION = 1


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
    corpora: tuple[str, ...] = ("kjv", "shakespeare", "wiki")
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
    checkpoint_activations: bool = False  # recompute each decoder layer in backward

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"--parallel must be one of {', '.join(PARALLEL_MODES)}, got {self.parallel!r}")
        positive = {"steps": self.steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "eval_every": self.eval_every, "eval_rows": self.eval_rows, "log_every": self.log_every,
                    "checkpoint_every": self.checkpoint_every, "vocab_size": self.vocab_size}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a positive number, got {self.lr!r}")
        if self.warmup is not None and not 0 <= self.warmup <= self.steps:
            raise ValueError(f"--warmup must lie in [0, --steps={self.steps}], got {self.warmup!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"--clip must be > 0, got {self.clip!r}")
        if self.seq_len is not None and self.seq_len < 1:
            raise ValueError(f"--seq-len must be >= 1, got {self.seq_len!r}")
        if self.state_bits not in (32, 8, 4):
            raise ValueError(f"--state-bits must be 32, 8 or 4, got {self.state_bits!r}")
        if self.int8_weights and self.method != "sltrain":
            raise ValueError("--int8-weights stores SLTrain's A, B and values: it needs --method sltrain")
        if self.parallel != "none" and self.uses_memory_stack:
            # Per-layer hooks fire before DDP's all-reduce and never on FSDP2's sharded gradients.
            raise ValueError("--per-layer, --state-bits and --int8-weights are not supported with --parallel yet")

    @property
    def uses_memory_stack(self) -> bool:
        return self.per_layer or self.state_bits != 32 or self.int8_weights

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else max(1, self.steps // 10)


# Settings a resumed run may change without changing what it computes. Not `steps`: the
# cosine schedule depends on the total, so a longer run is a different run. `parallel`: DDP,
# FSDP2 and one process compute the same updates (up to float rounding) and read each other's
# distributed checkpoints. `checkpoint_activations`: recomputation gives the same values.
RESUMABLE_FIELDS = {"out", "eval_every", "log_every", "checkpoint_every", "threads", "progress", "parallel",
                    "export", "checkpoint_activations"}


def build_model(cfg: TrainConfig, vocab_size: int) -> tuple[nn.Module, int, dict]:
    """The model for ``cfg`` with its method applied; returns ``(model, seq_len, method_info)``.

    Our LLaMA takes the paper's rank/alpha/density for its size unless overridden; a HF model
    (``--hf-config``) needs ``--rank`` and ``--alpha``.
    """
    if cfg.hf_config:
        from slcompile.recipes.models.hf import HFCausalLM, load_hf_llama_config
        hf = load_hf_llama_config(cfg.hf_config, vocab_size)
        model, max_seq = HFCausalLM(hf), hf.max_position_embeddings
        if cfg.checkpoint_activations:
            model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.method != "full" and (cfg.rank is None or cfg.alpha is None):
            raise ValueError("--hf-config needs --rank and --alpha (no paper defaults for an arbitrary shape)")
        rank, alpha, density = cfg.rank, cfg.alpha, cfg.density if cfg.density is not None else 0.03
    else:
        dim_cfg = replace(get_config(cfg.model), vocab_size=vocab_size)
        model, max_seq = Llama(dim_cfg, checkpoint_activations=cfg.checkpoint_activations), dim_cfg.max_seq_len
        rank = cfg.rank if cfg.rank is not None else dim_cfg.rank
        alpha = cfg.alpha if cfg.alpha is not None else dim_cfg.alpha
        density = cfg.density if cfg.density is not None else dim_cfg.density
    seq_len = cfg.seq_len or max_seq
    if seq_len > max_seq:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's maximum sequence length {max_seq}")
    if cfg.method == "full":
        return model.to(DTYPES[cfg.dtype]), seq_len, {}
    info = {"rank": rank, "alpha": alpha, "density": density}
    sl_cfg = SLConfig(rank=rank, alpha=alpha, density=density, seed=cfg.seed)
    if cfg.method == "sltrain":
        model, report = transform(model, sl_cfg)
    else:
        model, report = to_lowrank(model, sl_cfg, init="paper" if cfg.method == "lowrank-b0" else "matched")
    info.update(linear_params_full=report.linear_params_before, linear_params=report.linear_params_after)
    return model.to(DTYPES[cfg.dtype]), seq_len, info


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(path: Path, **state) -> None:
    """``torch.save`` to a temporary file, then rename: the old checkpoint survives any crash."""
    with atomic_path(path) as tmp:
        torch.save({"version": CHECKPOINT_VERSION, **state}, tmp)


def load_checkpoint(path: Path, cfg: TrainConfig) -> dict:
    """Load and validate ``path``; a corrupt or mismatched file is a ``ValueError`` (and is kept)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for truncated/garbled files
        raise ValueError(f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: {exc}); "
                         "it was left untouched: remove it to start over, or point --out elsewhere") from exc
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path} is not a slcompile v{CHECKPOINT_VERSION} training checkpoint")
    saved = state["config"]
    current = {k: v for k, v in _config_dict(cfg).items() if k not in RESUMABLE_FIELDS}
    mismatched = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if mismatched:
        details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in mismatched.items())
        raise ValueError(f"checkpoint {path} was written by a run with other settings ({details}); "
                         "use the same settings or another --out")
    return state


def _config_dict(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))  # tuples -> lists, as stored in checkpoints


def _parse_line(line: str) -> dict | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:  # the last line of a killed run may be cut short
        return None


def _write_jsonl_prefix(path: Path, max_step: int) -> None:
    """Drop log lines written after the checkpoint being resumed (they will be redone)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if (record := _parse_line(line)) is not None and record["step"] <= max_step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


@torch.no_grad()
def evaluate(model: nn.Module, rows: np.ndarray, batch_size: int, dtype: torch.dtype,
             ctx: DistContext = DistContext()) -> float:
    """Mean next-token cross-entropy over ``rows`` (token-weighted); ranks share the batches out."""
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


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training as ``cfg`` says; returns the summary also written to ``summary.json``.

    With ``cfg.parallel`` ``"ddp"``/``"fsdp2"``, call it on every torchrun rank.
    """
    with distributed.process_group(cfg.parallel) as ctx:
        return _train(cfg, ctx)


def _checkpoint_path(out: Path, ctx: DistContext) -> Path:
    """``checkpoint.pt`` for one process, the DCP directory ``checkpoint/`` under ``--parallel``;
    refuses a run directory that holds the other kind."""
    names = ("checkpoint", "checkpoint.pt") if ctx.enabled else ("checkpoint.pt", "checkpoint")
    path, other = out / names[0], out / names[1]
    if other.exists():
        how = ("without --parallel" if ctx.enabled else
               "under torchrun with --parallel ddp or fsdp2 (any number of ranks dividing --batch-size)")
        raise ValueError(f"{out} holds a {'single-process' if ctx.enabled else 'distributed'} checkpoint "
                         f"({other.name}): resume it {how}, or use another --out")
    return path


def _train(cfg: TrainConfig, ctx: DistContext) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ctx.check_batch_size(cfg.batch_size)
    if cfg.export and importlib.util.find_spec("safetensors") is None:
        raise ValueError("--export needs `pip install safetensors`")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = _checkpoint_path(out, ctx), out / "metrics.jsonl"
    if ctx.enabled:
        found = distributed.restore_interrupted_save(ckpt_path, ctx)
        resume = load_checkpoint(ckpt_path / distributed.META_FILE, cfg) if found else None
    else:
        resume = load_checkpoint(ckpt_path, cfg) if ckpt_path.exists() else None

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    with ctx.main_first():  # rank 0 fills the tokenizer/token cache, the others read it
        data = load_text_data(cfg.corpora, cfg.vocab_size)
    model, seq_len, info = build_model(cfg, data.vocab_size)
    data = replace(data, seq_len=seq_len)
    device = ctx.device
    train_rows, val_rows = data.train, data.val[:cfg.eval_rows]
    if len(val_rows) == 0:
        raise ValueError("the validation split is empty: use more corpora or a shorter --seq-len")
    batches = BatchIterator(train_rows, cfg.batch_size, seed=cfg.seed)
    distributed.verify_supports(model, ctx)
    model = distributed.wrap(model.to(device), ctx)
    optimizer = build_optimizer(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    dtype = DTYPES[cfg.dtype]

    start, tokens = 0, 0
    if resume is not None:
        if ctx.enabled:
            distributed.load_checkpoint(ckpt_path, model, optimizer)
        else:
            model.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        batches.load_state_dict(resume["data"])
        _set_rng_state(resume["rng"])  # rank 0's under --parallel: every rank drew the same numbers
        start, tokens = resume["step"], resume["tokens"]
        if ctx.is_main:
            _write_jsonl_prefix(log_path, start)
    elif ctx.is_main and log_path.exists():
        log_path.unlink()
    if ctx.is_main:
        (out / "config.json").write_text(json.dumps(_config_dict(cfg), indent=2) + "\n")

    trainable = sum(p.numel() for p in params)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * seq_len
    log = log_path.open("a") if ctx.is_main else None
    progress = None
    if cfg.progress and ctx.is_main:
        from tqdm import tqdm
        progress = tqdm(total=cfg.steps, initial=start, desc=cfg.method, dynamic_ncols=True, file=sys.stderr)
    train_time, val_loss = 0.0, None

    def write(record: dict) -> None:
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()

    for step in range(start, cfg.steps):
        began = time.perf_counter()
        micro_batches = [ctx.local_batch(next(batches)) for _ in range(cfg.grad_accum)]

        def forward_backward() -> float:
            """All micro-batches of one update; the mean loss (run twice by two-pass clipping)."""
            loss_sum = 0.0
            for micro, (inputs, targets) in enumerate(micro_batches):
                with distributed.gradient_sync(model, micro == cfg.grad_accum - 1):
                    loss = model(inputs, targets)
                    (loss / cfg.grad_accum).backward()
                loss_sum += float(loss.detach())
            return loss_sum / cfg.grad_accum

        grad_norm = None
        lr = optimizer.param_groups[0]["lr"]
        if cfg.per_layer and cfg.clip is not None:
            mean_loss = optimizer.step(forward_backward)  # global-norm clipping inside backward: two passes
        else:
            mean_loss = forward_backward()  # per layer: parameters are updated during this backward
            if cfg.clip is not None:
                grad_norm = distributed.clip_grad_norm(params, cfg.clip)
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_time += time.perf_counter() - began
        tokens += tokens_per_step
        loss_value = ctx.mean(mean_loss)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at step {step + 1}; lower --lr (now {cfg.lr})")
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            write({"step": done, "loss": loss_value, "lr": lr, "tokens": tokens, "grad_norm": grad_norm,
                   "tokens_per_s": tokens_per_step * (done - start) / max(train_time, 1e-9)})
        if done % cfg.eval_every == 0 or done == cfg.steps:
            val_loss = evaluate(model, val_rows, cfg.batch_size, dtype, ctx)
            write({"step": done, "val_loss": val_loss, "val_ppl": math.exp(val_loss), "tokens": tokens})
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            meta = dict(config=_config_dict(cfg), step=done, tokens=tokens, scheduler=scheduler.state_dict(),
                        data=batches.state_dict(), rng=_rng_state())
            if ctx.enabled:
                distributed.save_checkpoint(ckpt_path, model, optimizer, {"version": CHECKPOINT_VERSION, **meta},
                                            ctx)
            else:
                save_checkpoint(ckpt_path, model=model.state_dict(), optimizer=optimizer.state_dict(), **meta)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_step / (time.perf_counter() - began):.0f}")
    if progress is not None:
        progress.close()
    if log is not None:
        log.close()
    if val_loss is None:  # resumed a finished run: report its last evaluation
        val_loss = evaluate(model, val_rows, cfg.batch_size, dtype, ctx)
    if cfg.export:
        distributed.export_safetensors(model, lambda: build_model(cfg, data.vocab_size)[0], out / "model.safetensors",
                                       ctx, metadata={"method": cfg.method, "model": cfg.hf_config or cfg.model,
                                                      "step": str(cfg.steps), "seed": str(cfg.seed)})

    summary = {
        "method": cfg.method, "model": cfg.hf_config or cfg.model, "lr": cfg.lr, "steps": cfg.steps,
        "tokens": tokens, "seq_len": seq_len, "trainable_params": trainable,
        "total_params": sum(p.numel() for p in model.parameters()),
        "state_bytes": _state_bytes(params, optimizer), "peak_memory_bytes": peak_memory_bytes(device),
        "tokens_per_s": tokens_per_step * (cfg.steps - start) / train_time if train_time else None,
        "val_loss": val_loss, "val_ppl": math.exp(val_loss), "parallel": cfg.parallel,
        "world_size": ctx.world_size, **info,
    }
    if ctx.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Plain ``torch.optim.AdamW``, or ``slcompile.optim`` when the memory stack is asked for."""
    if not cfg.uses_memory_stack:
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                 weight_decay=cfg.weight_decay)
    from slcompile import optim
    return optim.build(model, lr=cfg.lr, weight_decay=cfg.weight_decay, per_layer=cfg.per_layer,
                       state_bits=cfg.state_bits, accumulation_steps=cfg.grad_accum if cfg.per_layer else 1,
                       max_grad_norm=cfg.clip if cfg.per_layer else None, int8_weights=cfg.int8_weights)


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
            parser.add_argument(flag, default=",".join(default), help="comma-separated corpus names")
        elif isinstance(default, bool):  # --export, --per-layer, --int8-weights; --no-progress
            parser.add_argument("--no-" + flag[2:] if default else flag, dest=f.name,
                                action="store_false" if default else "store_true")
        elif f.name == "parallel":
            parser.add_argument(flag, default=default, choices=PARALLEL_MODES,
                                help="data parallelism under torchrun (gloo on CPU, NCCL on GPU)")
        elif f.name in ("method", "dtype"):
            parser.add_argument(flag, default=default, choices=METHODS if f.name == "method" else list(DTYPES))
        else:
            kind = {"int": int, "float": float}.get(type(default).__name__, str)
            if default is None:
                kind = {"seq_len": int, "warmup": int, "rank": int, "threads": int,
                        "alpha": float, "density": float, "clip": float}.get(f.name, str)
            parser.add_argument(flag, type=kind, default=default)
    args = vars(parser.parse_args(argv))
    args["corpora"] = tuple(c for c in args["corpora"].split(",") if c)
    try:
        return TrainConfig(**args)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        summary = train(cfg)
    except (ValueError, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

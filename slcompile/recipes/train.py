"""Training loop and CLI: ``python -m slcompile.recipes.train --model llama-mini --method sltrain ...``.

One harness for every method (:data:`slcompile.recipes.run_config.METHODS`: ``sltrain``, ``full``, ``lowrank``, ``lowrank-b0``):
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional, TextIO

import numpy as np
import torch
from torch import nn

from slcompile.config import SLConfig
from slcompile.layers import SLLinear
from slcompile.model_configs import get_config
from slcompile.recipes import distributed
from slcompile.recipes.checkpoint import Checkpointer
from slcompile.recipes.data import BatchIterator, TextData, cache_dir, eval_batches, load_text_data
from slcompile.recipes.distributed import DistContext
from slcompile.recipes.files import RUN_MARKER, atomic_path, check_writable, locked_run_dir
from slcompile.recipes.models.llama import Llama
from slcompile.recipes.run_config import (DTYPES, FACTOR_FLAGS, METHODS, TrainConfig, check_hf_config,
                                          check_resumable, config_dict, parse_args)
from slcompile.recipes.schedule import build_scheduler

EXIT_STOPPED = 75  # EX_TEMPFAIL: a signal stopped the run after a checkpoint; rerunning resumes it


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
            _write_json(out / "config.json", config_dict(cfg))
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
    meta = dict(config=config_dict(run.cfg), step=run.step, tokens=run.tokens, skipped=run.skipped,
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

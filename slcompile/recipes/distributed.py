"""Data-parallel training under ``torchrun``: DDP or FSDP2, sharded checkpoints, safetensors export.

``torchrun --nproc_per_node N -m slcompile.recipes.train --parallel ddp|fsdp2 ...`` runs one process per
rank: gloo on CPU, NCCL (one GPU per rank, ``cuda:LOCAL_RANK``) when CUDA is available.

- Supports: every rank builds the model from the same seed, so each ``SLLinear`` support (derived
  from ``(seed, module name, shape)``) is identical everywhere by construction;
  :func:`verify_supports` checks that at start-up with two tiny all-reduces of checksums.
  Supports are never broadcast (DDP runs with ``broadcast_buffers=False``) nor sharded (FSDP2
  shards parameters only: ``A``, ``B``, ``values`` shard like any other parameter).
- Data: every rank draws the same global batch and keeps its contiguous slice of
  ``batch_size / world_size`` rows (:meth:`DistContext.local_batch`), so a global step sees the
  rows a single process sees; with gradients averaged over ranks (DDP all-reduce, FSDP2
  reduce-scatter) and equal slices, the update equals the single-process one up to float
  rounding.
- Checkpoints: see :mod:`slcompile.recipes.checkpoint` (DCP shards under ``--parallel``).
- Failures: :meth:`DistContext.all_or_none` turns an error on some ranks into an error on every
  rank (no rank is left waiting in a collective until the process-group timeout).
- Export: :func:`export_safetensors` gathers the full state on rank 0 and writes one
  ``safetensors`` file of the merged dense model.

With ``slcompile.optim``'s per-layer optimizer (``--per-layer``: AdamW in each parameter's
post-accumulate-grad hook), no update ever uses a local gradient:

- FSDP2: after each reduce-scatter, FSDP2 assigns the sharded parameter's averaged gradient shard
  and then runs that parameter's post-accumulate-grad hooks (``foreach_reduce`` in
  ``torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py``): the shard is updated there and
  its gradient freed. With ``--grad-accum`` every micro-batch reduce-scatters (see
  :func:`gradient_sync`; so with any ``slcompile.optim`` optimizer, which counts the backward
  passes in these hooks), so only sharded gradients are kept between micro-batches.
- DDP: its bucketed all-reduce would finish after the hooks fire, so :func:`wrap` leaves the
  model unwrapped (parameters broadcast from rank 0 instead) and the optimizer averages each
  gradient over the ranks in its hook before using it (``data_parallel``).

Optimizer states (quantized ones too) are checkpointed as dense tensors of their parameter's
shape (``DTensor`` shards under FSDP2), so DCP reshards them to any world size.
``--int8-weights`` needs ``--per-layer`` (an ``Int8Weight`` is stepped in its hook: averaged
gradient or shard, then dequantize, step, stochastic requantize; refused by ``train.py`` otherwise).
DDP: every rank draws the same rounding noise from the same seed. FSDP2: ``slcompile.optim.build``
quantizes each rank's shards after ``fully_shard`` (``A``/``B`` rows with their per-row scales, a
``values`` shard with its own scale), FSDP2 all-gathers int8 codes plus fp32 scales
(``Int8Weight.fsdp_pre_all_gather``), and each shard is requantized in its hook with noise of the
shard's shape, so the run does not draw one process's rounding noise (it matches one process up
to that noise, not to float rounding).
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import math
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from slcompile.recipes.files import atomic_path
from slcompile.layers import SLLinear
from slcompile.optim.int8_weights import Int8Weight

PARALLEL_MODES = ("none", "ddp", "fsdp2")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

DEFAULT_TIMEOUT_S = 300.0  # a stuck rank is reported after 5 minutes, not torch's 30

Batch = tuple[Tensor, Tensor]


class RankFailed(ValueError):
    """Another rank failed; this one stops with it (the cause is in that rank's output)."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its parallel mode, rank, world size and compute device."""

    parallel: str = "none"
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.parallel != "none"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes logs, summaries and exports."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on some rank (every rank gets the same answer)."""
        if not self.enabled:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    @contextlib.contextmanager
    def all_or_none(self, what: str) -> Iterator[None]:
        """Run the body on every rank; if it fails on some rank, fail on all: that rank re-raises its
        own error, the others a :class:`RankFailed` pointing to it."""
        error = None
        try:
            yield
        except Exception as exc:  # re-raised below, once the ranks have agreed
            error = exc
        if self.any(error is not None):
            if error is not None:
                raise error
            raise RankFailed(f"another rank failed while {what}; its error is printed above")

    def from_main(self, flags: list[bool]) -> list[bool]:
        """Rank 0's ``flags`` on every rank (ranks may decide differently, e.g. from a calibration)."""
        if not self.enabled:
            return flags
        values = torch.tensor([int(f) for f in flags], dtype=torch.int64, device=self.device)
        dist.broadcast(values, src=0)
        return [bool(v) for v in values.tolist()]

    def check_batch_size(self, batch_size: int) -> None:
        """``ValueError`` unless the global batch splits into equal slices, one per rank."""
        if batch_size % self.world_size:
            raise ValueError(f"--batch-size {batch_size} must be divisible by the world size {self.world_size}: "
                             "each rank takes an equal slice of the global batch, so that the average of the "
                             "ranks' losses and gradients is the single-process one")

    def local_batch(self, batch: Batch) -> Batch:
        """This rank's rows ``[rank * b / world, (rank + 1) * b / world)`` of a global batch, on its device."""
        self.check_batch_size(len(batch[0]))
        per_rank = len(batch[0]) // self.world_size
        rows = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        return tuple(t[rows].to(self.device) for t in batch)

    def mean(self, value: float) -> float:
        """Average of ``value`` over ranks (the global mean loss from the per-rank means)."""
        if not self.enabled:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total) / self.world_size

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over ranks (float64)."""
        if not self.enabled:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.tolist()


@contextlib.contextmanager
def process_group(parallel: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[DistContext]:
    """The :class:`DistContext` for ``parallel``; joins (and finally leaves) the torchrun process group.

    ``"none"``: a single process on the CPU; refused when torchrun started several processes (they
    would all write the same run directory). ``"ddp"``/``"fsdp2"``: needs torchrun's environment
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); NCCL on
    ``cuda:LOCAL_RANK`` when CUDA is available, else gloo on the CPU. A process group that already
    exists (a caller's) is used as is and left open.

    Leaving after success waits at a barrier, destroys the group, then collects garbage: the
    model (FSDP2's device mesh, DDP's reducer) keeps process-group objects alive in reference
    cycles, and a gloo group first freed during interpreter exit can abort (``terminate called
    without an active exception``, SIGABRT), turning a finished run into a failed one.
    """
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"--parallel must be one of {', '.join(PARALLEL_MODES)}, got {parallel!r}")
    if parallel == "none":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(f"started as one of WORLD_SIZE={os.environ['WORLD_SIZE']} processes (torchrun?) "
                             "without --parallel: pass --parallel ddp or --parallel fsdp2")
        yield DistContext()
        return
    missing = [name for name in TORCHRUN_VARS if name not in os.environ]
    if missing and not dist.is_initialized():
        raise ValueError(f"--parallel {parallel} needs the torchrun environment (missing {', '.join(missing)}): "
                         f"launch with `torchrun --nproc_per_node N -m slcompile.recipes.train --parallel {parallel} ...`")
    owned = not dist.is_initialized()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if owned:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    ctx = DistContext(parallel, dist.get_rank(), dist.get_world_size(), device)
    try:
        yield ctx
        ctx.barrier()
    finally:
        if owned:
            dist.destroy_process_group()
            gc.collect()


def support_checksum(model: nn.Module) -> dict[str, int]:
    """A 63-bit checksum of every ``SLLinear``'s support (and shape), by module name, in module order.

    Call it on the unwrapped model so names carry no wrapper prefix. Hashes the int32 indices on
    the CPU: about a second per GB of support, once per run.
    """
    sums = {}
    for name, layer in model.named_modules():
        if isinstance(layer, SLLinear):
            digest = hashlib.blake2b(digest_size=8)
            digest.update(f"{name}:{layer.out_features}x{layer.in_features}:{layer.nnz}".encode())
            digest.update(layer.support.detach().cpu().numpy().tobytes())
            sums[name] = int.from_bytes(digest.digest(), "little") >> 1
    return sums


def verify_supports(model: nn.Module, ctx: DistContext) -> None:
    """Check that every rank holds the same ``SLLinear`` supports; ``ValueError`` names the first that differs.

    Two small all-reduces (MAX of ``[x, -x]`` gives max and min at once): the number of layers,
    then the per-layer checksums. Every rank sees the same reductions, so all raise together.
    """
    if not ctx.enabled:
        return
    sums = support_checksum(model)

    def spread(values: list[int]) -> tuple[list[int], list[int]]:
        both = torch.tensor(values + [-v for v in values], dtype=torch.int64, device=ctx.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        high, low = both.tolist()[:len(values)], [-v for v in both.tolist()[len(values):]]
        return low, high

    (fewest,), (most,) = spread([len(sums)])
    if fewest != most:
        raise ValueError(f"ranks hold different numbers of SLLinear layers (between {fewest} and {most}; "
                         f"rank {ctx.rank} has {len(sums)}): every rank must build the same model")
    if not sums:
        return
    low, high = spread(list(sums.values()))
    for (name, mine), lo, hi in zip(sums.items(), low, high):
        if lo != hi:
            raise ValueError(f"the sparse support of SLLinear {name!r} differs across ranks (checksum "
                             f"{mine:#x} on rank {ctx.rank}, range {lo:#x}..{hi:#x}): every rank must build the "
                             "model with the same --seed, SLConfig and module names")


def wrap(model: nn.Module, ctx: DistContext, per_layer: bool = False) -> nn.Module:
    """``model`` (already on ``ctx.device``) under DDP or FSDP2; unchanged for ``"none"``.

    FSDP2 (``fully_shard``) shards each child of the model's ``nn.ModuleList`` blocks (the decoder
    layers), then the root (embeddings, final norm, head). Build the optimizer after this: FSDP2
    replaces the parameters by ``DTensor`` shards. DDP with ``per_layer``: the model stays
    unwrapped, its parameters broadcast from rank 0 (as DDP would); the per-layer optimizer
    averages the gradients.
    """
    if ctx.parallel == "ddp" and per_layer:
        with torch.no_grad():
            for param in model.parameters():
                for tensor in (param.codes, param.scale) if isinstance(param, Int8Weight) else (param,):
                    dist.broadcast(tensor, src=0)
        return model
    if ctx.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        # Buffers stay per-rank: the supports are identical (verify_supports), RoPE tables are derived.
        return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                       broadcast_buffers=False)
    if ctx.parallel == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        for block in _blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def _blocks(model: nn.Module) -> list[nn.Module]:
    """Children of the outermost ``nn.ModuleList``s of ``model`` (transformer blocks)."""
    blocks: list[nn.Module] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(p + ".") for p in inside):
            blocks.extend(module)
            inside.append(name)
    return blocks


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce/reduce-scatter inside the body unless ``enabled`` (gradient
    accumulation: only the last micro-batch of a step communicates; with ``slcompile.optim`` under
    FSDP2 pass ``True`` for every micro-batch: its hooks run after each reduce-scatter)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def clip_grad_norm(params: list[Tensor], max_norm: float) -> float:
    """``clip_grad_norm_`` over all ranks' gradients (FSDP2's are sharded ``DTensor``s); the total norm."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def eval_assignment(num_batches: int, ctx: DistContext) -> list[tuple[int, bool]]:
    """The evaluation batches of this rank as ``(index, counts)``: round-robin over ranks, padded so
    every rank runs the same number of forwards (FSDP2's collectives need it); padding repeats
    batch 0 and does not count."""
    per_rank = math.ceil(num_batches / ctx.world_size)
    indices = [ctx.rank + i * ctx.world_size for i in range(per_rank)]
    return [(i, True) if i < num_batches else (0, False) for i in indices]


def full_state_dict(model: nn.Module, ctx: DistContext) -> dict[str, Tensor]:
    """The whole model's state on rank 0's CPU (gathered from FSDP2 shards); ``{}`` on other ranks."""
    if not ctx.enabled:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_safetensors(model: nn.Module, skeleton: Callable[[], nn.Module], path: Path, ctx: DistContext,
                       metadata: Optional[dict[str, str]] = None) -> None:
    """Write the merged dense model (``slcompile.merge``: every ``SLLinear`` becomes an ``nn.Linear``
    holding ``W``) as one ``safetensors`` file, from rank 0; collective (every rank must call it).

    ``skeleton()`` builds the unwrapped architecture (it runs on the meta device: no memory);
    the gathered state is assigned into it, merged and saved atomically.
    """
    from safetensors.torch import save_model

    from slcompile.transform import merge
    state = full_state_dict(model, ctx)
    if ctx.is_main:
        with torch.device("meta"):
            dense = skeleton()
        dense.load_state_dict(state, assign=True)
        dense = merge(dense)
        with atomic_path(path) as tmp:
            save_model(dense, str(tmp), metadata=metadata, force_contiguous=True)
    ctx.barrier()


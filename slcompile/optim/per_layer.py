"""AdamW fused into backward: each parameter is updated in its post-accumulate-grad hook and its
gradient freed at once, so at most one layer's gradients are alive.

:class:`PerLayerOptimizer` subclasses ``torch.optim.Optimizer`` so LR schedulers, checkpoints and
ordinary training loops drive it unchanged::

    for i, batch in enumerate(loader):          # accumulation_steps = k
        (model(batch).loss / k).backward()      # per layer: the k-th backward updates as it goes
        if (i + 1) % k == 0:
            opt.step()                          # bookkeeping (checks the k backward passes)
            scheduler.step()                    # once per update, never more
            opt.zero_grad()

Contract:

- One inner AdamW per parameter (``torch.optim.AdamW`` or torchao ``AdamW8bit``/``AdamW4bit``,
  see :mod:`slcompile.optim.lowbit`); its hyperparameters are copied from the wrapper's
  ``param_groups`` right before each update, so a scheduler writing ``group["lr"]`` reaches them.
  The wrapper's ``state[p]`` *is* the inner optimizer's state dict, so ``state_dict()`` has the
  standard layout (indices in group order) and round-trips every state, quantized ones included
  (a state padded for block quantization is flat, of the padded length).
- Backward passes are counted (end of each backward is detected with an autograd-engine
  callback). With ``accumulation_steps = k`` the first ``k - 1`` backward passes only accumulate
  ``.grad``; in the ``k``-th each parameter is updated as soon as its gradient is complete;
  parameters that got no gradient in that pass but have one from earlier passes are updated
  in ``step()``. ``step()`` after ``j < k`` backward passes raises; so does a backward pass that
  would start a new accumulation cycle before ``step()`` closed the previous update: a loop
  that accumulates without telling the optimizer can never silently get ``k`` updates.
- ``per_layer=False`` keeps the same object but updates in ``step()`` after backward (gradients
  kept, as any optimizer): same results, no memory saving, and plain global-norm clipping.
- Clipping (``max_grad_norm``): ``clip="per_param"`` clips each gradient by its own norm (works
  in the hook). ``clip="global"`` needs every gradient's norm before any update:
  with ``per_layer=False`` it is ``clip_grad_norm_`` in ``step()``; with ``per_layer=True`` it is a
  two-pass ``step(closure)``: the closure (forward + ``k`` backward passes) runs once with the
  hooks only measuring and freeing gradients, then again with the same RNG state (dropout
  repeats) updating each parameter with ``grad * min(1, max_norm / (norm + 1e-6))``. That costs
  a second forward and backward per update; a plain ``loss.backward()`` raises instead.
- Parameters stored as :class:`~slcompile.optim.int8_weights.Int8Weight` (or ``DTensor``s of
  ``Int8Weight`` shards under FSDP2: the local shard) are dequantized into a transient
  full-precision tensor for their update and written back with stochastic rounding.

Data parallelism:

- FSDP2 (``DTensor`` parameters): FSDP2's reduce-scatter assigns each sharded parameter's
  averaged gradient shard and then runs that parameter's post-accumulate-grad hooks
  (``torch.distributed.fsdp._fully_shard._fsdp_collectives.foreach_reduce``), so the update runs
  on the local shard right after its reduce-scatter. Accumulation needs a reduce-scatter in every
  backward pass (``set_requires_gradient_sync(True)``): FSDP2 then sums the shards in ``.grad``
  and the hooks count the passes. The global norm sums the shards' squared norms over the
  mesh dimension they are sharded along (HSDP: not over the replicas, which hold the same
  shards), plus once the squared norms of parameters FSDP2 left unsharded.
- DDP: its bucketed all-reduce finishes after the hooks fire, so do not wrap the model in
  ``DistributedDataParallel``; pass ``data_parallel=group`` instead: in the ``k``-th backward
  pass each gradient is averaged over ``group`` (one all-reduce per parameter, in the hook order,
  which is the same on every rank) before it is measured or applied. No local gradient is ever
  applied.
- ``dense_state_dict`` (forced for ``DTensor`` parameters): states leave ``state_dict()`` as
  tensors of their parameter's shape and dtype (``DTensor`` shards for a sharded parameter;
  quantized states dequantized, padding cut; zeros for a parameter never stepped) and are
  requantized by ``load_state_dict``, so ``torch.distributed.checkpoint`` reshards them to any
  world size.

Not supported with ``per_layer=True`` (use ``per_layer=False``): fp16 ``GradScaler`` (it unscales
and skips steps after backward), compiled autograd. Every backward pass that reaches the
parameters counts as a micro-batch.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Variable
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from slcompile._validate import check_bool, check_int, check_number
from slcompile.optim import lowbit
from slcompile.optim.int8_weights import Int8Weight

__all__ = ["PerLayerOptimizer"]

CLIP_MODES = ("global", "per_param")
STATE_KEYS = ("exp_avg", "exp_avg_sq")  # AdamW's tensors besides ``step`` (torch and torchao alike)


def _shard_group(param: DTensor) -> dist.ProcessGroup:
    """The process group ``param`` is sharded over: its one ``Shard`` mesh dimension (FSDP2's
    only dimension, HSDP's second; replicas along other dimensions hold the same shards)."""
    mesh, placements = param.device_mesh, param.placements
    dims = [i for i, placement in enumerate(placements) if placement.is_shard()]
    if len(dims) != 1:
        raise NotImplementedError(f"PerLayerOptimizer: a parameter with placements {placements}: exactly one "
                                  "Shard mesh dimension (FSDP2, HSDP) is supported")
    return mesh.get_group(dims[0]) if mesh.ndim > 1 else mesh.get_group()


def _local(tensor: Tensor) -> Tensor:
    """The local shard of a ``DTensor``, else the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class _Slot:
    """One parameter as its inner optimizer sees it.

    ``key`` is the tensor the inner optimizer steps: the parameter itself, or a stand-in that
    holds a full-precision copy (and the gradient) only during the update and is empty
    otherwise. A stand-in is used for an ``Int8Weight`` (dequantized copy, written back with
    stochastic rounding), for a tensor whose quantized states need padding to a whole number
    of blocks (flat zero-padded copy, see :func:`lowbit.state_numel`) and for a ``DTensor``
    (its local shard, so the states are plain tensors of the shard, padded per shard).
    """

    def __init__(self, param: Tensor, group: dict[str, Any], state_bits: int) -> None:
        self.param, self.group, self.state_bits = param, group, state_bits
        self.quantized = isinstance(_local(param), Int8Weight)
        self.sharded = isinstance(param, DTensor)
        self.local_shape = _local(param).shape
        numel = math.prod(self.local_shape)
        self.padding = lowbit.state_numel(numel, state_bits) - numel
        self.stand_in = self.quantized or self.sharded or self.padding > 0
        self.key = self._empty() if self.stand_in else param
        self.inner = lowbit.make_adamw([self.key], state_bits, **{k: group[k] for k in lowbit.HYPERPARAMS})

    def _empty(self) -> Tensor:
        return torch.empty(0, dtype=self.param.dtype, device=self.param.device)

    def _padded(self, tensor: Tensor) -> Tensor:
        if not self.padding:
            return tensor
        flat = tensor.reshape(-1)
        return torch.cat([flat, flat.new_zeros(self.padding)])

    @torch.no_grad()
    def update(self, context: Callable[[], contextlib.AbstractContextManager]) -> None:
        """One AdamW step from ``param.grad`` (already clipped), with the group's current hyperparameters."""
        lowbit.sync_hyperparams(self.inner, self.group)
        if not self.stand_in:
            with context():
                self.inner.step()
            return
        self.key.data = self._padded(self._value())
        self.key.grad = self._padded(_local(self.param.grad))
        try:
            with context():
                self.inner.step()
            new = self.key.data.reshape(-1)[:self.key.numel() - self.padding].view(self.local_shape)
            if self.quantized:
                _local(self.param).requantize_(new, stochastic=True)
            else:
                _local(self.param).copy_(new)
        finally:
            self.key.grad = None
            self.key.data = self._empty()

    def _value(self) -> Tensor:
        """The full-precision local value, ``local_shape``."""
        return _local(self.param).dequantize() if self.quantized else _local(self.param).detach()

    def dense_state(self) -> dict[str, Tensor]:
        """The AdamW state as ``step`` plus tensors of the parameter's shape and dtype (``DTensor``
        shards for a sharded parameter): quantized states dequantized, padding cut, zeros if the
        parameter never stepped."""
        state = self.inner.state[self.key]
        dense = {"step": state.get("step", torch.tensor(0.0))}
        for name in STATE_KEYS:
            value = state.get(name)
            if value is None:
                local = torch.zeros(self.local_shape, dtype=self.param.dtype, device=self.param.device)
            else:
                plain = value if type(value) is Tensor else value.dequantize()  # torchao's subclasses
                local = plain.reshape(-1)[:math.prod(self.local_shape)].view(self.local_shape).to(self.param.dtype)
            dense[name] = (DTensor.from_local(local, self.param.device_mesh, self.param.placements, run_check=False,
                                              shape=self.param.shape, stride=self.param.stride())
                           if self.sharded else local)
        return dense

    def load_dense_state(self, dense: dict[str, Tensor]) -> dict[str, Tensor]:
        """The inner optimizer's state from :meth:`dense_state`'s layout (requantized on this
        slot's blocks: a checkpoint of another world size may have cut the blocks elsewhere).
        Buffers come from torchao's ``_new_buffer`` (private, torchao 0.18), so the quantize-or-not
        rule is the one of its first step."""
        if self.state_bits == 32 and not self.stand_in:
            return dense
        state = {"step": dense["step"]}
        if self.stand_in:
            self.key.data = self._padded(self._value())  # _new_buffer reads the key's length and device
        try:
            for name in STATE_KEYS:
                value = self._padded(_local(dense[name]).to(self.key.dtype))
                if self.state_bits == 32:
                    state[name] = value.clone()
                else:
                    state[name] = self.inner._new_buffer(self.key, signed=name == "exp_avg")
                    state[name].copy_(value)
        finally:
            if self.stand_in:
                self.key.data = self._empty()
        return state


class PerLayerOptimizer(Optimizer):
    """AdamW whose update runs inside backward (``per_layer=True``) or in ``step()`` (``False``).

    Args:
        params: tensors or param-group dicts (as for any torch optimizer); groups may override
            ``lr``, ``betas``, ``eps``, ``weight_decay``.
        lr, betas, eps, weight_decay: AdamW hyperparameters (decoupled weight decay).
        state_bits: 32 (``torch.optim.AdamW``), 8 or 4 (torchao ``AdamW8bit``/``AdamW4bit``).
        per_layer: update in each parameter's post-accumulate-grad hook and free its gradient.
        accumulation_steps: backward passes per update (``k``); see the module docstring.
        max_grad_norm: clip gradients to this norm (``None``: no clipping).
        clip: ``"global"`` (one norm over all gradients, as ``clip_grad_norm_``) or ``"per_param"``.
        compile_step: let torchao compile its step (8/4-bit only; ``False`` runs it eagerly).
        data_parallel: average each gradient over this process group before using it (DDP-style
            data parallelism on an unwrapped model; see the module docstring).
        dense_state_dict: states in ``state_dict()`` as tensors of their parameter's shape (what
            ``torch.distributed.checkpoint`` reshards); forced for ``DTensor`` parameters.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], *, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 state_bits: int = 32, per_layer: bool = True, accumulation_steps: int = 1,
                 max_grad_norm: float | None = None, clip: str = "global", compile_step: bool = True,
                 data_parallel: dist.ProcessGroup | None = None, dense_state_dict: bool = False) -> None:
        if state_bits not in lowbit.STATE_BITS or isinstance(state_bits, bool):
            raise ValueError(f"state_bits must be one of {lowbit.STATE_BITS}, got {state_bits!r}")
        check_bool("per_layer", per_layer)
        check_bool("compile_step", compile_step)
        check_bool("dense_state_dict", dense_state_dict)
        if data_parallel is not None and not per_layer:
            raise ValueError("data_parallel averages gradients in the hooks of per_layer=True; with per_layer=False "
                             "wrap the model in DistributedDataParallel instead")
        check_int("accumulation_steps", accumulation_steps, 1)
        if max_grad_norm is not None:
            check_number("max_grad_norm", max_grad_norm, 0.0, open_low=True)
        if clip not in CLIP_MODES:
            raise ValueError(f"clip must be one of {CLIP_MODES}, got {clip!r}")
        self.state_bits, self.per_layer, self.compile_step = state_bits, per_layer, compile_step
        self.accumulation_steps, self.max_grad_norm, self.clip = accumulation_steps, max_grad_norm, clip
        self.data_parallel, self.dense_state_dict = data_parallel, dense_state_dict
        self._norm_group: dist.ProcessGroup | None = None  # where shards' squared norms are summed
        self._slots: dict[Tensor, _Slot] = {}
        self._hooks: list[Any] = []
        self._micro_batches = 0          # backward passes completed in the current accumulation cycle
        self._ready = False              # a cycle completed and step() has not closed it yet
        self._graph_task: int | None = None
        self._measuring = False          # first pass of a two-pass global clip: norms only
        self._in_closure = False
        self._norms: list[Tensor] = []  # of local shards (summed over _norm_group)
        self._plain_norms: list[Tensor] = []  # of whole, unsharded gradients (counted once)
        self._total_norm: Tensor | None = None
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    # -- construction ------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_number("lr", group["lr"], 0.0)
        check_number("eps", group["eps"], 0.0)
        check_number("weight_decay", group["weight_decay"], 0.0)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
        for i, beta in enumerate(betas):
            check_number(f"betas[{i}]", beta, 0.0, 1.0, open_high=True)
        group["betas"] = tuple(betas)
        for param in group["params"]:
            if not param.requires_grad:
                raise ValueError("PerLayerOptimizer: every parameter must require grad "
                                 "(pass only trainable ones, e.g. [p for p in model.parameters() if p.requires_grad])")
            if not param.is_floating_point():
                raise ValueError(f"PerLayerOptimizer: parameters must be floating point, got {param.dtype}")
            slot = _Slot(param, group, self.state_bits)
            if slot.sharded:
                self.dense_state_dict = True
                shard_group = _shard_group(param)
                if self._norm_group is not None and shard_group is not self._norm_group:
                    raise ValueError("PerLayerOptimizer: parameters sharded over different process groups; "
                                     "global-norm clipping needs one")
                self._norm_group = shard_group
                self._norm_device = param.device  # NCCL reduces only device tensors
            self._slots[param] = slot
            self.state[param] = slot.inner.state[slot.key]  # one dict, seen by both
            self._hooks.append(param.register_post_accumulate_grad_hook(self._on_grad))

    def remove_hooks(self) -> None:
        """Detach the optimizer from the parameters (no more counting or in-backward updates)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # -- backward-time machinery ---------------------------------------------------------------
    @property
    def _two_pass(self) -> bool:
        return self.per_layer and self.max_grad_norm is not None and self.clip == "global"

    def _on_grad(self, param: Tensor) -> None:
        # The id of the running backward (private but stable API): the first hook of each backward
        # queues the end-of-backward callback; an aborted backward cannot leave a stale flag.
        task = torch._C._current_graph_task_id()
        if task != self._graph_task:
            self._begin_backward(task)
        if self.per_layer and self._micro_batches + 1 == self.accumulation_steps:
            self._finish(self._slots[param])

    def _begin_backward(self, task: int) -> None:
        if self._ready:
            raise RuntimeError(
                f"PerLayerOptimizer: a new backward pass started after an update ({self.accumulation_steps} "
                "backward pass(es)) without optimizer.step(). Call step() once per update (then the LR "
                "scheduler); to accumulate gradients over k backward passes build the optimizer with "
                "accumulation_steps=k.")
        if self._two_pass and not self._in_closure:
            raise RuntimeError(
                "PerLayerOptimizer: per_layer=True with global-norm clipping needs the norm of all "
                "gradients before any update: run forward and backward inside optimizer.step(closure) "
                "(two passes), or use clip='per_param', or per_layer=False.")
        self._graph_task = task
        Variable._execution_engine.queue_callback(self._end_backward)

    def _end_backward(self) -> None:
        self._graph_task = None
        self._micro_batches += 1
        if self._micro_batches < self.accumulation_steps:
            return
        self._micro_batches = 0
        if self._measuring:
            for slot in self._slots.values():  # idle in this pass but holding earlier gradients
                if slot.param.grad is not None:
                    self._finish(slot)
            self._total_norm = self._global_norm()
            self._norms, self._plain_norms = [], []
        else:
            self._ready = True

    def _global_norm(self) -> Tensor | None:
        """The norm of all gradients of this update from the measured ones (local shards' norms
        under FSDP2: their squares are summed over the mesh)."""
        if self._norm_group is None:
            return torch.nn.utils.get_total_norm(self._plain_norms) if self._plain_norms else None
        squares = (torch.stack(self._norms).square().sum() if self._norms
                   else torch.zeros((), device=self._norm_device))
        dist.all_reduce(squares, group=self._norm_group)  # every rank measures (possibly empty) shards
        if self._plain_norms:
            squares = squares + torch.stack(self._plain_norms).to(squares.device).square().sum()
        return squares.sqrt()

    def _finish(self, slot: _Slot) -> None:
        """The gradient of ``slot`` is final for this update: average it over ``data_parallel``,
        then measure it, or clip and apply it."""
        param = slot.param
        grad = param.grad
        if grad is None:
            return
        if grad.is_sparse:
            raise RuntimeError("PerLayerOptimizer does not support sparse gradients")
        if self.data_parallel is not None:
            dist.all_reduce(grad, group=self.data_parallel)  # gloo has no AVG: sum, then divide
            grad.div_(dist.get_world_size(self.data_parallel))
        if self._measuring:
            norms = self._norms if slot.sharded else self._plain_norms
            norms.append(torch.linalg.vector_norm(_local(grad), dtype=torch.float32))
            param.grad = None
            return
        if self.max_grad_norm is not None and self.clip == "per_param":
            torch.nn.utils.clip_grad_norm_([param], self.max_grad_norm, foreach=False)
        elif self._two_pass and self._total_norm is not None:
            # clip_grads_with_norm_'s arithmetic, on the local tensor (a DTensor gradient and a plain norm do not mix)
            _local(grad).mul_((self.max_grad_norm / (self._total_norm + 1e-6)).clamp(max=1.0))
        slot.update(self._step_context)
        if self.per_layer:
            param.grad = None

    def _step_context(self) -> contextlib.AbstractContextManager:
        return lowbit.step_context(self.state_bits, self.compile_step)

    # -- the optimizer surface -------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Close one update. Per layer: the parameters were updated during backward; this applies
        what is left (gradients of parameters idle in the last backward pass) and checks the count
        of backward passes. ``per_layer=False``: clip and update from ``.grad``, as usual.
        With per-layer global-norm clipping ``closure`` is required and runs twice."""
        if self._two_pass:
            return self._two_pass_step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_cycle_complete()
        if not self.per_layer and self.max_grad_norm is not None and self.clip == "global":
            grads = [p for p in self._slots if p.grad is not None]
            if grads:
                torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm)
        self._apply_pending()
        self._ready = False
        return loss

    def _check_cycle_complete(self) -> None:
        if self._micro_batches:
            raise RuntimeError(
                f"PerLayerOptimizer.step() after {self._micro_batches} of accumulation_steps="
                f"{self.accumulation_steps} backward passes: the update happens on the "
                f"{self.accumulation_steps}-th. Run the remaining micro-batches first (or rebuild with "
                "the accumulation_steps your loop uses).")

    def _apply_pending(self) -> None:
        for slot in self._slots.values():
            if slot.param.grad is not None:
                self._finish(slot)

    def _two_pass_step(self, closure: Callable[[], Any] | None) -> Any:
        if closure is None:
            raise RuntimeError("PerLayerOptimizer: per_layer=True with clip='global' and max_grad_norm "
                               "updates in step(closure): the closure runs forward and backward (all "
                               "accumulation_steps passes) and is called twice.")
        self._check_cycle_complete()
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        self._in_closure = True
        try:
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                self._measuring = True
                closure()
            self._measuring = False
            if self._micro_batches or self._total_norm is None:
                raise RuntimeError(self._closure_error("first"))
            with torch.enable_grad():
                loss = closure()
            if self._micro_batches or not self._ready:
                raise RuntimeError(self._closure_error("second"))
            self._apply_pending()
        finally:
            self._in_closure = self._measuring = False
            self._norms, self._plain_norms, self._total_norm = [], [], None
            self._micro_batches, self._ready = 0, False
        return loss

    def _closure_error(self, which: str) -> str:
        return (f"PerLayerOptimizer.step(closure): the {which} call of the closure did not complete "
                f"accumulation_steps={self.accumulation_steps} backward passes with gradients")

    def state_dict(self) -> dict[str, Any]:
        """Standard layout: ``{"state": {index: {...}}, "param_groups": [...]}``; parameters that
        never stepped have no entry (as in ``torch.optim``), except with ``dense_state_dict``
        (every parameter, dense states; see :meth:`_Slot.dense_state`)."""
        packed = super().state_dict()
        if self.dense_state_dict:
            params = [p for group in self.param_groups for p in group["params"]]
            packed["state"] = {index: self._slots[param].dense_state() for index, param in enumerate(params)}
        else:
            packed["state"] = {index: state for index, state in packed["state"].items() if state}
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # replaces self.state and the group dicts
        for group in self.param_groups:
            for param in group["params"]:
                slot = self._slots[param]
                slot.group = group
                if self.dense_state_dict and self.state[param]:
                    self.state[param] = slot.load_dense_state(self.state[param])
                slot.inner.state[slot.key] = self.state[param]

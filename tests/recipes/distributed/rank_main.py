"""One rank of a distributed test run: ``slcompile.recipes.train.main`` plus a fault set by ``SLCOMPILE_TEST_FAULT``.

- ``support``: rank 1 changes one support index of ``layers.0.self_attn.q_proj`` after building
  its model (as a rank with another seed or model definition would).
- ``crash-after:K``: every rank dies (``os._exit``, no clean-up, like a kill) right after the
  checkpoint of step ``K`` is complete.
- ``updates-in-backward``: an optimizer update outside a backward pass raises (the per-layer
  optimizer must update each parameter in its post-accumulate-grad hook, e.g. right after
  FSDP2's reduce-scatter, never later in ``step()``).
- ``int8-shards``: every ``Int8Weight`` all-gather input must be int8 codes plus fp32 scales of the
  padded shard, and every update of an int8 factor must find a ``DTensor`` whose local tensor is
  an ``Int8Weight`` shard (fewer rows than the parameter) with int8 codes; each rank prints
  ``INT8 rank=R gathers=G updates=U dtypes=D`` at the end (``D``: the dtypes FSDP2 all-gathered).

Several faults are joined by ``+``.
"""
import os
import sys

import torch
from torch.distributed.fsdp._fully_shard import _fsdp_collectives
from torch.distributed.tensor import DTensor

from slcompile.optim import Int8Weight, per_layer
from slcompile.recipes import checkpoint, train

CORRUPTED_LAYER = "layers.0.self_attn.q_proj"
COUNTS = {"gathers": 0, "updates": 0, "dtypes": set()}


def _install_fault(fault: str) -> None:
    if fault == "support" and os.environ["RANK"] == "1":
        build = train.build_model

        def corrupted(cfg, vocab_size):
            model, seq_len, info = build(cfg, vocab_size)
            model.get_submodule(CORRUPTED_LAYER).support[0] += 1
            return model, seq_len, info

        train.build_model = corrupted
    elif fault.startswith("crash-after:"):
        crash_step, save = int(fault.split(":")[1]), checkpoint.Checkpointer.save

        def save_then_die(self, model, optimizer, meta):
            save(self, model, optimizer, meta)
            if meta["step"] == crash_step:
                os._exit(17)

        checkpoint.Checkpointer.save = save_then_die
    elif fault == "updates-in-backward":
        update = per_layer._Slot.update

        def update_in_backward(self, context):
            if torch._C._current_graph_task_id() == -1:
                raise RuntimeError("a per-layer update ran outside backward")
            update(self, context)

        per_layer._Slot.update = update_in_backward
    elif fault == "int8-shards":
        pre_all_gather, update, all_gather = (Int8Weight.fsdp_pre_all_gather, per_layer._Slot.update,
                                              _fsdp_collectives.DefaultAllGather.__call__)

        def checked_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
            (codes, scale), meta = pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy)
            rows = -(-outer_size[0] // mesh.size())
            assert codes.dtype == torch.int8 and codes.shape == (rows, *outer_size[1:]), (codes.dtype, codes.shape)
            assert scale.dtype == torch.float32 and scale.shape == ((rows, 1) if codes.ndim == 2 else (1,))
            COUNTS["gathers"] += 1
            return (codes, scale), meta

        def checked_update(self, context):
            local = self.param.to_local()
            if isinstance(local, Int8Weight):
                assert isinstance(self.param, DTensor) and local.codes.dtype == torch.int8
                assert local.shape[0] < self.param.shape[0] and local.codes.shape == local.shape
                COUNTS["updates"] += 1
            update(self, context)

        def recorded_all_gather(self, output_tensor, input_tensor, *args, **kwargs):
            COUNTS["dtypes"].add(str(input_tensor.dtype))
            return all_gather(self, output_tensor, input_tensor, *args, **kwargs)

        Int8Weight.fsdp_pre_all_gather = checked_pre_all_gather
        per_layer._Slot.update = checked_update
        _fsdp_collectives.DefaultAllGather.__call__ = recorded_all_gather


if __name__ == "__main__":
    for name in os.environ.get("SLCOMPILE_TEST_FAULT", "").split("+"):
        _install_fault(name)
    code = train.main(sys.argv[1:])
    if "int8-shards" in os.environ["SLCOMPILE_TEST_FAULT"].split("+"):
        print(f"INT8 rank={os.environ['RANK']} gathers={COUNTS['gathers']} updates={COUNTS['updates']} "
              f"dtypes={','.join(sorted(COUNTS['dtypes']))}", flush=True)
    sys.exit(code)

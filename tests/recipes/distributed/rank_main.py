"""One rank of a distributed test run: ``slcompile.recipes.train.main`` plus a fault set by ``SLCOMPILE_TEST_FAULT``.

- ``support``: rank 1 changes one support index of ``layers.0.self_attn.q_proj`` after building
  its model (as a rank with another seed or model definition would).
- ``crash-after:K``: every rank dies (``os._exit``, no clean-up, like a kill) right after the
  checkpoint of step ``K`` is complete.
- ``updates-in-backward``: an optimizer update outside a backward pass raises (the per-layer
  optimizer must update each parameter in its post-accumulate-grad hook, e.g. right after
  FSDP2's reduce-scatter, never later in ``step()``).

Several faults are joined by ``+``.
"""
import os
import sys

import torch

from slcompile.optim import per_layer
from slcompile.recipes import checkpoint, train

CORRUPTED_LAYER = "layers.0.self_attn.q_proj"


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


if __name__ == "__main__":
    for name in os.environ.get("SLCOMPILE_TEST_FAULT", "").split("+"):
        _install_fault(name)
    sys.exit(train.main(sys.argv[1:]))

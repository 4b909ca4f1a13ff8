"""One rank of a distributed test run: ``slcompile.recipes.train.main`` plus a fault set by ``SLCOMPILE_TEST_FAULT``.

- ``support``: rank 1 changes one support index of ``layers.0.self_attn.q_proj`` after building
  its model (as a rank with another seed or model definition would).
- ``crash-after:K``: every rank dies (``os._exit``, no clean-up, like a kill) right after the
  checkpoint of step ``K`` is complete.
"""
import os
import sys

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


if __name__ == "__main__":
    _install_fault(os.environ.get("SLCOMPILE_TEST_FAULT", ""))
    sys.exit(train.main(sys.argv[1:]))

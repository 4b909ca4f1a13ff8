"""The main job (``make demo``): SLTrain vs full rank vs low rank on real offline text, one harness.

Each method trains the same small LLaMA on the same tokens with the same seed, at its own best
learning rate from the committed sweep (``benchmarks/results/demo_sweep.json``, reproduced by
``python -m slcompile.demo --sweep``). Each run is a separate process so that its peak memory is
its own. Writes ``runs/demo/`` (one directory per method with JSONL logs, plus ``table.md``,
``table.json`` and ``val_curves.png``) and prints the table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from slcompile.compare import compare, markdown
from slcompile.sweep import sweep
from slcompile.train import TrainConfig

# The demo's settings: llama-mini (dim 128, 4 layers, rank 32, alpha/r = 0.25 as the paper at 60M).
DEMO = {"model": "llama-mini", "steps": 240, "batch_size": 16, "seq_len": 128, "seed": 0}
METHODS = ("sltrain", "full", "lowrank", "lowrank-b0")
SWEEP_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
SWEEP_FILE = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "demo_sweep.json"


def best_learning_rates(path: Path) -> dict[str, float]:
    report = json.loads(path.read_text())
    settings = {k: report["settings"].get(k) for k in DEMO}
    if settings != DEMO:
        raise ValueError(f"{path} was swept with other settings ({settings}, demo uses {DEMO}): "
                         "rerun `python -m slcompile.demo --sweep`")
    return report["best_lr"]


def run_method(method: str, lr: float, out: Path) -> None:
    cmd = [sys.executable, "-m", "slcompile.train", "--method", method, "--lr", str(lr), "--out", str(out),
           "--eval-every", "30", "--checkpoint-every", "100", "--no-progress"]
    cmd += [arg for key, value in DEMO.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
    print(f"== {method} (lr {lr:g}): {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slcompile.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--sweep", action="store_true", help=f"redo the learning-rate sweep into {SWEEP_FILE.name}")
    args = parser.parse_args(argv)
    if args.sweep:
        base = TrainConfig(**DEMO, eval_every=DEMO["steps"], checkpoint_every=DEMO["steps"], progress=False)
        report = sweep(base, list(METHODS), list(SWEEP_LRS), args.out / "sweep")
        SWEEP_FILE.write_text(json.dumps(report, indent=2, default=list) + "\n")
    lrs = best_learning_rates(SWEEP_FILE)
    for method in METHODS:
        run_method(method, lrs[method], args.out / method)
    rows = compare([args.out / m for m in METHODS], args.out)
    print()
    print(markdown(rows), end="")
    print(f"\nwrote {args.out}/table.md, table.json, val_curves.png and one run directory per method")
    return 0


if __name__ == "__main__":
    sys.exit(main())

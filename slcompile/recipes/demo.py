"""The main job (``make demo``): SLTrain vs full rank vs low rank on real offline text, one harness.

Each method trains the same small LLaMA on the same tokens with the same seed, at its own best
learning rate from a committed sweep (``--sweep-file``: by default
``benchmarks/results/demo_sweep.json`` under the working directory, the repository root for
``make demo``; reproduced by ``python -m slcompile.recipes.demo --sweep``). Each run is a
separate process so that its peak memory is its own. Writes ``OUT/`` (one directory per method with JSONL logs, plus ``table.md``,
``table.json`` and ``val_curves.png``) and prints the table.

Presets: ``demo`` (minutes on 2 cores; favours factorized models, which learn fast early) and
``quality`` (``make quality``: >= 10 training tokens per parameter, about an hour per method on
CPU; it uses the demo sweep's learning rates, not a sweep of its own).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from slcompile.recipes.compare import compare, markdown
from slcompile.recipes.data import load_text_data
from slcompile.recipes.sweep import sweep
from slcompile.recipes.train import METHODS, TrainConfig

PRESETS = {
    # llama-mini: dim 128, 4 layers, rank 32, alpha/r = 0.25 as the paper at 60M; 0.5M tokens.
    "demo": {"model": "llama-mini", "steps": 240, "batch_size": 16, "seq_len": 128, "seed": 0},
    # llama-micro: 0.64M parameters (vocab 1024), 3200 x 2048 = 6.6M tokens = 10.2 per parameter.
    "quality": {"model": "llama-micro", "vocab_size": 1024, "steps": 3200, "batch_size": 16, "seq_len": 128,
                "seed": 0},
}
EVAL_POINTS = 8  # validation evaluations per run
SWEEP_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
SWEEP_FILE = Path("benchmarks") / "results" / "demo_sweep.json"  # relative to the working directory


def best_learning_rates(path: Path) -> dict[str, float]:
    """The best learning rate per method of the demo sweep; refuses a sweep of other settings."""
    if not path.is_file():
        raise FileNotFoundError(f"no learning-rate sweep at {path.resolve()}: run from the repository root, pass "
                                "--sweep-file, or create one with `python -m slcompile.recipes.demo --sweep`")
    report = json.loads(path.read_text())
    demo = PRESETS["demo"]
    settings = {k: report["settings"].get(k) for k in demo}
    if settings != demo:
        raise ValueError(f"{path} was swept with other settings ({settings}, demo uses {demo}): "
                         "rerun `python -m slcompile.recipes.demo --sweep`")
    return report["best_lr"]


def train_command(settings: dict, method: str, lr: float, out: Path, threads: int | None) -> list[str]:
    every = max(1, settings["steps"] // EVAL_POINTS)
    cmd = [sys.executable, "-m", "slcompile.recipes.train", "--method", method, "--lr", str(lr), "--out", str(out),
           "--eval-every", str(every), "--checkpoint-every", str(every), "--no-progress"]
    cmd += [arg for key, value in settings.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
    return cmd + (["--threads", str(threads)] if threads else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slcompile.recipes.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="demo")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/<preset>")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--jobs", type=int, default=1,
                        help="methods trained at once (each with cores/jobs threads; tokens/s then shares the machine)")
    parser.add_argument("--sweep-file", type=Path, default=SWEEP_FILE,
                        help="the learning-rate sweep to read (or write with --sweep); default: %(default)s")
    parser.add_argument("--sweep", action="store_true", help="redo the learning-rate sweep into --sweep-file")
    args = parser.parse_args(argv)
    settings, out = PRESETS[args.preset], args.out or Path("runs") / args.preset
    methods = [m for m in args.methods.split(",") if m]
    if args.sweep:
        base = TrainConfig(**PRESETS["demo"], eval_every=PRESETS["demo"]["steps"],
                           checkpoint_every=PRESETS["demo"]["steps"], progress=False)
        report = sweep(base, list(METHODS), list(SWEEP_LRS), out / "sweep")
        args.sweep_file.parent.mkdir(parents=True, exist_ok=True)
        args.sweep_file.write_text(json.dumps(report, indent=2, default=list) + "\n")
    lrs = best_learning_rates(args.sweep_file)
    # Tokenize once here: otherwise the first run's peak memory would include building the cache.
    load_text_data(vocab_size=settings.get("vocab_size", TrainConfig.vocab_size))
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    commands = [train_command(settings, m, lrs[m], out / m, threads) for m in methods]
    for cmd in commands:
        print(f"== {' '.join(cmd[1:])}", flush=True)
    # The preset path rates, not ones timed on this (maybe busy) machine: a timing-dependent choice
    # of compute path changes SLTrain's losses at float level, which 240 steps at lr 1e-2 grow into
    # a few percent of perplexity; with the preset the table is the same on every machine.
    env = {"SLCOMPILE_CALIBRATE": "0", **os.environ}
    # A rerun resumes each method from its last checkpoint (or finds it finished).
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(lambda cmd: subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env), commands))
    rows = compare([out / m for m in methods], out)
    print()
    print(markdown(rows), end="")
    print(f"\nwrote {out}/table.md, table.json, val_curves.png and one run directory per method")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Learning-rate sweep per method in one harness: ``python -m slcompile.recipes.sweep ...``.

Trains every ``(method, lr)`` pair with otherwise identical settings and picks, per method, the
learning rate with the lowest final validation loss. Writes ``sweep.json`` (all results and the
best lr per method) to ``--out``; ``slcompile.recipes.demo`` reads it so that no method is compared at a
learning rate tuned for another.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

from slcompile.recipes.train import METHODS, TrainConfig, train


def sweep(base: TrainConfig, methods: list[str], lrs: list[float], out: Path) -> dict:
    """Run the grid; returns ``{"results": [...], "best_lr": {method: lr}, "settings": {...}}``."""
    results = []
    for method in methods:
        for lr in lrs:
            run = replace(base, method=method, lr=lr, out=str(out / f"{method}-lr{lr:g}"))
            try:
                val_loss = train(run)["val_loss"]
            except FloatingPointError:  # diverged: a legitimate sweep outcome
                val_loss = math.inf
            results.append({"method": method, "lr": lr, "val_loss": val_loss})
            print(f"{method:>10} lr={lr:<8g} val_loss={val_loss:.4f}", flush=True)
    best = {m: min((r for r in results if r["method"] == m), key=lambda r: r["val_loss"])["lr"] for m in methods}
    report = {"settings": {k: v for k, v in vars(base).items() if k not in ("method", "lr", "out")},
              "results": results, "best_lr": best}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(report, indent=2, default=list) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slcompile.recipes.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="sltrain,full,lowrank,lowrank-b0")
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2")
    parser.add_argument("--model", default="llama-mini")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    try:
        lrs = [float(x) for x in args.lrs.split(",") if x]
        base = TrainConfig(model=args.model, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                           seed=args.seed, eval_every=args.steps, checkpoint_every=args.steps, progress=False)
    except ValueError as exc:
        parser.error(str(exc))
    report = sweep(base, methods, lrs, args.out)
    print(json.dumps(report["best_lr"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

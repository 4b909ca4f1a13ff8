"""The techniques study (``make quality-techniques``): SLTrain with weight refactorization, momentum
reset, both, and another ``alpha/r``, in the harness of ``make quality``, plus low rank with both.

Same model, data, tokens, seed and schedule as ``make quality`` (``slcompile.recipes.demo``'s
``quality`` preset: llama-micro, 3200 steps of 16 x 128 tokens). Three phases, each a list of
``python -m slcompile.recipes.train`` commands run ``--jobs`` at a time (a rerun resumes every
run from its checkpoint, or finds it finished):

1. short sweep (800 steps, a quarter of the tokens): every variant of :func:`variants` at each
   of ``LRS``; a diverged run counts as infinite loss;
2. long runs (3200 steps): each variant but plain SLTrain at its best short-sweep LR (the
   ``alpha/r`` variants: only the better one), plain SLTrain, full and low rank at the LR of
   their grid ``make quality`` did not run (3e-2, 1e-2, 1e-2), low rank with both techniques at
   its ``make quality`` LR;
3. second seed (``--seed 1``) of the two best SLTrain runs of phase 2 and ``make quality``.

Restarts every ``steps / 8`` updates, LR recovery over ``steps / 80`` (cosine with quick recovery,
arXiv 2505.22922); the momentum resets clear the states of ``A``, ``B`` and ``values``.
Writes ``--results`` (default ``benchmarks/results/quality/techniques``): ``commands.txt``,
``short_sweep.json``, ``table.md``/``table.json``/``val_curves.png`` of the long runs (ratios to
this study's full-rank run) and ``summary.md`` (every long run and ``make quality``'s, ratio to the
best full-rank run of both), plus one ``<run>.metrics.jsonl`` per long run.
``--dry-run`` prints phase 1's commands and exits.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from slcompile.model_configs import get_config
from slcompile.recipes.compare import compare
from slcompile.recipes.demo import PRESETS, train_command

LONG = PRESETS["quality"]
SHORT = {**LONG, "steps": LONG["steps"] // 4}
LRS = (3e-3, 1e-2, 3e-2)
# make quality ran two LRs per method (SLTrain 1e-2 and 3e-3, full and low rank 3e-3 and 1e-3): the best,
# QUALITY_LR, and one below it; THIRD_LR is the one above.
QUALITY_LR = {"sltrain": 1e-2, "full": 3e-3, "lowrank": 3e-3}
THIRD_LR = {"sltrain": 3e-2, "full": 1e-2, "lowrank": 1e-2}
QUALITY_RESULTS = Path("benchmarks") / "results" / "quality"


def variants(steps: int) -> dict[str, dict]:
    """``{name: extra train flags}`` of the SLTrain variants for a run of ``steps`` updates."""
    every, rank = steps // 8, get_config(LONG["model"]).rank
    reset = {"momentum_reset_every": every, "reset_values": True, "recovery_steps": steps // 80}
    return {"sltrain": {}, "alpha0.5": {"alpha": 0.5 * rank}, "alpha1": {"alpha": 1.0 * rank},
            "refactor": {"refactor_every": every}, "reset": reset, "both": {"refactor_every": every, **reset}}


def command(settings: dict, method: str, lr: float, flags: dict, out: Path, threads: int) -> list[str]:
    """The train command of ``demo`` for these settings, plus ``flags`` (``True``: a bare switch)."""
    extra = []
    for key, value in flags.items():
        extra += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return train_command(settings, method, lr, out, threads) + extra


def run_all(commands: list[list[str]], jobs: int, log: Path) -> list[int]:
    """Run the commands ``jobs`` at a time (appending each to ``log``); their exit codes."""
    with log.open("a") as file:
        file.writelines(" ".join(cmd[1:]) + "\n" for cmd in commands)
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda cmd: subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode, commands))


def val_loss(run_dir: Path) -> float:
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text())["val_loss"] if summary.exists() else math.inf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs") / "quality-techniques")
    parser.add_argument("--results", type=Path, default=QUALITY_RESULTS / "techniques")
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    short_variants, long_variants = variants(SHORT["steps"]), variants(LONG["steps"])
    short = {(name, lr): command(SHORT, "sltrain", lr, flags, args.out / "short" / f"{name}-lr{lr:g}", threads)
             for name, flags in short_variants.items() for lr in LRS}
    if args.dry_run:
        print("\n".join(" ".join(cmd[1:]) for cmd in short.values()))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    log = args.results / "commands.txt"
    log.write_text("")
    run_all(list(short.values()), args.jobs, log)
    results = [{"variant": name, "lr": lr, "val_loss": val_loss(args.out / "short" / f"{name}-lr{lr:g}")}
               for name, lr in short]
    best = {name: min((r for r in results if r["variant"] == name), key=lambda r: r["val_loss"])
            for name in short_variants}
    alpha = min(("alpha0.5", "alpha1"), key=lambda name: best[name]["val_loss"])
    (args.results / "short_sweep.json").write_text(json.dumps({"results": results, "best_lr": {
        name: r["lr"] for name, r in best.items()}, "settings": SHORT}, indent=2) + "\n")

    long = {f"{name}-lr{best[name]['lr']:g}": ("sltrain", best[name]["lr"], long_variants[name])
            for name in ("refactor", "reset", "both", alpha)}
    long.update({f"{method}-lr{lr:g}": (method, lr, {}) for method, lr in THIRD_LR.items()})
    lowrank_both = {k: v for k, v in long_variants["both"].items() if k != "reset_values"}
    long[f"lowrank-both-lr{QUALITY_LR['lowrank']:g}"] = ("lowrank", QUALITY_LR["lowrank"], lowrank_both)
    run_all([command(LONG, m, lr, flags, args.out / name, threads) for name, (m, lr, flags) in long.items()],
            args.jobs, log)

    # Second seed of the two best SLTrain runs (make quality's best SLTrain run included).
    reference = {r["run"]: r for r in json.loads((QUALITY_RESULTS / "table.json").read_text())}
    candidates = {name: val_loss(args.out / name) for name, (m, _, _) in long.items() if m == "sltrain"}
    candidates["sltrain-lr0.01"] = math.log(reference["sltrain"]["val_ppl"])
    runs = {**long, "sltrain-lr0.01": ("sltrain", QUALITY_LR["sltrain"], {})}
    seeds = {f"{name}-seed1": (*runs[name][:2], {**runs[name][2], "seed": 1})
             for name in sorted(candidates, key=candidates.get)[:2]}
    run_all([command(LONG, m, lr, flags, args.out / name, threads) for name, (m, lr, flags) in seeds.items()],
            args.jobs, log)

    finished = [name for name in [*long, *seeds] if (args.out / name / "summary.json").exists()]
    compare([args.out / name for name in finished], args.results)
    for name in finished:
        shutil.copy(args.out / name / "metrics.jsonl", args.results / f"{name}.metrics.jsonl")
    rows = [(name, math.exp(val_loss(args.out / name))) for name in finished]
    rows += [(f"make quality: {r['run']} (lr {r['lr']:g})", r["val_ppl"]) for r in reference.values()]
    full = min(ppl for name, ppl in rows if name.startswith(("full", "make quality: full")))
    lines = ["| run | val ppl | vs best full rank |", "|---|---|---|"]
    lines += [f"| {name} | {ppl:.2f} | {ppl / full:.3f}x |" for name, ppl in sorted(rows, key=lambda row: row[1])]
    (args.results / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

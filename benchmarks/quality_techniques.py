"""The techniques study (``make quality-techniques``): SLTrain with weight refactorization, momentum
reset, both, and other ``alpha/r``, in the harness of ``make quality``, beside full rank and low rank.

Same model, data, tokens, seed and schedule as ``make quality`` (``slcompile.recipes.demo``'s
``quality`` preset: llama-micro, 3200 steps of 16 x 128 tokens), with the preset compute-path rates
(``SLCOMPILE_CALIBRATE=0``) so that no run's losses depend on timings of this machine. Every run is a
``python -m slcompile.recipes.train`` command, run ``--jobs`` at a time (a rerun resumes every run
from its checkpoint, or finds it finished):

1. short sweep (800 steps, a quarter of the tokens): every variant of :func:`variants` at each of
   ``LRS``; a diverged run counts as infinite loss;
2. long runs (3200 steps), all in this harness: each SLTrain variant but plain at its best
   short-sweep LR (of the ``alpha/r`` variants only the better one), plain SLTrain, full rank and
   low rank each at the best LR of ``make quality`` and at the one above it (the LR below was
   worse for all three there), low rank with both techniques at its ``make quality`` LR;
3. second seed (``--seed 1``) of the two best SLTrain runs of phase 2 and of plain SLTrain (the
   noise every technique is compared against), started as soon as the SLTrain runs of phase 2 end.

Restarts every ``steps / 8`` updates, LR recovery over ``steps / 80`` (cosine with quick recovery,
arXiv 2505.22922); the momentum resets clear the states of ``A``, ``B`` and ``values``.
Writes ``--results`` (default ``benchmarks/results/quality/techniques``): ``commands.txt``,
``short_sweep.json``, ``table.md``/``table.json``/``val_curves.png`` of the long runs (ratios to
the best full-rank run) and ``summary.md`` (val perplexity of every long run, ratio to the best
full-rank run, mean and spread of the seeds), plus one ``<run>.metrics.jsonl`` per long run.
``--dry-run`` prints phase 1's commands and exits. ``--report-only`` trains nothing and writes the
results of every finished run under ``--out`` (follow-up runs started by hand in the same folder,
with the same settings, included; ``commands.txt`` lists them).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from slcompile.model_configs import get_config
from slcompile.recipes.compare import compare
from slcompile.recipes.demo import PRESETS, train_command

LONG = PRESETS["quality"]
SHORT = {**LONG, "steps": LONG["steps"] // 4}
LRS = (3e-3, 1e-2, 3e-2)
# make quality ran two LRs per method (SLTrain 1e-2 and 3e-3, full and low rank 3e-3 and 1e-3): the best,
# QUALITY_LR, and one below it (worse for all three); THIRD_LR is the one above.
QUALITY_LR = {"sltrain": 1e-2, "full": 3e-3, "lowrank": 3e-3}
THIRD_LR = {"sltrain": 3e-2, "full": 1e-2, "lowrank": 1e-2}
ENV = {**os.environ, "SLCOMPILE_CALIBRATE": "0"}


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


def val_loss(run_dir: Path) -> float:
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text())["val_loss"] if summary.exists() else math.inf


class Runner:
    """Runs train commands ``jobs`` at a time, logging each to ``log``."""

    def __init__(self, jobs: int, log: Path):
        self.pool, self.log = ThreadPoolExecutor(jobs), log

    def submit(self, commands: list[list[str]]) -> list:
        with self.log.open("a") as file:
            file.writelines(" ".join(cmd[1:]) + "\n" for cmd in commands)
        return [self.pool.submit(subprocess.run, cmd, stdout=subprocess.DEVNULL, env=ENV) for cmd in commands]


def summary_lines(out: Path, finished: list[str]) -> list[str]:
    """``summary.md``: every long run's val ppl against the best full-rank run, then the seed pairs."""
    ppl = {name: math.exp(val_loss(out / name)) for name in finished}
    full = min(value for name, value in ppl.items() if name.startswith("full"))
    lines = ["| run | val ppl | vs best full rank |", "|---|---|---|"]
    lines += [f"| {name} | {value:.2f} | {value / full:.3f}x |" for name, value in sorted(ppl.items(), key=lambda x: x[1])]
    pairs = [(name[:-len("-seed1")], name) for name in finished if name.endswith("-seed1")]
    if pairs:
        lines += ["", "| run | seed 0 | seed 1 | mean vs best full rank | seed spread |", "|---|---|---|---|---|"]
        for base, seeded in pairs:
            a, b = ppl[base], ppl[seeded]
            lines.append(f"| {base} | {a:.2f} | {b:.2f} | {(a + b) / 2 / full:.3f}x | {abs(a - b) / min(a, b):.1%} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs") / "quality-techniques")
    parser.add_argument("--results", type=Path, default=Path("benchmarks") / "results" / "quality" / "techniques")
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if args.report_only:
        report(args.out, args.results)
        return 0
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
    if not log.exists():
        log.write_text("")
    runner = Runner(args.jobs, log)
    wait(runner.submit(list(short.values())))
    results = [{"variant": name, "lr": lr, "val_loss": val_loss(args.out / "short" / f"{name}-lr{lr:g}")}
               for name, lr in short]
    best = {name: min((r for r in results if r["variant"] == name), key=lambda r: r["val_loss"])
            for name in short_variants}
    alpha = min(("alpha0.5", "alpha1"), key=lambda name: best[name]["val_loss"])

    sltrain = {f"{name}-lr{best[name]['lr']:g}": ("sltrain", best[name]["lr"], long_variants[name])
               for name in ("refactor", "reset", "both", alpha)}
    sltrain.update({f"sltrain-lr{lr:g}": ("sltrain", lr, {}) for lr in (QUALITY_LR["sltrain"], THIRD_LR["sltrain"])})
    others = {f"{method}-lr{lr:g}": (method, lr, {}) for method in ("full", "lowrank")
              for lr in (QUALITY_LR[method], THIRD_LR[method])}
    lowrank_both = {k: v for k, v in long_variants["both"].items() if k != "reset_values"}
    others[f"lowrank-both-lr{QUALITY_LR['lowrank']:g}"] = ("lowrank", QUALITY_LR["lowrank"], lowrank_both)

    def commands(runs: dict) -> list[list[str]]:
        return [command(LONG, m, lr, flags, args.out / name, threads) for name, (m, lr, flags) in runs.items()]

    sltrain_futures = runner.submit(commands(sltrain))
    other_futures = runner.submit(commands(others))
    wait(sltrain_futures)
    # Second seed of the two best SLTrain runs and of plain SLTrain, queued behind the full and low-rank runs.
    plain = f"sltrain-lr{QUALITY_LR['sltrain']:g}"
    best_two = sorted(sltrain, key=lambda name: val_loss(args.out / name))[:2]
    seeds = {f"{name}-seed1": (*sltrain[name][:2], {**sltrain[name][2], "seed": 1})
             for name in dict.fromkeys([*best_two, plain])}
    wait(other_futures + runner.submit(commands(seeds)))
    runner.pool.shutdown()

    report(args.out, args.results)
    return 0


def report(out: Path, results: Path) -> None:
    """Write the results of every finished run under ``out`` (module doc) into ``results``."""
    short = []
    for folder in ("short", "short-extra"):
        for run in sorted((out / folder).glob("*-lr*")):
            config = json.loads((run / "config.json").read_text())
            short.append({"run": f"{folder}/{run.name}", "lr": config["lr"], "val_loss": val_loss(run)})
    (results / "short_sweep.json").write_text(json.dumps({"results": short, "settings": SHORT}, indent=2) + "\n")
    finished = sorted(run.name for run in out.glob("*-lr*") if (run / "summary.json").exists())
    compare([out / name for name in finished], results)
    for name in finished:
        shutil.copy(out / name / "metrics.jsonl", results / f"{name}.metrics.jsonl")
    lines = summary_lines(out, finished)
    (results / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

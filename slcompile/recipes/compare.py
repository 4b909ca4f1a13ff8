"""Compare training runs: ``python -m slcompile.recipes.compare RUN_DIR... --out DIR``.

Reads each run's ``summary.json`` and ``metrics.jsonl`` (written by ``slcompile.recipes.train``) and writes
``table.md``, ``table.json`` and ``val_curves.png`` (validation perplexity against tokens) to ``--out``.
Ratios are to the best (lowest validation perplexity) ``full`` run when one is present.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_run(run_dir: Path) -> dict:
    """A run's summary plus its validation curve ``[(tokens, val_ppl), ...]``."""
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise ValueError(f"{run_dir} has no summary.json: not a finished slcompile.recipes.train run")
    run = json.loads(summary_path.read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    run["curve"] = [(r["tokens"], r["val_ppl"]) for r in records if "val_ppl" in r]
    run["name"] = run_dir.name
    return run


def table_rows(runs: list[dict]) -> list[dict]:
    """One row per run with the numbers the table shows (ratios to the best full-rank run)."""
    full = min((r for r in runs if r["method"] == "full"), key=lambda r: r["val_ppl"], default=None)
    rows = []
    for run in runs:
        row = {"run": run["name"], "method": run["method"], "lr": run["lr"], "tokens": run["tokens"],
               "trainable_params": run["trainable_params"], "linear_params": run.get("linear_params"),
               "peak_memory_mb": run["peak_memory_bytes"] / 2**20, "state_mb": run["state_bytes"] / 2**20,
               "tokens_per_s": run["tokens_per_s"], "val_ppl": run["val_ppl"]}
        if full is not None:
            row["ppl_vs_full"] = run["val_ppl"] / full["val_ppl"]
            row["params_vs_full"] = run["trainable_params"] / full["trainable_params"]
        if run.get("linear_params_full"):
            row["linear_params_vs_full"] = run["linear_params"] / run["linear_params_full"]
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    columns = [("run", "run", "{}"), ("method", "method", "{}"), ("lr", "lr", "{:g}"),
               ("trainable_params", "trainable params", "{:,}"), ("linear_params_vs_full", "linears vs full", "{:.3f}x"),
               ("params_vs_full", "params vs full", "{:.3f}x"), ("state_mb", "params+grads+opt MB", "{:.1f}"),
               ("peak_memory_mb", "peak MB (CUDA: allocated; CPU: process RSS)", "{:.0f}"), ("tokens_per_s", "tokens/s", "{:,.0f}"),
               ("val_ppl", "val ppl", "{:.2f}"), ("ppl_vs_full", "ppl vs full", "{:.3f}x")]
    columns = [c for c in columns if any(c[0] in row for row in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        tokens, ppl = zip(*run["curve"]) if run["curve"] else ((), ())
        ax.plot([t / 1e6 for t in tokens], ppl, marker="o", markersize=3,
                label=f"{run['name']} (lr {run['lr']:g}): {run['val_ppl']:.1f}")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("SLTrain vs full rank vs low rank, same harness")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(run_dirs: list[Path], out: Path) -> list[dict]:
    """Write ``table.md``, ``table.json`` and ``val_curves.png`` for ``run_dirs`` into ``out``."""
    runs = [load_run(Path(d)) for d in run_dirs]
    rows = table_rows(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown(rows))
    (out / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(runs, out / "val_curves.png")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slcompile.recipes.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of slcompile.recipes.train")
    parser.add_argument("--out", type=Path, required=True, help="where to write table.md/json and the plot")
    args = parser.parse_args(argv)
    try:
        rows = compare(args.runs, args.out)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

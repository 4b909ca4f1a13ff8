"""``benchmarks/gpu_check.sh --dry-run``: the GPU check's steps end to end on CPU (tiny shapes,
Triton interpreter), so the one-shot script cannot rot between GPU runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["device", "correctness_float32", "correctness_float16", "kernel_timings", "layer_bench", "layer_autotune",
         "memory_7b"]


def test_gpu_check_dry_run(tmp_path):
    pytest.importorskip("triton", reason="triton is not installed (pip install 'slcompile[kernels]')")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable,
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = {s["step"]: s for s in map(json.loads, (tmp_path / "steps.jsonl").read_text().splitlines())}
    logs = {name: (tmp_path / f"{name}.log").read_text()[-2000:] for name in steps}
    assert sorted(steps) == sorted(STEPS)
    assert all(s["rc"] == 0 for s in steps.values()), {n: logs[n] for n, s in steps.items() if s["rc"]}
    results = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in STEPS}
    assert results["device"]["triton_kernels_registered"] in (True, False)
    for dtype in ("float32", "float16"):
        correct = results[f"correctness_{dtype}"]
        assert correct["ok"] and {c["kernel"] for c in correct["cases"]} == {
            "materialize", "grad_weight dW", "grad_weight dvalues", "grad_weight sddmm", "spmm x S^T"}
    timing = results["kernel_timings"]["rows"]
    assert timing and all(ms > 0 for row in timing for ms in row["ms"].values())
    layer = results["layer_bench"]["results"]
    assert [r["config"] for r in layer] == ["llama-tiny"] and set(layer[0]["time_ms"]) == {
        "dense", "autograd", "sllinear", "backend"}
    autotuned = results["layer_autotune"]["results"][0]["time_ms"]
    assert set(autotuned) == {"dense", "sllinear", "backend", "backend_autotune"}
    peaks = results["memory_7b"]["fwd_bwd_peak_bytes"]
    assert peaks["dense"]["peak"] > 0 and peaks["sllinear"]["peak"] > 0

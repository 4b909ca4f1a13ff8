"""The runnable examples run as a user runs them (a fresh interpreter) and do what they print."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # Small models gain nothing from threads, and on a busy 2-core CI machine OpenMP threads that
    # spin-wait on each other make a 5 s script take minutes.
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, str(ROOT / "examples" / name)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_quickstart_trains_and_merges():
    proc = run_example("quickstart.py")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    losses = [float(v) for v in re.findall(r"^step\s+\d+\s+loss\s+([0-9.]+)$", proc.stdout, re.MULTILINE)]
    assert len(losses) >= 2, proc.stdout
    assert losses[-1] < losses[0], f"loss did not go down: {losses}"
    assert "replaced 8 linear layer(s)" in proc.stdout
    diff = re.search(r"max \|logits\(SLTrain\) - logits\(merged\)\| = (\S+)", proc.stdout)
    assert diff is not None and float(diff.group(1)) < 1e-4, proc.stdout


def test_hf_trainer_trains_both_ways_and_reloads():
    pytest.importorskip("transformers", reason="the Trainer example needs transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    proc = run_example("hf_trainer.py")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "replaced 14 linear layer(s), kept 1" in proc.stdout
    runs = re.findall(r"^per_layer=(True|False): 16 updates, loss ([0-9.]+) -> ([0-9.]+)$", proc.stdout, re.MULTILINE)
    assert sorted(run[0] for run in runs) == ["False", "True"], proc.stdout
    assert all(float(last) < float(first) - 0.5 for _, first, last in runs), runs
    diffs = re.findall(r"reloaded.*: max \|logits diff\| = (\S+)$", proc.stdout, re.MULTILINE)
    assert len(diffs) == 2 and float(diffs[0]) == 0 and float(diffs[1]) < 1e-5, proc.stdout

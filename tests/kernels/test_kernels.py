"""Runs ``kernel_cases.py`` (Triton kernels vs the torch reference) in a fresh interpreter.

Without CUDA the cases run in Triton's interpreter, which must be selected before Triton is
first imported; this session may already have imported it (``torch._inductor`` does), hence the
subprocess. Its pytest output is shown on failure.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CASES = Path(__file__).with_name("kernel_cases.py")
ROOT = Path(__file__).resolve().parents[2]


def test_triton_kernels_match_reference():
    pytest.importorskip("triton", reason="triton is not installed (pip install triton==3.9.0 --no-deps)")
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = proc.stdout[-8000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout and " skipped" not in proc.stdout.splitlines()[-1], report

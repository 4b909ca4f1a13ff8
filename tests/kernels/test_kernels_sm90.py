"""Hopper without a GPU: ``benchmarks/kernels_sm90.py`` compiles every Triton kernel x dtype x the
host's block configuration at LLaMA 7B and 1B shapes for sm_90a with Triton's bundled ptxas.
Each must compile without spills, and a bf16/fp16/TF32 ``tl.dot`` must become a wgmma."""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOT_KERNELS = {"materialize", "grad_weight", "grad_weight_sddmm"}


def test_every_kernel_compiles_for_sm90_without_spills(tmp_path):
    pytest.importorskip("triton", reason="triton is not installed (pip install 'slcompile[kernels]')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "kernels_sm90.json"
    proc = subprocess.run([sys.executable, "benchmarks/kernels_sm90.py", "--check", "--jobs", "2", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    variants = json.loads(out.read_text())["variants"]
    shapes = collections.defaultdict(set)
    for v in variants:
        assert "error" not in v, v
        assert v["spill_store_bytes"] == v["spill_load_bytes"] == 0, v["variant"]
        assert v["registers"] <= 255 and v["shared_bytes"] <= 227 * 1024, v["variant"]
        if v["kernel"] in DOT_KERNELS:
            assert v["wgmma"] == (v["dtype"] != "fp32"), v["variant"]  # IEEE fp32 stays on the FMA units
            assert v["main_loop"]["opcodes"].get("HGMMA" if v["wgmma"] else "FFMA"), v["variant"]
        shapes[v["kernel"], v["dtype"]].update(v["shapes"])
    every_shape = {"7b 11008x4096", "7b 4096x11008", "1b 5461x2048", "1b 2048x5461"}
    expected = {(k, d) for k in DOT_KERNELS for d in ("bf16", "fp16", "fp32", "tf32")}
    expected |= {("spmm", d) for d in ("bf16", "fp16", "fp32")}
    assert set(shapes) == expected
    assert all(found == every_shape for found in shapes.values()), shapes

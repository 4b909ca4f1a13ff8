"""Hopper without a GPU: ``benchmarks/kernels_sm90.py --subset`` compiles every Triton kernel x dtype
at LLaMA 7B and 1B shapes for sm_90a with Triton's bundled ptxas, in its default configuration,
and every tuner configuration for bf16 and fp32 at 7B (the full set: the script without
``--subset``). Each must compile without spills, and a bf16/fp16/TF32 ``tl.dot`` must become a
wgmma; the default bf16 configurations at 7B must keep what the Hopper rework bought (two blocks
per SM, the main loop's instructions per wgmma, the sparse step's instructions)."""
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
EVERY_SHAPE = {"7b 11008x4096", "7b 4096x11008", "1b 5461x2048", "1b 2048x5461"}


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    pytest.importorskip("triton", reason="triton is not installed (pip install 'slcompile[kernels]')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path_factory.mktemp("sm90") / "kernels_sm90.json"
    proc = subprocess.run([sys.executable, "benchmarks/kernels_sm90.py", "--check", "--subset", "--jobs", "2",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())["variants"]


def test_every_kernel_compiles_for_sm90_without_spills(variants):
    shapes = collections.defaultdict(set)
    for v in variants:
        assert "error" not in v, v
        assert v["spill_store_bytes"] == v["spill_load_bytes"] == 0, v["variant"]
        assert v["registers"] <= 255 and v["shared_bytes"] <= 227 * 1024 and v["blocks_per_sm"] >= 1, v["variant"]
        if v["kernel"] in DOT_KERNELS:
            assert v["wgmma"] == (v["dtype"] != "fp32"), v["variant"]  # IEEE fp32 stays on the FMA units
            assert v["main_loop"]["opcodes"].get("HGMMA" if v["wgmma"] else "FFMA"), v["variant"]
            assert (v["main_loop"]["per_wgmma"] is not None) == v["wgmma"], v["variant"]
        assert v["sparse_step"], v["variant"]  # the sparse loop was found
        if v["default"]:
            shapes[v["kernel"], v["dtype"]].update(v["shapes"])
    expected = {(k, d) for k in DOT_KERNELS for d in ("bf16", "fp16", "fp32", "tf32")}
    expected |= {("spmm", d) for d in ("bf16", "fp16", "fp32")}
    assert set(shapes) == expected
    assert all(found == EVERY_SHAPE for found in shapes.values()), shapes


def test_tuner_configurations_compile_at_7b(variants):
    from slcompile.kernels import configs

    tiles = collections.defaultdict(set)
    for v in variants:
        if v["dtype"] == "bf16" and v["shapes"][0].startswith("7b"):
            c = v["constexprs"]
            tiles[v["kernel"]].add((c.get("BLOCK_M", c.get("BLOCK_R")), c.get("BLOCK_N", c.get("BLOCK_T")),
                                    c.get("BLOCK_K"), v["num_warps"], v.get("num_stages"), v.get("maxnreg")))
    assert len(tiles["materialize"]) == len(configs.MATERIALIZE["half"])
    assert {(128, 256, 64, 8, 3, None), (128, 128, 64, 8, 4, None)} <= tiles["materialize"]
    assert len(tiles["grad_weight"]) == len(configs.GRAD_WEIGHT["half"])
    assert {(128, 128, 64, 8, 3, 128), (128, 128, 64, 8, 3, None)} <= tiles["grad_weight"]
    assert len(tiles["grad_weight_sddmm"]) == len(configs.SDDMM["half"])
    assert len(tiles["spmm"]) == len(configs.SPMM)


def test_default_bf16_configurations_at_7b_keep_their_budget(variants):
    """Before the rework (64 x 64 x 32 materialize, 128 x 128 x 32 grad_weight): one grad_weight
    block per SM (165 registers), 41.5 main-loop instructions per wgmma in materialize, 201
    instructions per one-entry sparse step in materialize and ~500 in grad_weight."""
    default = {v["kernel"]: v for v in variants
               if v["default"] and v["dtype"] == "bf16" and "7b 11008x4096" in v["shapes"]}
    assert default["materialize"]["blocks_per_sm"] >= 2 and default["grad_weight"]["blocks_per_sm"] >= 2
    assert default["materialize"]["main_loop"]["per_wgmma"] < 41.5
    assert default["grad_weight"]["main_loop"]["per_wgmma"] < 40
    assert default["materialize"]["sparse_step"] < 201  # a step now adds CHUNK = 8 entries per row
    assert default["grad_weight"]["sparse_step"] < 201

"""Hopper proof without a GPU: every Triton kernel, compiled ahead of time for sm_90a.

Each case is a kernel with the arguments its host function passes at a LLaMA shape (7B's
``11008 x 4096``, rank 1024, density 0.05, both directions; 1B's odd ``5461``), a dtype (bf16,
fp16, fp32 IEEE, fp32 TF32 where the kernel has a ``tl.dot``) and the host function's block
configuration (per dot precision where it has several). It is specialized as Triton's launcher would (an int equal to 1 becomes a
constant; pointers and ints divisible by 16 carry that hint), compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` and Triton's bundled
``ptxas``, then disassembled with its ``cuobjdump``. Cases that specialize the same way are
compiled once.

Per compiled variant the JSON records: ``registers`` and spill bytes (``ptxas -v``),
``shared_bytes`` (Triton's metadata), ``wgmma`` (the PTX holds ``wgmma.mma_async``), and for the
main loop (the first loop of the SASS, the tile GEMM's reduction; spmm's only loop) its
instruction count per iteration and the counts per opcode. ``--check`` exits non-zero when a
variant fails to compile, spills, or has a bf16/fp16 ``tl.dot`` that is not a wgmma.

    python benchmarks/kernels_sm90.py                 # writes benchmarks/results/kernels_sm90.json
    python benchmarks/kernels_sm90.py --check --jobs 2 --out /some/file.json

Needs Triton (any platform Triton ships ptxas for); no GPU, no CUDA driver.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # name: (out, in, rank, tokens); 1B's odd width with an odd token count
    "7b": (11008, 4096, 1024, 16384),
    "1b": (5461, 2048, 512, 2047),
}
DENSITY = 0.05
DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32", "tf32": "fp32"}  # tf32: fp32 operands, TF32 dots


def _host_defaults(fn) -> dict:
    """The block configuration a host function launches with: its keyword defaults."""
    import inspect

    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not inspect._empty}


def cases() -> list[dict]:
    """Every (kernel, shape, direction, dtype, mode) with its launch arguments, as the host passes them."""
    import torch

    from slcompile.kernels import grad_weight, materialize, spmm

    found = []
    for shape, (out_f, in_f, rank, tokens) in SHAPES.items():
        for out_, in_ in ((out_f, in_f), (in_f, out_f)):  # up/gate and down projections
            nnz = int(DENSITY * out_ * in_)
            for dname, dtype in DTYPES.items():
                precision = "ieee" if dname == "fp32" else "tf32"  # as host.dot_precision: ignored for bf16/fp16
                blocks = _host_defaults(materialize.materialize)
                found.append(dict(
                    kernel="materialize", shape=f"{shape} {out_}x{in_}", dtype=dname, fn=materialize._materialize_kernel,
                    args=dict(a_ptr=dtype, b_ptr=dtype, values_ptr=dtype, support_ptr="i32", tile_ptr_ptr="i32",
                              w_ptr=dtype, out_features=out_, in_features=in_, rank=rank,
                              n_col_tiles=-(-in_ // blocks["block_n"]), scale=0.5, stride_ar=in_, stride_ai=1,
                              stride_bo=rank, stride_br=1, stride_wo=in_, stride_wi=1),
                    constexprs=dict(BLOCK_M=blocks["block_m"], BLOCK_N=blocks["block_n"], BLOCK_K=blocks["block_k"],
                                    INPUT_PRECISION=precision),
                    options=dict(num_warps=blocks["num_warps"]), nnz=nnz))
                blocks = grad_weight.BLOCKS[precision]
                for write_dw in (True, False):
                    found.append(dict(
                        kernel=f"grad_weight{'' if write_dw else '_sddmm'}", shape=f"{shape} {out_}x{in_}",
                        dtype=dname, fn=grad_weight._grad_weight_kernel,
                        args=dict(g_ptr=dtype, x_ptr=dtype, support_ptr="i32", tile_ptr_ptr="i32", dw_ptr=dtype,
                                  dvalues_ptr=dtype, tokens=tokens, out_features=out_, in_features=in_,
                                  n_col_tiles=-(-in_ // blocks["block_n"]), stride_gt=out_, stride_go=1,
                                  stride_xt=in_, stride_xi=1, stride_wo=in_ if write_dw else 0,
                                  stride_wi=1 if write_dw else 0),
                        constexprs=dict(BLOCK_M=blocks["block_m"], BLOCK_N=blocks["block_n"],
                                        BLOCK_K=blocks["block_k"], WRITE_DW=write_dw, INPUT_PRECISION=precision),
                        options=dict(num_warps=blocks["num_warps"], num_stages=blocks["num_stages"]), nnz=nnz))
                if dname == "tf32":  # no tl.dot in spmm
                    continue
                blocks = _host_defaults(spmm.spmm)
                found.append(dict(  # x S^T (S: out_ x in_) in forward; dY S is the same kernel with the roles swapped
                    kernel="spmm", shape=f"{shape} {out_}x{in_}", dtype=dname, fn=spmm._spmm_kernel,
                    args=dict(crow_ptr="i32", col_ptr="i32", val_ptr=dtype, dense_ptr=dtype, out_ptr=dtype,
                              n_rows=out_, tokens=tokens, stride_dk=spmm.token_major(torch.empty(tokens, 1)).stride(1),
                              stride_dt=1, stride_ot=out_,
                              stride_or=1),
                    constexprs=dict(BLOCK_R=blocks["block_r"], BLOCK_T=blocks["block_t"]),
                    options=dict(num_warps=blocks["num_warps"]), nnz=nnz))
    return found


def _specialize(case: dict):
    """``(signature, constexprs, attrs)`` as Triton's launcher specializes these arguments."""
    fn, signature, constexprs, attrs = case["fn"], {}, dict(case["constexprs"]), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = case["args"][name]
        if isinstance(value, str):  # a pointer to this element type; torch allocations are 16-byte aligned
            signature[name], divisible = f"*{value}", True
        elif isinstance(value, float):
            signature[name], divisible = "fp32", False
        elif value == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
            continue
        else:
            signature[name], divisible = ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0
        if divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _main_loop(sass: str) -> dict:
    """The first loop of the SASS (``cuobjdump -sass``): from the target of the first backward
    branch to that branch, its instruction count and the count per opcode (predicates and
    modifiers dropped)."""
    instructions = {int(m.group(1), 16): m.group(2).strip()
                    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;/]*?)\s*;", sass)}
    loops = sorted((int(m.group(1), 16), address) for address, text in instructions.items()
                   if (m := re.search(r"\bBRA\s+(0x[0-9a-f]+)", text)) and int(m.group(1), 16) < address)
    if not loops:
        return {"instructions": 0, "opcodes": {}, "loops": 0}
    start, end = loops[0]
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
                              for address, text in instructions.items() if start <= address <= end)
    return {"instructions": sum(ops.values()), "opcodes": dict(ops.most_common()), "loops": len(loops)}


_VARIANTS: dict[str, dict] = {}  # filled before the worker processes fork (a JIT function does not pickle)


def compile_variant(key: str) -> dict:
    """Compile the specialization ``key`` of :data:`_VARIANTS` for sm_90a; its statistics (or the error)."""
    case = _VARIANTS[key]
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource
    from triton import knobs

    signature, constexprs, attrs = _specialize(case)
    result = {"variant": key, "kernel": case["kernel"], "dtype": case["dtype"],
              "constexprs": {k: v for k, v in constexprs.items() if k in case["constexprs"]}, **case["options"]}
    log = io.StringIO()
    try:
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(case["fn"], signature, constexprs, attrs),
                                      target=GPUTarget("cuda", 90, 32), options=case["options"])
    except Exception as error:  # a failed compile is a result (the check reports it)
        return {**result, "error": f"{type(error).__name__}: {str(error)[-2000:]}"}
    ptxas = log.getvalue()
    regs = re.search(r"Used (\d+) registers", ptxas)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        cuobjdump = str(Path(get_ptxas(90).path).with_name("cuobjdump"))
        sass = subprocess.run([cuobjdump, "-sass", cubin.name], capture_output=True, text=True, check=True).stdout
    return {**result, "registers": int(regs.group(1)), "spill_store_bytes": int(spills.group(1)),
            "spill_load_bytes": int(spills.group(2)), "shared_bytes": compiled.metadata.shared,
            "wgmma": "wgmma.mma_async" in compiled.asm["ptx"], "main_loop": _main_loop(sass)}


def problems(variants: list[dict]) -> list[str]:
    """What ``--check`` fails on: no compile, any spill, a half-precision tl.dot that is not wgmma."""
    found = []
    for v in variants:
        name = f"{v['variant']}"
        if "error" in v:
            found.append(f"{name}: {v['error'][:300]}")
            continue
        if v["spill_store_bytes"] or v["spill_load_bytes"]:
            found.append(f"{name}: spills {v['spill_store_bytes']} / {v['spill_load_bytes']} bytes")
        if v["kernel"] != "spmm" and v["dtype"] in ("bf16", "fp16", "tf32") and not v["wgmma"]:
            found.append(f"{name}: its tl.dot is not a wgmma")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kernels_sm90.json")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--check", action="store_true", help="exit 1 on a failed compile, a spill or no wgmma")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    variants = _VARIANTS
    uses: dict[str, list[str]] = collections.defaultdict(list)
    for case in cases():
        signature, constexprs, attrs = _specialize(case)
        key = (f"{case['kernel']} {case['dtype']} " + " ".join(f"{k}={v}" for k, v in constexprs.items())
               + " D:" + ",".join(str(i[0]) for i in sorted(attrs)))
        variants.setdefault(key, case)
        uses[key].append(case["shape"])
    with tempfile.TemporaryDirectory() as cache:  # Triton's cache: nothing left behind
        os.environ["TRITON_CACHE_DIR"] = cache
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            results = pool.map(compile_variant, sorted(variants), chunksize=1)
    for r in results:
        r["shapes"] = uses[r["variant"]]
    report = {"target": "cuda sm_90a (GPUTarget('cuda', 90, 32)), Triton's bundled ptxas",
              "triton": triton.__version__, "density": DENSITY, "shapes": SHAPES, "variants": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for r in results:
        if "error" in r:
            print(f"{r['variant']}: ERROR")
        else:
            print(f"{r['kernel']:18s} {r['dtype']:5s} regs {r['registers']:3d}  smem {r['shared_bytes']:6d}  "
                  f"wgmma {r['wgmma']!s:5s}  loop {r['main_loop']['instructions']:4d}  {', '.join(r['shapes'])}")
    bad = problems(results)
    print("\n".join(bad) or f"{len(results)} variants: all compile, no spills, half-precision dots on wgmma")
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

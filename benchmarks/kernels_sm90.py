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


def _tiled(kernel: str, module, fn, listed: dict, dname: str, precision: str, every: bool, shape: str,
           args: dict, constexprs: dict, nnz: int) -> list[dict]:
    """One case per configuration a tiled kernel (materialize, grad_weight) offers for these
    arguments (``configs.offered``; pointers are 16-byte aligned as torch allocates them), launched as
    its host function does (``maxnreg`` only on the read-back epilogue). ``every``: all of them,
    else the default only."""
    import torch

    from slcompile.kernels import configs

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dname, torch.float32)
    aligned = all(v == 1 or v % 16 == 0 for v in args.values() if isinstance(v, int))
    offered = configs.offered(listed, dtype, precision, aligned)
    return [dict(kernel=kernel, shape=shape, dtype=dname, fn=fn, nnz=nnz, default=i == 0,
                 args={**args, "n_col_tiles": -(-args["in_features"] // c["block_n"])},
                 constexprs=dict(BLOCK_M=c["block_m"], BLOCK_N=c["block_n"], BLOCK_K=c["block_k"],
                                 INPUT_PRECISION=precision, GROUP_M=module.GROUP_M, CHUNK=module.CHUNK, **constexprs),
                 options=dict(num_warps=c["num_warps"], num_stages=c["num_stages"],
                              **({"maxnreg": c["maxnreg"]} if c["maxnreg"] and constexprs.get("FROM_DW") else {})))
            for i, c in enumerate(offered if every else offered[:1])]


def cases(subset: bool = False) -> list[dict]:
    """Every (kernel, shape, direction, dtype, configuration) with its launch arguments, as the host
    passes them. ``subset``: the default configurations, and the others only for bf16 / fp32 at 7B
    (the CI set: fp16 compiles as bf16 does, and 1B's odd widths only change the divisibility hints)."""
    import torch

    from slcompile.kernels import configs, grad_weight, materialize, spmm

    found = []
    for shape, (out_f, in_f, rank, tokens) in SHAPES.items():
        for out_, in_ in ((out_f, in_f), (in_f, out_f)):  # up/gate and down projections
            nnz, name = int(DENSITY * out_ * in_), f"{shape} {out_}x{in_}"
            for dname, dtype in DTYPES.items():
                precision = "ieee" if dname == "fp32" else "tf32"  # as host.dot_precision: ignored for bf16/fp16
                every = not subset or (shape == "7b" and dname in ("bf16", "fp32"))
                found += _tiled("materialize", materialize, materialize._materialize_kernel, configs.MATERIALIZE,
                                dname, precision, every, name,
                                dict(a_ptr=dtype, b_ptr=dtype, values_ptr=dtype, support_ptr="i32",
                                     tile_ptr_ptr="i32", w_ptr=dtype, out_features=out_, in_features=in_, rank=rank,
                                     scale=0.5, stride_ar=in_, stride_ai=1, stride_bo=rank, stride_br=1,
                                     stride_wo=in_, stride_wi=1), {}, nnz)
                for write_dw, listed in ((True, configs.GRAD_WEIGHT), (False, configs.SDDMM)):
                    found += _tiled(f"grad_weight{'' if write_dw else '_sddmm'}", grad_weight,
                                    grad_weight._grad_weight_kernel, listed, dname, precision, every, name,
                                    dict(g_ptr=dtype, x_ptr=dtype, support_ptr="i32", tile_ptr_ptr="i32",
                                         dw_ptr=dtype, dvalues_ptr=dtype, tokens=tokens, out_features=out_,
                                         in_features=in_, stride_gt=out_, stride_go=1, stride_xt=in_, stride_xi=1,
                                         stride_wo=in_ if write_dw else 0, stride_wi=1 if write_dw else 0),
                                    dict(WRITE_DW=write_dw, FROM_DW=write_dw), nnz)
                if dname == "tf32":  # no tl.dot in spmm
                    continue
                found += [dict(  # x S^T (S: out_ x in_) in forward; dY S is the same kernel with the roles swapped
                    kernel="spmm", shape=name, dtype=dname, fn=spmm._spmm_kernel, nnz=nnz, default=i == 0,
                    args=dict(crow_ptr="i32", col_ptr="i32", val_ptr=dtype, dense_ptr=dtype, out_ptr=dtype,
                              n_rows=out_, tokens=tokens, stride_dk=spmm.token_major(torch.empty(tokens, 1)).stride(1),
                              stride_dt=1, stride_ot=out_, stride_or=1),
                    constexprs=dict(BLOCK_R=c["block_r"], BLOCK_T=c["block_t"]),
                    options=dict(num_warps=c["num_warps"]))
                    for i, c in enumerate(configs.SPMM if every else configs.SPMM[:1])]
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


def _loops(sass: str) -> list[dict]:
    """The loops of the SASS (``cuobjdump -sass``), in address order: each from the target of a
    backward branch to that branch, with its instruction count and the count per opcode
    (predicates and modifiers dropped)."""
    instructions = {int(m.group(1), 16): m.group(2).strip()
                    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;/]*?)\s*;", sass)}
    spans = sorted((int(m.group(1), 16), address) for address, text in instructions.items()
                   if (m := re.search(r"\bBRA\s+(0x[0-9a-f]+)", text)) and int(m.group(1), 16) < address)
    loops = []
    for start, end in spans:
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
                                  for address, text in instructions.items() if start <= address <= end)
        loops.append({"start": start, "end": end, "instructions": sum(ops.values()),
                      "opcodes": dict(ops.most_common())})
    return loops


def _loop_summary(loops: list[dict], kernel: str) -> dict:
    """``main_loop``: the first loop (the tile GEMM's reduction; spmm's only loop);
    ``sparse_step``: the sparse loop's instructions per step (in the tiled kernels the last
    outermost loop after the main one, the epilogue's chunk, counted with the loops nested in it
    once, e.g. the compare-and-swap retry of a bf16 atomic add; spmm's main loop), ``None`` if the
    compiler left none."""
    if not loops:
        return {"main_loop": {"instructions": 0, "opcodes": {}, "loops": 0}, "sparse_step": None}
    main = loops[0]
    after = [loop for loop in loops if loop["start"] > main["end"]
             and not any(o["start"] <= loop["start"] and loop["end"] <= o["end"] and o is not loop for o in loops)]
    sparse = main if kernel == "spmm" else (after[-1] if after else None)
    wgmma = main["opcodes"].get("HGMMA", 0)
    return {"main_loop": {"instructions": main["instructions"], "opcodes": main["opcodes"], "loops": len(loops),
                          "per_wgmma": round(main["instructions"] / wgmma, 1) if wgmma else None},
            "sparse_step": sparse and sparse["instructions"]}


# H100 / H200 (sm_90) per-SM limits: registers, shared memory (the CUDA runtime reserves 1 KB per
# block), threads, resident blocks; registers are allocated per warp in units of 256.
SM90 = {"registers": 65536, "shared_bytes": 228 * 1024, "reserved_shared_bytes": 1024, "threads": 2048, "blocks": 32}


def blocks_per_sm(registers: int, shared_bytes: int, num_warps: int) -> int:
    """Resident blocks per SM of a kernel using ``registers`` per thread and ``shared_bytes`` per block."""
    per_warp = -(-registers * 32 // 256) * 256
    return min(SM90["blocks"], SM90["threads"] // (32 * num_warps), SM90["registers"] // (per_warp * num_warps),
               SM90["shared_bytes"] // (shared_bytes + SM90["reserved_shared_bytes"]))


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
    result = {"variant": key, "kernel": case["kernel"], "dtype": case["dtype"], "default": case["default"],
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
    registers, shared = int(regs.group(1)), compiled.metadata.shared
    return {**result, "registers": registers, "spill_store_bytes": int(spills.group(1)),
            "spill_load_bytes": int(spills.group(2)), "shared_bytes": shared,
            "blocks_per_sm": blocks_per_sm(registers, shared, case["options"]["num_warps"]),
            "wgmma": "wgmma.mma_async" in compiled.asm["ptx"], **_loop_summary(_loops(sass), case["kernel"])}


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
    parser.add_argument("--subset", action="store_true",
                        help="the CI set: default configurations, the others for bf16/fp32 at 7B only (cases())")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    variants = _VARIANTS
    uses: dict[str, list[str]] = collections.defaultdict(list)
    for case in cases(args.subset):
        signature, constexprs, attrs = _specialize(case)
        key = (f"{case['kernel']} {case['dtype']} " + " ".join(f"{k}={v}" for k, v in constexprs.items())
               + " D:" + ",".join(str(i[0]) for i in sorted(attrs))
               + "".join(f" {k}={v}" for k, v in case["options"].items()))
        variants.setdefault(key, case)
        uses[key].append(case["shape"])
    with tempfile.TemporaryDirectory() as cache:  # Triton's cache: nothing left behind
        os.environ["TRITON_CACHE_DIR"] = cache
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            results = pool.map(compile_variant, sorted(variants), chunksize=1)
    for r in results:
        r["shapes"] = uses[r["variant"]]
    report = {"target": "cuda sm_90a (GPUTarget('cuda', 90, 32)), Triton's bundled ptxas",
              "triton": triton.__version__, "density": DENSITY, "shapes": SHAPES, "sm90_limits": SM90,
              "subset": args.subset, "variants": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for r in results:
        if "error" in r:
            print(f"{r['variant']}: ERROR")
        else:
            c = r["constexprs"]
            tile = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "BLOCK_T") if k in c)
            print(f"{r['kernel']:17s} {r['dtype']:4s} {tile:11s} w{r['num_warps']} s{r.get('num_stages', '-')} "
                  f"{'*' if r['default'] else ' '} regs {r['registers']:3d}  smem {r['shared_bytes']:6d}  "
                  f"blocks/SM {r['blocks_per_sm']}  loop {r['main_loop']['instructions']:4d}"
                  f" /wgmma {r['main_loop']['per_wgmma']}  sparse {r['sparse_step']}  {', '.join(r['shapes'])}")
    bad = problems(results)
    print("\n".join(bad) or f"{len(results)} variants: all compile, no spills, half-precision dots on wgmma")
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

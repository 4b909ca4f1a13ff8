"""The steps of ``gpu_check.sh`` that are not another benchmark: one JSON each.

    python benchmarks/gpu_check.py device OUT.json
    python benchmarks/gpu_check.py correctness OUT.json --dtype bfloat16
    python benchmarks/gpu_check.py timings OUT.json
    python benchmarks/gpu_check.py memory OUT.json

``--dry-run``: CPU, tiny shapes, the Triton kernels in the interpreter (set ``TRITON_INTERPRET=1``
before Python starts), a couple of repeats: the same code end to end, so it cannot rot.

- ``device``: torch / Triton / Python versions, the GPU (name, capability, memory), whether the
  Triton kernels are registered.
- ``correctness``: each kernel (materialize, grad_weight writing ``dW`` and as SDDMM, spmm) in one
  dtype against float64 torch at 7B-like and odd shapes, errors relative to the dtype's
  tolerance (``4 eps`` times the magnitude of the terms); ``ok`` per case. Exit 1 on a failure.
- ``timings``: per linear shape of 350M/1B/7B (``in``, ``out``, rank, density of the config),
  bf16, median milliseconds of each kernel against the torch route it replaces: materialize vs
  ``index_add`` into zeros plus the cuBLAS ``B @ A``; grad_weight vs the cuBLAS ``dY^T X`` plus
  the gather at the support; the SDDMM (no ``dW``) and spmm ``x S^T`` vs torch's CSR product,
  and the dense cuBLAS ``x W^T`` of the same shape for scale. The kernels run in their default
  configuration; ``*_tuned`` is the op's CUDA implementation, tuned on its first (warm-up) call
  among every configuration and the torch route (``slcompile.kernels.autotune``); ``tuned``
  lists the choice per key.
- ``memory``: fwd+bwd peak of one 7B decoder layer's seven linears (``layer_bench``'s
  ``DecoderLinears``), bf16, dense ``nn.Linear`` vs ``SLLinear``, at 4096 tokens.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slcompile import kernels, ops, ops_factored  # noqa: E402
from slcompile.model_configs import get_config  # noqa: E402
from slcompile.support import generate_support  # noqa: E402

EPS = {torch.float32: 1.2e-7, torch.float16: 9.8e-4, torch.bfloat16: 7.8e-3}


def device_info(args) -> dict:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "device": args.device,
            "triton_kernels_registered": kernels.cuda_kernels_registered()}
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "capability": list(torch.cuda.get_device_capability()),
                 "memory_gib": round(props.total_memory / 2**30, 1), "sm_count": props.multi_processor_count,
                 "gpu_count": torch.cuda.device_count()}
    return info


def _operands(out_f, in_f, rank, density, tokens, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    support = generate_support(out_f, in_f, int(density * out_f * in_f), seed, device=device)
    made = {"A": (rank, in_f), "B": (out_f, rank), "values": (support.numel(),), "x": (tokens, in_f),
            "g": (tokens, out_f)}
    made = {k: (torch.randn(shape, generator=gen) / 4).to(device, dtype) for k, shape in made.items()}
    return made, support


def _error(got, want, magnitude, dtype) -> float:
    """Max error as a multiple of the tolerance (<= 1 passes)."""
    err = (got.double() - want).abs()
    return float((err / (4 * EPS[dtype] * magnitude + 1e-6)).max()) if err.numel() else 0.0


def correctness(args) -> dict:
    from slcompile.kernels.grad_weight import grad_weight
    from slcompile.kernels.materialize import materialize
    from slcompile.kernels.spmm import spmm

    dtype = getattr(torch, args.dtype)
    shapes = [(7, 33, 4, 0.3, 5)] if args.dry_run else [(11008, 4096, 1024, 0.05, 2048), (5461, 2048, 512, 0.05, 777)]
    cases = []
    for out_f, in_f, rank, density, tokens in shapes:
        t, support = _operands(out_f, in_f, rank, density, tokens, dtype, args.device)
        d = {k: v.double() for k, v in t.items()}
        a = {k: v.abs() for k, v in d.items()}
        flat = support.long()
        w_ref = ops.materialized_weight(d["A"], d["B"], d["values"], support, 0.5)
        w_mag = ops.materialized_weight(a["A"], a["B"], a["values"], support, 0.5)
        dw_ref, dw_mag = d["g"].t() @ d["x"], a["g"].t() @ a["x"]
        index = ops_factored.sparse_index(support, out_f, in_f)
        s_ref = torch.zeros(out_f * in_f, dtype=torch.float64, device=args.device).index_put_((flat,), d["values"])
        s_ref = s_ref.view(out_f, in_f)
        dw, dvalues = grad_weight(t["g"], t["x"], support)
        _, sampled = grad_weight(t["g"], t["x"], support, write_dw=False)
        errors = {
            "materialize": _error(materialize(t["A"], t["B"], t["values"], support, 0.5), w_ref, w_mag, dtype),
            "grad_weight dW": _error(dw, dw_ref, dw_mag, dtype),
            "grad_weight dvalues": _error(dvalues, dw_ref.view(-1)[flat], dw_mag.view(-1)[flat], dtype),
            "grad_weight sddmm": _error(sampled, dw_ref.view(-1)[flat], dw_mag.view(-1)[flat], dtype),
            "spmm x S^T": _error(spmm(index.crow, index.col, index.csr_values(t["values"]), t["x"]),
                                 d["x"] @ s_ref.t(), a["x"] @ s_ref.abs().t(), dtype),
        }
        cases += [{"kernel": k, "shape": [out_f, in_f, rank, tokens], "error_over_tolerance": e, "ok": e <= 1.0}
                  for k, e in errors.items()]
    return {"dtype": args.dtype, "device": args.device, "cases": cases, "ok": all(c["ok"] for c in cases)}


def _median_ms(fn, repeats: int, device: str) -> float:
    fn()  # warm-up (compiles a Triton specialization the first time)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def timings(args) -> dict:
    from slcompile.kernels.grad_weight import grad_weight
    from slcompile.kernels.materialize import materialize
    from slcompile.kernels.spmm import spmm

    dtype = torch.float32 if args.dry_run else torch.bfloat16
    configs, tokens = (["llama-tiny"], 16) if args.dry_run else (["llama-350m", "llama-1b", "llama-7b"], 8192)
    rows = []
    for name in configs:
        cfg = get_config(name)
        for in_f, out_f in sorted({(i, o) for _, i, o in cfg.linear_shapes()}):
            t, support = _operands(out_f, in_f, cfg.rank, cfg.density, tokens, dtype, args.device)
            index = ops_factored.sparse_index(support, out_f, in_f)
            csr_values = index.csr_values(t["values"])
            weight = materialize(t["A"], t["B"], t["values"], support, 0.5)
            ms = {
                "materialize": lambda: materialize(t["A"], t["B"], t["values"], support, 0.5),
                "materialize_torch": lambda: ops.materialized_weight(t["A"], t["B"], t["values"], support, 0.5),
                "grad_weight": lambda: grad_weight(t["g"], t["x"], support),
                "grad_weight_torch": lambda: ops.grad_weight_and_values(t["g"], t["x"], support),
                "sddmm": lambda: grad_weight(t["g"], t["x"], support, write_dw=False),
                "sddmm_torch": lambda: ops_factored.TORCH_SPARSE.sampled(index, support, t["g"], t["x"], dtype),
                "spmm": lambda: spmm(index.crow, index.col, csr_values, t["x"]),
                "spmm_torch": lambda: ops_factored.TORCH_SPARSE.s_x(index, t["values"], t["x"]),
                "dense_gemm": lambda: t["x"] @ weight.t(),
                "materialize_tuned": lambda: kernels._materialize_cuda(t["A"], t["B"], t["values"], support, 0.5),
                "grad_weight_tuned": lambda: kernels.triton_grad_weight(t["g"], t["x"], support),
                "sddmm_tuned": lambda: kernels._triton_sampled(index, support, t["g"], t["x"], dtype),
                "spmm_tuned": lambda: kernels._triton_s_x(index, t["values"], t["x"]),
            }
            rows.append({"config": name, "in": in_f, "out": out_f, "rank": cfg.rank, "density": cfg.density,
                         "tokens": tokens,
                         "ms": {k: round(_median_ms(fn, args.repeats, args.device), 4) for k, fn in ms.items()}})
            print(rows[-1], flush=True)
    tuned = [{"key": repr(key), "choice": label} for key, label in kernels.autotune.tuned().items()]
    return {"dtype": str(dtype).removeprefix("torch."), "device": args.device, "rows": rows, "tuned": tuned}


def memory(args) -> dict:
    from layer_bench import build_layers, cuda_peak
    from layer_cpu import peak_bytes

    name, tokens, dtype = ("llama-tiny", 16, torch.float32) if args.dry_run else ("llama-7b", 4096, torch.bfloat16)
    cfg = get_config(name)
    layers = build_layers(cfg, args.device, dtype)
    x = torch.randn(tokens, cfg.dim, device=args.device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(tokens, cfg.dim, device=args.device, dtype=dtype)
    measure = cuda_peak if args.device == "cuda" else peak_bytes
    peaks = {v: measure(layers[v], x, grad_y) for v in ("dense", "sllinear")}
    params = {v: sum(p.numel() * p.element_size() for p in layers[v].parameters()) for v in peaks}
    return {"config": name, "tokens": tokens, "dtype": str(dtype).removeprefix("torch."), "device": args.device,
            "fwd_bwd_peak_bytes": peaks, "parameter_bytes": params,
            "peak_ratio_sllinear_to_dense": peaks["sllinear"]["peak"] / peaks["dense"]["peak"]}


STEPS = {"device": device_info, "correctness": correctness, "timings": timings, "memory": memory}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=list(STEPS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    args.device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        args.repeats = 1
    started = time.perf_counter()
    result = STEPS[args.step](args)
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.step}: wrote {args.out} ({result['seconds']} s)")
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Decoder-layer benchmark: the seven linears of one LLaMA layer, fwd+bwd, per implementation.

The layer is the seven linears wired as in the model, with cheap elementwise stand-ins for
attention and the norms so the linears dominate::

    q, k, v = q_proj(x), k_proj(x), v_proj(x)        # one shared input (fusable)
    h = o_proj(q * sigmoid(k) + v)
    g, u = gate_proj(h), up_proj(h)                  # one shared input (fusable)
    y = down_proj(silu(g) * u)

Variants (same parameters in every SLTrain variant, ``B`` random so every term is live):

- ``dense``: ``nn.Linear`` (eager);
- ``autograd``: SLTrain with plain differentiable torch ops (``AutogradSLLinear`` of
  ``layer_cpu.py``: ``W = scale * B @ A``, ``index_add`` of the values, ``F.linear``; eager);
- ``sllinear``: ``slcompile.SLLinear`` (our custom ops, eager);
- ``backend``: ``torch.compile(sllinear, backend="slcompile")`` (default options: the cost
  model picks the path per call site, as eager ``path="auto"`` does per call);
- ``backend_autotune``: the same with ``mode="max-autotune"`` (Inductor's autotuning and CUDA
  graphs; our ops' CUDA implementations tune themselves in every mode, ``slcompile.kernels.autotune``);
- ``backend_mat``: the same with ``options={"choose_path": False}`` (every call materialized);
- ``backend_fused``: ``options={"fuse_shared_input": True, "choose_path": False}`` (q/k/v and
  gate/up share one materialized GEMM);
- ``pattern``: ``torch.compile(autograd, backend="slcompile")``: the pattern pass turns the
  hand-written product into ``sl_linear`` (its pass counts are recorded).

Time: median of ``forward + backward(grad_y)`` over ``--repeats``, variants interleaved
round-robin (order rotated each repeat) after warm-up; CUDA times are wall time around a
synchronized call. Peak: CUDA ``max_memory_allocated`` above the pre-call level; CPU the
allocation-event replay of ``layer_cpu.peak_bytes`` (bytes allocated and live during the call).
Ratios are to ``dense``; ``floor`` is the FLOP floor of the materialize path,
``1 + 4r/(3N)`` (the ``autograd`` variant keeps ``W`` and forms it once: ``1 + r/N``).
Writes ``benchmarks/results/layer_bench_<device>.json`` and a PNG bar chart next to it (time and
peak per case and variant, the floor marked).

GPU (default there): 350M/1B/7B shapes at 2k/8k/16k tokens, bf16. CPU: small shapes, fp32, and
ratios only mean "on this CPU" (2 shared cores here)::

    .venv/bin/python benchmarks/layer_bench.py                       # CPU: mini,60m,130m at 256,1024 tokens
    python benchmarks/layer_bench.py --device cuda                  # GPU: 350m,1b,7b at 2k,8k,16k
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
from layer_cpu import AutogradSLLinear, machine_info, peak_bytes  # noqa: E402

import slcompile.backend  # noqa: E402
from slcompile import SLLinear  # noqa: E402
from slcompile.model_configs import LlamaConfig, get_config  # noqa: E402

VARIANTS = ("dense", "autograd", "sllinear", "backend", "backend_autotune", "backend_mat", "backend_fused", "pattern")
COMPILED = {"backend": ("sllinear", {}), "backend_autotune": ("sllinear", {"mode": "max-autotune"}),
            "backend_mat": ("sllinear", {"options": {"choose_path": False}}),
            "backend_fused": ("sllinear", {"options": {"fuse_shared_input": True, "choose_path": False}}),
            "pattern": ("autograd", {})}  # variant: (module it compiles, torch.compile keywords)
MIB = 2**20


class DecoderLinears(nn.Module):
    """The seven linears of a decoder layer with the model's input sharing (see module doc)."""

    def __init__(self, linears: dict[str, nn.Module]) -> None:
        super().__init__()
        self.proj = nn.ModuleDict(linears)

    def forward(self, x: Tensor) -> Tensor:
        p = self.proj
        h = p["o_proj"](p["q_proj"](x) * torch.sigmoid(p["k_proj"](x)) + p["v_proj"](x))
        return p["down_proj"](F.silu(p["gate_proj"](h)) * p["up_proj"](h))


def build_layers(cfg: LlamaConfig, device: str, dtype: torch.dtype) -> dict[str, nn.Module]:
    """Eager ``dense``, ``autograd`` and ``sllinear`` layers (the SLTrain two share parameters)."""
    torch.manual_seed(0)
    dense, sl, ag = {}, {}, {}
    for index, (name, fan_in, fan_out) in enumerate(cfg.linear_shapes()):
        dense[name] = nn.Linear(fan_in, fan_out, bias=False)
        sl[name] = SLLinear(fan_in, fan_out, bias=False, rank=cfg.rank, alpha=cfg.alpha, density=cfg.density,
                            seed=index)
        with torch.no_grad():
            sl[name].B.normal_(0.0, 1.0 / cfg.rank ** 0.5)
        ag[name] = AutogradSLLinear(sl[name])
    return {key: DecoderLinears(mods).to(device, dtype) for key, mods in
            (("dense", dense), ("sllinear", sl), ("autograd", ag))}


def fwd_bwd(module: nn.Module, x: Tensor, grad_y: Tensor) -> None:
    module(x).backward(grad_y)


def clear(module: nn.Module, x: Tensor) -> None:
    module.zero_grad(set_to_none=True)
    x.grad = None


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def cuda_peak(module: nn.Module, x: Tensor, grad_y: Tensor) -> dict[str, int]:
    clear(module, x)
    sync("cuda")
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd(module, x, grad_y)
    sync("cuda")
    result = {"peak": torch.cuda.max_memory_allocated() - base, "end": torch.cuda.memory_allocated() - base}
    clear(module, x)
    return result


def check_agree(modules: dict[str, nn.Module], x: Tensor, grad_y: Tensor, tol: float) -> dict[str, float]:
    """Max relative difference of output and input gradient of each SLTrain variant to ``sllinear``."""
    results = {}
    for name, module in modules.items():
        clear(module, x)
        y = module(x)
        y.backward(grad_y)
        results[name] = (y.detach().float(), x.grad.float())
        clear(module, x)
    ref_y, ref_dx = results["sllinear"]
    diffs = {}
    for name, (y, dx) in results.items():
        if name == "dense":
            continue
        diffs[name] = max(((y - ref_y).abs().max() / ref_y.abs().max()).item(),
                          ((dx - ref_dx).abs().max() / ref_dx.abs().max()).item())
        if diffs[name] > tol:
            raise AssertionError(f"{name} differs from sllinear by {diffs[name]:.3g} (relative)")
    return diffs


def bench_case(label: str, cfg: LlamaConfig, tokens: int, args) -> dict:
    torch._dynamo.reset()  # fresh compile caches per case: no recompile limit across cases
    device, dtype = args.device, args.dtype
    modules = build_layers(cfg, device, dtype)
    reports = {}
    for name, (source, keywords) in COMPILED.items():
        if name not in args.variants:
            continue
        modules[name] = torch.compile(modules[source], backend="slcompile", dynamic=False, **keywords)
    modules = {v: modules[v] for v in args.variants}
    x = torch.randn(tokens, cfg.dim, device=device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(tokens, cfg.dim, device=device, dtype=dtype)
    compile_s = {}
    for name in COMPILED:
        if name in modules:
            start = time.perf_counter()
            fwd_bwd(modules[name], x, grad_y)  # compiles forward and backward
            compile_s[name] = round(time.perf_counter() - start, 1)
            report = slcompile.backend.last_report()
            reports[name] = report.counts() if report else None
            clear(modules[name], x)
    diffs = check_agree(modules, x, grad_y, tol=1e-3 if dtype == torch.float32 else 3e-2)
    times = {v: [] for v in modules}
    names = list(modules)
    for rep in range(args.warmup + args.repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            clear(modules[name], x)
            sync(device)
            start = time.perf_counter()
            fwd_bwd(modules[name], x, grad_y)
            sync(device)
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - start)
    peak = {v: (cuda_peak if device == "cuda" else peak_bytes)(m, x, grad_y) for v, m in modules.items()}
    time_ms = {v: 1e3 * statistics.median(t) for v, t in times.items()}
    base_t, base_p = time_ms.get("dense"), peak.get("dense", {}).get("peak")
    return {
        "config": label, "tokens": tokens, "dtype": str(dtype).removeprefix("torch."), "rank": cfg.rank,
        "density": cfg.density,
        "flop_floor": {"sllinear": 1 + 4 * cfg.rank / (3 * tokens), "autograd": 1 + cfg.rank / tokens},
        "time_ms": time_ms, "time_ms_min": {v: 1e3 * min(t) for v, t in times.items()}, "time_ms_all": {v: [1e3 * s for s in t] for v, t in times.items()},
        "peak_bytes": peak,
        "ratios": {"time": {v: t / base_t for v, t in time_ms.items()} if base_t else {},
                   "peak": {v: p["peak"] / base_p for v, p in peak.items()} if base_p else {}},
        "max_rel_diff_to_sllinear": diffs, "compile_s": compile_s, "pass_counts": reports,
    }


def print_table(results: list[dict], variants: list[str]) -> None:
    print(f"{'config':<11}{'tokens':>7}{'floor':>7}{'':>7}" + "".join(f"{v:>16}" for v in variants))
    for res in results:
        for stat, times in (("median", res["time_ms"]), ("min", res["time_ms_min"])):
            base = times.get("dense")
            print(f"{res['config']:<11}{res['tokens']:>7}{res['flop_floor']['sllinear']:>7.2f}{stat:>7}"
                  + "".join(f"{times[v]:>8.2f} ({times[v] / base if base else float('nan'):.2f}x)" for v in variants))
    print("ms of forward+backward of the 7 linears over the repeats (ratio to dense); "
          "floor: FLOP floor of the materialize path\n")
    print(f"{'config':<11}{'tokens':>7}  " + "".join(f"{v:>16}" for v in variants))
    for res in results:
        p, rp = res["peak_bytes"], res["ratios"]["peak"]
        print(f"{res['config']:<11}{res['tokens']:>7}  "
              + "".join(f"{p[v]['peak'] / MIB:>8.1f} ({rp.get(v, float('nan')):.2f}x)" for v in variants))
    print("peak MiB allocated during forward+backward (ratio to dense)")


def plot(results: list[dict], variants: list[str], path: Path) -> None:
    """Bar chart: per case (config, tokens) one bar per variant, time and peak as multiples of
    ``dense``; the materialize path's FLOP floor as a black tick over the ``sllinear`` bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.1 * len(results) * len(variants) / 3), 7), sharex=True)
    width = 0.8 / len(variants)
    cases = range(len(results))
    for ax, metric in zip(axes, ("time", "peak")):
        for j, variant in enumerate(variants):
            xs = [i + (j - (len(variants) - 1) / 2) * width for i in cases]
            ax.bar(xs, [r["ratios"][metric].get(variant, float("nan")) for r in results], width, label=variant)
            if metric == "time" and variant == "sllinear":
                ax.scatter(xs, [r["flop_floor"]["sllinear"] for r in results], marker="_", s=160, color="black",
                           zorder=3, label="FLOP floor (materialize)")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_ylabel(f"{metric} / dense")
    axes[0].set_title(f"decoder layer's 7 linears, fwd+bwd, {results[0]['dtype']}", fontsize=9)
    axes[1].set_xticks(list(cases), [f"{r['config'][6:]}\n{r['tokens']} tok" for r in results], fontsize=8)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=7)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=None, help="comma-separated configs (default cpu: mini,60m,130m; cuda: "
                                                       "350m,1b,7b)")
    parser.add_argument("--tokens", default=None, help="comma-separated token counts (default cpu: 256,1024; "
                                                       "cuda: 2048,8192,16384)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=None, help="default 5 on cpu, 20 on cuda")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="default benchmarks/results/layer_bench_<device>.json")
    parser.add_argument("--plot", default=None, help="PNG bar chart (default next to the JSON; 'none': no chart)")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    args.shapes = [s if s.startswith("llama-") else f"llama-{s}"
                   for s in (args.shapes or ("350m,1b,7b" if gpu else "mini,60m,130m")).split(",") if s]
    args.tokens = [int(t) for t in (args.tokens or ("2048,8192,16384" if gpu else "256,1024")).split(",") if t]
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown or "sllinear" not in args.variants:
        parser.error(f"--variants: known {VARIANTS}; 'sllinear' (the reference of the check) is required")
    args.repeats = args.repeats or (20 if gpu else 5)
    args.out = Path(args.out or Path(__file__).parent / "results" / f"layer_bench_{args.device}.json")
    args.plot = None if args.plot == "none" else Path(args.plot) if args.plot else args.out.with_suffix(".png")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.shapes:
        for tokens in args.tokens:
            results.append(bench_case(name, get_config(name), tokens, args))
            write_report(args, results, started)  # after every case: a run cut short keeps what it measured
            print(f"done {name} {tokens} tokens ({time.perf_counter() - started:.0f} s)", flush=True)
    report = write_report(args, results, started)
    if args.plot:
        plot(results, args.variants, args.plot)
    print_table(results, args.variants)
    print(f"wrote {args.out}{f' and {args.plot}' if args.plot else ''} ({report['runtime_s']} s)")
    return report


def write_report(args: argparse.Namespace, results: list[dict], started: float) -> dict:
    """The JSON of ``--out`` with the cases measured so far."""
    report = {
        "benchmark": "layer_bench",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "machine": machine_info(),
        "settings": {"threads": torch.get_num_threads(), "shapes": args.shapes, "tokens": args.tokens, "dtype": str(args.dtype), "repeats": args.repeats,
                     "warmup": args.warmup, "variants": args.variants, "command": " ".join(["python", *sys.argv])},
        "results": results, "runtime_s": round(time.perf_counter() - started, 1),
    }
    args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()

"""Materialize vs factored SLTrain linear, side by side, against the cost model.

For each distinct linear shape ``(in, out)`` of a config's decoder layer (q/k/v/o ``d x d``,
gate/up ``d -> f``, down ``f -> d``; the paper's rank and density), and each token count ``N``:
the median time of the materialize and factored paths as ``SLLinear`` runs them (on CPU the
eager Functions of :mod:`slcompile.eager`, on CUDA the custom ops ``slcompile::sl_linear`` and
``slcompile::sl_linear_factored``), in ``train`` mode (forward + backward, all gradients) and ``forward`` mode (no grad),
interleaved round-robin. The **measured crossover** is the smallest ``N`` of the grid from which
materialize is no slower than factored (and stays so); the **predicted** one is
:func:`slcompile.cost_model.crossover_tokens` with the ``cpu`` preset and with rates fitted to
this run's measurements (GEMM, forming ``W``, SpMM/SDDMM FLOP/s and a fixed cost per kernel, by
non-negative least squares on relative error: in-sample, so it shows how well the model's *form*
can explain the times; copy bandwidth measured apart), and with the rates
:func:`slcompile.calibration.calibrate` measures at the start of the run, as ``SLLinear(path="auto")``
does on first use (out-of-sample: one mid-size shape, micro-benchmarks). Per mode it reports
what choosing costs, as the ``cpu`` preset at margin 1, as the preset at its margin
(:data:`~slcompile.cost_model.DEFAULT_MARGIN`, what auto did before calibration) and as auto
does now (calibrated, margin 1; ``auto picks``): the chosen path's time over materialize's
(> 1 means the choice made things slower) and over the faster path's.

    .venv/bin/python benchmarks/paths_bench.py                         # mini,60m,130m; 1..4096 tokens; 1 thread
    .venv/bin/python benchmarks/paths_bench.py --shapes 60m --tokens 1,16,256 --repeats 3
    .venv/bin/python benchmarks/paths_bench.py --probe                 # + gather/index_add vs CSR SpMM
    python benchmarks/paths_bench.py --device cuda                     # GPU: 350m,1b,7b; 1..16384 tokens; bf16

On CUDA it times the ops as registered there (our Triton kernels; calls synchronized) and
scores the ``h200-triton`` preset, which is what auto uses there. Writes
``benchmarks/results/paths_bench_<device>.json``. Also prints the cost model's
predictions at the paper's 350M / 1B / 7B shapes on the ``h200`` and ``h200-cusparse`` presets.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from layer_cpu import machine_info  # noqa: E402

from slcompile import cost_model, eager, ops, ops_factored, path_policy  # noqa: E402
from slcompile.model_configs import get_config  # noqa: E402
from slcompile.support import generate_support, nnz_for  # noqa: E402

PATHS = ("materialize", "factored")


def path_ops(device: str) -> dict:
    """What ``SLLinear`` runs per path on ``device``: on CPU the eager Functions of
    :mod:`slcompile.eager`, elsewhere the custom ops (our Triton kernels on CUDA)."""
    if device == "cpu":
        return {"materialize": eager.EagerMaterialized.apply, "factored": eager.EagerFactored.apply}
    return {"materialize": ops.sl_linear, "factored": ops_factored.sl_linear_factored}


def median_s(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(repeats: int, device: str = "cpu") -> float:
    """Bytes/s of a 32 MiB clone (read + write)."""
    big = torch.randn(2**23, device=device)
    return 2 * big.numel() * big.element_size() / median_s(lambda: (big.clone(), sync(device)), repeats)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _features(path: str, mode: str, in_f: int, out_f: int, rank: int, nnz: int, tokens: int) -> list[float]:
    """FLOPs per rate unit (GEMM, forming W, SpMM + SDDMM), the sparse products' dense elements
    (``Kernel.elems``) and the kernel count of one path call (fp32)."""
    values = {cost_model.N: tokens, cost_model.IN: in_f, cost_model.OUT: out_f, cost_model.R: rank,
              cost_model.NNZ: nnz}
    sums = {"dense": 0.0, "form": 0.0, "sparse": 0.0, "elems": 0.0}
    kernels = cost_model.path_kernels(path, mode)
    for kernel in kernels:
        unit = "sparse" if kernel.unit in ("spmm", "sddmm") else kernel.unit
        if unit in sums:
            sums[unit] += float(kernel.flops.subs(values))
        sums["elems"] += float(kernel.elems.subs(values))
    return [sums["dense"], sums["form"], sums["sparse"], sums["elems"], float(len(kernels))]


def fit_device(results: list[dict], bandwidth: float, device: str = "cpu") -> cost_model.DeviceSpec:
    """Rates that best explain the measured path times (least squares on relative error, all >= 0).

    Model per call: ``dense / D + form / F + sparse / S + elems * e + kernels * launch`` (one
    rate ``S`` and element cost ``e`` for SpMM and SDDMM); the memory terms are left out (small
    at these shapes) and the copy bandwidth is measured apart."""
    rows, times = [], []
    for res in results:
        for mode, by_path in res["time_ms"].items():
            for path, samples in by_path.items():
                for tokens, ms in zip(res["tokens"], samples):
                    rows.append(_features(path, mode, res["in"], res["out"], res["rank"], res["nnz"], tokens))
                    times.append(ms / 1e3)
    a = np.asarray(rows) / np.asarray(times)[:, None]  # relative residuals: every row has weight 1
    active = list(range(a.shape[1]))
    while True:  # active-set non-negative least squares (5 unknowns)
        coef = np.zeros(a.shape[1])
        coef[active] = np.linalg.lstsq(a[:, active], np.ones(len(times)), rcond=None)[0]
        if (coef >= 0).all():
            break
        active = [k for k in active if coef[k] > 0]
    inverse = lambda c: 1.0 / c if c > 0 else math.inf  # noqa: E731
    return cost_model.DeviceSpec(f"{device}-fitted", dense_flops=inverse(coef[0]), form_flops=inverse(coef[1]),
                                 spmm_flops=inverse(coef[2]), sddmm_flops=inverse(coef[2]), bandwidth=bandwidth,
                                 launch_s=float(coef[4]), spmm_elem_s=float(coef[3]), sddmm_elem_s=float(coef[3]))


def layer_operands(in_f: int, out_f: int, rank: int, density: float, tokens: int, dtype: torch.dtype,
                   device: str = "cpu") -> dict:
    gen = torch.Generator().manual_seed(in_f * 7 + out_f)
    nnz = nnz_for(in_f, out_f, density)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device, dtype)

    return {"x": rand(tokens, in_f), "A": rand(rank, in_f, std=in_f ** -0.5).requires_grad_(),
            "B": rand(out_f, rank, std=rank ** -0.5).requires_grad_(),
            "values": rand(nnz, std=in_f ** -0.5).requires_grad_(),
            "support": generate_support(out_f, in_f, nnz, 0).to(device), "grad_y": rand(tokens, out_f),
            "scale": 0.25, "nnz": nnz, "ops": path_ops(device)}


def run(path: str, o: dict, train: bool) -> None:
    if train:
        x = o["x"].requires_grad_()
        y = o["ops"][path](x, o["A"], o["B"], o["values"], o["support"], o["scale"])
        y.backward(o["grad_y"])
        for t in (x, o["A"], o["B"], o["values"]):
            t.grad = None
    else:
        with torch.no_grad():
            o["ops"][path](o["x"], o["A"], o["B"], o["values"], o["support"], o["scale"])


def check_agree(o: dict) -> float:
    """Max relative difference of output and all gradients between the paths."""
    results = []
    for path in PATHS:
        leaves = [o["x"].detach().clone().requires_grad_(), *(o[k] for k in ("A", "B", "values"))]
        y = o["ops"][path](leaves[0], *leaves[1:], o["support"], o["scale"])
        grads = torch.autograd.grad(y, leaves, o["grad_y"])
        results.append([y.detach(), *grads])
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(*results))


def measured_crossover(tokens: list[int], times: dict[str, list[float]]) -> int | None:
    """Smallest N of the grid from which materialize is no slower for every larger N too."""
    crossing = None
    for n, mat, fac in reversed(list(zip(tokens, times["materialize"], times["factored"]))):
        if mat > fac:
            break
        crossing = n
    return crossing


def bench_shape(label: str, in_f: int, out_f: int, cfg, args) -> dict:
    """Median ms of both paths per mode and token count (interleaved, order alternated)."""
    modes = {"train": True, "forward": False}
    times = {mode: {path: [] for path in PATHS} for mode in modes}
    diffs = []
    for tokens in args.tokens:
        o = layer_operands(in_f, out_f, cfg.rank, cfg.density, tokens, args.dtype, args.device)
        diffs.append(check_agree(o))
        for mode, train in modes.items():
            samples = {path: [] for path in PATHS}
            for path in PATHS:  # warm-up (builds the factored path's index cache once)
                run(path, o, train)
            for rep in range(args.repeats):
                for path in (list(PATHS) if rep % 2 == 0 else list(PATHS)[::-1]):
                    sync(args.device)
                    start = time.perf_counter()
                    run(path, o, train)
                    sync(args.device)
                    samples[path].append(time.perf_counter() - start)
            for path in PATHS:
                times[mode][path].append(1e3 * statistics.median(samples[path]))
    return {"config": label, "in": in_f, "out": out_f, "rank": cfg.rank, "density": cfg.density,
            "nnz": nnz_for(in_f, out_f, cfg.density), "tokens": args.tokens, "time_ms": times,
            "max_rel_diff": max(diffs)}


def evaluate(res: dict, devices: dict[str, tuple[cost_model.DeviceSpec | str, float]], dtype_bytes: int) -> None:
    """Add to ``res`` per mode: measured and predicted crossovers, predicted times, and what
    choosing by each ``(device, margin)`` costs: ``vs_materialize`` = time of the chosen path
    over materialize's (> 1: the choice made it slower), ``vs_best`` = over the faster path's."""
    shape = (res["in"], res["out"], res["rank"], res["nnz"])
    for mode, measured in res["time_ms"].items():
        entry = res.setdefault("by_mode", {}).setdefault(mode, {})
        entry["crossover"] = {"measured": measured_crossover(res["tokens"], measured)}
        for name, (device, margin) in devices.items():
            entry["crossover"][name] = cost_model.crossover_tokens(*shape, device, mode, dtype_bytes, margin=margin)
            picks = [cost_model.choose_path(n, *shape, device, mode, dtype_bytes, margin) for n in res["tokens"]]
            chosen = [measured[p][k] for k, p in enumerate(picks)]
            best = [min(m, f) for m, f in zip(measured["materialize"], measured["factored"])]
            entry[name] = {
                "predicted_ms": {p: [1e3 * cost_model.path_time(p, n, *shape, device, mode, dtype_bytes)
                                     for n in res["tokens"]]
                                 for p in PATHS},
                "picks": picks,
                "vs_materialize": [c / m for c, m in zip(chosen, measured["materialize"])],
                "vs_best": [c / b for c, b in zip(chosen, best)]}


def probe_spmm(repeats: int) -> dict:
    """``S @ x^T`` two ways at one shape: gather x columns + index_add into rows vs MKL CSR."""
    out_f, in_f, results = 2048, 2048, {}
    support = generate_support(out_f, in_f, nnz_for(in_f, out_f, 0.03), 0)
    rows, cols = support // in_f, support % in_f
    index = ops_factored.sparse_index(support, out_f, in_f)
    values = torch.randn(support.numel())
    for tokens in (1, 16, 128):
        x_t = torch.randn(in_f, tokens)

        def gather():
            return torch.zeros(out_f, tokens).index_add_(0, rows, x_t.index_select(0, cols).mul_(values[:, None]))

        torch.testing.assert_close(gather(), index.csr(values) @ x_t, rtol=1e-4, atol=1e-4)
        results[tokens] = {"gather_index_add_ms": 1e3 * median_s(gather, repeats),
                           "csr_ms": 1e3 * median_s(lambda: index.csr(values) @ x_t, repeats)}
    return {"shape": [out_f, in_f], "density": 0.03, "by_tokens": results}


def paper_predictions(tokens_list=(1, 16, 256, 2048, 8192, 16384)) -> dict:
    """The cost model's decoder-layer ratios to dense at 350M / 1B / 7B (bf16) on the H200 presets."""
    out = {}
    for name in ("llama-350m", "llama-1b", "llama-7b"):
        cfg = get_config(name)
        shapes = [(i, o) for _, i, o in cfg.linear_shapes()]
        for device in ("h200", "h200-cusparse"):
            for mode in ("train", "forward"):
                for tokens in tokens_list:
                    costs = cost_model.layer_costs(shapes, cfg.rank, cfg.density, tokens, device, mode)
                    out.setdefault(name, {}).setdefault(device, {}).setdefault(mode, {})[tokens] = {
                        "vs_dense": {k: round(v, 3) for k, v in costs["vs_dense"].items()},
                        "picks": sorted(set(costs["picks"]))}
                crossovers = {f"{i}x{o}": cost_model.crossover_tokens(i, o, cfg.rank, nnz_for(i, o, cfg.density),
                                                                      device, mode)
                              for i, o in dict.fromkeys(shapes)}
                out[name][device][mode]["crossover"] = crossovers
    return out


def print_tables(results: list[dict], spec: cost_model.DeviceSpec, paper: dict, choosers: dict[str, str]) -> None:
    print(f"fitted to these measurements: GEMM {spec.dense_flops / 1e9:.0f} GFLOP/s, form W "
          f"{spec.form_flops / 1e9:.0f}, SpMM/SDDMM {spec.spmm_flops / 1e9:.1f} + {spec.spmm_elem_s * 1e9:.2f} ns per "
          f"dense element, {spec.launch_s * 1e6:.0f} us/kernel; copy {spec.bandwidth / 1e9:.1f} GB/s")
    for res in results:
        print(f"\n{res['config']} {res['in']}x{res['out']} r={res['rank']} nnz={res['nnz']} "
              f"(paths agree to {res['max_rel_diff']:.1e})")
        for mode, entry in res["by_mode"].items():
            t = res["time_ms"][mode]
            print(f"  {mode:<8}{'tokens':>7}{'mat ms':>10}{'fac ms':>10}{'fac/mat':>9}"
                  f"{'preset':>11}{'fitted':>8}{'auto spec':>12}{'auto picks':>12}")
            for k, n in enumerate(res["tokens"]):
                model = [entry[d]["predicted_ms"]["factored"][k] / entry[d]["predicted_ms"]["materialize"][k]
                         for d in ("preset1", "fitted", "auto")]
                print(f"  {'':<8}{n:>7}{t['materialize'][k]:>10.3f}{t['factored'][k]:>10.3f}"
                      f"{t['factored'][k] / t['materialize'][k]:>9.2f}{model[0]:>11.2f}{model[1]:>8.2f}"
                      f"{model[2]:>12.2f}{entry['auto']['picks'][k][:3]:>12}")
            cross = entry["crossover"]
            print(f"  crossover tokens: measured {cross['measured']}, preset {cross['preset1']}, fitted "
                  f"{cross['fitted']}, auto's spec {cross['auto']} (None: factored cheaper over the whole range)")
            for name, label in choosers.items():
                print(f"  choosing as {label}: worst {max(entry[name]['vs_materialize']):.2f}x materialize, "
                      f"{max(entry[name]['vs_best']):.2f}x the faster path")
    print("\ncost model, one decoder layer (7 linears), bf16, as a multiple of dense nn.Linear:")
    for name, by_device in paper.items():
        for device, by_mode in by_device.items():
            for mode, by_tokens in by_mode.items():
                cells = [f"{n}: mat {v['vs_dense']['materialize']:.2f} fac {v['vs_dense']['factored']:.2f} "
                         f"-> {'/'.join(v['picks'])}" for n, v in by_tokens.items() if n != "crossover"]
                print(f"  {name:<11}{device:<14}{mode:<8}" + "; ".join(cells))
                print(f"  {'':<33}crossover tokens per shape: {by_tokens['crossover']}")


def choosers(device: str, preset: cost_model.DeviceSpec, auto: cost_model.DeviceSpec
             ) -> dict[str, tuple[cost_model.DeviceSpec, float, str]]:
    """``name -> (spec, margin, label)`` of the choices the run is scored by: the device's preset
    at margin 1 and at its own margin, and what ``path="auto"`` uses (on CPU the calibrated spec)."""
    return {"preset1": (preset, 1.0, f"{preset.name} preset, margin 1"),
            "preset": (preset, preset.margin, f"{preset.name} preset, margin {preset.margin}"),
            "auto": (auto, auto.margin, f"auto ({auto.name}, margin {auto.margin})")}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shapes", default=None, help="default cpu: mini,60m,130m; cuda: 350m,1b,7b")
    parser.add_argument("--tokens", default=None, help="default cpu: 1,4,...,4096; cuda: 1,16,...,16384")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--probe", action="store_true", help="also time gather/index_add vs CSR SpMM")
    parser.add_argument("--out", default=None, help="default benchmarks/results/paths_bench_<device>.json")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    shapes = args.shapes or ("350m,1b,7b" if gpu else "mini,60m,130m")
    tokens = args.tokens or ("1,16,64,256,1024,2048,8192,16384" if gpu else "1,4,16,64,256,1024,2048,4096")
    args.shapes = [s if s.startswith("llama-") else f"llama-{s}" for s in shapes.split(",") if s]
    args.tokens = sorted(int(t) for t in tokens.split(",") if t)
    args.dtype = torch.bfloat16 if gpu else torch.float32
    args.out = Path(args.out or Path(__file__).parent / "results" / f"paths_bench_{args.device}.json")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    auto_spec = path_policy.runtime_device(args.device)  # on CPU measured now, as auto does on first use
    preset = cost_model.DEVICES["cpu"] if args.device == "cpu" else auto_spec  # off CPU auto uses the preset
    results = []
    for name in args.shapes:
        cfg = get_config(name)
        for in_f, out_f in dict.fromkeys((i, o) for _, i, o in cfg.linear_shapes()):
            results.append(bench_shape(name, in_f, out_f, cfg, args))
            print(f"done {name} {in_f}x{out_f} ({time.perf_counter() - started:.0f} s)", flush=True)
    spec = fit_device(results, copy_bandwidth(args.repeats, args.device), args.device)
    scored = choosers(args.device, preset, auto_spec)
    for res in results:
        evaluate(res, {"fitted": (spec, 1.0), **{k: (d, m) for k, (d, m, _) in scored.items()}},
                 args.dtype.itemsize)
    paper = paper_predictions()
    report = {
        "benchmark": "paths_bench", "device": args.device, "torch": torch.__version__, "machine": machine_info(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"threads": torch.get_num_threads(), "shapes": args.shapes, "tokens": args.tokens,
                     "repeats": args.repeats, "dtype": str(args.dtype).removeprefix("torch."),
                     "command": " ".join(["python", *sys.argv])},
        "fitted_device": vars(spec), "auto_device": vars(auto_spec), "preset_device": vars(preset),
        "results": results, "paper_predictions": paper,
        "probe_spmm": probe_spmm(args.repeats) if args.probe and args.device == "cpu" else None,
    }
    report["runtime_s"] = round(time.perf_counter() - started, 1)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"auto's spec {auto_spec.name}: GEMM {auto_spec.dense_flops / 1e9:.0f} GFLOP/s, form W "
          f"{auto_spec.form_flops / 1e9:.0f}, SpMM {auto_spec.spmm_flops / 1e9:.1f} + "
          f"{auto_spec.spmm_elem_s * 1e9:.2f} ns/element, SDDMM {auto_spec.sddmm_flops / 1e9:.1f} + "
          f"{auto_spec.sddmm_elem_s * 1e9:.2f} ns/element, {auto_spec.launch_s * 1e6:.0f} us/kernel")
    print_tables(results, spec, paper, {k: label for k, (_, _, label) in scored.items()})
    if report["probe_spmm"]:
        print("\nS @ x^T (2048x2048, density 0.03):", json.dumps(report["probe_spmm"]["by_tokens"]))
    print(f"wrote {out} ({report['runtime_s']} s)")
    return report


if __name__ == "__main__":
    main()

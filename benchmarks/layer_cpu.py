"""Layer benchmark on CPU: ``nn.Linear`` vs ``SLLinear`` vs a plain-autograd SLTrain, fwd+bwd.

For each paper shape (the seven linears of one LLaMA decoder layer, ``LlamaConfig.linear_shapes()``,
with that config's ``rank``/``alpha``/``density``) and each token count ``N`` (input ``(N, in)``,
fp32, no bias as in LLaMA), it measures four variants:

- ``dense``:    ``nn.Linear(in, out, bias=False)``.
- ``sllinear``: ``slcompile.SLLinear`` as users get it (``path="auto"``: per call the cost
  model's pick of the two custom-op paths; the JSON records the pick per linear; only ``x`` saved).
- ``sllinear_mat``: ``SLLinear(path="materialize")`` (``W`` formed in forward, dropped,
  recomputed in backward; only ``x`` saved).
- ``autograd``: the same parameters through ordinary differentiable torch ops,
  ``W = (scale * B @ A).view(-1).index_add(0, support.long(), values)`` then ``F.linear``:
  whatever autograd decides to save (``x``, ``W`` and the int64 index).

What is measured (all in one process, one run, so the ratios are side by side):

- time: median wall time of one ``forward + backward(grad_y)`` (``time.perf_counter``), the
  variants interleaved round-robin in the same loop (order rotated every repeat) after warm-up.
  Per decoder layer: sum over the seven linears of ``count x median``.
- saved: bytes autograd holds for backward, from ``torch.autograd.graph.saved_tensors_hooks``:
  the sum of ``nbytes`` of the unique storages packed during forward, reported including and
  excluding storages of the module's parameters and buffers (resident anyway). Per decoder layer
  it is measured on all seven linears at once with the inputs shared as in the model (q/k/v
  read the same ``x``, gate/up the same ``x``), so a shared input counts once.
- peak: peak of the bytes allocated during one ``forward + backward`` and still live, from the
  allocation events that ``torch.profiler`` (``profile_memory=True``) records for the CPU
  allocator: each event carries the block's address and signed size; replaying them in time order
  gives the live bytes at every instant, relative to the start of the call (tensors that existed
  before it, such as ``x``, the parameters and ``grad_y``, are not counted). It includes ``y``,
  transients (``W``, the dense ``dW``) and the gradients left at the end (``dx`` and the parameter
  grads, also reported as ``end``). Per decoder layer: the largest of the seven, since the layers
  run one after another.

Values of ``B`` are random (the paper starts it at zero) so every term is live; the SLTrain
variants are checked to agree before timing. Writes JSON (``--out``) and prints a table.

    .venv/bin/python benchmarks/layer_cpu.py --tokens 256,1024,2048 --repeats 5 --shapes mini,60m,130m
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from slcompile import SLLinear
from slcompile.model_configs import LlamaConfig, get_config

VARIANTS = ("dense", "sllinear", "sllinear_mat", "autograd")
SL_VARIANTS = VARIANTS[1:]
MIB = 2**20


class AutogradSLLinear(nn.Module):
    """SLTrain written with ordinary differentiable torch ops: the baseline a user would write.

    Shares nothing with the custom ops: ``W = scale * B @ A`` plus ``values`` index-added at
    ``support`` (int32 buffer, widened to int64 each call), then ``F.linear``. Autograd saves
    what it saves: ``x``, ``W``, the int64 index, and the (resident) parameters.
    """

    def __init__(self, layer: SLLinear) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scale = layer.in_features, layer.out_features, layer.scale
        self.A = nn.Parameter(layer.A.detach().clone())
        self.B = nn.Parameter(layer.B.detach().clone())
        self.values = nn.Parameter(layer.values.detach().clone())
        self.register_buffer("support", layer.support.clone())

    def forward(self, x: Tensor) -> Tensor:
        weight = torch.mm(self.B, self.A) * self.scale
        weight = weight.view(-1).index_add(0, self.support.long(), self.values).view(self.out_features, -1)
        return F.linear(x, weight)


def build_variants(in_features: int, out_features: int, cfg: LlamaConfig, seed: int) -> dict[str, nn.Module]:
    """The variants of one ``(in, out)`` linear; the SLTrain ones hold identical parameters."""
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features, bias=False)
    sl = SLLinear(in_features, out_features, bias=False, rank=cfg.rank, alpha=cfg.alpha, density=cfg.density,
                  seed=seed)
    with torch.no_grad():
        sl.B.normal_(0.0, 1.0 / cfg.rank ** 0.5)
    materialized = SLLinear(in_features, out_features, bias=False, rank=cfg.rank, alpha=cfg.alpha,
                            density=cfg.density, seed=seed, path="materialize")
    materialized.load_state_dict(sl.state_dict())
    return {"dense": dense, "sllinear": sl, "sllinear_mat": materialized, "autograd": AutogradSLLinear(sl)}


def unique_shapes(cfg: LlamaConfig) -> list[dict]:
    """``[{in, out, names, count}]``: the decoder layer's linears grouped by shape, in order."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name, fan_in, fan_out in cfg.linear_shapes():
        groups.setdefault((fan_in, fan_out), []).append(name)
    return [{"in": i, "out": o, "names": names, "count": len(names)} for (i, o), names in groups.items()]


def fwd_bwd(module: nn.Module, x: Tensor, grad_y: Tensor) -> None:
    module(x).backward(grad_y)


def clear_grads(module: nn.Module, x: Tensor) -> None:
    module.zero_grad(set_to_none=True)
    x.grad = None


def resident_storages(modules) -> set[int]:
    return {t.untyped_storage().data_ptr() for m in modules for t in (*m.parameters(), *m.buffers())}


def saved_bytes(run, modules) -> dict[str, int]:
    """Bytes of the unique storages autograd saves while ``run()`` builds its graph."""
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        graph = run()  # keep the outputs (and so the saved tensors) alive until counted
    resident = resident_storages(modules)
    total = sum(storages.values())
    excluded = sum(n for ptr, n in storages.items() if ptr not in resident)
    del graph
    return {"saved_incl_params": total, "saved_excl_params": excluded}


def allocation_events(prof) -> list[tuple[int, int, int]]:
    """``(time_ns, ptr, signed_bytes)`` of the CPU allocations and frees a profile recorded."""
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields.ptr, event.extra_fields.alloc_size))
    return sorted(events, key=lambda e: (e[0], e[2] > 0))  # a free before an alloc at the same instant


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (Kineto prints two lines per profiler start/stop there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(module: nn.Module, x: Tensor, grad_y: Tensor) -> dict[str, int]:
    """Peak and final live bytes allocated during one fwd+bwd (profiler allocation events)."""
    clear_grads(module, x)
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fwd_bwd(module, x, grad_y)
    live: dict[int, int] = {}
    current = peak = 0
    for _, ptr, size in allocation_events(prof):
        if size > 0:
            current += size - live.get(ptr, 0)
            live[ptr] = size
        elif ptr in live:  # frees of blocks allocated before the call are ignored
            current -= live.pop(ptr)
        peak = max(peak, current)
    clear_grads(module, x)
    return {"peak": peak, "end": current}


def check_agree(variants: dict[str, nn.Module], x: Tensor, grad_y: Tensor) -> None:
    """The custom-op and plain-autograd SLTrain give the same output and gradients."""
    outs = {}
    for name in SL_VARIANTS:
        clear_grads(variants[name], x)
        y = variants[name](x)
        y.backward(grad_y)
        outs[name] = [y.detach(), x.grad, *(variants[name].get_parameter(p).grad for p in ("A", "B", "values"))]
        clear_grads(variants[name], x)
    for name in SL_VARIANTS[:-1]:
        for a, b in zip(outs[name], outs["autograd"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def time_round_robin(cases: list[dict], repeats: int, warmup: int) -> None:
    """Fill ``case['times'][variant]`` (seconds); variants interleaved, order rotated per repeat."""
    for case in cases:
        case["times"] = {v: [] for v in VARIANTS}
    for rep in range(warmup + repeats):
        for case in cases:
            shift = rep % len(VARIANTS)
            for name in VARIANTS[shift:] + VARIANTS[:shift]:
                module, x, grad_y = case["variants"][name], case["x"], case["grad_y"]
                clear_grads(module, x)
                start = time.perf_counter()
                fwd_bwd(module, x, grad_y)
                elapsed = time.perf_counter() - start
                if rep >= warmup:
                    case["times"][name].append(elapsed)
                clear_grads(module, x)


def decoder_layer_saved(cases: list[dict], cfg: LlamaConfig, tokens: int) -> dict[str, dict[str, int]]:
    """Saved bytes of the seven linears run together on shared inputs, per variant."""
    by_shape = {(c["in"], c["out"]): c for c in cases}
    inputs: dict[str, Tensor] = {}
    result = {}
    for variant in VARIANTS:
        def run():
            outs = []
            for name, fan_in, fan_out in cfg.linear_shapes():
                # q/k/v share the attention input, gate/up the MLP input; o and down read their own.
                key = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(name, name)
                if key not in inputs:
                    inputs[key] = torch.randn(tokens, fan_in, requires_grad=True)
                outs.append(by_shape[(fan_in, fan_out)]["variants"][variant](inputs[key]))
            return outs

        modules = [c["variants"][variant] for c in cases]
        result[variant] = saved_bytes(run, modules)
    return result


def flop_floors(cfg: LlamaConfig, tokens: int) -> dict[str, float]:
    """fwd+bwd FLOPs as a multiple of dense ``6*N*in*out`` (docs/compute.md).

    ``sllinear_mat`` forms W twice (forward, backward) plus dA/dB from dense dW: ``1 + 4r/(3N)``;
    ``autograd`` keeps W, forming it once: ``1 + r/N``. (``sllinear``: its pick's, per linear.)
    """
    return {"dense": 1.0, "sllinear_mat": 1 + 4 * cfg.rank / (3 * tokens), "autograd": 1 + cfg.rank / tokens}


def ratios(values: dict[str, float]) -> dict[str, float]:
    return {v: values[v] / values["dense"] if values["dense"] else float("nan") for v in VARIANTS}


def bench_config(label: str, cfg: LlamaConfig, tokens: int, repeats: int, warmup: int) -> dict:
    cases = []
    for index, shape in enumerate(unique_shapes(cfg)):
        variants = build_variants(shape["in"], shape["out"], cfg, seed=index)
        x = torch.randn(tokens, shape["in"], requires_grad=True)
        grad_y = torch.randn(tokens, shape["out"])
        check_agree(variants, x, grad_y)
        cases.append({**shape, "variants": variants, "x": x, "grad_y": grad_y})
    time_round_robin(cases, repeats, warmup)
    rows, layer_time = [], dict.fromkeys(VARIANTS, 0.0)
    for case in cases:
        row = {key: case[key] for key in ("in", "out", "names", "count")}
        with torch.enable_grad():  # the timed calls train: the path of a training call
            row["auto_path"] = case["variants"]["sllinear"].path_for(case["x"])
        row["time_ms"] = {v: 1e3 * statistics.median(case["times"][v]) for v in VARIANTS}
        row["time_ms_min"] = {v: 1e3 * min(case["times"][v]) for v in VARIANTS}
        row["time_ms_all"] = {v: [1e3 * t for t in case["times"][v]] for v in VARIANTS}
        memory = {}
        for v in VARIANTS:
            module = case["variants"][v]
            memory[v] = saved_bytes(lambda m=module: m(case["x"]), [module])
            memory[v].update(peak_bytes(module, case["x"], case["grad_y"]))
        row["memory_bytes"] = memory
        row["ratios"] = {"time": ratios(row["time_ms"]), "time_min": ratios(row["time_ms_min"]),
                         **{k: ratios({v: memory[v][k] for v in VARIANTS})
                            for k in ("saved_excl_params", "saved_incl_params", "peak")}}
        for v in VARIANTS:
            layer_time[v] += case["count"] * row["time_ms"][v]
        rows.append(row)
    saved = decoder_layer_saved(cases, cfg, tokens)
    layer_memory = {v: {**saved[v], "peak": max(r["memory_bytes"][v]["peak"] for r in rows)} for v in VARIANTS}
    layer = {"time_ms": layer_time, "memory_bytes": layer_memory,
             "ratios": {"time": ratios(layer_time),
                        **{k: ratios({v: layer_memory[v][k] for v in VARIANTS})
                           for k in ("saved_excl_params", "saved_incl_params", "peak")}}}
    return {"config": label, "tokens": tokens, "flop_floor": flop_floors(cfg, tokens), "linears": rows,
            "decoder_layer": layer}


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "mkl": torch.backends.mkl.is_available(), "mkldnn": torch.backends.mkldnn.is_available()}


def _cell(value: float, ratio: float) -> str:
    return f"{value:.2f} ({ratio:.2f}x)"


def print_table(results: list[dict]) -> None:
    """Two tables: time (ms, ratio to nn.Linear, FLOP floors) and memory (MiB, ratio to nn.Linear)."""
    rows = []
    for res in results:
        entries = [(f"{r['out']}x{r['in']} x{r['count']}", r) for r in res["linears"]]
        rows += [(res, label, r) for label, r in entries + [("decoder layer (7)", res["decoder_layer"])]]
    heads = {"sllinear": "SLLinear auto", "sllinear_mat": "SLLinear mat", "autograd": "autograd SL"}
    print(f"{'config':<11}{'tokens':>6}  {'linear (out x in)':<19}{'auto path':>12}{'nn.Linear ms':>13}"
          + "".join(f"{heads[v]:>18}" for v in SL_VARIANTS) + f"{'floor mat':>10}{'floor ag':>10}")
    for res, label, r in rows:
        t, rt, floor = r["time_ms"], r["ratios"]["time"], res["flop_floor"]
        print(f"{res['config']:<11}{res['tokens']:>6}  {label:<19}{r.get('auto_path', ''):>12}{t['dense']:>13.2f}"
              + "".join(f"{_cell(t[v], rt[v]):>18}" for v in SL_VARIANTS)
              + f"{floor['sllinear_mat']:>10.2f}{floor['autograd']:>10.2f}")
    print("time: median ms of forward+backward, (ratio to nn.Linear); floor: FLOP floor as a multiple of dense\n")
    print(f"{'config':<11}{'tokens':>6}  {'linear (out x in)':<19}{'saved MiB: nn.Linear':>21}"
          + "".join(f"{heads[v]:>18}" for v in SL_VARIANTS) + f"{'peak MiB: nn.Linear':>21}"
          + "".join(f"{heads[v]:>18}" for v in SL_VARIANTS))
    for res, label, r in rows:
        m, rm = r["memory_bytes"], r["ratios"]
        saved = "".join(f"{_cell(m[v]['saved_excl_params'] / MIB, rm['saved_excl_params'][v]):>18}" for v in SL_VARIANTS)
        peak = "".join(f"{_cell(m[v]['peak'] / MIB, rm['peak'][v]):>18}" for v in SL_VARIANTS)
        print(f"{res['config']:<11}{res['tokens']:>6}  {label:<19}{m['dense']['saved_excl_params'] / MIB:>21.2f}"
              f"{saved}{m['dense']['peak'] / MIB:>21.2f}{peak}")
    print("saved: bytes autograd keeps for backward, excluding parameters/buffers (incl. in the JSON);\n"
          "peak: max bytes allocated and live during forward+backward (y, transients, grads); (ratio to nn.Linear)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="256,1024,2048", help="comma-separated token counts N (input (N, in))")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed round-robin rounds first")
    parser.add_argument("--shapes", default="mini,60m,130m",
                        help="comma-separated configs (llama-* names; mini is the demo model)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice, one per core)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "layer_cpu.json"))
    args = parser.parse_args(argv)
    args.tokens = [int(t) for t in args.tokens.split(",") if t]
    args.shapes = [s if s.startswith("llama-") else f"llama-{s}" for s in args.shapes.split(",") if s]
    if args.repeats < 1 or any(t < 1 for t in args.tokens) or (args.threads is not None and args.threads < 1):
        parser.error("--repeats, --tokens and --threads must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    configs = {name: get_config(name) for name in args.shapes}
    started, load_start = time.perf_counter(), os.getloadavg()
    results = [bench_config(name, cfg, tokens, args.repeats, args.warmup)
               for name, cfg in configs.items() for tokens in args.tokens]
    report = {
        "benchmark": "layer_cpu",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "machine": machine_info(),
        "settings": {"tokens": args.tokens, "repeats": args.repeats, "warmup": args.warmup, "dtype": "float32",
                     "bias": False, "threads": torch.get_num_threads(),
                     "command": " ".join(["python", *sys.argv])},
        "configs": {name: {"dim": c.dim, "intermediate_size": c.intermediate_size, "rank": c.rank,
                           "alpha": c.alpha, "density": c.density, "scale": c.alpha / c.rank,
                           "linear_shapes": c.linear_shapes()} for name, c in configs.items()},
        "method": {
            "time": "median of perf_counter around forward+backward(grad_y); variants interleaved round-robin, "
                    "order rotated each repeat; decoder layer = sum of count x median over its 7 linears",
            "saved": "saved_tensors_hooks: sum of nbytes of unique storages packed in forward, incl./excl. "
                     "the module's parameters and buffers; decoder layer measured on the 7 linears with shared inputs",
            "peak": "torch.profiler(profile_memory=True) CPU allocation events replayed in time order: max live "
                    "bytes allocated during one forward+backward (includes y, transients, grads left at the "
                    "end = 'end'); decoder layer = max over its linears",
        },
        "results": results,
        "runtime_s": round(time.perf_counter() - started, 1),
        # Other processes on the machine skew absolute times (ratios less: the variants interleave).
        "loadavg_1_5_15": {"start": load_start, "end": os.getloadavg()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print_table(results)
    print(f"wrote {out} ({report['runtime_s']} s, torch {torch.__version__}, {report['machine']['torch_threads']} threads)")
    return report


if __name__ == "__main__":
    main()

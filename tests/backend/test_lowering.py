"""``slcompile.lowering``: the ``slcompile::materialize`` lowering the backend installs while it compiles.

No GPU here: the choice set is built from IR buffers placed on a ``cuda`` device (Inductor builds
extern choices without one), and the autotuned path runs end to end on CPU with ``"cpu"`` added to
``TUNED_DEVICES``, so Inductor times both choices on CPU and emits the winner. Six compilations
of tiny layers (a few seconds each).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch._inductor.select_algorithm as select_algorithm
import torch.nn.functional as F
from torch._inductor import config as inductor_config, ir
from torch._inductor.graph import GraphLowering
from torch._inductor.lowering import lowerings
from torch._inductor.virtualized import V

import slcompile
import slcompile.backend as backend
from slcompile import lowering, ops
from slcompile._compat import custom_graph_passes
from slcompile.support import generate_support

NO_PASSES = {"pattern_sltrain": False, "choose_path": False, "fx_graph_cache": False}


def make_layer() -> slcompile.SLLinear:
    torch.manual_seed(0)
    layer = slcompile.SLLinear(24, 16, rank=4, density=0.1)
    with torch.no_grad():
        layer.B.normal_()
    return layer


def forward(layer: slcompile.SLLinear, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` with ``W`` formed by ``slcompile::materialize`` (a node of the compiled graph)."""
    return F.linear(x, ops.materialize(layer.A, layer.B, layer.values, layer.support, layer.scale))


def ir_buffer(name: str, size: list[int], dtype: torch.dtype = torch.bfloat16, device: str = "cuda"):
    return ir.TensorBox.create(ir.Buffer(name=name, layout=ir.FixedLayout(torch.device(device), dtype, size)))


@pytest.fixture
def graph_handler():
    """An Inductor graph context, as a lowering runs in (no compilation)."""
    with V.set_graph_handler(GraphLowering(torch.fx.symbolic_trace(torch.nn.Identity()))):
        yield


@pytest.fixture
def tuned_on_cpu(monkeypatch) -> list[str]:
    """The CUDA path with ``"cpu"`` admitted; the names of the autotuned nodes, in order."""
    monkeypatch.setattr(lowering, "TUNED_DEVICES", ("cuda", "cpu"))
    tuned = []
    real = select_algorithm.autotune_select_algorithm
    monkeypatch.setattr(select_algorithm, "autotune_select_algorithm",
                        lambda name, *args, **kwargs: tuned.append(name) or real(name, *args, **kwargs))
    return tuned


def test_installed_only_inside_and_restored(monkeypatch):
    """Inside: an entry calling ``lower_materialize`` with the previous entry, or Inductor's implicit
    fallback, as its default. After: the previous entry, or none."""
    monkeypatch.setattr(lowering, "lower_materialize", lambda default, *args: (default, args))
    before = lowerings.get(lowering.MATERIALIZE)
    with lowering.installed():
        default, args = lowerings[lowering.MATERIALIZE](1, 2)
        assert args == (1, 2) and (default is before if before else default._is_fallback_handler)
    assert lowerings.get(lowering.MATERIALIZE) is before
    others = {op: lowerings.get(op) for op in (lowering.SL_LINEAR, lowering.SL_LINEAR_BACKWARD)}
    with lowering.installed():
        assert all(lowerings[op] is not entry for op, entry in others.items())
    assert all(lowerings.get(op) is entry for op, entry in others.items())
    lowerings[lowering.MATERIALIZE] = sentinel = object()
    try:
        with lowering.installed():
            assert lowerings[lowering.MATERIALIZE] is not sentinel
        assert lowerings[lowering.MATERIALIZE] is sentinel
    finally:
        lowerings.pop(lowering.MATERIALIZE)
        if before is not None:
            lowerings[lowering.MATERIALIZE] = before



def test_overlapping_installs_keep_the_entry_until_the_last_ends():
    """Two compilations at once (threads, or nested): the first to end must not remove the entry
    the other is still lowering with, and the last restores what was there before."""
    before = lowerings.get(lowering.MATERIALIZE)
    first, second = lowering.installed(), lowering.installed()
    first.__enter__()
    entry = lowerings[lowering.MATERIALIZE]
    second.__enter__()
    first.__exit__(None, None, None)
    assert lowerings.get(lowering.MATERIALIZE) is entry
    second.__exit__(None, None, None)
    assert lowerings.get(lowering.MATERIALIZE) is before

def test_choices_for_cuda_nodes(graph_handler, monkeypatch):
    """On CUDA under max-autotune: the op itself and the ATen composition, ``W``'s layout, a
    ``support`` generator; without max-autotune, or with mixed dtypes, the default lowering."""
    seen = {}

    def select(name, choices, inputs, layout, input_gen_fns=None):
        seen.update(name=name, choices=choices, layout=layout, gen=input_gen_fns)
        return "tuned", choices[0]

    monkeypatch.setattr(select_algorithm, "autotune_select_algorithm", select)
    A, B, values = ir_buffer("A", [4, 24]), ir_buffer("B", [16, 4]), ir_buffer("v", [38])
    support = ir_buffer("s", [38], torch.int32)
    default = lambda *args: "default"  # noqa: E731
    with inductor_config.patch(max_autotune=True):
        assert lowering.lower_materialize(default, A, B, values, support, 0.5) == "tuned"
        mixed = ir_buffer("v32", [38], torch.float32)
        assert lowering.lower_materialize(default, A, B, mixed, support, 0.5) == "default"
    assert lowering.lower_materialize(default, A, B, values, support, 0.5) == "default"
    assert [c.name for c in seen["choices"]] == ["slcompile_materialize", "slcompile_materialize_aten"]
    assert all(c.kwargs == {"scale": 0.5} for c in seen["choices"])
    assert (seen["layout"].device.type, seen["layout"].dtype, seen["layout"].size) == ("cuda", torch.bfloat16,
                                                                                         [16, 24])
    assert set(seen["gen"]) == {3}
    generated = seen["gen"][3](ir_buffer("s_cpu", [38], torch.int32, "cpu"))
    assert generated.dtype == torch.int32 and generated.shape == (38,)
    assert generated.unique().numel() == 38 and 0 <= generated.min() and generated.max() < 16 * 24
    assert torch.equal(generated, generated.sort().values)


def test_extern_kernels_registered_on_import():
    """Cached compiled code calls ``extern_kernels.slcompile_materialize_aten`` without lowering
    anything: importing the backend must register it (a fresh interpreter, nothing compiled)."""
    code = ("import slcompile.backend\nfrom torch._inductor.select_algorithm import extern_kernels as k\n"
            "print(hasattr(k, 'slcompile_materialize'), hasattr(k, 'slcompile_materialize_aten'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.split() == ["True", "True"]


def test_aten_choice_matches_op():
    layer = make_layer()
    args = (layer.A.detach(), layer.B.detach(), layer.values.detach(), layer.support)
    out = torch.full((16, 24), float("nan"))
    lowering.materialize_aten(*args, scale=layer.scale, out=out)
    torch.testing.assert_close(out, ops.materialize(*args, layer.scale))


def test_backend_adds_cache_key(monkeypatch):
    """The lowering's key rides in ``post_grad_custom_pre_pass``, after a pass already configured."""
    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches=None, **kwargs):
        seen.update(config_patches)
        return gm

    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", fake_compile_fx)
    configured = lowering.LoweringKey()
    with inductor_config.patch(post_grad_custom_pre_pass=configured):
        backend.slcompile_backend(torch.fx.symbolic_trace(torch.nn.Identity()), [torch.ones(1)], options=NO_PASSES)
    passes = custom_graph_passes(seen["post_grad_custom_pre_pass"])
    assert passes[0] is configured and isinstance(passes[-1], lowering.LoweringKey) and len(passes) == 2
    assert passes[-1].uuid() == configured.uuid()


@pytest.mark.compile
def test_backend_lowers_materialize_plain_compile_does_not(monkeypatch):
    """Compiled by the backend (default lowering on CPU) equals eager in values and gradients, and
    went through the lowering; plain ``torch.compile`` of the same function never does."""
    calls = []
    real = lowering.lower_materialize
    monkeypatch.setattr(lowering, "lower_materialize", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer, x = make_layer(), torch.randn(5, 24)

    def values_and_grads(fn):
        layer.zero_grad(set_to_none=True)
        y = fn(layer, x)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        return [y.detach()] + [p.grad for p in (layer.A, layer.B, layer.values)]

    eager = values_and_grads(forward)
    compiled = values_and_grads(torch.compile(forward, backend="slcompile", options=NO_PASSES))
    for got, ref in zip(compiled, eager):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert calls
    calls.clear()
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(forward, options={"fx_graph_cache": False})(layer, x)
    assert not calls


@pytest.mark.compile
@pytest.mark.parametrize("only", [None, "slcompile_materialize", "slcompile_materialize_aten"])
def test_autotuned_choices_run_on_cpu(monkeypatch, only):
    """The CUDA path with ``"cpu"`` allowed: Inductor times both choices on the generated support
    (``only=None``) or emits the one ``only`` names; the compiled forward equals eager (inference:
    Inductor's max-autotune ``addmm`` fails on the 0-d input of ``materialize``'s backward, with
    or without this lowering)."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(lowering, "TUNED_DEVICES", ("cuda", "cpu"))
    tuned = []
    real = select_algorithm.autotune_select_algorithm

    def select(name, choices, *args, **kwargs):
        tuned.append((name, [c.name for c in choices]))
        return real(name, [c for c in choices if only in (None, c.name)], *args, **kwargs)

    monkeypatch.setattr(select_algorithm, "autotune_select_algorithm", select)
    layer, x = make_layer(), torch.randn(5, 24)
    torch._dynamo.reset()
    options = {**NO_PASSES, "max_autotune": True}
    with torch.no_grad():
        compiled, (code,) = run_and_get_code(torch.compile(forward, backend="slcompile", options=options), layer, x)
        torch.testing.assert_close(compiled, forward(layer, x), rtol=1e-4, atol=1e-5)
    assert ("slcompile_materialize", ["slcompile_materialize", "slcompile_materialize_aten"]) in tuned
    emitted = {"slcompile_materialize": "torch.ops.slcompile.materialize.default(",
               "slcompile_materialize_aten": "extern_kernels.slcompile_materialize_aten("}
    assert only is None or emitted[only] in code


@pytest.mark.compile
def test_fused_inputs_autotuned_on_cpu(tuned_on_cpu):
    """Where the backend makes ``materialize`` nodes itself (``fuse_shared_input``: one ``W`` per
    layer, concatenated), forward and backward under max-autotune with ``"cpu"`` allowed: each
    node is autotuned and the values and gradients equal eager."""
    tuned = tuned_on_cpu
    torch.manual_seed(0)
    # path fixed: an eager "auto" call would calibrate the CPU rates here, amid compile workers
    q, k = (slcompile.SLLinear(32, 16, rank=4, density=0.1, seed=seed, path="materialize") for seed in (1, 2))
    for layer in (q, k):
        torch.nn.init.normal_(layer.B)
    model, x = torch.nn.ModuleList([q, k]), torch.randn(6, 32)

    def values_and_grads(fn):
        model.zero_grad(set_to_none=True)
        y = fn(x)
        y.sum().backward()
        return [y.detach()] + [p.grad for p in model.parameters()]

    def forward(x):
        return q(x) * k(x)

    eager = values_and_grads(forward)
    torch._dynamo.reset()
    options = {"fuse_shared_input": True, "choose_path": False, "max_autotune": True, "fx_graph_cache": False}
    compiled = values_and_grads(torch.compile(forward, backend="slcompile", options=options))
    assert backend.last_report().counts()["fuse_shared_input"]["groups"] == 1
    assert tuned.count("slcompile_materialize") == 2
    for got, ref in zip(compiled, eager):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_grad_weight_choices_for_cuda_nodes(graph_handler, monkeypatch):
    """The ``dW`` + ``dvalues`` step on CUDA: our tuned kernel and the ATen composition, one packed
    output layout (``dvalues`` 16-element aligned after ``dW``), a ``support`` generator."""
    seen = {}
    monkeypatch.setattr(select_algorithm, "autotune_select_algorithm",
                        lambda name, choices, inputs, layout, input_gen_fns=None:
                        seen.update(name=name, choices=choices, layout=layout, gen=input_gen_fns) or choices[0])
    g, x = ir_buffer("g", [10, 7]), ir_buffer("x", [10, 33])
    support = ir_buffer("s", [23], torch.int32)
    choices, layout, gen = lowering.grad_weight_choices(g, x, support, (7, 33, 23))
    assert [c.name for c in choices] == ["slcompile_grad_weight", "slcompile_grad_weight_aten"]
    assert lowering.packed_offset(7, 33) == 240 and layout.size == [240 + 23] and layout.dtype == torch.bfloat16
    generated = gen[2](ir_buffer("s_cpu", [23], torch.int32, "cpu"))
    assert generated.unique().numel() == 23 and generated.max() < 7 * 33


@pytest.mark.parametrize("choice", [lowering.grad_weight_kernel, lowering.grad_weight_aten])
def test_grad_weight_choices_fill_the_packed_buffer(choice):
    gen = torch.Generator().manual_seed(0)
    g, x = torch.randn(10, 7, generator=gen), torch.randn(10, 33, generator=gen)
    support = generate_support(7, 33, 23, 0)
    packed = torch.full((lowering.packed_offset(7, 33) + 23,), float("nan"))
    assert choice(g, x, support, out=packed) is packed
    dw, dvalues = ops.grad_weight_and_values(g, x, support)
    torch.testing.assert_close(packed[:7 * 33].view(7, 33), dw)
    torch.testing.assert_close(packed[240:], dvalues)


@pytest.mark.compile
def test_sl_linear_forward_and_backward_autotuned_on_cpu(tuned_on_cpu):
    """The default ``sl_linear`` path under max-autotune with ``"cpu"`` allowed: forward and
    backward decompose into autotuned ``materialize`` and ``dW`` + ``dvalues`` nodes and Inductor
    ``mm`` nodes; values and gradients (3-D input, bias, first layer without ``dx``) equal eager
    in float64, and no ``sl_linear`` op is left in the code."""
    from torch._inductor.utils import run_and_get_code

    tuned = tuned_on_cpu
    torch.manual_seed(0)
    first = slcompile.SLLinear(24, 16, rank=4, density=0.1, bias=True, path="materialize")
    second = slcompile.SLLinear(16, 8, rank=3, density=0.2, seed=1, path="materialize")
    model = torch.nn.Sequential(first, torch.nn.GELU(), second).double()
    for layer in (first, second):
        torch.nn.init.normal_(layer.B)
    x = torch.randn(2, 5, 24, dtype=torch.float64)

    def values_and_grads(fn):
        model.zero_grad(set_to_none=True)
        y = fn(x)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
        return [y.detach()] + [p.grad for p in model.parameters()]

    eager = values_and_grads(model)
    torch._dynamo.reset()
    options = {**NO_PASSES, "max_autotune": True, "max_autotune_gemm_backends": "ATEN"}
    compiled, (forward_code, backward_code) = run_and_get_code(
        lambda: values_and_grads(torch.compile(model, backend="slcompile", options=options)))
    for got, ref in zip(compiled, eager):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for layer in (first, second):  # values.grad owns nnz elements, not the packed dW + dvalues
        assert layer.values.grad.untyped_storage().nbytes() == layer.nnz * 8
    assert tuned.count("slcompile_materialize") == 3  # two forwards, the second layer's dx
    assert tuned.count("slcompile_grad_weight") == 2
    for code in (forward_code, backward_code):
        calls = [line for line in code.splitlines() if not line.lstrip().startswith("#")]
        assert not [line for line in calls if "slcompile.sl_linear" in line]
        assert any("extern_kernels.mm(" in line or "extern_kernels.addmm(" in line for line in calls)

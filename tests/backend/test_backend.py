"""The ``slcompile`` torch.compile backend: same outputs and gradients as eager, passes applied.

Three compilations in all (each 10-30 s on CPU): a transformed decoder block with the fusion
pass on, a transformed MLP with biases fused through ``make_backend`` as on torch 2.11, and a fresh interpreter that
compiles hand-written SLTrain by the backend's name without importing slcompile.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor.custom_graph_pass import CustomGraphPass

import slcompile
import slcompile.backend as backend
from slcompile import _compat
from slcompile.model_configs import get_config
from slcompile.recipes.models.llama import DecoderLayer

pytestmark = pytest.mark.compile
ROOT = Path(__file__).resolve().parents[2]


def randomize_low_rank(model: nn.Module) -> None:
    """``B`` is zero at init: make it random so the low-rank term is live in the comparison."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, slcompile.SLLinear):
                module.B.copy_(torch.randn(module.B.shape, generator=gen) * 0.2)


def outputs_and_grads(model: nn.Module, *inputs: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    x = inputs[0].detach().clone().requires_grad_()
    y = model(x, *inputs[1:])
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return [y.detach(), x.grad, *grads]


def assert_all_close(got: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_decoder_block_matches_eager_with_fusion():
    cfg = get_config("llama-tiny")
    torch.manual_seed(0)
    block, report = slcompile.transform(DecoderLayer(cfg), slcompile.SLConfig(rank=8, alpha=2.0, density=0.1))
    assert len(report.replaced) == 7
    randomize_low_rank(block)
    x = torch.randn(2, 16, cfg.dim)
    cos, sin = torch.randn(16, cfg.head_dim), torch.randn(16, cfg.head_dim)
    eager = outputs_and_grads(block, x, cos, sin)
    before = torch._inductor.config.post_grad_custom_post_pass
    compiled = torch.compile(block, backend="slcompile", fullgraph=True,
                             options={"fuse_shared_input": True, "choose_path": False, "fx_graph_cache": False})
    assert_all_close(outputs_and_grads(compiled, x, cos, sin), eager)
    counts = backend.last_report().counts()
    assert counts["fuse_shared_input"]["groups"] == 2  # q/k/v and gate/up
    assert counts["fuse_shared_input"]["sl_linear"] == 5
    assert counts["pattern_sltrain"] == {"graphs": 1}  # SLLinear already calls sl_linear
    assert torch._inductor.config.post_grad_custom_post_pass is before  # config patched for the call only


class BiasMLP(nn.Module):
    def __init__(self, dim=24, hidden=40):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class RecordingPass(CustomGraphPass):
    """A post-grad pass configured before the backend runs: it must still run, before ours."""

    def __init__(self):
        self.calls = 0

    def __call__(self, graph) -> None:
        self.calls += 1

    def uuid(self):
        return "recording"


def test_mlp_with_bias_fused_through_make_backend_on_a_one_pass_torch(monkeypatch):
    """torch 2.11's single ``post_grad_custom_post_pass`` (``_compat.PASS_LISTS`` off): a configured
    pass and the fusion pass both run, chained."""
    monkeypatch.setattr(_compat, "PASS_LISTS", False)
    configured = RecordingPass()
    torch.manual_seed(0)
    mlp, _ = slcompile.transform(BiasMLP(), slcompile.SLConfig(rank=4, alpha=1.0, density=0.2))
    randomize_low_rank(mlp)
    x = torch.randn(3, 7, 24)
    eager = outputs_and_grads(mlp, x)
    compiled = torch.compile(mlp, backend=backend.make_backend(fuse_shared_input=True, choose_path=False,
                                                               fx_graph_cache=False))
    with torch._inductor.config.patch(post_grad_custom_post_pass=configured):
        assert_all_close(outputs_and_grads(compiled, x), eager)
    report = backend.last_report()
    assert report.counts()["fuse_shared_input"]["groups"] == 1  # gate/up
    assert configured.calls == 2  # forward and backward graph
    assert "slcompile backend" in str(report)


def test_inductor_options_and_mode_reach_compile_fx(monkeypatch):
    """Keys that are not ours go to ``compile_fx(config_patches=...)``, with the mode's options."""
    import torch._inductor.compile_fx as compile_fx_module

    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches=None, **kwargs):
        seen.update(config_patches or {})
        return gm

    monkeypatch.setattr(compile_fx_module, "compile_fx", fake_compile_fx)
    gm = torch.fx.symbolic_trace(nn.Linear(4, 3))
    backend.slcompile_backend(gm, [torch.randn(2, 4)], mode="max-autotune-no-cudagraphs",
                              options={"epilogue_fusion": False, "fuse_shared_input": True})
    assert seen["epilogue_fusion"] is False
    assert seen["max_autotune"] is True  # from the mode
    assert "fuse_shared_input" not in seen and seen["post_grad_custom_post_pass"]


ENTRY_POINT_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.nn.functional as F
    from torch import nn

    class HandWritten(nn.Module):  # SLTrain as a user writes it, without slcompile
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.A = nn.Parameter(torch.randn(4, 16, generator=g))
            self.B = nn.Parameter(torch.randn(8, 4, generator=g))
            self.values = nn.Parameter(torch.randn(20, generator=g))
            self.register_buffer("index", torch.randperm(128, generator=g)[:20].to(torch.int32))
            self.scale = 0.5

        def forward(self, x):
            w = self.B @ (self.scale * self.A)
            w = w.view(-1).index_add(0, self.index.long(), self.values).view(8, 16)
            return torch.tanh(F.linear(x, w))

    imported_before = "slcompile" in sys.modules
    model = HandWritten()
    x = torch.randn(5, 16)
    grads = lambda y: torch.autograd.grad(y.square().sum(), list(model.parameters()))
    ref = model(x)
    ref_grads = grads(ref)
    compiled = torch.compile(model, backend="slcompile")
    out = compiled(x)
    out_grads = grads(out)
    diff = max((a - b).abs().max().item() for a, b in zip((out, *out_grads), (ref, *ref_grads)))
    print(json.dumps({"imported_before": imported_before, "diff": diff,
                      "counts": sys.modules["slcompile.backend"].last_report().counts()}))
""")


def test_entry_point_in_fresh_interpreter_without_import():
    proc = subprocess.run([sys.executable, "-c", ENTRY_POINT_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["imported_before"] is False  # the entry point imported it
    assert result["diff"] < 1e-4
    assert result["counts"]["pattern_sltrain"]["sl_linear"] == 1


def test_options_are_validated_and_split():
    with pytest.raises(ValueError, match="fuse_shared_input"):
        backend.make_backend(fuse_shared_input="yes")
    with pytest.raises(ValueError, match="fuse_min_group"):
        backend.post_grad_passes({"fuse_shared_input": True, "fuse_min_group": 1})
    ours, inductor = backend._split_options({"pattern_sltrain": False, "max_autotune": True})
    assert ours == {**backend.DEFAULT_OPTIONS, "pattern_sltrain": False} and inductor == {"max_autotune": True}
    assert backend.post_grad_passes() == []


def test_post_grad_pass_uuid_follows_options():
    (two,) = backend.post_grad_passes({"fuse_shared_input": True})
    (again,) = backend.post_grad_passes({"fuse_shared_input": True, "fuse_min_group": 2})
    (three,) = backend.post_grad_passes({"fuse_shared_input": True, "fuse_min_group": 3})
    assert two.uuid() == again.uuid() != three.uuid()

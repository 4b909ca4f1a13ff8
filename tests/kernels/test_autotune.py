"""Eager autotuning (``slcompile.kernels.autotune``): the choice among candidates, its cache, and
the candidates each CUDA implementation offers, on CPU (timings faked, no kernel launched)."""
from __future__ import annotations

import pytest
import torch

from slcompile import ops
from slcompile.support import generate_support

pytest.importorskip("triton", reason="triton is not installed (pip install 'slcompile[kernels]')")

from slcompile import kernels  # noqa: E402
from slcompile.kernels import autotune, configs  # noqa: E402


@pytest.fixture
def tuner(monkeypatch):
    """Tuning on (as on a GPU), each candidate's time given by ``times`` (label -> ms), calls recorded."""
    autotune.clear()
    timed = []
    times = {}

    def fake_time(run):
        label = next(label for label, candidate in current.items() if candidate is run)
        timed.append(label)
        return times[label]

    current = {}
    real_pick = autotune.pick

    def pick(key, candidates, device):
        current.clear()
        current.update(candidates)
        return real_pick(key, candidates, device)

    monkeypatch.setattr(autotune, "enabled", lambda device: True)
    monkeypatch.setattr(autotune, "_time", fake_time)
    monkeypatch.setattr(autotune, "pick", pick)
    yield times, timed
    autotune.clear()


def test_pick_times_once_per_key_and_keeps_the_fastest(tuner):
    times, timed = tuner
    times.update(a=2.0, b=1.0, c=3.0)
    candidates = {"a": lambda: None, "b": lambda: None, "c": lambda: None}
    assert autotune.pick(("k", 1), candidates, torch.device("cpu")) == "b"
    assert autotune.pick(("k", 1), candidates, torch.device("cpu")) == "b"
    assert timed == ["a", "b", "c"]  # the second call read the cache
    times.update(a=0.5)
    assert autotune.pick(("k", 2), candidates, torch.device("cpu")) == "a"
    assert autotune.tuned() == {("k", 1): "b", ("k", 2): "a"}


def test_a_call_offered_other_candidates_is_tuned_again(tuner):
    """Same shapes, strides and dtypes, but an unaligned view offers fewer configurations: the
    choice cached for the aligned call must not be looked up among them (it was a KeyError)."""
    times, _ = tuner
    times.update(big=1.0, small=2.0, aten=3.0)
    x = torch.zeros(8, 8)
    assert kernels._tuned("op", (x,), {"big": lambda: "big", "small": lambda: "small", "aten": lambda: "aten"}) == "big"
    assert kernels._tuned("op", (x,), {"small": lambda: "small", "aten": lambda: "aten"}) == "small"


def test_untuned_devices_take_the_first_candidate():
    autotune.clear()
    assert not autotune.enabled(torch.device("cpu"))
    assert autotune.pick("k", {"first": lambda: 1, "second": lambda: 2}, torch.device("cpu")) == "first"
    assert autotune.tuned() == {}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_materialize_and_grad_weight_offer_every_config_and_aten(tuner, dtype):
    """The CUDA implementations offer each configuration of their kernel (at aligned widths: all of
    them) plus the ATen composition; picking ATen (fastest here) returns the torch reference."""
    times, timed = tuner
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(16, 48, generator=gen, dtype=dtype), torch.randn(32, 16, generator=gen, dtype=dtype)
    support = generate_support(32, 48, 64, 0)
    values = torch.randn(64, generator=gen, dtype=dtype)
    kind = configs.operand_kind(dtype, "ieee")  # CPU: torch's fp32 matmul precision is not TF32 here
    labels = {name: [kernels._label({"maxnreg": None, **{k: v for k, v in c.items() if k != "aligned"}})
                     for c in listed[kind]]
              for name, listed in (("m", configs.MATERIALIZE), ("g", configs.GRAD_WEIGHT))}
    times.update({label: 1.0 for listed in labels.values() for label in listed}, aten=0.5)
    weight = kernels._materialize_cuda(A, B, values, support, 0.5)
    assert timed == labels["m"] + ["aten"]
    torch.testing.assert_close(weight, ops.materialized_weight(A, B, values, support, 0.5))
    timed.clear()
    g, x = torch.randn(16, 32, generator=gen, dtype=dtype), torch.randn(16, 48, generator=gen, dtype=dtype)
    dw, dvalues = kernels.triton_grad_weight(g, x, support)
    assert timed == labels["g"] + ["aten"]
    want = ops.grad_weight_and_values(g, x, support)
    torch.testing.assert_close(dw, want[0])
    torch.testing.assert_close(dvalues, want[1])
    out = (torch.empty_like(dw), torch.empty_like(dvalues))
    assert all(a is b for a, b in zip(kernels.triton_grad_weight(g, x, support, out=out), out))  # tuned: ATen
    torch.testing.assert_close(out[1], want[1])
    timed.clear()
    kernels.triton_grad_weight(g[:15], x[:15], support)  # 15 tokens: no aligned-only tile is offered
    assert timed == [label for label, c in zip(labels["g"], configs.GRAD_WEIGHT[kind]) if not c["aligned"]] + ["aten"]


def test_a_tuned_key_builds_only_the_candidate_it_runs(monkeypatch):
    """The hot path: once a key is tuned, a call makes one callable, not one per configuration."""
    autotune.clear()
    monkeypatch.setattr(autotune, "enabled", lambda device: True)
    monkeypatch.setattr(autotune, "_time", lambda run: {"a": 2.0, "b": 1.0}.get(next(iter(run() or {"aten": 0})), 3.0))
    made = []

    def make(config):
        made.append(config)
        return lambda: config

    offers = {"a": {"a": 1}, "b": {"b": 1}, "aten": None}
    x = torch.zeros(4)
    assert kernels._tuned("op", (x,), kernels._Candidates(offers, make)) == {"b": 1}
    assert made == [{"a": 1}, {"b": 1}, None]  # the first call timed each once
    made.clear()
    assert kernels._tuned("op", (x,), kernels._Candidates(offers, make)) == {"b": 1}
    assert made == [{"b": 1}]
    autotune.clear()

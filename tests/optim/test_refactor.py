"""Weight refactorization, momentum reset and per-group LR multipliers (slcompile.optim.refactor)."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import example, given, strategies as st
from torch import nn

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

from slcompile import SLLinear  # noqa: E402
from slcompile.optim import (build, factor_params, param_groups, quantize_weights, refactorize_,  # noqa: E402
                             reset_moments_)
from slcompile.recipes.baselines import LowRankLinear  # noqa: E402
from helpers import batches, dense_reference_weight, save_load, tiny_model  # noqa: E402


def weight(layer: SLLinear) -> torch.Tensor:
    return dense_reference_weight(layer.A.detach(), layer.B.detach(), layer.values.detach(), layer.support, layer.scale)


@given(out_features=st.integers(1, 24), in_features=st.integers(1, 24), rank_frac=st.floats(0.0, 1.0),
       dtype=st.sampled_from([torch.float32, torch.float64]), b_zero=st.booleans(),
       imbalance=st.floats(1e-2, 1e2), seed=st.integers(0, 2 ** 16))
@example(out_features=7, in_features=5, rank_frac=1.0, dtype=torch.float32, b_zero=False, imbalance=30.0, seed=1)
@example(out_features=5, in_features=9, rank_frac=1.0, dtype=torch.float64, b_zero=True, imbalance=1.0, seed=2)
def test_refactorization_keeps_w_and_balances_the_factors(out_features, in_features, rank_frac, dtype, b_zero,
                                                          imbalance, seed):
    torch.manual_seed(seed)
    rank = max(1, round(rank_frac * min(in_features, out_features)))  # r = min(in, out) included
    layer = SLLinear(in_features, out_features, rank=rank, alpha=2.0, density=0.5, seed=seed, dtype=dtype)
    if not b_zero:
        with torch.no_grad():
            layer.B.normal_(0.0, imbalance)
            layer.A.mul_(1 / imbalance)
    before, a0, values0 = weight(layer), layer.A.detach().clone(), layer.values.detach().clone()
    delta = refactorize_(layer)[""]
    after = weight(layer)
    change = float((after - before).abs().max())
    tol = (1e-5 if dtype == torch.float32 else 1e-12) * (1 + float(before.abs().max()))
    assert change <= tol and delta <= tol
    assert torch.equal(layer.values, values0) and layer.A.dtype == layer.B.dtype == dtype
    if b_zero:  # the SLTrain init: a no-op, never NaN, A kept so the factors can still learn
        assert delta == 0.0 and torch.equal(layer.A, a0) and not layer.B.any()
    else:
        b, a = layer.B.detach().double(), layer.A.detach().double()
        gram_b, gram_a = b.T @ b, a @ a.T
        scale = 1 + float(gram_a.abs().max())
        torch.testing.assert_close(gram_b / scale, gram_a / scale, atol=1e-5 if dtype == torch.float32 else 1e-12,
                                   rtol=0)
        torch.testing.assert_close(gram_a - torch.diag(gram_a.diagonal()), torch.zeros_like(gram_a),
                                   atol=1e-5 * scale if dtype == torch.float32 else 1e-12 * scale, rtol=0)


def test_refactorization_reports_the_change_per_layer_and_reaches_lowrank_layers():
    model = nn.Sequential(tiny_model(torch.float64), LowRankLinear(8, 8, rank=3, alpha=1.0).double())
    with torch.no_grad():
        model[1].B.mul_(50.0)
    before = model[1].dense_weight()
    deltas = refactorize_(model)
    assert set(deltas) == {"0.0", "0.3", "1"} and max(deltas.values()) < 1e-12
    torch.testing.assert_close(model[1].dense_weight(), before, atol=1e-12, rtol=0)
    assert float(model[1].B.detach().norm()) == pytest.approx(float(model[1].A.detach().norm()), rel=1e-9)
    factors, values = factor_params(model)
    assert len(factors) == 6 and len(values) == 2


def test_int8_factors_are_requantized_and_the_change_is_reported():
    model = tiny_model()
    with torch.no_grad():
        model[0].B.mul_(30.0)  # unbalanced: the rebalanced factors need new per-row scales
    quantize_weights(model)
    layer = model[0]
    before = weight(layer)
    deltas = refactorize_(model)
    change = float((weight(layer) - before).abs().max())
    assert deltas["0"] == pytest.approx(change, rel=1e-5, abs=1e-7)
    assert 0 < change < 0.02 * float((layer.scale * layer.B.dequantize() @ layer.A.dequantize()).abs().max())
    zero = SLLinear(16, 16, rank=4, density=0.5)  # B = 0 at init stays a no-op when stored as int8
    quantize_weights(zero)
    codes = zero.A.codes.clone()
    assert refactorize_(zero) == {"": 0.0} and torch.equal(zero.A.codes, codes)


def _step(model: nn.Module, optimizer, batch) -> None:
    x, y = batch
    (model(x) - y).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def wide() -> nn.Module:
    """First layer: A (32, 128), B (128, 32), 4096 elements each, so 8-bit states are quantized."""
    torch.manual_seed(0)
    model = nn.Sequential(SLLinear(128, 128, rank=32, density=0.1, seed=1), nn.GELU(),
                          SLLinear(128, 8, rank=4, density=0.1, seed=2))
    with torch.no_grad():
        model[0].B.normal_(0.0, 0.05)
        model[2].B.normal_(0.0, 0.05)
    return model


def wide_batches(n: int):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(12, 128, generator=gen), torch.randn(12, 8, generator=gen)) for _ in range(n)]


@pytest.mark.parametrize("kind", ["torch", "plain", "per_layer", "8bit"])
def test_momentum_reset_makes_the_next_update_a_fresh_first_step(kind):
    if kind == "8bit":
        pytest.importorskip("torchao.optim", reason="8-bit states need torchao (pip install 'slcompile[lowbit]')")
    """After ``reset_moments_`` the factors take exactly the first step of a new optimizer (moments
    and step count restart); the values, whose states were kept, do not."""
    model = wide()

    def make(target, params=None):
        if kind == "torch":
            return torch.optim.AdamW(params if params is not None else target.parameters(), lr=1e-2)
        return build(params if params is not None else target, lr=1e-2, per_layer=kind == "per_layer",
                     state_bits=8 if kind == "8bit" else 32, compile_step=False)

    optimizer = make(model)
    data = wide_batches(4)
    for batch in data[:3]:
        _step(model, optimizer, batch)
    factors, values = factor_params(model)
    twin = wide()
    twin.load_state_dict(model.state_dict())
    assert reset_moments_(optimizer, factors) == len(factors) == 4
    assert all(len(optimizer.state[p]) == 0 for p in factors) and all(optimizer.state[p] for p in values)
    twin_factors, _ = factor_params(twin)
    fresh = make(twin, twin_factors)
    _step(model, optimizer, data[3])
    _step(twin, fresh, data[3])
    for p, q in zip(factors, twin_factors):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    assert not torch.equal(model[0].values, twin[0].values)  # the twin's values did not step at all
    if kind == "8bit":
        assert type(optimizer.state[factors[0]]["exp_avg"]).__name__ == "OptimState8bit"


@pytest.mark.parametrize("state_bits", [32, 8])
def test_momentum_reset_survives_a_checkpoint_of_the_per_layer_optimizer(state_bits):
    if state_bits == 8:
        pytest.importorskip("torchao.optim", reason="8-bit states need torchao (pip install 'slcompile[lowbit]')")
    """Saved right after a reset (cleared states are left out), loaded into a new run: the next
    updates are the same as the uninterrupted run's."""
    model, data = wide(), wide_batches(3)
    optimizer = build(model, lr=1e-2, per_layer=True, state_bits=state_bits, compile_step=False)
    _step(model, optimizer, data[0])
    factors, _ = factor_params(model)
    reset_moments_(optimizer, factors)
    state = save_load(optimizer.state_dict())
    assert len(state["state"]) == len(list(model.parameters())) - len(factors)
    twin = wide()
    twin.load_state_dict(model.state_dict())
    restored = build(twin, lr=1e-2, per_layer=True, state_bits=state_bits, compile_step=False)
    restored.load_state_dict(state)
    for batch in data[1:]:
        _step(model, optimizer, batch)
        _step(twin, restored, batch)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kind", ["torch", "plain", "per_layer"])
def test_lr_multipliers_scale_their_groups_and_zero_freezes_the_values(kind):
    model = tiny_model()
    if kind == "torch":
        optimizer = torch.optim.AdamW(param_groups(model, 1e-2, lr_factors=0.5, lr_values=0.0), lr=1e-2)
    else:
        optimizer = build(model, lr=1e-2, lr_factors=0.5, lr_values=0.0, per_layer=kind == "per_layer")
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 5e-3, 0.0]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    before = copy.deepcopy(model)
    _step(model, optimizer, batches(1)[0])
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == [5e-3, 2.5e-3, 0.0]
    assert torch.equal(model[0].values, before[0].values) and torch.equal(model[3].values, before[3].values)
    assert not torch.equal(model[0].A, before[0].A) and not torch.equal(model[4].weight, before[4].weight)


def test_default_multipliers_keep_one_group_and_bad_ones_are_refused():
    model = tiny_model()
    assert [len(g["params"]) for g in build(model).param_groups] == [len(list(model.parameters()))]
    with pytest.raises(ValueError, match="lr_values must be a finite number"):
        build(model, lr_values=-1.0)
    with pytest.raises(ValueError, match="lr_factors must be a finite number"):
        build(model, lr_factors=float("nan"))
    with pytest.raises(ValueError, match="need the model"):
        build(list(model.parameters()), lr_factors=2.0)

"""8-bit and 4-bit optimizer states from torchao through slcompile.optim.build.

torchao compiles its step per parameter shape (seconds each on CPU): these tests run it eagerly
(``compile_step=False``, the same math) except one, which compiles a single shape.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
torchao_optim = pytest.importorskip("torchao.optim")

from slcompile import SLLinear  # noqa: E402
from slcompile.optim import build  # noqa: E402
from helpers import assert_same_params, save_load  # noqa: E402

STATE_CLASSES = {8: torchao_optim.subclass_8bit.OptimState8bit, 4: torchao_optim.subclass_4bit.OptimState4bit}


def wide_model(density: float = 0.3) -> nn.Module:
    """A(32, 128), B(128, 32): 4096 elements each; values: int(density * 16384) (4915 by default,
    not a multiple of torchao's block: padded); bias(128): too small to quantize."""
    torch.manual_seed(0)
    layer = SLLinear(128, 128, rank=32, alpha=8.0, density=density, seed=3)
    with torch.no_grad():
        layer.B.normal_(0.0, 0.05)
    return layer


def data(n: int):
    gen = torch.Generator().manual_seed(5)
    teacher = torch.randn(128, 128, generator=gen) / 128 ** 0.5
    xs = [torch.randn(32, 128, generator=gen) for _ in range(n)]
    return [(x, x @ teacher.T) for x in xs]


def train(model, opt, batches):
    losses = []
    for x, y in batches:
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("bits", [8, 4])
def test_states_quantized_and_training_reduces_loss(bits):
    batches = data(1) * 6
    full = wide_model()
    full_losses = train(full, build(full, lr=3e-2), batches)
    model = wide_model()
    opt = build(model, lr=3e-2, state_bits=bits, compile_step=False)
    losses = train(model, opt, batches)
    assert losses[-1] < 0.3 * losses[0]
    assert losses[-1] == pytest.approx(full_losses[-1], rel=0.15)  # close to 32-bit states
    for name in ("A", "B", "values"):
        state = opt.state[getattr(model, name)]
        for key in ("exp_avg", "exp_avg_sq"):
            assert isinstance(state[key], STATE_CLASSES[bits]), (name, key)
            assert state[key].codes.dtype == torch.uint8
    assert type(opt.state[model.bias]["exp_avg"]) is torch.Tensor  # 128 < 4096 elements: plain
    block = {8: 256, 4: 128}[bits]
    assert model.values.numel() == 4915 and opt.state[model.values]["exp_avg"].numel() == -(-4915 // block) * block


def test_per_layer_8bit_equals_torchao_after_backward():
    # density 0.25: every tensor is a whole number of blocks, so torchao quantizes the same ones
    ref, model, batches = wide_model(0.25), wide_model(0.25), data(3)
    ref_opt = torchao_optim.AdamW8bit(ref.parameters(), lr=1e-2, weight_decay=0.1)
    with torch.compiler.set_stance("force_eager"):
        train(ref, ref_opt, batches)
    train(model, build(model, lr=1e-2, weight_decay=0.1, state_bits=8, compile_step=False), batches)
    assert_same_params(ref, model)


def test_resume_8bit_equals_uninterrupted():
    def make():
        model = wide_model()
        return model, build(model, lr=1e-2, state_bits=8, compile_step=False)

    batches = data(4)
    model, opt = make()
    train(model, opt, batches[:2])
    checkpoint = save_load({"model": model.state_dict(), "opt": opt.state_dict()})
    assert all(isinstance(checkpoint["opt"]["state"][i]["exp_avg"], STATE_CLASSES[8]) for i in range(3))
    train(model, opt, batches[2:])

    resumed, resumed_opt = make()
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["opt"])
    train(resumed, resumed_opt, batches[2:])
    assert_same_params(model, resumed)
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = opt.state[p][key], resumed_opt.state[q][key]
            assert type(a) is type(b)
            assert torch.equal(a.dequantize() if hasattr(a, "dequantize") else a,
                               b.dequantize() if hasattr(b, "dequantize") else b)


@pytest.mark.parametrize("bits", [8, 4])
def test_dense_state_dict_has_parameter_shaped_states_and_requantizes_on_load(bits):
    # What DCP saves under --parallel: every state as a tensor of its parameter's shape and dtype
    # (padding cut, zeros for a parameter never stepped); loading requantizes it on this
    # optimizer's blocks. torchao's signed map stops short of -1, so a block whose largest
    # magnitude is negative can come back one code off: exp_avg within one 8/4-bit step.
    batches = data(3)
    model = wide_model()
    model.extra = nn.Parameter(torch.ones(8))  # gets no gradient: never steps
    opt = build(model, lr=1e-2, state_bits=bits, compile_step=False, dense_state_dict=True)
    train(model, opt, batches[:2])
    dense = save_load(opt.state_dict())
    params = list(model.parameters())
    assert len(dense["state"]) == len(params)
    for index, param in enumerate(params):
        state = dense["state"][index]
        assert {k: (v.shape, v.dtype, type(v)) for k, v in state.items() if k != "step"} == {
            k: (param.shape, param.dtype, torch.Tensor) for k in ("exp_avg", "exp_avg_sq")}
    (extra,) = [dense["state"][i] for i, p in enumerate(params) if p is model.extra]
    assert float(extra["step"]) == 0 and not extra["exp_avg"].any() and not extra["exp_avg_sq"].any()

    resumed = wide_model()
    resumed.extra = nn.Parameter(torch.ones(8))
    resumed.load_state_dict(model.state_dict())
    resumed_opt = build(resumed, lr=1e-2, state_bits=bits, compile_step=False, dense_state_dict=True)
    resumed_opt.load_state_dict(dense)
    assert isinstance(resumed_opt.state[resumed.values]["exp_avg"], STATE_CLASSES[bits])  # quantized again, padded
    again = resumed_opt.state_dict()["state"]
    step = {8: 2 / 127, 4: 2 / 7}[bits]  # widest gap of torchao's signed map, relative to the block scale
    for index in dense["state"]:
        before, after = dense["state"][index], again[index]
        assert float(after["step"]) == float(before["step"])
        torch.testing.assert_close(after["exp_avg_sq"], before["exp_avg_sq"], rtol=0, atol=0)
        assert (after["exp_avg"] - before["exp_avg"]).abs().max() <= step * before["exp_avg"].abs().max()
    train(model, opt, batches[2:])
    train(resumed, resumed_opt, batches[2:])
    # One step moves a weight by about lr = 1e-2; the requantized moments move it by a fraction of that.
    assert_same_params(model, resumed, atol={8: 1e-3, 4: 3e-3}[bits])


@pytest.mark.compile
@pytest.mark.slow  # compiles torchao's step
def test_compiled_step_inside_backward_hook():
    """torchao's default path: its step torch.compile-d, here called from the gradient hook."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(64, 64))  # 4096 elements: one shape, one compile
    eager_weight = nn.Parameter(weight.detach().clone())
    opt = build([weight], lr=1e-2, state_bits=8)
    eager_opt = build([eager_weight], lr=1e-2, state_bits=8, compile_step=False)
    x = torch.randn(16, 64)
    for _ in range(2):
        for w, o in ((weight, opt), (eager_weight, eager_opt)):
            (x @ w).pow(2).mean().backward()
            o.step()
    assert isinstance(opt.state[weight]["exp_avg"], STATE_CLASSES[8])
    assert opt.state[weight]["step"].item() == 2
    torch.testing.assert_close(weight.detach(), eager_weight.detach(), atol=1e-5, rtol=1e-5)


def test_padded_states_equal_torchao_on_an_explicitly_padded_tensor():
    torch.manual_seed(0)
    value = torch.randn(4915)  # not a multiple of 256: torchao alone would keep fp32 states
    param = nn.Parameter(value.clone())
    padded = nn.Parameter(torch.cat([value, torch.zeros(5120 - 4915)]))
    opt = build([param], lr=1e-2, weight_decay=0.1, state_bits=8, compile_step=False)
    ref_opt = torchao_optim.AdamW8bit([padded], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        grad = torch.randn(4915)
        param.grad, padded.grad = grad.clone(), torch.cat([grad, torch.zeros(5120 - 4915)])
        opt.step()
        with torch.compiler.set_stance("force_eager"):
            ref_opt.step()
    assert isinstance(opt.state[param]["exp_avg"], STATE_CLASSES[8])
    assert torch.equal(param.detach(), padded.detach()[:4915])
    assert torch.equal(padded.detach()[4915:], torch.zeros(5120 - 4915))

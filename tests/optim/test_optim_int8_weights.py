"""int8 storage of A, B, values (Int8Weight) and training through slcompile.optim.build."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slcompile import SLLinear, ops
from slcompile.optim import Int8Weight, build, quantize_int8, quantize_weights
from helpers import save_load, tiny_model


def layer(dtype=torch.float32) -> SLLinear:
    torch.manual_seed(0)
    sl = SLLinear(32, 24, rank=8, alpha=8.0, density=0.2, seed=4)
    with torch.no_grad():
        sl.B.normal_(0.0, 0.2)
    return sl.to(dtype)


def test_quantize_layout_and_error_bounds():
    x = torch.randn(6, 40)
    for stochastic, bound in ((False, 0.5), (True, 1.0)):
        codes, scale = quantize_int8(x, stochastic=stochastic)
        assert codes.dtype == torch.int8 and codes.shape == x.shape
        assert scale.dtype == torch.float32 and scale.shape == (6, 1)  # per row
        assert ((codes.float() * scale - x).abs() <= bound * scale + 1e-7).all()
    codes, scale = quantize_int8(torch.randn(50), stochastic=False)
    assert scale.shape == (1,)  # per tensor
    codes, scale = quantize_int8(torch.zeros(3, 4), stochastic=True)  # B's init
    assert (codes == 0).all() and (scale == 1).all()


def test_stochastic_rounding_is_unbiased():
    row = torch.tensor([1.0, 0.3 / 127])  # absmax 1: the second entry is 0.3 of a step
    draws = torch.stack([quantize_int8(row, stochastic=True)[0][1] for _ in range(4000)]).float()
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    assert draws.mean().item() == pytest.approx(0.3, abs=0.03)


def test_forward_matches_dequantized_weights():
    sl = layer()
    x = torch.randn(5, 32)
    dense = sl(x).detach()
    quantized = quantize_weights(sl)
    assert quantized == ["A", "B", "values"]
    assert all(isinstance(getattr(sl, n), Int8Weight) and getattr(sl, n).codes.dtype == torch.int8
               for n in quantized)
    A, B, values = (getattr(sl, n).dequantize() for n in ("A", "B", "values"))
    expected = F.linear(x, ops.materialize(A, B, values, sl.support, sl.scale), sl.bias)
    y = sl(x)
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y, dense, atol=2e-2, rtol=0)  # int8 rounding only
    torch.testing.assert_close(sl.dense_weight(), ops.materialize(A, B, values, sl.support, sl.scale))


def test_backward_gives_plain_gradients_of_the_parameter_shape():
    sl = layer(torch.bfloat16)
    quantize_weights(sl)
    assert sl.A.dtype == torch.bfloat16 and sl.A.is_leaf and sl.A.requires_grad
    sl(torch.randn(5, 32, dtype=torch.bfloat16)).float().pow(2).sum().backward()
    for name in ("A", "B", "values"):
        param = getattr(sl, name)
        assert type(param.grad) is torch.Tensor
        assert param.grad.shape == param.shape and param.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("per_layer", [True, False])
def test_training_reduces_loss(per_layer):
    torch.manual_seed(1)
    teacher = layer()
    x = torch.randn(64, 32)
    y = teacher(x).detach()
    model = SLLinear(32, 24, rank=8, alpha=8.0, density=0.2, seed=4)
    opt = build(model, lr=1e-2, per_layer=per_layer, int8_weights=True)
    losses = []
    for _ in range(40):
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert all(isinstance(getattr(model, n), Int8Weight) for n in ("A", "B", "values"))
    assert opt.state[model.A]["exp_avg"].shape == model.A.shape  # full-precision Adam state
    assert model.A.codes.dtype == torch.int8


def test_int8_weights_with_8bit_states():
    pytest.importorskip("torchao")
    model = SLLinear(128, 128, rank=32, alpha=8.0, density=0.25, seed=3)  # 4096-element factors
    opt = build(model, lr=1e-2, state_bits=8, int8_weights=True, compile_step=False)
    x = torch.randn(8, 128)
    before = model.values.dequantize().clone()
    for _ in range(2):
        model(x).pow(2).mean().backward()
        opt.step()
    assert type(opt.state[model.values]["exp_avg"]).__name__ == "OptimState8bit"
    assert not torch.equal(before, model.values.dequantize())


def test_predicate_selects_parameters():
    model = tiny_model()
    build(model, int8_weights=lambda name, param: name.endswith("values"))
    assert isinstance(model[0].values, Int8Weight) and isinstance(model[3].values, Int8Weight)
    assert not isinstance(model[0].A, Int8Weight) and not isinstance(model[3].B, Int8Weight)
    with pytest.raises(ValueError, match="names must be among"):
        quantize_weights(model, names=("weight",))


def test_inplace_arithmetic_is_refused():
    sl = layer()
    quantize_weights(sl)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="slcompile.optim.build"):
        sl.A.mul_(2.0)
    with pytest.raises(NotImplementedError, match="aten.add_"):  # a plain torch optimizer
        sl(torch.randn(2, 32)).sum().backward()
        torch.optim.SGD(sl.parameters(), lr=0.1).step()


def test_model_state_dict_is_dense_and_requantized_on_load():
    sl = layer()
    float_state = {k: v.clone() for k, v in sl.state_dict().items()}
    quantize_weights(sl)
    restored = save_load(sl.state_dict())
    assert type(restored["A"]) is torch.Tensor and restored["A"].dtype == torch.float32
    torch.testing.assert_close(restored["values"], sl.values.dequantize(), rtol=0, atol=0)
    fresh = layer()
    quantize_weights(fresh)
    with torch.no_grad():
        fresh.A.zero_()
    fresh.load_state_dict(restored)  # dequantized -> int8: the largest code of a row is 127, so the same codes
    assert isinstance(fresh.A, Int8Weight) and torch.equal(fresh.A.codes, sl.A.codes)
    torch.testing.assert_close(fresh.A.scale, sl.A.scale, rtol=1e-6, atol=0)
    fresh.load_state_dict(float_state)  # float -> int8: rounded to nearest
    assert torch.equal(fresh.A.codes, sl.A.codes)


class _Mesh:
    def __init__(self, world: int):
        self.world = world

    def size(self) -> int:
        return self.world


def _shard(weight: Int8Weight, world: int) -> list[Int8Weight]:
    """FSDP2's sharding of ``weight`` on ``world`` ranks, in one process: chunk dim 0, copy each chunk into
    a padded zero shard, keep the narrowed view (the rank's local tensor)."""
    chunks = torch.chunk(weight, world)
    shards = []
    for chunk in chunks:
        padded = weight.new_zeros(chunks[0].shape)
        padded.narrow(0, 0, len(chunk)).copy_(chunk)
        shards.append(padded.narrow(0, 0, len(chunk)))
    return shards


def _gather(shards: list[Int8Weight], shape: torch.Size) -> Int8Weight:
    """FSDP2's all-gather of the shards' pre-all-gather inputs (concatenated), rebuilt and cut to ``shape``."""
    inputs = [s.fsdp_pre_all_gather(_Mesh(len(shards)), shape, None, None, None)[0] for s in shards]
    outputs = tuple(torch.cat([i[k] for i in inputs]) for k in range(2))
    gathered, inner = shards[0].fsdp_post_all_gather(outputs, None, shards[0].dtype)
    assert inner == outputs and outputs[0].dtype == torch.int8 and outputs[1].dtype == torch.float32
    return torch.as_strided(gathered, shape, torch.empty(shape, device="meta").stride(), 0)


@pytest.mark.parametrize("shape, rows", [((7, 5), [3, 3, 1]), ((11,), [4, 4, 3])])  # the last shard is shorter
def test_fsdp2_shards_and_all_gathers_int8(shape, rows):
    torch.manual_seed(0)
    weight = Int8Weight.from_float(torch.randn(shape))
    shards = _shard(weight, world=3)
    assert [len(s) for s in shards] == rows and all(s.codes.dtype == torch.int8 for s in shards)
    torch.testing.assert_close(_gather(shards, weight.shape).dequantize(), weight.dequantize(), rtol=0, atol=0)
    update = torch.randn(shape)
    for shard, part in zip(shards, torch.split(update, rows[0])):
        shard.requantize_(part, stochastic=False)  # in place, into the padded shard FSDP2 gathers from
    gathered = _gather(shards, weight.shape)
    torch.testing.assert_close(gathered.dequantize(), torch.cat([s.dequantize() for s in shards]), rtol=0, atol=0)
    # 2-D: a scale per row; 1-D: one per shard (each shard requantized on its own absmax)
    absmax = [p.abs().amax(-1) for p in torch.split(update, rows[0])] if len(shape) == 1 else [update.abs().amax(-1)]
    torch.testing.assert_close(gathered.scale.reshape(-1), torch.cat([a.reshape(-1) for a in absmax]) / 127)


def test_one_dimensional_block_scales():
    # 5 entries in 2 blocks of ceil(5 / 2) = 3: [1, 0.5, 10] and [-5, 2] (an all-gathered 1-D weight's layout)
    codes, scale = quantize_int8(torch.tensor([1.0, 0.5, 10.0, -5.0, 2.0]), stochastic=False, blocks=2)
    assert scale.tolist() == pytest.approx([10 / 127, 5 / 127]) and codes.tolist() == [13, 6, 127, -127, 51]
    weight = Int8Weight(codes, scale, torch.float32)
    torch.testing.assert_close(weight.dequantize(), codes.float() * torch.tensor([10, 10, 10, 5, 5]) / 127)


@pytest.mark.parametrize("write", ["copy", "requantize", "int8_copy"])
def test_a_write_into_a_slice_of_a_1d_weight_keeps_the_other_entries(write):
    """The slice shares the tensor's scale: a write into it must not rescale its neighbours."""
    weight = Int8Weight.from_float(torch.tensor([1.0, 2.0, 3.0, 100.0]))
    new = torch.tensor([0.5, -0.25])
    if write == "copy":
        weight[0:2].copy_(new)
    elif write == "requantize":
        weight[0:2].requantize_(new, stochastic=False)
    else:
        weight[0:2].copy_(Int8Weight.from_float(new))
    step = 100 / 127  # the scale stays the absmax of the whole tensor
    torch.testing.assert_close(weight.dequantize(), torch.tensor([0.5, -0.25, 3.0, 100.0]), rtol=0, atol=step / 2)
    assert weight.scale.item() == pytest.approx(step)

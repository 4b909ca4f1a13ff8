"""slcompile.optim.build / PerLayerOptimizer against an ordinary torch AdamW stepped after backward."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import slcompile
from slcompile.optim import PerLayerOptimizer, build
from helpers import assert_same_params, batches, loss_fn, save_load, tiny_model

LR, WD = 1e-2, 0.1


def reference_run(model, data, *, k=1, clip=None, per_param=False, schedule=None):
    """Ordinary AdamW: ``k`` micro-batches per update, optional clipping and LambdaLR."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule) if schedule else None
    lrs = []
    for start in range(0, len(data), k):
        for batch in data[start:start + k]:
            (loss_fn(model, batch) / k).backward()
        if clip is not None:
            params = [p for p in model.parameters() if p.grad is not None]
            if per_param:
                for p in params:
                    torch.nn.utils.clip_grad_norm_([p], clip, foreach=False)
            else:
                torch.nn.utils.clip_grad_norm_(params, clip)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched:
            sched.step()
        opt.zero_grad()
    return lrs


def run(model, opt, data, *, k=1, sched=None):
    """The same loop a user writes for any optimizer: backward per micro-batch, step every k."""
    lrs = []
    for i, batch in enumerate(data):
        (loss_fn(model, batch) / k).backward()
        if (i + 1) % k == 0:
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            if sched:
                sched.step()
            opt.zero_grad()
    return lrs


@pytest.mark.parametrize("per_layer", [True, False])
def test_matches_adamw_fp32(per_layer):
    ref, model, data = tiny_model(), tiny_model(), batches(5)
    reference_run(ref, data)
    opt = build(model, lr=LR, weight_decay=WD, per_layer=per_layer)
    run(model, opt, data)
    assert_same_params(ref, model)  # bit-identical: the same single-tensor AdamW per parameter


def test_matches_adamw_bf16():
    ref, model, data = tiny_model(torch.bfloat16), tiny_model(torch.bfloat16), batches(5, dtype=torch.bfloat16)
    reference_run(ref, data)
    run(model, build(model, lr=LR, weight_decay=WD), data)
    assert model[0].A.dtype == torch.bfloat16
    assert_same_params(ref, model)  # bit-identical too: one skipped or repeated step moves a weight by ~lr


def test_updates_happen_in_backward_and_free_grads():
    model = tiny_model()
    opt = build(model, lr=LR)
    before = [p.detach().clone() for p in model.parameters()]
    loss_fn(model, batches(1)[0]).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert opt.state[model[0].A]["step"].item() == 1
    opt.step()  # bookkeeping only
    assert opt.state[model[0].A]["step"].item() == 1


@pytest.mark.compile
def test_matches_adamw_under_torch_compile():
    # The whole backward is one compiled autograd node; the hooks fire from the AccumulateGrad
    # nodes behind it. One graph, Inductor: 10-20 s of cold compile on a 2-core CPU.
    ref, model, data = tiny_model(), tiny_model(), batches(3)
    reference_run(ref, data)
    opt = build(model, lr=LR, weight_decay=WD)
    compiled = torch.compile(model, fullgraph=True)
    run(compiled, opt, data)
    assert all(p.grad is None for p in model.parameters())
    assert_same_params(ref, model, atol=1e-5, rtol=1e-5)


def test_accumulation_equals_one_big_batch():
    ref, model, data = tiny_model(), tiny_model(), batches(6, size=4)
    big = [(torch.cat([x for x, _ in data[i:i + 3]]), torch.cat([y for _, y in data[i:i + 3]])) for i in (0, 3)]
    reference_run(ref, big)
    opt = build(model, lr=LR, weight_decay=WD, accumulation_steps=3)
    for update in range(2):
        for j, batch in enumerate(data[3 * update:3 * update + 3]):
            before = [p.detach().clone() for p in model.parameters()]
            (loss_fn(model, batch) / 3).backward()
            changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
            assert all(changed) if j == 2 else not any(changed)  # one update, on the last micro-batch
            assert all((p.grad is None) == (j == 2) for p in model.parameters())
        opt.step()
        opt.zero_grad()
    assert_same_params(ref, model, atol=1e-6, rtol=1e-5)


def test_accumulation_updates_parameters_idle_in_the_last_micro_batch():
    def two_heads():
        torch.manual_seed(0)
        return nn.ModuleList([slcompile.SLLinear(16, 8, rank=4, alpha=4.0, density=0.25, seed=s) for s in (1, 2)])

    def losses(heads, data):  # head 1 is not used in the last micro-batch
        return [sum((head(x) - y).pow(2).mean() for head in (heads if i < 2 else heads[:1]))
                for i, (x, y) in enumerate(data)]

    data = batches(3)
    ref, heads = two_heads(), two_heads()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=WD, foreach=False)
    for loss in losses(ref, data):
        loss.backward()
    ref_opt.step()
    opt = build(heads, lr=LR, weight_decay=WD, accumulation_steps=3)
    for loss in losses(heads, data):
        loss.backward()
    assert heads[1].A.grad is not None  # waiting for step()
    opt.step()
    assert heads[1].A.grad is None
    assert_same_params(ref, heads)


def test_unannounced_accumulation_is_refused():
    model = tiny_model()
    build(model, lr=LR)  # accumulation_steps=1
    data = batches(2)
    loss_fn(model, data[0]).backward()
    after_first = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="accumulation_steps=k"):
        loss_fn(model, data[1]).backward()
    assert all(torch.equal(a, p) for a, p in zip(after_first, model.parameters()))  # no second update


def test_step_before_the_last_micro_batch_is_refused():
    model = tiny_model()
    opt = build(model, lr=LR, accumulation_steps=3)
    for batch in batches(2):
        loss_fn(model, batch).backward()
    with pytest.raises(RuntimeError, match="after 2 of accumulation_steps=3"):
        opt.step()


def test_lr_schedule_steps_once_per_update():
    def schedule(update):
        return 0.5 ** update

    ref, model, data = tiny_model(), tiny_model(), batches(8)
    ref_lrs = reference_run(ref, data, k=2, schedule=schedule)
    opt = build(model, lr=LR, weight_decay=WD, accumulation_steps=2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    lrs = run(model, opt, data, k=2, sched=sched)
    assert lrs == ref_lrs == pytest.approx([LR * schedule(u) for u in range(4)])
    assert sched.last_epoch == 4
    assert opt.param_groups[0]["lr"] == pytest.approx(LR * schedule(4))
    assert_same_params(ref, model, atol=1e-6, rtol=1e-5)  # the inner optimizers used those lrs


def test_per_param_clipping_matches_reference():
    ref, model, data = tiny_model(), tiny_model(), batches(4)
    reference_run(ref, data, clip=0.05, per_param=True)
    opt = build(model, lr=LR, weight_decay=WD, max_grad_norm=0.05, clip="per_param")
    run(model, opt, data)
    assert_same_params(ref, model)


def test_global_clipping_after_backward_matches_reference():
    ref, model, data = tiny_model(), tiny_model(), batches(4)
    reference_run(ref, data, clip=0.05)
    opt = build(model, lr=LR, weight_decay=WD, per_layer=False, max_grad_norm=0.05)
    run(model, opt, data)
    assert_same_params(ref, model)


def test_global_clipping_per_layer_two_pass_matches_reference():
    # dropout: the second pass must see the same random masks as the first
    ref, model, data = tiny_model(dropout=0.3), tiny_model(dropout=0.3), batches(6)
    torch.manual_seed(123)
    reference_run(ref, data, k=2, clip=0.05)
    ref_rng = torch.get_rng_state()
    opt = build(model, lr=LR, weight_decay=WD, accumulation_steps=2, max_grad_norm=0.05)
    torch.manual_seed(123)
    for start in (0, 2, 4):
        def closure(start=start):
            losses = [loss_fn(model, batch) / 2 for batch in data[start:start + 2]]
            for loss in losses:
                loss.backward()
            return sum(loss.detach() for loss in losses)

        loss = opt.step(closure)
        assert loss.ndim == 0
        assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), ref_rng)  # one pass' worth of randomness per update
    assert_same_params(ref, model, atol=1e-6, rtol=1e-5)


def test_global_clipping_per_layer_without_closure_is_refused():
    model = tiny_model()
    opt = build(model, lr=LR, max_grad_norm=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"step\(closure\)"):
        loss_fn(model, batches(1)[0]).backward()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_state_dict_has_standard_layout():
    ref, model, data = tiny_model(), tiny_model(), batches(3)
    reference_run(ref, data)
    opt = build(model, lr=LR, weight_decay=WD)
    run(model, opt, data)
    mine = opt.state_dict()
    ordinary = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=WD)
    ordinary.load_state_dict(mine)  # loads into a plain AdamW, index for index
    assert set(mine["state"]) == set(range(len(list(model.parameters()))))
    for index, state in mine["state"].items():
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        assert state["step"].item() == 3


@pytest.mark.parametrize("per_layer", [True, False])
def test_resume_equals_uninterrupted(per_layer):
    def make():
        model = tiny_model()
        opt = build(model, lr=LR, weight_decay=WD, per_layer=per_layer, accumulation_steps=2)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0 / (1 + u))

    data = batches(12)
    model, opt, sched = make()
    run(model, opt, data[:6], k=2, sched=sched)
    checkpoint = save_load({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    run(model, opt, data[6:], k=2, sched=sched)

    resumed, resumed_opt, resumed_sched = make()
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["opt"])
    resumed_sched.load_state_dict(checkpoint["sched"])
    assert resumed_opt.param_groups[0]["lr"] == pytest.approx(LR / 4)
    run(resumed, resumed_opt, data[6:], k=2, sched=resumed_sched)
    assert_same_params(model, resumed)
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], resumed_opt.state[q][key])


def test_param_groups_override_hyperparameters():
    model = tiny_model()
    decay = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim != 2]
    opt = build([{"params": decay, "weight_decay": 0.5}, {"params": rest, "lr": 0.0}], lr=LR)
    before = [p.detach().clone() for p in rest]
    loss_fn(model, batches(1)[0]).backward()
    assert all(torch.equal(b, p) for b, p in zip(before, rest))  # lr 0
    assert opt.param_groups[0]["weight_decay"] == 0.5


@pytest.mark.parametrize("kwargs, match", [
    ({"state_bits": 5}, "state_bits"),
    ({"state_bits": True}, "state_bits"),
    ({"lr": -1e-3}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"eps": -1.0}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"betas": (1.0, 0.9)}, r"betas\[0\]"),
    ({"betas": (0.9,)}, "betas"),
    ({"accumulation_steps": 0}, "accumulation_steps"),
    ({"accumulation_steps": 1.5}, "accumulation_steps"),
    ({"max_grad_norm": 0.0}, "max_grad_norm"),
    ({"max_grad_norm": -1.0}, "max_grad_norm"),
    ({"clip": "layer"}, "clip"),
    ({"per_layer": "yes"}, "per_layer"),
    ({"optimizer": "sgd"}, "optimizer"),
    ({"int8_weights": "A"}, "int8_weights"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(tiny_model(), **kwargs)


def test_bad_parameters_raise():
    model = tiny_model()
    with pytest.raises(ValueError, match="int8_weights needs the model"):
        build(list(model.parameters()), int8_weights=True)
    model[4].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="require grad"):
        PerLayerOptimizer(model.parameters())
    with pytest.raises(ValueError, match="empty parameter list"):
        build(nn.Sequential(nn.ReLU()))


def test_data_parallel_needs_per_layer():
    # per_layer=False clips and steps after backward: DistributedDataParallel averages the gradients there.
    with pytest.raises(ValueError, match="data_parallel averages gradients in the hooks of per_layer=True"):
        PerLayerOptimizer(tiny_model().parameters(), per_layer=False, data_parallel=object())  # stands for a group

"""The paper's schedule as training uses it: 10% linear warmup by default, then cosine to ``min_ratio``."""
import pytest
import torch

from slcompile.recipes.schedule import build_scheduler
from slcompile.recipes.train import TrainConfig


def test_default_warmup_is_a_tenth_of_the_updates():
    assert [TrainConfig(steps=steps).warmup_steps for steps in (5, 100, 250)] == [1, 10, 25]
    assert TrainConfig(steps=100, warmup=0).warmup_steps == 0


def test_scheduler_drives_the_optimizer_lr_once_per_update():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = build_scheduler(optimizer, warmup=4, total=20, min_ratio=0.1)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:5] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0])  # the first update already moves
    assert lrs[-1] == pytest.approx(0.2) and lrs[4:] == sorted(lrs[4:], reverse=True)


def test_bad_schedule_raises_when_built():
    with pytest.raises(ValueError, match="warmup"):
        build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), warmup=5, total=4)


def test_quick_recovery_ramps_from_a_thousandth_to_the_schedule_after_each_restart():
    from slcompile.recipes.schedule import last_restart, quick_recovery, warmup_cosine

    def lr(step, **kw):
        return quick_recovery(step, 2, 40, 0.1, **{"restart_every": (10,), "recovery_steps": 4, **kw})

    assert [last_restart(s, (10, 15)) for s in (0, 9, 10, 14, 15, 19, 20, 31)] == [0, 0, 10, 10, 15, 15, 20, 30]
    for window in (10, 20, 30):
        target = warmup_cosine(window + 4, 2, 40)
        assert [lr(window + k) for k in range(4)] == pytest.approx([target * (0.001 + 0.999 * k / 4) for k in range(4)])
    outside = [s for s in range(40) if s % 10 >= 4 or s < 10]
    assert [lr(s) for s in outside] == pytest.approx([warmup_cosine(s, 2, 40) for s in outside])
    assert lr(38, restart_every=(38,)) == pytest.approx(0.001 * warmup_cosine(39, 2, 40))  # target clamped to the end
    assert [lr(s, recovery_steps=0) for s in range(40)] == [warmup_cosine(s, 2, 40) for s in range(40)]
    with pytest.raises(ValueError, match="recovery_steps >= 0"):
        build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 2, 40, recovery_steps=-1)


def test_scheduler_with_restarts_is_the_same_after_a_state_dict_round_trip():
    def make():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return optimizer, build_scheduler(optimizer, 2, 30, 0.1, restart_every=(7,), recovery_steps=3)

    optimizer, scheduler = make()
    lrs = []
    for _ in range(30):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        if len(lrs) == 12:
            resumed_opt, resumed = make()
            resumed_opt.load_state_dict(optimizer.state_dict())  # as a resume loads both
            resumed.load_state_dict(scheduler.state_dict())
    assert lrs[7] == pytest.approx(0.001 * lrs[10], rel=1e-9) and lrs[8] < lrs[9] < lrs[10]
    tail = []
    for _ in range(18):
        tail.append(resumed_opt.param_groups[0]["lr"])
        resumed_opt.step()
        resumed.step()
    assert tail == pytest.approx(lrs[12:])

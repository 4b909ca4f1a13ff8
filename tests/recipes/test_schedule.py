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

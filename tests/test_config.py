import math

import pytest

from slcompile import SLConfig


def test_defaults_follow_the_paper():
    cfg = SLConfig(rank=128)
    assert (cfg.alpha, cfg.density, cfg.seed, cfg.targets, cfg.exclude) == (32.0, 0.03, 0, None, ())
    assert cfg.head_names[:2] == ("lm_head", "output")  # the paper's heads; other common head names follow


@pytest.mark.parametrize("kwargs, field", [
    ({}, "rank"),
    ({"rank": 4, "rank_ratio": 0.5}, "rank"),
    ({"rank": 0}, "rank"),
    ({"rank": -3}, "rank"),
    ({"rank": 2.5}, "rank"),
    ({"rank": True}, "rank"),
    ({"rank_ratio": 0.0}, "rank_ratio"),
    ({"rank_ratio": 1.5}, "rank_ratio"),
    ({"rank_ratio": math.nan}, "rank_ratio"),
    ({"rank": 4, "alpha": 0.0}, "alpha"),
    ({"rank": 4, "alpha": -1.0}, "alpha"),
    ({"rank": 4, "alpha": math.nan}, "alpha"),
    ({"rank": 4, "alpha": math.inf}, "alpha"),
    ({"rank": 4, "density": 0.0}, "density"),
    ({"rank": 4, "density": 1.0}, "density"),
    ({"rank": 4, "density": -0.1}, "density"),
    ({"rank": 4, "density": math.nan}, "density"),
    ({"rank": 4, "density": "0.1"}, "density"),
    ({"rank": 4, "seed": 1.5}, "seed"),
    ({"rank": 4, "targets": ()}, "targets"),
    ({"rank": 4, "targets": ("",)}, "targets"),
    ({"rank": 4, "exclude": (3,)}, "exclude"),
    ({"rank": 4, "targets": 123}, "targets"),
    ({"rank": 4, "head_names": 0}, "head_names"),
    ({"rank": 4, "path": "dense"}, "path"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SLConfig(**kwargs)


def test_frozen_and_string_patterns_become_tuples():
    cfg = SLConfig(rank=2, targets="q_proj", exclude="k_proj")
    assert cfg.targets == ("q_proj",) and cfg.exclude == ("k_proj",)
    with pytest.raises(Exception):
        cfg.rank = 3


def test_rank_for_checks_the_layer_and_rounds_ratios():
    assert SLConfig(rank=8).rank_for(16, 32) == 8
    with pytest.raises(ValueError, match=r"rank=20 exceeds min\(in, out\)=16 of layer 'fc'"):
        SLConfig(rank=20).rank_for(16, 32, "fc")
    assert SLConfig(rank_ratio=0.25).rank_for(512, 1376) == 128
    assert SLConfig(rank_ratio=0.01).rank_for(3, 5) == 1
    assert SLConfig(rank_ratio=1.0).rank_for(7, 5) == 5

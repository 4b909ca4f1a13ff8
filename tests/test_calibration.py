"""``slcompile.calibration``: measured CPU rates for the cost model."""
import pytest
import torch

from slcompile import calibration, cost_model


def test_calibrate_measures_every_rate_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    spec = calibration.calibrate(repeats=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert spec.name == "cpu-calibrated" and spec.margin == 1.0 and not spec.gather_in_gemm
    for rate in (spec.dense_flops, spec.form_flops, spec.spmm_flops, spec.sddmm_flops, spec.bandwidth):
        assert 1e6 < rate < 1e15  # finite, positive, and in FLOP/s or B/s (not per ms)
    assert 0 < spec.launch_s < 0.1 and spec.spmm_elem_s >= 0 and spec.sddmm_elem_s >= 0
    # The model runs on it: a one-token call is cheaper factored than forming a 512 x 512 W.
    assert cost_model.choose_path(1, 512, 512, 128, 7864, spec, "train", 4, spec.margin) == "factored"
    with pytest.raises(ValueError, match="repeats"):
        calibration.calibrate(repeats=0)


def test_sparse_cost_solves_the_two_shape_system():
    rate, elem_s = 1e10, 5e-10
    flops, elems = (8e6, 5e5), (5e5, 1.3e5)
    seconds = tuple(f / rate + e * elem_s for f, e in zip(flops, elems))
    got_rate, got_elem = calibration._sparse_cost(seconds, flops, elems)
    assert got_rate == pytest.approx(rate) and got_elem == pytest.approx(elem_s)
    # Times the form cannot explain with a non-negative element cost: the large shape's rate alone.
    assert calibration._sparse_cost((1e-3, 1e-6), flops, elems) == (pytest.approx(8e9), 0.0)

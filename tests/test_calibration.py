"""``slcompile.calibration``: measured CPU rates for the cost model, and the spec auto uses."""
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


def test_calibrate_works_under_inference_mode_through_runtime_device(monkeypatch):
    monkeypatch.delenv("SLCOMPILE_CALIBRATE", raising=False)
    calibration.runtime_device.cache_clear()
    try:
        with torch.inference_mode():
            spec = calibration.runtime_device("cpu")
        assert spec.name == "cpu-calibrated" and calibration.runtime_device("cpu") is spec  # memoized
    finally:
        calibration.runtime_device.cache_clear()


def test_runtime_device_presets(monkeypatch):
    monkeypatch.setenv("SLCOMPILE_CALIBRATE", "0")
    calibration.runtime_device.cache_clear()
    try:
        assert calibration.runtime_device("cpu") is cost_model.DEVICES["cpu"]
        assert calibration.runtime_device("cpu").margin == cost_model.DEFAULT_MARGIN
        assert calibration.runtime_device("cuda") is cost_model.device_for("cuda")
        with pytest.raises(ValueError, match="unknown device"):
            calibration.runtime_device("tpu")
    finally:
        calibration.runtime_device.cache_clear()


def test_sparse_cost_solves_the_two_shape_system():
    rate, elem_s = 1e10, 5e-10
    flops, elems = (8e6, 5e5), (5e5, 1.3e5)
    seconds = tuple(f / rate + e * elem_s for f, e in zip(flops, elems))
    got_rate, got_elem = calibration._sparse_cost(seconds, flops, elems)
    assert got_rate == pytest.approx(rate) and got_elem == pytest.approx(elem_s)
    # Times the form cannot explain with a non-negative element cost: the large shape's rate alone.
    assert calibration._sparse_cost((1e-3, 1e-6), flops, elems) == (pytest.approx(8e9), 0.0)


def test_first_auto_call_under_cpu_autocast_calibrates_in_fp32(monkeypatch):
    from slcompile import SLLinear

    monkeypatch.delenv("SLCOMPILE_CALIBRATE", raising=False)
    calibration.runtime_device.cache_clear()
    cost_model.choose_path_for_call.cache_clear()
    try:
        layer = SLLinear(64, 48, rank=8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(torch.randn(4096, 64))
        assert y.dtype == torch.bfloat16 and calibration.runtime_device("cpu").name == "cpu-calibrated"
    finally:
        calibration.runtime_device.cache_clear()
        cost_model.choose_path_for_call.cache_clear()


def test_first_auto_call_under_a_dispatch_mode_calibrates_outside_it(monkeypatch):
    """Fake tensors (calibration would crash on them) and FLOP counters (would count and slow
    down the micro-benchmarks, and their rates would stay cached) never see the calibration."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from slcompile import SLLinear

    monkeypatch.delenv("SLCOMPILE_CALIBRATE", raising=False)
    layer, x = SLLinear(512, 512, rank=128, density=0.03), torch.randn(8, 512)
    try:
        calibration.runtime_device.cache_clear()
        cost_model.choose_path_for_call.cache_clear()
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            assert layer(mode.from_tensor(x)).shape == (8, 512)
        calibration.runtime_device.cache_clear()
        cost_model.choose_path_for_call.cache_clear()
        with FlopCounterMode(display=False) as first:
            layer(x)
        with FlopCounterMode(display=False) as warm:  # calibrated and memoized now
            layer(x)
        assert first.get_total_flops() == warm.get_total_flops()
    finally:
        calibration.runtime_device.cache_clear()
        cost_model.choose_path_for_call.cache_clear()

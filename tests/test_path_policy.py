"""``slcompile.path_policy``: which cost-model spec ``path="auto"`` uses per device type, and when it calibrates."""
import pytest
import torch

from slcompile import cost_model, path_policy
from slcompile.kernels import cuda_kernels_registered


def test_calibrate_works_under_inference_mode_through_runtime_device(monkeypatch):
    monkeypatch.delenv("SLCOMPILE_CALIBRATE", raising=False)
    path_policy.runtime_device.cache_clear()
    try:
        with torch.inference_mode():
            spec = path_policy.runtime_device("cpu")
        assert spec.name == "cpu-calibrated" and path_policy.runtime_device("cpu") is spec  # memoized
    finally:
        path_policy.runtime_device.cache_clear()


def test_runtime_device_presets(monkeypatch):
    monkeypatch.setenv("SLCOMPILE_CALIBRATE", "0")
    path_policy.runtime_device.cache_clear()
    try:
        assert path_policy.runtime_device("cpu") is cost_model.DEVICES["cpu"]
        assert path_policy.runtime_device("cpu").margin == cost_model.DEFAULT_MARGIN
        want = "h200-triton" if cuda_kernels_registered() else "h200-cusparse"
        assert path_policy.runtime_device("cuda") is cost_model.DEVICES[want]
        with pytest.raises(ValueError, match="unknown device"):
            path_policy.runtime_device("tpu")
    finally:
        path_policy.runtime_device.cache_clear()


def test_first_auto_call_under_cpu_autocast_calibrates_in_fp32(monkeypatch):
    from slcompile import SLLinear

    monkeypatch.delenv("SLCOMPILE_CALIBRATE", raising=False)
    path_policy.runtime_device.cache_clear()
    path_policy.choose_path_for_call.cache_clear()
    try:
        layer = SLLinear(64, 48, rank=8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(torch.randn(4096, 64))
        assert y.dtype == torch.bfloat16 and path_policy.runtime_device("cpu").name == "cpu-calibrated"
    finally:
        path_policy.runtime_device.cache_clear()
        path_policy.choose_path_for_call.cache_clear()


def test_first_auto_call_under_a_dispatch_mode_calibrates_outside_it(monkeypatch):
    """Fake tensors (calibration would crash on them) and FLOP counters (would count and slow
    down the micro-benchmarks, and their rates would stay cached) never see the calibration."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from slcompile import SLLinear

    monkeypatch.delenv("SLCOMPILE_CALIBRATE", raising=False)
    layer, x = SLLinear(512, 512, rank=128, density=0.03), torch.randn(8, 512)
    try:
        path_policy.runtime_device.cache_clear()
        path_policy.choose_path_for_call.cache_clear()
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            assert layer(mode.from_tensor(x)).shape == (8, 512)
        path_policy.runtime_device.cache_clear()
        path_policy.choose_path_for_call.cache_clear()
        with FlopCounterMode(display=False) as first:
            layer(x)
        with FlopCounterMode(display=False) as warm:  # calibrated and memoized now
            layer(x)
        assert first.get_total_flops() == warm.get_total_flops()
    finally:
        path_policy.runtime_device.cache_clear()
        path_policy.choose_path_for_call.cache_clear()


def test_first_auto_call_calibrates_out_of_the_callers_saved_tensor_hooks(monkeypatch):
    """Calibration times its own backward: a caller's pack hook must see only the layer's input."""
    from slcompile import SLLinear

    monkeypatch.delenv("SLCOMPILE_CALIBRATE", raising=False)
    layer, x = SLLinear(32, 16, rank=4), torch.randn(5, 32, requires_grad=True)
    known = {t.data_ptr() for t in (*layer.parameters(), *layer.buffers())}
    packed = []
    path_policy.runtime_device.cache_clear()
    path_policy.choose_path_for_call.cache_clear()
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            layer(x)
        assert path_policy.runtime_device("cpu").name == "cpu-calibrated"
        assert [id(t) for t in packed if t.data_ptr() not in known] == [id(x)]
    finally:
        path_policy.runtime_device.cache_clear()
        path_policy.choose_path_for_call.cache_clear()


def test_presets_leave_an_uncertain_call_to_materialize():
    """Preset rates are assumptions: factored only where it promises more than the margin's saving."""
    spec = path_policy.runtime_device("cuda")
    shape = (4096, 11008, 1024, int(0.05 * 4096 * 11008))
    near = cost_model.crossover_tokens(*shape, device=spec) - 1  # factored barely cheaper here
    assert cost_model.choose_path(near, *shape, spec, "train", 2) == "factored"
    assert path_policy.choose_path_for_call(near, *shape, "cuda", "train", 2) == "materialize"

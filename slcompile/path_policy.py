"""Which path ``SLLinear(path="auto")`` and the backend's ``choose_path`` pass take: the one place
that maps a torch device type to cost-model rates and asks :func:`slcompile.cost_model.choose_path`.

- ``"cpu"``: rates measured on this machine by :func:`slcompile.calibration.calibrate`, once per
  process on first use (``SLCOMPILE_CALIBRATE=0`` keeps the ``cpu`` preset, for a choice that
  does not depend on timings);
- ``"cuda"``: the ``h200-triton`` preset when slcompile's Triton kernels are registered, else
  ``h200-cusparse`` (torch's sparse library kernels);
- any other device type has no rates: ``ValueError``, and an eager call takes materialize.
"""
from __future__ import annotations

import functools
import os
from typing import Literal

import torch
from torch.utils._python_dispatch import _disable_current_modes

from slcompile import calibration, cost_model
from slcompile.kernels import cuda_kernels_registered

__all__ = ["choose_path_for_call", "runtime_device"]


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@functools.cache
def runtime_device(device_type: str) -> cost_model.DeviceSpec:
    """The spec the path choice uses for tensors on ``device_type`` (see the module doc)."""
    if device_type == "cpu" and os.environ.get("SLCOMPILE_CALIBRATE", "1") != "0":
        # fp32, grad mode, no autocast, outside any dispatch mode (fake tensors and FLOP counters
        # must neither see nor time it) and out of the caller's saved-tensor hooks (identity hooks
        # shadow them), whatever context the first call came in.
        with (_disable_current_modes(), torch.inference_mode(False), torch.enable_grad(),
              torch.autocast("cpu", enabled=False), torch.autograd.graph.saved_tensors_hooks(_same, _same)):
            return calibration.calibrate()
    if device_type == "cuda":
        return cost_model.DEVICES["h200-triton" if cuda_kernels_registered() else "h200-cusparse"]
    return cost_model.device_for(device_type)


@functools.lru_cache(maxsize=4096)
def choose_path_for_call(tokens: int, in_features: int, out_features: int, rank: int, nnz: int, device_type: str,
                         mode: cost_model.Mode, dtype_bytes: int) -> Literal["materialize", "factored"]:
    """:func:`slcompile.cost_model.choose_path` on :func:`runtime_device`'s spec at its ``margin``,
    memoized (a dict lookup per eager call once a shape was seen); materialize on a device type
    without rates."""
    try:
        device = runtime_device(device_type)
    except ValueError:
        return "materialize"
    return cost_model.choose_path(tokens, in_features, out_features, rank, nnz, device, mode, dtype_bytes,
                                  device.margin)

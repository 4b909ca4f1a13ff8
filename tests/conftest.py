"""Shared test set-up: hypothesis profiles, markers, the ``replayed_peak`` fixture.

Profiles: ``ci`` (default; few examples, CI budget) and ``dev`` (many examples), chosen with
``HYPOTHESIS_PROFILE=dev``. Helper functions live in ``helpers.py`` next to this file (pytest
puts this directory on ``sys.path``).
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _replayed_peak(prof) -> int:
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields.alloc_size > 0, event.extra_fields.ptr,
                           event.extra_fields.alloc_size))
    live, current, peak = {}, 0, 0
    for _, _, ptr, size in sorted(events):
        if size > 0:
            live[ptr] = size
            current += size
        elif ptr in live:  # frees of blocks allocated before the profile are ignored
            current -= live.pop(ptr)
        peak = max(peak, current)
    return peak


@pytest.fixture
def replayed_peak():
    """``replayed_peak(prof) -> int``: peak live CPU bytes allocated inside a ``torch.profiler``
    profile recorded with ``profile_memory=True``."""
    return _replayed_peak


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SLCOMPILE_SLOW") != "1":
        skip = pytest.mark.skip(reason="slow test: set SLCOMPILE_SLOW=1 to run")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)

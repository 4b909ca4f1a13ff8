"""``slcompile._compat``: each shim on both sides of the torch release where it differs, and the
backend by name from a source tree that is not installed."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._dynamo.backends import registry
from torch._inductor.custom_graph_pass import CustomGraphPass

from slcompile import _compat

ROOT = Path(__file__).resolve().parents[1]


class Recorder(CustomGraphPass):
    """A post-grad pass that logs its name when run."""

    def __init__(self, name: str, log: list, uuid: object = "id"):
        self.name, self.log, self._uuid = name, log, uuid

    def __call__(self, graph) -> None:
        self.log.append(self.name)

    def uuid(self):
        return self._uuid and (self.name, self._uuid)


def test_pass_lists_follow_the_torch_release():
    major_minor = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    assert _compat.PASS_LISTS == (major_minor > (2, 11))  # 2.11 takes one post-grad pass


@pytest.mark.parametrize("existing", [None, "one", "list"])
def test_chain_post_grad_passes_on_list_taking_torch(existing):
    log: list = []
    ours = Recorder("ours", log)
    before = {None: None, "one": Recorder("a", log), "list": [Recorder("a", log), Recorder("b", log)]}[existing]
    value = _compat.chain_post_grad_passes(before, [ours], lists=True)
    assert value == [*_compat.custom_graph_passes(before), ours]


def test_chain_post_grad_passes_on_torch_2_11_is_one_pass():
    log: list = []
    a, b, ours = Recorder("a", log), Recorder("b", log), Recorder("ours", log)
    assert _compat.chain_post_grad_passes(None, [ours], lists=False) is ours
    assert _compat.chain_post_grad_passes(None, [], lists=False) is None
    chain = _compat.chain_post_grad_passes([a, b], [ours], lists=False)
    assert isinstance(chain, CustomGraphPass) and _compat.custom_graph_passes(chain) == (a, b, ours)
    chain(None)
    assert log == ["a", "b", "ours"]
    assert chain.uuid() == ("PassChain", ("a", "id"), ("b", "id"), ("ours", "id"))
    assert _compat.PassChain([a, lambda graph: None]).uuid() is None  # a plain callable: not cacheable
    assert _compat.PassChain([a, Recorder("c", log, uuid=None)]).uuid() is None
    assert _compat.chain_post_grad_passes(chain, [b], lists=False).passes == (a, b, ours, b)  # no nesting


@pytest.fixture
def empty_registry(monkeypatch):
    """Dynamo's backend registry, emptied for the test (restored after)."""
    monkeypatch.setattr(registry, "_BACKENDS", {})
    monkeypatch.setattr(registry, "_COMPILER_FNS", {})
    return registry


def test_register_dynamo_backend_is_lazy_and_idempotent(empty_registry):
    loads = []

    def compiler(gm, example_inputs, **kwargs):
        return ("compiled", kwargs)

    def load():
        loads.append(1)
        return compiler

    assert _compat.register_dynamo_backend("sl_test", load)
    assert not _compat.register_dynamo_backend("sl_test", load)
    fn = registry.lookup_backend("sl_test")
    assert loads == [] and fn.__name__ == "sl_test"  # nothing loaded before the first compile
    assert fn(None, [], options={"a": 1}) == ("compiled", {"options": {"a": 1}})
    assert loads == [1]


def test_register_dynamo_backend_steps_aside_for_a_loading_entry_point(empty_registry):
    """An installed package: the lookup loads the entry point, whose import registers the name
    again (``import slcompile``); ``register_backend`` would then assert on a duplicate."""

    def compiler(gm, example_inputs, **kwargs):
        return "compiled"

    class EntryPoint:
        def load(self):
            assert not _compat.register_dynamo_backend("sl_test", lambda: compiler)
            return compiler

    registry._BACKENDS["sl_test"] = EntryPoint()
    assert registry.lookup_backend("sl_test") is compiler


SOURCE_TREE_SCRIPT = textwrap.dedent("""
    import importlib.metadata as metadata, json, sys

    def entry_points(**kwargs):  # the source tree is not installed: no torch_dynamo_backends entry
        found = _entry_points(**kwargs)
        if kwargs.get("group") == "torch_dynamo_backends":
            found = metadata.EntryPoints(ep for ep in found if ep.name != "slcompile")
        return found

    _entry_points, metadata.entry_points = metadata.entry_points, entry_points
    import torch
    from torch._dynamo.exc import InvalidBackend
    try:
        torch._dynamo.lookup_backend("slcompile")
        hidden = False
    except InvalidBackend:
        hidden = True
    import slcompile
    layer = slcompile.SLLinear(16, 8, rank=4, alpha=1.0, density=0.2)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(3, 16)
    out = torch.compile(layer, backend="slcompile")(x)
    print(json.dumps({"hidden": hidden, "file": slcompile.__file__,
                      "diff": (out - layer(x)).abs().max().item()}))
""")


@pytest.mark.compile
def test_source_tree_on_pythonpath_compiles_by_backend_name(tmp_path):
    shutil.copytree(ROOT / "slcompile", tmp_path / "slcompile", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    proc = subprocess.run([sys.executable, "-c", SOURCE_TREE_SCRIPT], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["hidden"], "the installed entry point was visible: the test would not exercise the source tree"
    assert Path(result["file"]).is_relative_to(tmp_path)
    assert result["diff"] < 1e-5


def test_extern_kernel_choice_is_made_once_with_or_without_lookup(monkeypatch):
    """2.13 on: ``ExternKernelChoice.lookup`` finds the registered choice. 2.11 has no ``lookup``
    and asserts on a second registration of a name: the shim keeps its own, and replaces a stale
    registration (a reloaded module) instead of tripping the assertion."""
    from types import SimpleNamespace

    from torch._inductor import select_algorithm

    def kernel(x, *, out):
        return out

    first = _compat.extern_kernel_choice(kernel, "slcompile_test_choice")
    assert _compat.extern_kernel_choice(kernel, "slcompile_test_choice") is first

    class Choice211:  # 2.11's constructor: registers by name, asserts on a duplicate
        def __init__(self, kernel, *, name):
            assert not hasattr(select_algorithm.extern_kernels, name), f"duplicate extern kernel: {name}"
            setattr(select_algorithm.extern_kernels, name, kernel)

    monkeypatch.setattr(select_algorithm, "ExternKernelChoice", Choice211)
    monkeypatch.setattr(select_algorithm, "extern_kernels", SimpleNamespace(slcompile_stale=kernel))
    monkeypatch.setattr(_compat, "_extern_choices", {})
    made = _compat.extern_kernel_choice(kernel, "slcompile_new")
    assert isinstance(made, Choice211) and _compat.extern_kernel_choice(kernel, "slcompile_new") is made
    assert isinstance(_compat.extern_kernel_choice(kernel, "slcompile_stale"), Choice211)


@pytest.mark.compile
def test_autocast_available_agrees_with_torch_and_never_calls_it_while_compiling(monkeypatch):
    """torch 2.11's Dynamo cannot trace ``torch.amp.is_autocast_available`` (a graph break in every
    SLLinear, an error under fullgraph): the shim answers from a list while compiling."""
    for device_type in (*_compat.AUTOCAST_DEVICE_TYPES, "meta", "lazy"):
        assert _compat.autocast_available(device_type) == torch.amp.is_autocast_available(device_type), device_type

    def untraceable(device_type):
        raise AssertionError("called while compiling")

    monkeypatch.setattr(torch.amp, "is_autocast_available", untraceable)
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x * _compat.autocast_available("cpu") + _compat.autocast_available("meta"),
                       backend="eager", fullgraph=True)
    assert torch.equal(fn(torch.ones(2)), torch.ones(2))

"""The library's modules import one way: no cycle, lazy imports inside functions included."""
import ast
from pathlib import Path

import slcompile

PACKAGE = Path(slcompile.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _library_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "recipes" not in p.parts}


def _imports(name: str, path: Path, modules) -> set[str]:
    """Library modules ``name`` imports anywhere in its body (``from pkg import mod`` names ``mod``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # slcompile.ops.materialize -> slcompile.ops
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _library_modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_finder_sees_a_lazy_import_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _find_cycle(graph) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
    # kernels/__init__.py imports its kernel modules inside functions only
    assert "slcompile.kernels.spmm" in _imports("slcompile.kernels", PACKAGE / "kernels" / "__init__.py",
                                                _library_modules())


def test_library_has_no_import_cycle():
    graph = _graph()
    assert "slcompile.layers" in graph and "slcompile.recipes" not in graph
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))


def test_cost_model_is_pure_arithmetic():
    assert _graph()["slcompile.cost_model"] <= {"slcompile.support"}

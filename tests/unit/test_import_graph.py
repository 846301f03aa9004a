"""The package's import graph: no cycles, and the pure core imports no edge library.

Scanned from the source (every import, including those inside functions and under
TYPE_CHECKING), so a cycle hidden behind a lazy import is still one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "consumer"
EDGE_LIBRARIES = ("confluent_kafka", "httpx", "httpx_aiohttp", "aiohttp", "redis")
PURE = ("codec", "filtering", "mapping", "routing", "calls", "explain", "offsets", "commits",
        "overflow", "scheduling", "policy", "ratelimit", "errors")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(path: Path, node: ast.ImportFrom) -> str:
    """The module an import-from names, a relative one (`from . import x`) resolved."""
    if node.level == 0:
        return node.module or ""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _all_imports(path: Path) -> set[str]:
    """Every module name `path` imports (a `from pkg import mod` also counts as pkg.mod)."""
    tree = ast.parse(path.read_text("utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(path, node)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Modules of the package that `path` imports."""
    return {name for name in _all_imports(path) if name in modules}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: _imports(path, modules) - {name} for name, path in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_the_scanner_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_package() -> None:
    graph = _graph()
    assert "consumer.worker" in graph and "consumer.handler" in graph["consumer.worker"]
    # A package's __init__ importing its submodules is not a cycle of the code.
    for name in list(graph):
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    assert _cycles(graph) == []


def test_relative_imports_are_resolved() -> None:
    """A relative import escaped the scan (`node.level == 0` only, review newcomer19)."""
    path = PACKAGE / "worker.py"
    assert _absolute(path, ast.ImportFrom(module="handler", names=[], level=1)) == \
        "consumer.handler"
    assert _absolute(path, ast.ImportFrom(module=None, names=[], level=1)) == "consumer"
    sandbox = PACKAGE / "sandbox" / "app.py"
    assert _absolute(sandbox, ast.ImportFrom(module="config", names=[], level=2)) == \
        "consumer.config"


@pytest.mark.parametrize("module", PURE)
def test_the_pure_core_reaches_no_edge_library(module: str) -> None:
    """Not directly, and not through a module of the package it imports. `config` is not
    followed: the settings are made at the edge and handed in (`explain` reads their type
    and the API version; `config` checks URLs with httpx's parser, `httpurl`)."""
    graph = _graph()
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    seen: set[str] = set()
    todo = [f"consumer.{module}"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name != "consumer.config":
            todo.extend(graph.get(name, ()))
    for name in sorted(seen - {"consumer.config"}):
        imported = {m.split(".")[0] for m in _all_imports(files[name])}
        assert not imported & set(EDGE_LIBRARIES), (module, name)


def test_the_runtime_package_does_not_ship_the_benchmark() -> None:
    assert not (PACKAGE / "bench").exists()
    assert not (PACKAGE / "transport.py").exists()


def test_no_type_ignores_in_the_package() -> None:
    offenders = [f"{p.relative_to(PACKAGE.parent)}:{n}"
                 for p in PACKAGE.rglob("*.py")
                 for n, line in enumerate(p.read_text("utf-8").splitlines(), 1)
                 if "type: ignore" in line]
    assert offenders == []

"""The package's import graph has no cycle, lazy (function-level) imports included.

Every ``import``/``from ... import`` statement anywhere in a module of ``src/visattn`` (top level or
inside a function) is an edge to the visattn module it names; ``from pkg import name`` is an edge to
``pkg.name`` when that is a module, else to ``pkg``. Implicit imports of parent packages are not
edges (Python runs a package's ``__init__`` before its submodules, whoever imports them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import visattn

ROOT = Path(visattn.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = ("visattn",) + path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                # the longest visattn module named by the target (``import visattn.nn.x`` -> visattn.nn.x)
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles() -> None:
    cycle = _find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_finds_a_cycle_and_sees_lazy_imports() -> None:
    """The walker is not vacuous: it records function-level imports, and a back edge is a cycle."""
    graph = import_graph()
    assert "visattn.backends" in graph["visattn.ops"] and "visattn.ops" in graph["visattn.dispatch"]
    assert "visattn.bench.flops" in graph["visattn"]  # the lazy ``count_flops`` attribute
    graph["visattn.backends"].add("visattn.dispatch")
    assert _find_cycle(graph) is not None


def test_layers_only_import_downward() -> None:
    """spec <- backends <- ops <- dispatch <- functional: nothing below the dispatcher imports it."""
    graph = import_graph()
    below = [m for m in graph if m.startswith(("visattn.backends", "visattn.spec", "visattn.ops"))]
    for module in below:
        assert not graph[module] & {"visattn.dispatch", "visattn.functional"}, module

"""The package's import graph: every module imports in a fresh interpreter, and no two modules import each
other, directly or through others, at module level or inside a function (an import hidden in a function
still ties the two modules together)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import aligntok

PACKAGE = Path(aligntok.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """The aligntok modules that `name` imports anywhere in its file (`from x import y` counts x.y when
    x.y is a module, else x)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in found if m in MODULES and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _graph() -> dict[str, set[str]]:
    # A package imports its parents on the way in: that edge is Python's, not a dependency of ours.
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    return {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}


def test_the_import_graph_has_no_cycles() -> None:
    assert "aligntok.train.dit" in MODULES and len(MODULES) > 30
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = _graph()
    graph["aligntok.models.layers"] = graph["aligntok.models.layers"] | {"aligntok.cli"}
    cycles = _cycles(graph)
    assert any({"aligntok.models.layers", "aligntok.cli"} <= set(c) for c in cycles)


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    run = subprocess.run(
        [sys.executable, "-c", code, *MODULES], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]


def test_models_do_not_import_trainers_pipelines_or_entry_points() -> None:
    """Dependencies point one way: entry points -> pipelines -> trainers -> models -> layers."""
    above_models = (
        "aligntok.train",
        "aligntok.cli",
        "aligntok.demo",
        "aligntok.evaluate",
        "aligntok.generate",
    )
    above_models += ("aligntok.score", "aligntok.tokenizer_eval", "aligntok.recipes")
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith(("aligntok.models", "aligntok.metrics", "aligntok.files", "aligntok.data")):
            bad = sorted(d for d in deps if d.startswith(above_models))
            assert not bad, f"{name} imports {bad}"

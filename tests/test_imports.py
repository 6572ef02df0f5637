"""Every fededge module imports, and fededge modules import each other without cycles.

The graph has an edge a -> b for every ``import``/``from ... import`` of fededge module b in
module a, at any depth (an import inside a function still makes a cycle, it only delays it);
imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# native/ ships as fededge.native (see pyproject.toml).
PACKAGES = {"fededge": ROOT / "fededge", "fededge.native": ROOT / "native"}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path) -> set[str]:
    """The fededge modules that ``module`` imports, anywhere in its body."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` mod.
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in MODULES else base)
        for sub_node in ast.iter_child_nodes(node):
            visit(sub_node)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in out if m in MODULES and m != module}


def import_graph() -> dict[str, set[str]]:
    return {m: _imports(m, p) for m, p in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    pkg = tmp_path / "fededge"
    pkg.mkdir()
    (pkg / "a.py").write_text("from fededge.b import x\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from fededge import c\n"
        "def f():\n    from . import a\n"
    )
    (pkg / "c.py").write_text("import fededge.a\n")
    saved = dict(MODULES)
    MODULES.clear()
    MODULES.update({f"fededge.{n}": pkg / f"{n}.py" for n in "abc"})
    try:
        graph = import_graph()
    finally:
        MODULES.clear()
        MODULES.update(saved)
    assert graph == {
        "fededge.a": {"fededge.b"},
        "fededge.b": {"fededge.a"},
        "fededge.c": {"fededge.a"},
    }
    assert cycles(graph) == [["fededge.a", "fededge.b"]]


def test_no_import_cycles_among_fededge_modules() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_module_imports(module: str) -> None:
    assert importlib.import_module(module).__name__ == module


def test_the_demo_does_not_import_the_cli() -> None:
    graph = import_graph()
    assert not {m for m in graph["fededge.demo"] if m.startswith("fededge.cli")}

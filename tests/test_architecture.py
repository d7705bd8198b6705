"""The package's shape: no import cycles among ``cass`` modules.

A cycle makes import order matter (a module sees a half-initialised partner), forces imports into
functions to break it, and ties modules that should change separately. The graph is read from the source
with ``ast``, so the test sees imports inside functions too, which a runtime check of ``sys.modules``
would not.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "cass"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module of the package (``pkg/__init__.py`` is ``pkg``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at module level or in any function or class, except ``if TYPE_CHECKING:``
    blocks: those never run, and naming a type without a runtime dependency is what they are for."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The most specific package module that ``name`` (a module or a name inside one) refers to."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """Module -> the package modules it imports (relative imports resolved)."""
    modules = modules or module_names()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_package = path.name == "__init__.py"
        package = mod if is_package else mod.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from pkg import sub` imports the submodule pkg.sub; `from mod import name` imports mod.
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                if target.split(".")[0] != PACKAGE:
                    continue
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != mod:
                    graph[mod].add(resolved)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle (``a -> b -> ... -> a``) per strongly connected component of the graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan; the package has under 100 modules, recursion is fine
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for component in sorted(components):
        members = set(component)
        start = component[0]
        # Shortest path back to `start` inside the component (breadth-first).
        paths = {start: [start]}
        queue = [start]
        found: list[str] | None = None
        while queue and found is None:
            v = queue.pop(0)
            for w in sorted(graph[v] & members):
                if w == start:
                    found = [*paths[v], start]
                    break
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    queue.append(w)
        cycles.append(found or component)
    return cycles


def test_graph_reader_sees_function_level_relative_and_type_checking_imports(tmp_path: Path) -> None:
    """The reader itself: a cycle through a function-level relative import is found; TYPE_CHECKING is not one."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cass.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import thing\n")
    (pkg / "c.py").write_text("import os\n\ndef g():\n    import cass.a\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cass import e\n")
    (pkg / "e.py").write_text("from . import d\n")
    modules = module_names(pkg)
    graph = import_graph(modules)
    assert graph["cass.sub.b"] == {"cass.c"} and graph["cass.d"] == set() and graph["cass.e"] == {"cass.d"}
    assert import_cycles(graph) == [["cass.a", "cass.sub.b", "cass.c", "cass.a"]]


def test_no_import_cycles_among_cass_modules() -> None:
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles among cass modules:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)

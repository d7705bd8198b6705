"""The package's shape: imports point down the layers of docs/architecture.md, and never in a cycle.

A cycle makes import order matter (a module sees a half-initialised partner), forces imports into
functions to break it, and ties modules that should change separately; an upward import (a data module
reaching into evaluation, a stage into tracking) ties a lower layer to the callers it should not know. The
graph is read from the source with ``ast``, so the test sees imports inside functions too, which a runtime
check of ``sys.modules`` would not. Imports only under ``if TYPE_CHECKING:`` (type names, never run) are
not dependencies.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

PACKAGE = "cass"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# The layers of docs/architecture.md, bottom to top: a module may import its own layer and those below.
# A name covers the module and everything under it (``cass.data`` is every ``cass.data.*``); the most specific
# name decides (``cass.data.layouts`` is settings, the rest of ``cass.data`` is data). The package itself
# (``cass``, an empty ``__init__``) stands for itself only.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("vocabulary", ("cass", "cass.errors", "cass.telemetry", "cass.logs", "cass.io", "cass.outputs", "cass.lineage",
                    "cass.metrics", "cass.names", "cass.redaction", "cass.storage", "cass.tracker")),
    ("settings", ("cass.config", "cass.config_base", "cass.config_data", "cass.config_training",
                  "cass.config_tuning", "cass.config_tracking", "cass.config_study", "cass.data.layouts",
                  "cass.data.dicom_presets")),
    ("data", ("cass.data",)),
    ("subgroup metrics", ("cass.subgroups",)),
    ("models and losses", ("cass.models", "cass.losses", "cass.ema")),
    ("training", ("cass.training", "cass.distributed", "cass.engine", "cass.classifier")),
    ("learners", ("cass.calibration", "cass.variants", "cass.pretraining_common", "cass.cass_pretraining",
                  "cass.baselines", "cass.finetune", "cass.monitor", "cass.study.methods", "cass.study.recommend")),
    ("stages", ("cass.stages", "cass.evaluate", "cass.explain", "cass.tuning", "cass.quality", "cass.versioning",
                "cass.inference", "cass.serving", "cass.predict", "cass.run_keys")),
    ("tracking", ("cass.model_card", "cass.comparison", "cass.data_change", "cass.mutex", "cass.champion_history",
                  "cass.registry", "cass.tracking")),
    ("orchestration", ("cass.pipeline", "cass.dvc_yaml", "cass.study")),
    ("callers", ("cass.__main__", "cass.cli")),
)

# Upward imports that stay for now, each with why and what removes it. Nothing else may be added here.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {
    # The layout registry (settings: what data.layout may name) points each layout at its reader, imported
    # inside the layout's list_files when a dataset is read, never when settings are validated.
    ("cass.data.layouts", "cass.data.adapters"): "a layout's reader, imported when it lists files",
    ("cass.data.layouts", "cass.data.dicom_folder"): "a layout's reader, imported when it lists files",
}


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


def layer_of(module: str, layers: tuple[tuple[str, tuple[str, ...]], ...] = LAYERS) -> tuple[int, str] | None:
    """The index and name of the layer the most specific entry of ``layers`` puts ``module`` in."""
    best: tuple[int, int, str] | None = None
    for index, (name, prefixes) in enumerate(layers):
        for prefix in prefixes:
            covers = module == prefix or (prefix != PACKAGE and module.startswith(prefix + "."))
            if covers and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index, name)
    return None if best is None else (best[1], best[2])


def upward_imports(graph: dict[str, set[str]], layers: tuple[tuple[str, tuple[str, ...]], ...] = LAYERS,
                   allowed: Mapping[tuple[str, str], str] | None = None) -> list[str]:
    """Every import of a module from a higher layer than the importer's, as ``importer (layer) -> imported
    (layer)``, except those in ``allowed``."""
    allowed = ALLOWED_UPWARD if allowed is None else allowed
    found = []
    for importer in sorted(graph):
        below = layer_of(importer, layers)
        for imported in sorted(graph[importer]):
            above = layer_of(imported, layers)
            if below and above and above[0] > below[0] and (importer, imported) not in allowed:
                found.append(f"{importer} ({below[1]}) -> {imported} ({above[1]})")
    return found


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


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in module_names() if layer_of(m) is None]
    assert not unplaced, f"modules in no layer of LAYERS (add each where docs/architecture.md puts it): {unplaced}"


def test_the_layer_reader_names_an_upward_import_and_both_layers() -> None:
    layers = (("low", ("cass.a",)), ("high", ("cass.b", "cass.a.top")))
    graph = {"cass.a": {"cass.b"}, "cass.a.sub": {"cass.a"}, "cass.a.top": {"cass.a.sub"}, "cass.b": {"cass.a"}}
    assert layer_of("cass.a.top", layers) == (1, "high") and layer_of("cass.a.sub", layers) == (0, "low")
    assert upward_imports(graph, layers, allowed={}) == ["cass.a (low) -> cass.b (high)"]
    assert upward_imports(graph, layers, allowed={("cass.a", "cass.b"): "on its way out"}) == []


def test_imports_point_down_the_layers() -> None:
    upward = upward_imports(import_graph())
    assert not upward, "imports from a higher layer (docs/architecture.md):\n" + "\n".join(f"  {u}" for u in upward)


def test_every_allowed_upward_import_still_exists() -> None:
    graph = import_graph()
    gone = [pair for pair in ALLOWED_UPWARD if pair[1] not in graph.get(pair[0], set())]
    assert not gone, f"remove these from ALLOWED_UPWARD, the imports are gone: {gone}"

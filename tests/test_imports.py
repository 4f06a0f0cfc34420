"""The package's import graph, read from the source with ast (nothing is imported): no cycles, and kernels/ standing
alone.

Every ``import`` / ``from ... import`` statement counts, at module level or inside a function (a lazy import still
ties the two modules together). An edge goes from a module to the module it names: ``from . import x`` names the
submodule x when there is one, else the package; ``from .a import f`` names a. Parent packages are not edges (every
submodule import runs its parents' __init__, which would make each package a cycle with its children).
kernels/ (installed as ckpt_ext.kernels, the Triton kernels and their tile helpers) may import nothing of ckpt_ext
outside ``KERNELS_INTERFACE``: the launchers that call the kernels live in ckpt_ext/backends/triton.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"ckpt_ext": ROOT / "ckpt_ext", "ckpt_ext.kernels": ROOT / "kernels"}
KERNELS_INTERFACE: frozenset[str] = frozenset()  # ckpt_ext modules kernels/ may import: none
# Cycles waiting on work elsewhere, each with its reason; one that no longer exists fails the test (the list shrinks).
KNOWN_CYCLES: dict = {}


def _modules() -> dict[str, Path]:
    """Dotted module name -> source file for every module of ckpt_ext and of kernels/ (as ckpt_ext.kernels)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [] if rel.parts == ("__init__",) else list(rel.parts)
            if parts and parts[-1] == "__init__":
                parts.pop()
            if parts and parts[0] == "kernels" and package == "ckpt_ext":
                continue  # the in-tree link to kernels/, listed under its own name
            found[".".join([package, *parts])] = path
    return found


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _imports(name: str, modules: dict[str, Path]) -> set[str]:
    """The modules of the package that ``name``'s source imports (anywhere in the file)."""
    tree = ast.parse(modules[name].read_text(), filename=str(modules[name]))
    here = name if _is_package(name, modules) else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module
            for alias in node.names:
                sub = f"{stem}.{alias.name}"
                targets.add(sub if sub in modules else stem)
    resolved = set()
    for target in targets:
        if target.startswith("kernels.") or target == "kernels":
            target = "ckpt_ext." + target  # the top-level name of the same folder
        while target and target not in modules:  # `import a.b.c` of a non-module tail: the deepest module named
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, modules) for name in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _path(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete import cycle inside ``component``, start -> ... -> start."""
    members, start = set(component), component[0]
    parents, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return component


def test_graph_sees_the_package():
    """The walk finds the modules and edges it must (a broken walk would pass the cycle test vacuously)."""
    graph = _graph()
    assert {"ckpt_ext.backend", "ckpt_ext.ops.table", "ckpt_ext.backends.triton.launchers"} <= set(graph)
    assert "ckpt_ext.kernels.layer_norm" in graph["ckpt_ext.backends.triton.launchers"]
    assert "ckpt_ext.backend" in graph["ckpt_ext.ops.table"]
    assert "ckpt_ext.kernels.flash_attention_tiles" in graph["ckpt_ext.kernels.flash_attention"]  # a lazy import


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    (component,) = _cycles(graph)
    assert component == ["a", "b", "c"] and _path(graph, component) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    graph = _graph()
    found = _cycles(graph)
    cycles = [" -> ".join(_path(graph, c)) for c in found if frozenset(c) not in KNOWN_CYCLES]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
    stale = [sorted(c) for c in KNOWN_CYCLES if list(sorted(c)) not in found]
    assert not stale, f"KNOWN_CYCLES lists cycles that are gone (remove them): {stale}"


def test_kernels_import_only_the_declared_interface():
    graph = _graph()
    leaks = {
        name: sorted(t for t in targets if not t.startswith("ckpt_ext.kernels") and t not in KERNELS_INTERFACE)
        for name, targets in graph.items()
        if name.startswith("ckpt_ext.kernels")
    }
    leaks = {name: targets for name, targets in leaks.items() if targets}
    assert not leaks, f"kernels/ imports ckpt_ext outside its interface: {leaks}"

"""The package's import graph: no cycles, and ``posefr_dist.cli`` sits on top (DESIGN.md, "Layout").

Every module under ``posefr_dist/`` is parsed with :mod:`ast` (nothing is imported), and every
import counts: top-level, inside functions (lazy imports), under ``if TYPE_CHECKING:`` and in
``__getattr__``. ``from P import name`` is an edge to the submodule ``P.name`` when that is a
module, else to ``P``; an edge goes to the module named, not to the packages above it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "posefr_dist"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
TOP = f"{PACKAGE}.cli"  # imported by nothing under the package


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is a module of the package."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in modules:
            return cand
        parts.pop()
    return None


def _imports(mod: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module of the package, line) for every import statement of ``mod``."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == PACKAGE or a.name.startswith(PACKAGE + "."):
                    target = _known(a.name, modules)
                    if target:
                        out.append((target, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not (base == PACKAGE or base.startswith(PACKAGE + ".")):
                continue
            for a in node.names:
                target = _known(f"{base}.{a.name}", modules) if a.name != "*" else None
                if target != f"{base}.{a.name}":
                    target = _known(base, modules)
                if target:
                    out.append((target, node.lineno))
    return out


def import_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], int]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    lines: dict[tuple[str, str], int] = {}
    for mod, path in modules.items():
        for target, line in _imports(mod, path, modules):
            if target == mod:
                continue
            graph[mod].add(target)
            lines.setdefault((mod, target), line)
    return graph, lines


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components of more than one module, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return sorted(out)


def _cycle_in(comp: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One concrete cycle through the first module of a strongly connected component."""
    members = set(comp)
    start = comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:  # breadth first: the shortest way back to start
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def _describe(cycle: list[str], lines: dict[tuple[str, str], int]) -> str:
    steps = [f"{a} (line {lines[(a, b)]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(steps + [cycle[-1]])


def test_graph_sees_the_package():
    graph, _ = import_graph()
    assert TOP in graph and f"{PACKAGE}.config" in graph
    assert f"{PACKAGE}.storage" in graph[f"{PACKAGE}.tune.search"]


def test_no_import_cycles():
    graph, lines = import_graph()
    comps = _strongly_connected(graph)
    report = [f"cycle among {', '.join(c)}:\n    {_describe(_cycle_in(c, graph), lines)}" for c in comps]
    assert not comps, "import cycles:\n  " + "\n  ".join(report)


def test_cli_is_imported_by_nothing():
    graph, lines = import_graph()
    users = sorted(m for m, deps in graph.items() if TOP in deps and m != TOP)
    assert not users, (f"{TOP} sits on top and is imported by nothing under {PACKAGE}/; imported by: "
                       + ", ".join(f"{m} (line {lines[(m, TOP)]})" for m in users))


@pytest.mark.parametrize("source, expected", [
    ("from posefr_dist.tune import search", "posefr_dist.tune.search"),
    ("from posefr_dist.tune import run_tune", "posefr_dist.tune"),
    ("import posefr_dist.tune.space as s", "posefr_dist.tune.space"),
    ("def f():\n    from posefr_dist import storage", "posefr_dist.storage"),
    ("from . import space", "posefr_dist.tune.space"),
    ("from ..config import Config", "posefr_dist.config"),
])
def test_edges_are_resolved(tmp_path, source, expected):
    path = tmp_path / "probe.py"
    path.write_text(source + "\n")
    modules = _modules()
    got = [t for t, _ in _imports("posefr_dist.tune.probe", path, modules)]
    assert got == [expected]

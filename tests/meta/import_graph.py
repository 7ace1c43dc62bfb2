"""The import graph of ``opd_plugins``: every import statement, lazy ones inside functions included.

Run it to see the floors, any cycle and any import that points up a floor::

    python tests/meta/import_graph.py

An edge ``a -> b`` is written for every ``import b`` / ``from b import x`` in module ``a`` (resolved to the
deepest module of ``opd_plugins`` it names, so ``from opd_plugins.teachers import base`` is an edge to
``opd_plugins.teachers.base``). Imports under ``if TYPE_CHECKING:`` are left out: they never run. Modules loaded
by name at run time (``importlib.import_module("...")``, the plugin manager's built-ins) are not imports of the
module that names them.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "opd_plugins"

FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("opd_plugins", "opd_plugins.markers", "opd_plugins.errors", "opd_plugins.components",
              "opd_plugins.registry", "opd_plugins.hookspecs", "opd_plugins.manager", "opd_plugins.correction",
              "opd_plugins.diagnostics",
              "opd_plugins.paths", "opd_plugins.variants", "opd_plugins.context", "opd_plugins.collective",
              "opd_plugins.reveal", "opd_plugins.lm_head")),
    ("recipe", ("opd_plugins.recipe",)),
    ("kinds", ("opd_plugins.teachers", "opd_plugins.divergences", "opd_plugins.token_weighting",
               "opd_plugins.advantages", "opd_plugins.samplers", "opd_plugins.prompt_selection", "opd_plugins.rollout",
               "opd_plugins.schedules", "opd_plugins.tasks", "opd_plugins.data", "opd_plugins.models",
               "opd_plugins.generation", "opd_plugins.evaluation", "opd_plugins.selection")),
    ("trainers", ("opd_plugins.trainers",)),
    ("runs", ("opd_plugins.runs", "opd_plugins.commands", "opd_plugins.report")),
    ("entry", ("opd_plugins.cli", "opd_plugins.__main__", "opd_plugins.run", "opd_plugins.soda",
               "opd_plugins.precompute", "opd_plugins.serve", "opd_plugins.testing")),
)
"""Floors from the bottom up: a module may import its own floor and the floors below, never one above.
A module belongs to the floor of the longest prefix that names it."""


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST, here: str, is_package: bool) -> Iterable[tuple[str, list[str], int]]:
    """``(module, names, line)`` for every import that runs (TYPE_CHECKING blocks skipped)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if _type_checking_block(child):
                stack.extend(child.orelse)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, [], child.lineno
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = here.split(".") if is_package else here.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (child.level - 1)]
                    base = ".".join([*pkg, base] if base else pkg)
                yield base, [a.name for a in child.names], child.lineno
            stack.append(child)


def edges() -> dict[str, dict[str, int]]:
    """``{module: {imported module: first line}}`` within the package."""
    mods = modules()
    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for target, names, line in _imports(tree, name, path.name == "__init__.py"):
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                continue
            resolved = []
            for n in names:  # `from pkg import module` names a submodule
                if f"{target}.{n}" in mods:
                    resolved.append(f"{target}.{n}")
            if not resolved or len(resolved) < len(names):
                while target not in mods and "." in target:
                    target = target.rsplit(".", 1)[0]
                resolved.append(target)
            for r in resolved:
                if r != name:
                    graph[name].setdefault(r, line)
    return graph


def floor_of(module: str) -> int:
    best, best_len = -1, -1
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's SCCs with more than one module (the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def upward_edges(graph: dict[str, dict[str, int]]) -> list[tuple[str, str, int]]:
    ups = []
    for a, targets in graph.items():
        for b, line in targets.items():
            if floor_of(b) > floor_of(a):
                ups.append((a, b, line))
    return sorted(ups)


def unplaced(graph: dict[str, dict[str, int]]) -> list[str]:
    return sorted(m for m in graph if floor_of(m) < 0)


def report() -> str:
    graph = edges()
    lines = [f"{len(graph)} modules, {sum(len(t) for t in graph.values())} import edges"]
    for i, (name, _) in enumerate(FLOORS):
        members = sorted(m for m in graph if floor_of(m) == i)
        lines.append(f"floor {i} {name}: {len(members)} modules")
    cycles = strongly_connected(graph)
    lines.append(f"cycles: {len(cycles)}" + "".join(f"\n  {len(c)} modules: {', '.join(c)}" for c in cycles))
    ups = upward_edges(graph)
    lines.append(f"imports pointing up a floor: {len(ups)}" + "".join(
        f"\n  {a}:{line} -> {b} ({FLOORS[floor_of(a)][0]} -> {FLOORS[floor_of(b)][0]})" for a, b, line in ups))
    missing = unplaced(graph)
    if missing:
        lines.append("modules on no floor: " + ", ".join(missing))
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())

"""The package's import graph has no cycle and no import that points up a floor, lazy imports included."""

from __future__ import annotations

import import_graph as graph  # tests/meta is on sys.path (pytest rootdir-relative import)


def test_every_module_is_on_a_floor():
    assert not graph.unplaced(graph.edges()), "add these modules to a floor in tests/meta/import_graph.py"


def test_no_import_cycle():
    cycles = graph.strongly_connected(graph.edges())
    assert not cycles, "import cycles (an AST walk, imports inside functions included):\n" + "\n".join(
        ", ".join(c) for c in cycles)


def test_no_import_points_up_a_floor():
    ups = graph.upward_edges(graph.edges())
    assert not ups, "imports pointing up the layers (errors/components/registry < recipe < component kinds < " \
                    "trainers < runs/commands < cli):\n" + "\n".join(f"{a}:{line} imports {b}" for a, b, line in ups)


def test_the_walk_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The checker itself: an import inside a function counts, a TYPE_CHECKING one does not, and a cycle made only of
    lazy imports is found."""
    pkg = tmp_path / "opd_plugins"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("def f():\n    from opd_plugins.sub import thing\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "thing.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from opd_plugins import cli\n"
        "def g():\n    from .. import errors\n")
    (pkg / "cli.py").write_text("")
    monkeypatch.setattr(graph, "ROOT", tmp_path)
    edges = graph.edges()
    assert edges["opd_plugins.errors"] == {"opd_plugins.sub.thing": 2}
    assert edges["opd_plugins.sub.thing"] == {"opd_plugins.errors": 5}
    assert graph.strongly_connected(edges) == [["opd_plugins.errors", "opd_plugins.sub.thing"]]

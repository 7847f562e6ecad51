"""The project's import graph has no circle: modules, sibling packages, layers.

Read from the source by ``tests/support/import_graph.py``: imports inside functions
count (moving an import into a function does not remove a circle); imports under
``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import pytest
from support import import_graph


@pytest.fixture(scope="module")
def graph():
    modules = import_graph.project_modules()
    edges = import_graph.module_edges(modules)
    for (source, target), _reason in import_graph.ALLOWED.items():
        assert target in edges[source], f"allowed edge {source} -> {target} is gone: drop it"
        edges[source].discard(target)
    return modules, edges


def test_no_module_imports_itself_through_others(graph):
    modules, edges = graph
    assert import_graph.strongly_connected(edges) == []


def test_no_circle_between_sibling_packages(graph):
    modules, edges = graph
    assert import_graph.strongly_connected(import_graph.package_edges(modules, edges)) == []


def test_no_circle_between_layers(graph):
    modules, edges = graph
    layers = import_graph.package_edges(modules, edges, depth=2)
    assert import_graph.strongly_connected(layers) == []


@pytest.mark.parametrize(
    "lower, upper",
    [
        ("bnexport_plugins", "bnexport.runtime"),
        ("bnexport.runtime", "bnexport.export"),
        ("bnexport.export", "bnexport.quantize"),
        ("bnexport.serve.protocol", "bnexport.serve.core"),
        ("bnexport.serve.core", "bnexport.serve.rest"),
        ("bnexport.serve.core", "bnexport.serve.grpc"),
        ("bnexport.serve.triton", "bnexport.serve.core"),
        ("bnexport.serve.protocol", "bnexport.serve.rest"),
        ("bnexport.serve.protocol", "bnexport.serve.grpc"),
        ("bnexport.serve.grpc", "bnexport.serve.rest"),
        ("bnexport.serve.rest", "bnexport.serve.grpc"),
        ("bnexport.serve.settings", "bnexport.serve.core"),
        ("bnexport.graph", "bnexport.export"),
        ("bnexport.cuda_api", "bnexport.runtime"),
        ("bnexport.quickstart", "bnexport.cli"),
    ],
)
def test_lower_layer_never_imports_upper(graph, lower, upper):
    """The direction of each pair the data-plane issue named (a back-edge is a bug)."""
    _, edges = graph
    back = sorted(
        f"{source} -> {target}"
        for source, targets in edges.items()
        if source == lower or source.startswith(lower + ".")
        for target in targets
        if target == upper or target.startswith(upper + ".")
    )
    assert back == []


def test_graph_reader_sees_function_level_imports_and_skips_type_checking(tmp_path):
    pkg = tmp_path / "bnexport"
    pkg.mkdir()
    (tmp_path / "plugins").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from bnexport import b\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bnexport import c\n"
        "import bnexport.a\n"
    )
    (pkg / "c.py").write_text("from bnexport.b import thing\n")
    modules = import_graph.project_modules(tmp_path)
    edges = import_graph.module_edges(modules)
    assert edges["bnexport.a"] == {"bnexport.b"}
    assert edges["bnexport.b"] == {"bnexport.a"}
    assert edges["bnexport.c"] == {"bnexport.b"}
    assert import_graph.strongly_connected(edges) == [["bnexport.a", "bnexport.b"]]

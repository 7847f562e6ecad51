"""The import graph of ``bnexport`` and ``plugins``, read from the source (no import runs).

An edge ``a -> b`` is any ``import`` / ``from ... import`` statement in module ``a`` that
names module ``b`` of the project, at module level **or inside a function** (moving an
import into a function does not remove a circle). Imports under ``if TYPE_CHECKING:``
do not count: they never run. Parent packages that Python imports implicitly are not
edges (every module would otherwise sit in a circle with its package's ``__init__``).

Two views:

- module circles: strongly connected components of the module graph with more than one
  module;
- package circles: the same on the graph of packages (``bnexport.serve.core``,
  ``bnexport.runtime``, ``bnexport_plugins.fused_norm`` ...), where an edge between two modules
  becomes an edge between their packages. ``runtime -> plugins -> runtime`` is such a circle
  even when no two modules import each other.

Run ``python tests/support/import_graph.py`` for a summary.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Edges allowed to close a circle, each with the reason it must exist for now.
ALLOWED: dict[tuple[str, str], str] = {
    ("bnexport_plugins.fused_norm.trt_plugin", "bnexport.runtime.trt_build"): (
        "the deprecated alias trt_plugin.build_engine (README-documented; decisions.md keeps it "
        "one release) calls the one builder; goes with the alias"
    ),
}
#: Import name -> source folder (pyproject's ``package-dir``: ``plugins/`` installs as
#: ``bnexport_plugins``).
TOP_PACKAGES = {"bnexport": "bnexport", "bnexport_plugins": "plugins"}


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file of the top packages."""
    modules = {}
    for top, folder in TOP_PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = [top, *path.relative_to(root / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import statement in ``tree`` except those under ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, modules: Mapping[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a project module."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _edges_of(
    name: str, path: Path, modules: Mapping[str, Path], *, top_level_only: bool
) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    nodes: Iterable[ast.AST] = (
        (n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom))
        if top_level_only
        else _import_nodes(tree)
    )
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names]
            names_a_value = any(target not in modules for target in targets)
            # ``from pkg import name`` runs pkg's ``__init__`` when ``name`` is a value of
            # it; an ancestor package is already imported (implicitly) either way.
            if names_a_value and not (name == base or name.startswith(base + ".")):
                targets.append(base)
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != name:
                found.add(resolved)
    return found


def module_edges(
    modules: Mapping[str, Path], *, top_level_only: bool = False
) -> dict[str, set[str]]:
    """``{module: project modules it imports}`` (self-edges dropped)."""
    return {
        name: _edges_of(name, path, modules, top_level_only=top_level_only)
        for name, path in modules.items()
    }


def strongly_connected(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components of more than one node, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def package_of(module: str, modules: Mapping[str, Path]) -> str:
    """The package a module belongs to (a package's ``__init__`` belongs to itself).

    Modules directly under a top package (``bnexport.errors``, ``bnexport.quickstart``)
    are nodes of their own: the top package is a namespace of leaves and facades, not a
    layer, and lumping them would join every subpackage into one false circle.
    """
    if modules[module].name == "__init__.py":
        return module
    parent = module.rpartition(".")[0]
    return module if parent in TOP_PACKAGES else parent


def package_edges(
    modules: Mapping[str, Path], edges: Mapping[str, set[str]], *, depth: int | None = None
) -> dict[str, set[str]]:
    """Module edges lifted to packages.

    ``depth=None``: each module's own package, and an edge between a package and its
    ancestor or descendant is dropped (``bnexport.export`` using its ``passes`` subpackage,
    and ``passes`` using ``bnexport.export.report``, are one layer's inside). What is left
    are edges between siblings and cousins: ``serve.rest -> serve.core``.
    ``depth=2``: packages cut at two names (``bnexport.serve``, ``bnexport.runtime``): the
    layers of the project.
    """
    graph: dict[str, set[str]] = collections.defaultdict(set)
    for source, targets in edges.items():
        source_package = _package_at(source, modules, depth)
        graph[source_package]
        for target in targets:
            target_package = _package_at(target, modules, depth)
            if _same_line(source_package, target_package):
                continue
            graph[source_package].add(target_package)
    return dict(graph)


def _package_at(module: str, modules: Mapping[str, Path], depth: int | None) -> str:
    package = package_of(module, modules)
    return package if depth is None else ".".join(package.split(".")[:depth])


def _same_line(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


@dataclasses.dataclass(frozen=True)
class ImportGraphSummary:
    modules: int
    edges: int
    module_circles: list[list[str]]
    package_circles: list[list[str]]
    layer_circles: list[list[str]]
    allowed: list[str]
    function_level_edges: int

    def lines(self) -> list[str]:
        out = [
            f"modules: {self.modules}, import edges: {self.edges} "
            f"({self.function_level_edges} only inside functions)",
            f"module circles: {len(self.module_circles)}",
        ]
        out += [f"  - {' <-> '.join(c)}" for c in self.module_circles]
        out.append(f"package circles (siblings): {len(self.package_circles)}")
        out += [f"  - {' <-> '.join(c)}" for c in self.package_circles]
        out.append(f"layer circles (bnexport.X): {len(self.layer_circles)}")
        out += [f"  - {' <-> '.join(c)}" for c in self.layer_circles]
        out.append(f"allowed edges left out of the circles: {len(self.allowed)}")
        out += [f"  - {edge}" for edge in self.allowed]
        return out


def summarize(root: Path = ROOT) -> ImportGraphSummary:
    modules = project_modules(root)
    edges = module_edges(modules)
    allowed = []
    for (source, target), reason in ALLOWED.items():
        if target in edges.get(source, ()):
            edges[source].discard(target)
            allowed.append(f"{source} -> {target}: {reason}")
    return ImportGraphSummary(
        modules=len(modules),
        edges=sum(len(v) for v in edges.values()),
        module_circles=strongly_connected(edges),
        package_circles=strongly_connected(package_edges(modules, edges)),
        layer_circles=strongly_connected(package_edges(modules, edges, depth=2)),
        allowed=allowed,
        function_level_edges=sum(
            len(edges[name] - top)
            for name, top in module_edges(modules, top_level_only=True).items()
        ),
    )


def main(argv: list[str] | None = None) -> int:
    root = Path(argv[0]).resolve() if argv else ROOT
    print("\n".join(summarize(root).lines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

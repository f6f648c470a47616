"""An import-linter contract type that fails on any import cycle between the modules of a package.

import-linter's own ``acyclic_siblings`` contract checks cycles between the children of a package,
each child with its descendants squashed into one node: it misses a cycle through a package's own
``__init__`` (``pkg/__init__.py`` importing ``pkg.a``, which imports ``pkg``). This contract works on
the module graph itself: every module of the package, package ``__init__`` modules included, and
every import grimp sees (at the top of a file or inside a function). A strongly connected
component of more than one module is a cycle; the report names one cycle of each, with the lines.

``pyproject.toml`` registers it (``contract_types = ["acyclic: tests.architecture.AcyclicContract"]``;
``lint-imports`` runs from the repository root, which import-linter puts on ``sys.path``)::

    [[tool.importlinter.contracts]]
    type = "acyclic"
    packages = ["levo_train"]
"""

from __future__ import annotations

from collections import deque
from typing import Any

from grimp import ImportGraph
from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


def package_modules(graph: ImportGraph, package: str) -> set[str]:
    """``package`` and every module below it."""
    return {package} | set(graph.find_descendants(package))


def strongly_connected(nodes: set[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted; only those that hold a cycle
    (more than one node, or a node importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(nodes):
        if root in index:
            continue
        work: list[tuple[str, Any]] = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
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
                if len(comp) > 1 or v in edges[v]:
                    out.append(sorted(comp))
    return sorted(out)


def shortest_cycle(start: str, members: set[str], edges: dict[str, set[str]]) -> list[str]:
    """The shortest import path from ``start`` back to itself inside ``members`` (start repeated at the end)."""
    prev: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(edges[v] & members):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [*reversed(path), start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return [start, start]


def import_cycles(graph: ImportGraph, package: str) -> list[tuple[list[str], list[str]]]:
    """Each group of ``package``'s modules that import each other in a circle: (its modules, one
    cycle through them, the first module repeated at the end); empty when there is none."""
    nodes = package_modules(graph, package)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) & nodes for m in nodes}
    return [(comp, shortest_cycle(comp[0], set(comp), edges)) for comp in strongly_connected(nodes, edges)]


def describe(graph: ImportGraph, cycle: list[str]) -> str:
    """``a -> b (a.py:12) -> c (b.py:40) -> a (...)``: each import with its first line."""
    parts = [cycle[0]]
    for a, b in zip(cycle, cycle[1:]):
        details = graph.get_import_details(importer=a, imported=b)
        line = f" (line {details[0]['line_number']})" if details else ""
        parts.append(f"{b}{line}")
    return " -> ".join(parts)


class AcyclicContract(Contract):
    """No import cycle between the modules of each of ``packages`` (any import, at any place)."""

    type_name = "acyclic"
    packages = fields.ListField(subfield=fields.StringField())

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        found = {pkg: [f"{describe(graph, cycle)}" + (f"  [in a circle of {len(comp)}: {', '.join(comp)}]"
                                                      if len(comp) > len(cycle) - 1 else "")
                       for comp, cycle in import_cycles(graph, pkg)] for pkg in self.packages}
        found = {pkg: cycles for pkg, cycles in found.items() if cycles}
        return ContractCheck(kept=not found, metadata={"cycles": found})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for pkg, cycles in check.metadata["cycles"].items():
            output.print_error(f"{pkg}: {len(cycles)} import cycle(s); break each by moving what both sides "
                               "need into a lower module (an import inside a function is still an import):")
            for c in cycles:
                output.print_error(f"  {c}", bold=False)
            output.new_line()

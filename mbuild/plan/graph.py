"""Which targets a request builds, and in what order.

The graph itself is the Mergefile's (`mbuild.mergefile.dependencies.build_graph`, which
refuses cycles); the plan only selects from it: the requested targets and their ancestors,
in build order, ties broken by the order the Mergefile lists them.
"""

from __future__ import annotations

from typing import Sequence

from mbuild.errors import Location, MergefileError
from mbuild.mergefile import Mergefile
from mbuild.nodes import Node


def select(mergefile: Mergefile, graph, requested: Sequence[str]) -> tuple[str, ...]:
    """The requested targets and every target they depend on, in build order."""
    import networkx as nx

    names = list(mergefile.targets)
    if not requested or list(requested) == ["all"]:
        wanted = set(names)
    else:
        wanted = set()
        for name in mergefile.expand_names(requested):  # a sweep's name: all its points
            if name not in mergefile.targets:
                from mbuild.mergefile.values import suggest

                raise MergefileError(f"no target named '{name}'{suggest(name, names)}", Location(mergefile.path))
            wanted.add(name)
            wanted.update(n.label for n in nx.ancestors(graph, Node.target(name)) if n.is_target)
    position = {name: index for index, name in enumerate(names)}
    order = nx.lexicographical_topological_sort(
        graph.subgraph([Node.target(n) for n in wanted]), key=lambda node: position[node.label]
    )
    return tuple(node.label for node in order)

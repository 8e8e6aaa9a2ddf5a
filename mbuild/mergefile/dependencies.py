"""The graph a Mergefile declares: which targets and sources each target reads.

It is built from the recipes alone, so a cycle is a mistake in the Mergefile, reported at
the reference that closes it both when a build plans (`plan` builds on this graph) and
when the importer checks the Mergefile it made from a mergekit config.
"""

from __future__ import annotations

from mbuild.errors import Location, MergefileError
from mbuild.mergefile.recipe import Mergefile
from mbuild.nodes import Node


def build_graph(mergefile: Mergefile):
    """The DAG of targets and sources; a cycle is a MergefileError at the closing reference."""
    import networkx as nx

    graph = nx.DiGraph()
    for name, target in mergefile.targets.items():
        graph.add_node(Node.target(name), kind="target")
        for ref in target.references():
            graph.add_node(ref.node, kind=ref.kind)
            graph.add_edge(ref.node, Node.target(name), line=ref.line)
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return graph
    names = [Node(edge[0]).label for edge in cycle] + [Node(cycle[0][0]).label]
    closing = cycle[-1]
    target = Node(closing[1]).label
    line = graph.edges[closing].get("line")
    raise MergefileError(
        "dependency cycle: " + " -> ".join(names), Location(mergefile.path, line, target)
    )

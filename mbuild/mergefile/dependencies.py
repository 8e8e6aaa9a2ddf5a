"""The graph a Mergefile declares: which targets and sources each target reads.

It is built from the recipes alone, so a cycle is a mistake in the Mergefile, reported at
the reference that closes it both when a build plans (`plan` builds on this graph) and
when the importer checks the Mergefile it made from a mergekit config.
"""

from __future__ import annotations

from mbuild.errors import Location, MergefileError
from mbuild.mergefile.recipe import Mergefile


def build_graph(mergefile: Mergefile):
    """The DAG of targets and sources; a cycle is a MergefileError at the closing reference."""
    import networkx as nx

    graph = nx.DiGraph()
    for name, target in mergefile.targets.items():
        graph.add_node("target:" + name, kind="target")
        for ref in target.references():
            graph.add_node(ref.node, kind=ref.kind)
            graph.add_edge(ref.node, "target:" + name, line=ref.line)
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return graph
    names = [edge[0].split(":", 1)[1] for edge in cycle] + [cycle[0][0].split(":", 1)[1]]
    closing = cycle[-1]
    target = closing[1].split(":", 1)[1]
    line = graph.edges[closing].get("line")
    raise MergefileError(
        "dependency cycle: " + " -> ".join(names), Location(mergefile.path, line, target)
    )

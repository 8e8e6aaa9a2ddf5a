"""Moving hub pins on purpose: `mbuild lock --update [MODEL...]` (as `cargo update` does).

A hub model written without ``@revision`` is built from the commit Mergefile.lock pins, so
the family never moves under the user's feet; this is the one command that moves a pin. It
asks for the branch's commit now (the hub when online, the cache's ``refs/main`` when
``HF_HUB_OFFLINE=1``), writes it into the lock, and says which targets the move makes stale.
A model written ``model@revision`` is the Mergefile's own pin and is never moved here.

The targets a move makes stale are found from the graph alone: every model card names the
commits of its hub ancestors and is part of its target's key (`plan.cards`), so a moved pin
changes the key of exactly the targets downstream of that model. No weight is fetched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from mbuild import io, lock
from mbuild.errors import Location, MbuildError
from mbuild.mergefile import Mergefile, ModelRef
from mbuild.mergefile.dependencies import build_graph
from mbuild.nodes import LORA, Node
from mbuild.plan.graph import select

# The branch an unpinned hub model follows (its node is ``hub:ID@main``).
BRANCH = "main"


@dataclass(frozen=True)
class PinMove:
    """One hub model's pin: before and after the update, and the targets downstream of it."""

    model: str
    node: str
    old: str | None  # None: never pinned (never built)
    new: str
    targets: tuple[str, ...]

    @property
    def moved(self) -> bool:
        return self.old != self.new


@dataclass(frozen=True)
class PinUpdate:
    """What `mbuild lock --update` did: each model's move, the models the Mergefile pins itself,
    and every target now stale because of a move, in build order."""

    moves: tuple[PinMove, ...]
    kept: tuple[str, ...]  # 'model@revision' references, as written
    stale: tuple[str, ...]


def hub_references(mergefile: Mergefile) -> list[ModelRef]:
    """Every hub reference of the Mergefile, the sides of ``base+adapter`` ones included."""
    refs = []
    for target in mergefile.targets.values():
        for ref in target.references():
            refs.extend(ref.lora if ref.kind == LORA else [ref])
    return [ref for ref in refs if ref.kind == "hub"]


def update_pins(mergefile: Mergefile, state, models: Sequence[str] = ()) -> PinUpdate:
    """Re-resolve the hub pins (all, or those of ``models``), write them into the lock, and report."""
    refs = hub_references(mergefile)
    followed = {ref.location: ref.node for ref in refs if ref.revision is None}
    kept = tuple(dict.fromkeys(ref.text for ref in refs if ref.revision is not None))
    for model in models:
        if model not in followed:
            raise MbuildError(_not_followed(model, followed, kept), Location(mergefile.path))
    chosen = {model: followed[model] for model in (models or followed)}
    pinned = lock.pinned_revisions(mergefile.path)
    graph = build_graph(mergefile)
    moves = []
    for model, node in chosen.items():
        new = io.hub.branch_commit(model, BRANCH)
        moves.append(PinMove(model, node, pinned.get(node), new, downstream_targets(mergefile, graph, node)))
    moved = {move.node: move.new for move in moves if move.moved}
    if moved:
        lock.move_pins(mergefile.path, state, moved)
    stale = {name for move in moves if move.moved for name in move.targets}
    order = select(mergefile, graph, ())
    return PinUpdate(tuple(moves), kept, tuple(name for name in order if name in stale))


def _not_followed(model: str, followed, kept) -> str:
    """Why ``model`` cannot be updated: the Mergefile pins it itself, or it is no hub model of it."""
    if any(text.split("@", 1)[0] == model for text in kept):
        return f"'{model}' is pinned by the Mergefile itself ({model}@...): edit the Mergefile to move it"
    listed = ", ".join(sorted(followed)) or "none"
    return f"no hub model '{model}' read without a revision (those read: {listed})"


def downstream_targets(mergefile: Mergefile, graph, node: str) -> tuple[str, ...]:
    """The targets that read hub ``node`` (directly or as a side of a LoRA reference), and theirs."""
    import networkx as nx

    readers = [n for n in graph.nodes if n == node or (Node(n).kind == LORA and node in Node(n).label.split("+"))]
    found = set()
    for reader in readers:
        found.update(Node(n).label for n in nx.descendants(graph, reader) if Node(n).is_target)
    return tuple(name for name in mergefile.targets if name in found)

"""Making a plan: open the sources a request reads, then expand each target, in build order,
through its kind.

This is the one loop every build, dry run and status goes through. It knows no kind of
target by name (`kinds.kind_of` picks one) and does no hashing or caching of its own: what
it needs of the cache (digests, the folder where it keeps files it makes) is passed in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from mbuild import io, lora
from mbuild.errors import Location, ModelError
from mbuild.mergefile import Mergefile, ModelRef, Target
from mbuild.mergefile.dependencies import build_graph
from mbuild.nodes import LORA, Node
from mbuild.plan import cards, kinds
from mbuild.plan.graph import select
from mbuild.plan.tasks import (
    DEFAULT_SHARD_BYTES,
    DigestLookup,
    OutputLookup,
    Plan,
    Source,
    TargetPlan,
    node_of,
)


def make_plan(
    mergefile: Mergefile,
    requested: Sequence[str] = (),
    digests: DigestLookup = lambda source: None,
    pickles: Any = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    output_digest: OutputLookup = lambda key: None,
    *,
    store: Path,
    previous: Plan | None = None,
    changed: Sequence[str] | None = None,
    platform: str | None = None,
    pinned: Mapping[str, str] | None = None,
    adapters: Any = None,
) -> Plan:
    """Resolve sources, expand the selected targets into tensor tasks and compute keys.

    ``digests`` gives a source's per-tensor digests (None: not hashed yet);
    ``output_digest`` gives the digest of the bytes a task key once produced, so a
    downstream key names upstream bytes rather than upstream recipes where it can.
    With ``previous`` and ``changed`` (targets just built), only the targets downstream
    of those are expanded again; the rest, and the sources, are taken as they were.
    ``platform``: where tasks compute (`compute_platform.identify`; default: this CPU).
    ``pickles``: a `pickles.Conversions` through which pickled sources are read (None: refused).
    ``pinned``: hub node -> the commit Mergefile.lock pins it to (`lock.pinned_revisions`).
    ``adapters``: a `lora.Adapters` through which ``base+adapter`` models are applied (None:
    their adapted tensors stay unknown, as in a dry run).
    ``store``: the folder where planning keeps the files it makes (aligned vocabularies, chat
    templates), the build's cache folder.
    """
    import networkx as nx

    from mbuild import compute_platform

    if platform is None:
        platform = previous.platform if previous is not None else compute_platform.identify("cpu")

    graph = previous.graph if previous is not None else build_graph(mergefile)
    order = previous.order if previous is not None else select(mergefile, graph, requested)
    stale: set[str] = set(order)
    if previous is not None and changed is not None:
        stale = set()
        for name in changed:
            stale.update(n.label for n in nx.descendants(graph, Node.target(name)) if n.is_target)
    sources: dict[str, Source] = dict(previous.sources) if previous is not None else {}
    plans: dict[str, TargetPlan] = {}
    unhashed: set[str] = set(previous.unhashed) if previous is not None else set()
    pinned = pinned or {}
    source_digests: dict[str, Mapping[str, str] | None] = {}
    for name in order:
        target = mergefile.targets[name]
        if name not in stale:
            plans[name] = previous.targets[name]
            continue
        infos: dict[str, io.ModelInfo] = {}
        for ref in target.references():
            node = node_of(ref)
            if ref.kind == "target":
                infos[node] = plans[ref.location].model_info()
                continue
            if node not in sources:
                sources[node] = _open_source(ref, node, target, pickles, pinned, adapters)
            if node not in source_digests:
                found = digests(sources[node])
                source_digests[node] = found
                if found is None:
                    unhashed.add(node)
            infos[node] = sources[node].info
        expanded = expand(target, infos, plans, source_digests, shard_bytes, output_digest, store, platform=platform)
        plans[name] = cards.with_lineage(expanded, plans, sources)
    return Plan(mergefile, order, plans, sources, graph, frozenset(unhashed), platform)


def _open_source(ref: ModelRef, node: str, target: Target, pickles, pinned: Mapping[str, str], adapters=None) -> Source:
    """A source's tensor table from its headers; pickled ones through ``pickles`` (None: refused)."""
    location = target.mergefile.location(("targets", target.name), target.name)
    location = Location(location.file, ref.line or location.line, target.name)
    try:
        if ref.kind == LORA:
            return _lora_source(ref, node, pickles, pinned, adapters)
        if ref.kind == "hub":
            # Same Mergefile + lock -> same bytes: an unpinned hub model uses the locked commit.
            info, revision = io.open_hub_model(ref.location, ref.revision or pinned.get(node), pickles)
            return Source(node, ref, info, revision)
        return Source(node, ref, io.read_model(ref.location, pickles))
    except ModelError as error:
        raise ModelError(f"model '{ref}': {error.message}", location) from None


def _lora_source(ref: ModelRef, node: str, pickles, pinned: Mapping[str, str], adapters) -> Source:
    """A base model with a LoRA adapter applied: checked from the headers, applied through ``adapters``."""
    folders, revisions = [], []
    for side in ref.lora:
        if side.kind == "hub":
            folder, revision = io.resolve_hub_model(side.location, side.revision or pinned.get(side.node))
        else:
            folder, revision = Path(side.location), None
        folders.append(folder)
        revisions.append(revision)
    base = io.read_model(folders[0], pickles)
    adapter = lora.read_adapter(folders[1], base)
    if adapters is None:  # nowhere to apply it: its adapted tensors stay unknown
        adapters = lora.Adapters(Path(), None, write=False)
    info = adapters.applied(base, adapter, ref.text)
    revision = None if revisions == [None, None] else f"{revisions[0] or ''}+{revisions[1] or ''}"
    return Source(node, ref, info, revision)


def expand(target: Target, *arguments, platform: str) -> TargetPlan:
    """Expand one target into its tensor tasks and companion files, through its kind.

    The arguments are every kind's (`mbuild.plan.kinds`): this is the one place the planner
    reaches a kind, so a test can watch which targets a plan expands.
    """
    return kinds.kind_of(target).expand(target, *arguments, platform=platform)

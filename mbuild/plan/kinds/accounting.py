"""Every input tensor accounted for: inputs of one architecture, and no tensor left untaken.

mergekit's worst failures are silent: a tensor its tables do not name is dropped. A merge
target here refuses inputs whose configs name different architectures, and any input tensor
no task reads, unless the target says `allow_mixed_architectures: true`; then the tensors
left out are named (a warning, `--dry-run --json`, `mbuild explain`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from mbuild import io
from mbuild.errors import MergefileError
from mbuild.mergefile import Target
from mbuild.nodes import Node
from mbuild.plan.layers import LAYER_NAME, goes_first
from mbuild.plan.tasks import node_of


def architecture(info: io.ModelInfo) -> str | None:
    """The architecture class a model's config names (its first), if any."""
    names = info.config.get("architectures")
    if isinstance(names, list) and names and isinstance(names[0], str):
        return names[0]
    return None


def check_architectures(target: Target, groups: Sequence, infos: Mapping[str, io.ModelInfo]) -> None:
    """Refuse inputs of different architectures unless the target allows them (mergekit's rule)."""
    if target.mixed_architectures:
        return
    seen: dict[str, str] = {}
    for ref in (ref for group in groups for ref in group.refs):
        name = architecture(infos[node_of(ref)])
        if name is not None:
            seen.setdefault(name, str(ref))
    if len(seen) > 1:
        shown = ", ".join(f"'{ref}' is {name}" for name, ref in seen.items())
        raise MergefileError(
            f"the models are of different architectures ({shown}); merging them can drop or misplace "
            "tensors, so mbuild refuses. Say 'allow_mixed_architectures: true' in the target to merge them "
            "anyway (the output takes the first model's architecture)",
            target.location(),
        )


def untaken(
    target: Target, groups: Sequence, infos, taken: set[tuple[str, str]], stack_tables, ranged
) -> tuple[str, ...]:
    """Input tensors the target should read but no task does: refused unless the target allows it.

    A `models:` merge takes every tensor of every model; a slice takes its layers and, in the
    first and last slices, the tensors before and after the layer stack (the first also every
    other stack, whole).
    """
    expected: dict[str, set[str]] = {}
    for position, group in enumerate(groups):
        for ref, (start, end) in zip(group.refs, group.ranges):
            node = node_of(ref)
            wanted = expected.setdefault(node, set())
            stacks = stack_tables[node][0]
            for name in infos[node].tensors:
                match = LAYER_NAME.match(name)
                if target.models:
                    wanted.add(name)
                elif match and match["prefix"] == ranged[node]:
                    if start <= int(match["index"]) < end:
                        wanted.add(name)
                elif match:
                    if position == 0:
                        wanted.add(name)
                elif position == 0 and goes_first(name, stacks, ranged[node]):
                    wanted.add(name)
                elif position == len(groups) - 1 and not goes_first(name, stacks, ranged[node]):
                    wanted.add(name)
    dropped: list[str] = []
    for node, names in expected.items():
        missed = sorted(name for name in names if (node, name) not in taken)
        if missed and not target.mixed_architectures:
            label = Node(node).label
            shown = ", ".join(missed[:3]) + (f" and {len(missed) - 3} more" if len(missed) > 3 else "")
            raise MergefileError(
                f"model '{label}' has {len(missed)} tensor(s) that no output tensor takes ({shown}): mbuild never "
                "drops an input tensor silently. If the inputs really differ in architecture, say "
                "'allow_mixed_architectures: true' in the target and they are dropped with a warning",
                target.location(),
            )
        dropped.extend(f"{Node(node).label}: {name}" for name in missed)
    return tuple(dropped)

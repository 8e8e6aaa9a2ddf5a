"""The lineage every model card carries: which hub models a target descends from, through
every target in between, at which commits, and under which license.

A kind writes what its output is (`companions.model_card`, the GGUF and LoRA cards); the
planner then passes each expanded target through `with_lineage`, which needs what no kind
sees: the plans of the targets upstream and the resolved sources. The hub reads the card's
front matter (`base_model:`) to draw its model tree, so that list names hub models only,
never a target of this Mergefile, and never a local folder (which the hub cannot link to:
local folders are named in the card's body instead).

The built card is part of the target's key, so it holds only what identifies the sources
(hub IDs, commits, folders, licenses) and the target's own recipe: a pin moved to another
commit changes the key of every target downstream of that model and of no other, while an
upstream recipe change that leaves the upstream bytes as they were leaves this card as it
was (early cutoff). The ancestors' recipes, which would break that, are added to the card
only when it is pushed (`pushed_card`), from a plan in which every ancestor is up to date.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from mbuild import io, keys
from mbuild.errors import ModelError
from mbuild.nodes import HUB, LORA, Node
from mbuild.plan.companions import recipe_text
from mbuild.plan.tasks import Source, TargetPlan

# What every card's front matter holds at least; a kind's own card may say more (GGUF, PEFT).
DEFAULT_FRONT_MATTER = {"library_name": "transformers", "tags": ["merge", "mbuild"]}
# A model card's front matter is read for its license only: a few KiB are plenty.
CARD_READ_LIMIT = 1024 * 1024


@dataclass
class Lineage:
    """What a target descends from, in the order first met walking its inputs depth first."""

    hub: dict[str, str | None] = field(default_factory=dict)  # hub node -> the commit it resolved to
    local: list[str] = field(default_factory=list)  # local folders, as their nodes name them
    ancestors: list[str] = field(default_factory=list)  # targets upstream, each after its own inputs
    licenses: list[str | None] = field(default_factory=list)  # each source's declared license (None: unknown)

    @property
    def base_models(self) -> list[str]:
        """The hub IDs, each once (a model at two revisions is one base model)."""
        return list(dict.fromkeys(hub_repo(node) for node in self.hub))

    @property
    def license(self) -> str | None:
        """The license every source declares, or None when one is unknown or two differ."""
        found = set(self.licenses)
        return self.licenses[0] if len(found) == 1 and None not in found else None


def hub_repo(node: str) -> str:
    """The hub ID of a hub node (``hub:org/name@rev`` -> ``org/name``)."""
    return Node(node).label.split("@", 1)[0]


def lineage_of(target_plan: TargetPlan, plans: Mapping[str, TargetPlan], sources: Mapping[str, Source]) -> Lineage:
    """Walk a target's inputs, through every upstream target, down to its sources."""
    found = Lineage()
    seen: set[str] = set()

    def visit(nodes) -> None:
        for node in map(Node, nodes):
            if node in seen:
                continue
            seen.add(node)
            if node.is_target:
                visit(plans[node.label].input_nodes)
                found.ancestors.append(node.label)
            elif node.kind == LORA:
                # 'BASE+ADAPTER': each side a hub or local node; its revision 'BASE_COMMIT+ADAPTER_COMMIT'.
                source = sources.get(node)
                commits = (source.revision or "+").split("+") if source else ["", ""]
                for side, commit in zip(node.label.split("+"), commits):
                    add_source(Node(side), commit or None, None)
            else:
                source = sources.get(node)
                add_source(node, source.revision if source else None, source)

    def add_source(node: Node, commit: str | None, source: Source | None) -> None:
        if node.kind == HUB:
            found.hub.setdefault(node, commit)
        elif node not in found.local:
            found.local.append(node)
        # A LoRA's side has no folder of its own here: its license stays unknown.
        found.licenses.append(declared_license(source.info.folder) if source and source.info.folder else None)

    visit(target_plan.input_nodes)
    return found


def declared_license(folder) -> str | None:
    """The license a model folder's README.md front matter declares, if it has one."""
    try:
        text = io.read_small_file(Path(folder) / "README.md", CARD_READ_LIMIT).decode("utf-8")
    except (ModelError, OSError, UnicodeDecodeError):
        return None
    front = front_matter(text)[0]
    value = front.get("license")
    return value if isinstance(value, str) and value.strip() else None


def front_matter(card: str) -> tuple[dict[str, Any], str]:
    """A card's YAML front matter (empty when it has none or it does not parse) and the text after it."""
    if not card.startswith("---\n"):
        return {}, card
    end = card.find("\n---\n", 3)
    if end < 0:
        return {}, card
    try:
        data = yaml.safe_load(card[4:end])
    except (yaml.YAMLError, RecursionError):  # a card's front matter is only ever informative
        return {}, card
    return (data if isinstance(data, dict) else {}), card[end + 5 :]


def with_lineage(target_plan: TargetPlan, plans: Mapping[str, TargetPlan], sources: Mapping[str, Source]) -> TargetPlan:
    """The target's plan with its card carrying its lineage (and its key made over that card)."""
    lineage = lineage_of(target_plan, plans, sources)
    card = lineage_card(target_plan.card, lineage)
    key = target_plan.key
    if key is not None:
        key = keys.target_key({t.name: t.key for t in target_plan.tasks}, target_plan.config, target_plan.file_digests, card)
    return dataclasses.replace(target_plan, card=card, key=key)


def lineage_card(card: str, lineage: Lineage) -> str:
    """A kind's card with `base_model`, `license` and the default keys in its front matter and
    the lineage (hub commits, local folders) after its body."""
    own, body = front_matter(card)
    front: dict[str, Any] = {"base_model": lineage.base_models}
    for name, default in DEFAULT_FRONT_MATTER.items():
        front[name] = own.get(name, default)
    if lineage.license is not None:
        front["license"] = lineage.license
    front.update({k: v for k, v in own.items() if k not in front})
    text = "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n" + body.rstrip("\n") + "\n"
    return text + "\n" + lineage_body(lineage)


def lineage_body(lineage: Lineage) -> str:
    """The card's section on where the target comes from."""
    lines = ["## Lineage", ""]
    if lineage.hub:
        lines.append("Hub models, at the commits they were built from:")
        lines.append("")
        lines += [f"- `{Node(node).label}` at commit `{commit or 'unresolved'}`" for node, commit in lineage.hub.items()]
        lines.append("")
    if lineage.local:
        lines.append("Local folders (not on the hub, so not in `base_model`):")
        lines.append("")
        lines += [f"- `{Node(node).label}`" for node in lineage.local]
        lines.append("")
    return "\n".join(lines)


def pushed_card(plan, name: str) -> str:
    """The card a push uploads: the built card, then the recipe of every target upstream."""
    target_plan = plan.targets[name]
    ancestors = lineage_of(target_plan, plan.targets, plan.sources).ancestors
    lines = [target_plan.card.rstrip("\n"), ""]
    if ancestors:
        lines += ["## Ancestors", "", "The targets this one is built from, each after its own inputs:", ""]
    for ancestor in ancestors:
        lines += [f"### `{ancestor}`", "", f"```yaml\n{recipe_text(plan.targets[ancestor].target)}\n```", ""]
    return "\n".join(lines)

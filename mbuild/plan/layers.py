"""Where a tensor sits in a decoder: its layer stack, and what comes before and after it.

Every kind that maps input tensors to output tensors by layer (merges, slices, MoE) reads a
model's tensor names through these few patterns, so they agree on what a layer is.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from mbuild import io

# A decoder layer's tensors: "<prefix><index>.<suffix>", e.g. model.layers.3.mlp.up_proj.weight.
LAYER_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks)\.)(?P<index>\d+)\.(?P<suffix>.+)$")
# Non-layer tensors that sit before the layer stack (the rest come after it).
PRE_LAYER = re.compile(r"(embed|wte|wpe|word_embeddings)")
# A causal LM's output head; a tied model (`tie_word_embeddings`) stores none and reads its
# input embedding in its place.
OUTPUT_HEAD = "lm_head.weight"


def layer_table(info: io.ModelInfo) -> tuple[dict[int, dict[str, str]], list[str]]:
    """Split a model's tensor names into {layer: {suffix: name}} and non-layer names."""
    layers: dict[int, dict[str, str]] = {}
    others = []
    for name in info.tensors:
        match = LAYER_NAME.match(name)
        if match:
            layers.setdefault(int(match["index"]), {})[match["suffix"]] = name
        else:
            others.append(name)
    return layers, others


def stack_table(info: io.ModelInfo) -> tuple[dict[str, dict[int, dict[str, str]]], list[str]]:
    """Split a model's tensor names into {stack prefix: {layer: {suffix: name}}} and non-layer names.

    A stack is every layer under one prefix (`model.layers.`, `model.vision_tower.encoder.layers.`,
    `model.decoder.layers.`): a vision layer and a text layer with the same suffix stay apart.
    """
    stacks: dict[str, dict[int, dict[str, str]]] = {}
    others = []
    for name in info.tensors:
        match = LAYER_NAME.match(name)
        if match:
            stacks.setdefault(match["prefix"], {}).setdefault(int(match["index"]), {})[match["suffix"]] = name
        else:
            others.append(name)
    return stacks, others


def stack_length(layers: Mapping[int, Mapping[str, str]]) -> int:
    """How many layers a stack has, from its tensors."""
    return max(layers) + 1 if layers else 0


def text_stack(stacks: Mapping[str, Mapping[int, Mapping[str, str]]], config: Mapping[str, Any]) -> str | None:
    """The prefix of a model's text (language) stack, or None when that is ambiguous.

    The only stack; else the one under a `language_model`; else the one whose layer count is
    the config's text layer count.
    """
    if len(stacks) <= 1:
        return next(iter(stacks), None)
    language = [prefix for prefix in stacks if "language_model." in prefix]
    if len(language) == 1:
        return language[0]
    count = io.layer_count(config)
    counted = [prefix for prefix, layers in stacks.items() if stack_length(layers) == count]
    return counted[0] if len(counted) == 1 else None


def stack_of(name: str, prefixes: Iterable[str]) -> str | None:
    """The stack a non-layer tensor belongs to: the prefix sharing most leading name parts with it.

    `vision_tower.post_layernorm.weight` belongs to `vision_tower.encoder.layers.`; a name that
    shares no leading part with any stack, or as many with two (`lm_head.weight`,
    `multi_modal_projector.*`), belongs to none.
    """
    parts = name.split(".")
    best, best_shared, tied = None, 0, False
    for prefix in prefixes:
        shared = 0
        for mine, theirs in zip(parts, prefix.split(".")):
            if mine != theirs:
                break
            shared += 1
        if shared > best_shared:
            best, best_shared, tied = prefix, shared, False
        elif shared == best_shared and shared > 0:
            tied = True
    return None if tied else best


def embedding_name(info: io.ModelInfo) -> str | None:
    """The name of a model's input embedding, if it has one."""
    for name in info.tensors:
        if PRE_LAYER.search(name) and name.endswith("weight") and "position" not in name:
            return name
    return None


def goes_first(name: str, stacks, text_prefix: str | None) -> bool:
    """Whether a non-layer tensor comes from the first slice (else from the last).

    The text stack's own tensors sit before it (embeddings) or after it (norm, head); every
    other stack's tensors, and glue such as a vision projector, go with those stacks, which a
    frankenmerge takes from its first slice.
    """
    if len(stacks) <= 1 or text_prefix is None:
        return bool(PRE_LAYER.search(name))
    if name.endswith(OUTPUT_HEAD):
        return False
    if stack_of(name, stacks) == text_prefix:
        return bool(PRE_LAYER.search(name))
    return True

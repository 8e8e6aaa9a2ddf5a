"""Where a tensor sits in a decoder: its layer stack, and what comes before and after it.

Every kind that maps input tensors to output tensors by layer (merges, slices, MoE) reads a
model's tensor names through these few patterns, so they agree on what a layer is.
"""

from __future__ import annotations

import re

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


def embedding_name(info: io.ModelInfo) -> str | None:
    """The name of a model's input embedding, if it has one."""
    for name in info.tensors:
        if PRE_LAYER.search(name) and name.endswith("weight") and "position" not in name:
            return name
    return None

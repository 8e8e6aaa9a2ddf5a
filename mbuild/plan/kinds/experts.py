"""Per-expert MoE checkpoints: which expert tensors a merge fuses before merging.

mergekit joins the per-expert tensors of a layer the way transformers 5 holds them in memory
(`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]) and merges each
joined tensor once, so statistics such as TIES's top-k or SLERP's angle are taken over all
experts together. `expert_tensors: fused` (the default) does the same; `separate` merges each
expert tensor on its own.
"""

from __future__ import annotations

import re
from typing import Sequence

from mbuild.mergefile import ModelRef, Target
from mbuild.plan.tasks import node_of


# Per-expert MoE checkpoints whose experts mergekit fuses before merging (transformers 5's
# conversion mapping for the model type): fused suffix -> the per-expert suffixes, in order.
FUSED_EXPERTS = {
    **{
        model_type: {
            "mlp.experts.gate_up_proj": ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"),
            "mlp.experts.down_proj": ("mlp.experts.{e}.down_proj.weight",),
        }
        for model_type in ("qwen2_moe", "qwen3_moe", "deepseek_v3", "glm4_moe")
    },
    "mixtral": {
        "mlp.experts.gate_up_proj": ("block_sparse_moe.experts.{e}.w1.weight", "block_sparse_moe.experts.{e}.w3.weight"),
        "mlp.experts.down_proj": ("block_sparse_moe.experts.{e}.w2.weight",),
    },
}
# The layer's other tensors renamed with the fusing, as transformers 5 (and so mergekit) names them.
FUSED_RENAMES = {"mixtral": ("block_sparse_moe.", "mlp.")}


def fused_experts(target: Target, refs: Sequence[ModelRef], infos, in_layers) -> dict[str, tuple[tuple[int, int], list[str]]]:
    """The fused expert tensors of one layer: fused suffix -> ((experts, parts), per-expert suffixes).

    Only where the target fuses (`expert_tensors: fused`, the default), every model is of one
    model type that transformers fuses, and every model has every part of experts 0..n-1.
    """
    if target.expert_tensors != "fused":
        return {}
    model_types = {infos[node_of(ref)].config.get("model_type") for ref in refs}
    if len(model_types) != 1 or next(iter(model_types)) not in FUSED_EXPERTS:
        return {}
    fused = {}
    for fused_suffix, templates in FUSED_EXPERTS[next(iter(model_types))].items():
        experts = 0
        while all(template.format(e=experts) in in_layers[0] for template in templates):
            experts += 1
        part_suffixes = [template.format(e=e) for e in range(experts) for template in templates]
        # Every model has exactly these experts' parts: none missing, none past the count.
        pattern = re.compile("|".join(re.escape(t).replace(re.escape("{e}"), r"\d+") for t in templates))
        if experts and all(
            sorted(s for s in in_layer if pattern.fullmatch(s)) == sorted(part_suffixes) for in_layer in in_layers
        ):
            fused[fused_suffix] = ((experts, len(templates)), part_suffixes)
    return fused

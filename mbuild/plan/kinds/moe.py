"""The MoE kind: dense experts (sources or other targets) into a Mixtral mixture of experts.

Planning only, without torch: attention, embeddings and norms come from the base model; each
layer's expert MLPs are stacked from the experts' dense MLPs into the fused tensors
transformers' Mixtral reads (``mlp.experts.gate_up_proj`` [E, 2I, H] and
``mlp.experts.down_proj`` [E, H, I]) by ``concat`` tasks; each layer's router
(``mlp.gate.weight`` [E, H]) is a ``moe_gate`` task, computed from the experts' prompts as
mergekit-moe does. Running those operations is `mbuild.moe`'s part.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from mbuild import io, keys
from mbuild.errors import MergefileError
from mbuild.mergefile import Target
from mbuild.plan.companions import companion_files_for, finish_target_plan
from mbuild.plan.kinds.registry import TargetKind, register
from mbuild.plan.layers import PRE_LAYER, embedding_name, layer_table
from mbuild.plan.tasks import OutputLookup, TargetPlan, TensorInput, TensorTask, input_key, node_of

MOE_VERSION = 1
PAPER = "https://arxiv.org/abs/2401.04088"
SUPPORTED_TYPES = ("llama", "mistral")
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def expand(
    target: Target,
    infos: Mapping[str, io.ModelInfo],
    plans: Mapping[str, TargetPlan],
    source_digests,
    shard_bytes: int,
    output_digest: OutputLookup,
    store: Path,
    *,
    platform: str,
) -> TargetPlan:
    """Expand an MoE target into tensor tasks, checking every expert against the base."""
    spec = target.moe
    base_node = node_of(target.base_model)
    base = infos[base_node]

    def error(path: tuple, message: str) -> MergefileError:
        return MergefileError(message, target.location(*path))

    model_type = base.config.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise error(("base_model",), f"MoE output is Mixtral, built from Llama or Mistral models; '{target.base_model}' is {model_type}")
    base_layers, base_others = layer_table(base)
    layer_count = base.num_layers or len(base_layers)
    for expert in spec.experts:
        info = infos[node_of(expert.model)]
        if info.config.get("model_type") not in SUPPORTED_TYPES:
            raise error(expert.path + ("source_model",), f"expert '{expert.model}' is {info.config.get('model_type')}, not Llama or Mistral")
        if (info.num_layers or 0) != layer_count:
            raise error(expert.path + ("source_model",), f"expert '{expert.model}' has {info.num_layers} layers, the base has {layer_count}")
        for layer in range(layer_count):
            for projection in PROJECTIONS:
                name = f"model.layers.{layer}.mlp.{projection}.weight"
                mine, theirs = info.tensors.get(name), base.tensors.get(name)
                if mine is None:
                    raise error(expert.path + ("source_model",), f"expert '{expert.model}' has no tensor '{name}'")
                if theirs is not None and mine.shape != theirs.shape:
                    raise error(
                        expert.path + ("source_model",),
                        f"shape mismatch for tensor '{name}': base '{target.base_model}' {list(theirs.shape)}, "
                        f"expert '{expert.model}' {list(mine.shape)}",
                    )
    out_dtype = target.dtype or _config_dtype(base.config) or base.tensors[next(iter(base.tensors))].dtype

    def input_of(node: str, info: io.TensorInfo) -> TensorInput:
        return TensorInput(node, info.name, input_key(node, info, plans, source_digests, output_digest))

    tasks: list[TensorTask] = []

    def add(name, shape, method, params, inputs, seed=None, model_params=()):
        input_keys = [i.key for i in inputs]
        key = None
        if all(k is not None for k in input_keys):
            key = keys.task_key(
                method=method, version=MOE_VERSION, params=dict(params), model_params=[dict(p) for p in model_params],
                base_index=None, compute_dtype="float32", out_dtype=out_dtype, shape=shape, seed=seed, input_keys=input_keys,
                platform=platform,
            )
        tasks.append(TensorTask(name, tuple(shape), out_dtype, "float32", method, tuple(params),
                                     tuple(model_params), None, seed, tuple(inputs), key))

    for name in sorted(n for n in base_others if PRE_LAYER.search(n)):
        add(name, base.tensors[name].shape, "passthrough", (), [input_of(base_node, base.tensors[name])], model_params=((("scale", None),),))
    expert_nodes = [node_of(e.model) for e in spec.experts]
    embed_name = embedding_name(base)
    gate_inputs = []
    if spec.gate_mode == "cheap_embed":
        gate_inputs = [input_of(base_node, base.tensors[embed_name])]
    elif spec.gate_mode.startswith("hidden"):
        gate_inputs = [input_of(base_node, info) for info in base.tensors.values()]
    prompts = [[list(e.positive_prompts), list(e.negative_prompts)] for e in spec.experts]
    hidden = _hidden_size(base)
    for layer in range(layer_count):
        prefix = f"model.layers.{layer}."
        for suffix in sorted(base_layers.get(layer, {})):
            if suffix.startswith("mlp."):
                continue
            info = base.tensors[base_layers[layer][suffix]]
            add(info.name, info.shape, "passthrough", (), [input_of(base_node, info)], model_params=((("scale", None),),))
        gate_params = (("mode", spec.gate_mode), ("layer", layer), ("layers", layer_count), ("prompts", prompts))
        add(prefix + "mlp.gate.weight", (len(spec.experts), hidden), "moe_gate", gate_params, gate_inputs,
            seed=target.seed if "random" in spec.gate_mode else None)
        gate_up_inputs, down_inputs = [], []
        for expert, node in zip(spec.experts, expert_nodes):
            info = infos[node]
            gate_up_inputs += [input_of(node, info.tensors[f"{prefix}mlp.gate_proj.weight"]),
                               input_of(node, info.tensors[f"{prefix}mlp.up_proj.weight"])]
            down_inputs.append(input_of(node, info.tensors[f"{prefix}mlp.down_proj.weight"]))
        intermediate, _ = infos[expert_nodes[0]].tensors[f"{prefix}mlp.gate_proj.weight"].shape
        add(prefix + "mlp.experts.gate_up_proj", (len(spec.experts), 2 * intermediate, hidden), "concat",
            (("scales", [None] * len(gate_up_inputs)),), gate_up_inputs)
        add(prefix + "mlp.experts.down_proj", (len(spec.experts), hidden, intermediate), "concat",
            (("scales", [e.residual_scale for e in spec.experts]),), down_inputs)
    for name in sorted(n for n in base_others if not PRE_LAYER.search(n)):
        add(name, base.tensors[name].shape, "passthrough", (), [input_of(base_node, base.tensors[name])], model_params=((("scale", None),),))

    config = mixtral_config(base.config, len(spec.experts), spec.experts_per_token, out_dtype)
    files = companion_files_for(target, base_node, infos, plans)
    return finish_target_plan(target, method_of(target), tasks, config, files, layer_count, shard_bytes)


def _config_dtype(config: Mapping[str, Any]) -> str | None:
    value = config.get("dtype") or config.get("torch_dtype")
    return value if value in io.FLOAT_DTYPES else None


def _hidden_size(info: io.ModelInfo) -> int:
    if isinstance(info.config.get("hidden_size"), int):
        return info.config["hidden_size"]
    return info.tensors[embedding_name(info)].shape[1]


def mixtral_config(base: Mapping[str, Any], experts: int, per_token: int, dtype: str) -> dict[str, Any]:
    """The base's config turned into a Mixtral one, the way mergekit-moe does."""
    config = {k: v for k, v in base.items() if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
    config.update(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        num_local_experts=experts,
        num_experts_per_tok=per_token,
        sliding_window=None,
        output_router_logits=False,
        router_aux_loss_coef=base.get("router_aux_loss_coef", 0.001),
        router_jitter_noise=0.0,
        dtype=dtype,
    )
    return config


def method_of(target: Target) -> tuple[str, int, str]:
    """(name, implementation version, paper) of what an MoE target runs."""
    return "moe", MOE_VERSION, PAPER


MOE = register(TargetKind("moe", matches=lambda target: target.moe is not None, method=method_of, expand=expand))

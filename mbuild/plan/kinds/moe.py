"""The MoE kind: dense experts (sources or other targets) into a mixture of experts.

The output architecture is chosen as mergekit-moe chooses it (`choose_output`): Mixtral from
Llama or Mistral experts, Qwen2-MoE from Qwen2 experts with one shared expert, Qwen3-MoE from
Qwen3 experts. Planning only, without torch: attention, embeddings and norms come from the
base model; each layer's expert MLPs are laid out as mergekit-moe writes them: stacked into
the fused tensors transformers' Mixtral and Qwen3-MoE read (``mlp.experts.gate_up_proj``
[E, 2I, H] and ``mlp.experts.down_proj`` [E, H, I]) by ``concat`` tasks, or, for Qwen2-MoE,
one tensor per expert (``mlp.experts.{e}.gate_proj.weight`` ..., which transformers fuses on
load) beside the shared expert's (``mlp.shared_expert.*``). Each layer's router
(``mlp.gate.weight`` [E, H], and Qwen2-MoE's ``mlp.shared_expert_gate.weight`` [1, H]) is a
``moe_gate`` task, computed from the experts' prompts as mergekit-moe does. Running those
operations is `mbuild.moe`'s part.
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

MOE_VERSION = 2  # 2: hidden-state routers in bfloat16, as mergekit-moe computes them
PAPER = "https://arxiv.org/abs/2401.04088"
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
MIXTRAL, DEEPSEEK, QWEN2_MOE, QWEN3_MOE = "Mixtral", "DeepSeek MoE", "Qwen MoE", "Qwen3 MoE"
# mergekit-moe's output architectures in the order it prefers them (Mixtral first), each with
# the model types it takes, and the model types mbuild builds it from.
OUTPUT_INPUT_TYPES = {
    MIXTRAL: ("llama", "mistral"),
    DEEPSEEK: ("llama", "mistral"),
    QWEN2_MOE: ("llama", "mistral", "qwen2"),
    QWEN3_MOE: ("qwen3",),
}
BUILT_FROM = {MIXTRAL: ("llama", "mistral"), QWEN2_MOE: ("qwen2",), QWEN3_MOE: ("qwen3",)}
TYPE_NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def _named(model_types) -> str:
    return " or ".join(TYPE_NAMES.get(t, t) for t in model_types)


def choose_output(spec, model_types: list[str]) -> str:
    """The output architecture mergekit-moe would pick for this recipe; ValueError says why none."""
    candidates = [n for n in OUTPUT_INPUT_TYPES if not spec.architecture or n.lower().startswith(spec.architecture.lower())]
    reasons = {name: _unfit(name, spec, model_types) for name in candidates}
    fitting = [name for name, reason in reasons.items() if reason is None]
    if not fitting:
        raise ValueError("no MoE output architecture fits: " + "; ".join(f"{n} {r}" for n, r in reasons.items()))
    chosen = MIXTRAL if MIXTRAL in fitting else fitting[0]
    if chosen not in BUILT_FROM or model_types[0] not in BUILT_FROM[chosen]:
        raise ValueError(
            f"mergekit-moe would build a {chosen} from {model_types[0]} models here, which mbuild does not build; "
            + "it builds " + ", ".join(f"{n} from {_named(t)}" for n, t in BUILT_FROM.items())
        )
    return chosen


def _unfit(name: str, spec, model_types: list[str]) -> str | None:
    """Why an output architecture does not take this recipe (mergekit-moe's rules), or None."""
    shared = spec.shared_experts
    if name in (MIXTRAL, QWEN3_MOE) and shared:
        return "takes no shared experts"
    if name == DEEPSEEK and (len(shared) > 1 or any(e.positive_prompts or e.negative_prompts for e in shared)):
        return "takes at most one shared expert, without prompts"
    if name == QWEN2_MOE and len(shared) != 1:
        return "needs exactly one shared expert"
    if name == QWEN2_MOE and spec.gate_mode != "random" and not shared[0].positive_prompts:
        return "needs prompts for its shared expert"
    if len(set(model_types)) != 1:
        return f"needs every model of one architecture, not {', '.join(sorted(set(model_types)))}"
    if model_types[0] not in OUTPUT_INPUT_TYPES[name]:
        return f"needs {_named(OUTPUT_INPUT_TYPES[name])} models, not {model_types[0]}"
    return None


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

    every_expert = spec.experts + spec.shared_experts
    model_types = [str(infos[node_of(m)].config.get("model_type")) for m in [target.base_model] + [e.model for e in every_expert]]
    try:
        output = choose_output(spec, model_types)
    except ValueError as refusal:
        raise error(("architecture",) if spec.architecture else ("base_model",), str(refusal)) from None
    base_layers, base_others = layer_table(base)
    layer_count = base.num_layers or len(base_layers)
    for expert in every_expert:
        info = infos[node_of(expert.model)]
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
    # mergekit-moe gives the shared experts router rows after the experts' when they have
    # prompts or the gates are random: the rows are computed together, so they differ with it.
    gated_shared = [e for e in spec.shared_experts if e.positive_prompts or spec.gate_mode in ("random", "uniform_random")]
    prompts = [[list(e.positive_prompts), list(e.negative_prompts)] for e in spec.experts + tuple(gated_shared)]
    experts = len(spec.experts)
    hidden = _hidden_size(base)
    for layer in range(layer_count):
        prefix = f"model.layers.{layer}."
        for suffix in sorted(base_layers.get(layer, {})):
            if suffix.startswith("mlp."):
                continue
            info = base.tensors[base_layers[layer][suffix]]
            add(info.name, info.shape, "passthrough", (), [input_of(base_node, info)], model_params=((("scale", None),),))
        gate_params = (("mode", spec.gate_mode), ("layer", layer), ("layers", layer_count), ("prompts", prompts))
        seed = target.seed if "random" in spec.gate_mode else None
        if gated_shared:
            add(prefix + "mlp.gate.weight", (experts, hidden), "moe_gate", gate_params + (("rows", [0, experts]),),
                gate_inputs, seed=seed)
            add(prefix + "mlp.shared_expert_gate.weight", (1, hidden), "moe_gate",
                gate_params + (("rows", [experts, experts + 1]),), gate_inputs, seed=seed)
        else:
            add(prefix + "mlp.gate.weight", (experts, hidden), "moe_gate", gate_params, gate_inputs, seed=seed)
        if output == QWEN2_MOE:
            # One tensor per expert, as mergekit-moe writes Qwen2-MoE; transformers fuses them on load.
            named = [(f"experts.{index}.", expert) for index, expert in enumerate(spec.experts)]
            for part, expert in named + [("shared_expert.", e) for e in spec.shared_experts]:
                info = infos[node_of(expert.model)]
                for projection in PROJECTIONS:
                    source = info.tensors[f"{prefix}mlp.{projection}.weight"]
                    scale = expert.residual_scale if projection == "down_proj" else None
                    add(f"{prefix}mlp.{part}{projection}.weight", source.shape, "passthrough", (),
                        [input_of(node_of(expert.model), source)], model_params=((("scale", scale),),))
            continue
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

    config = OUTPUT_CONFIGS[output](base.config, len(spec.experts), spec.experts_per_token, out_dtype)
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


def qwen2_moe_config(base: Mapping[str, Any], experts: int, per_token: int, dtype: str) -> dict[str, Any]:
    """The base's (Qwen2) config turned into a Qwen2-MoE one, the way mergekit-moe does."""
    config = {k: v for k, v in base.items() if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
    config.update(
        architectures=["Qwen2MoeForCausalLM"],
        model_type="qwen2_moe",
        num_experts=experts,
        num_experts_per_tok=per_token,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        sliding_window=None,
        use_sliding_window=False,
        shared_expert_intermediate_size=base["intermediate_size"],
        moe_intermediate_size=base["intermediate_size"],
        qkv_bias=base.get("qkv_bias", True),
        output_router_logits=False,
        router_aux_loss_coef=base.get("router_aux_loss_coef", 0.001),
        dtype=dtype,
    )
    return config


def qwen3_moe_config(base: Mapping[str, Any], experts: int, per_token: int, dtype: str) -> dict[str, Any]:
    """The base's (Qwen3) config turned into a Qwen3-MoE one, the way mergekit-moe does."""
    config = {k: v for k, v in base.items() if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
    config.update(
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        num_local_experts=experts,
        num_experts_per_tok=per_token,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        moe_intermediate_size=base["intermediate_size"],
        output_router_logits=False,
        router_aux_loss_coef=base.get("router_aux_loss_coef", 0.001),
        dtype=dtype,
    )
    return config


OUTPUT_CONFIGS = {MIXTRAL: mixtral_config, QWEN2_MOE: qwen2_moe_config, QWEN3_MOE: qwen3_moe_config}


def method_of(target: Target) -> tuple[str, int, str]:
    """(name, implementation version, paper) of what an MoE target runs."""
    return "moe", MOE_VERSION, PAPER


MOE = register(TargetKind("moe", matches=lambda target: target.moe is not None, method=method_of, expand=expand))

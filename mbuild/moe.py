"""Mixture-of-experts targets: dense experts (sources or other targets) into a Mixtral MoE.

Planning (no torch): attention, embeddings and norms come from the base model; each
layer's expert MLPs are stacked from the experts' dense MLPs into the fused tensors
transformers' Mixtral reads (``mlp.experts.gate_up_proj`` [E, 2I, H] and
``mlp.experts.down_proj`` [E, H, I]); each layer's router (``mlp.gate.weight``
[E, H]) comes from the experts' prompts as mergekit-moe computes it.

Execution (torch, imported inside functions): fused expert tensors are streamed one
expert at a time straight into the output, never held whole; router rows are
computed once per target and cached per layer like any tensor.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Mapping

from mbuild import io, keys, plan
from mbuild.errors import MergefileError
from mbuild.mergefile import Target

MOE_VERSION = 1
SUPPORTED_TYPES = ("llama", "mistral")
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def expand(
    target: Target,
    infos: Mapping[str, io.ModelInfo],
    plans: Mapping[str, "plan.TargetPlan"],
    source_digests,
    shard_bytes: int,
    output_digest,
    *,
    platform: str,
) -> "plan.TargetPlan":
    """Expand an MoE target into tensor tasks, checking every expert against the base."""
    spec = target.moe
    base_node = plan.node_of(target.base_model)
    base = infos[base_node]

    def error(path: tuple, message: str) -> MergefileError:
        return MergefileError(message, target.location(*path))

    model_type = base.config.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise error(("base_model",), f"MoE output is Mixtral, built from Llama or Mistral models; '{target.base_model}' is {model_type}")
    base_layers, base_others = plan.layer_table(base)
    layer_count = base.num_layers or len(base_layers)
    for expert in spec.experts:
        info = infos[plan.node_of(expert.model)]
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

    def input_of(node: str, info: io.TensorInfo) -> plan.TensorInput:
        return plan.TensorInput(node, info.name, plan.input_key(node, info, plans, source_digests, output_digest))

    tasks: list[plan.TensorTask] = []

    def add(name, shape, method, params, inputs, seed=None, model_params=()):
        input_keys = [i.key for i in inputs]
        key = None
        if all(k is not None for k in input_keys):
            key = keys.task_key(
                method=method, version=MOE_VERSION, params=dict(params), model_params=[dict(p) for p in model_params],
                base_index=None, compute_dtype="float32", out_dtype=out_dtype, shape=shape, seed=seed, input_keys=input_keys,
                platform=platform,
            )
        tasks.append(plan.TensorTask(name, tuple(shape), out_dtype, "float32", method, tuple(params),
                                     tuple(model_params), None, seed, tuple(inputs), key))

    for name in sorted(n for n in base_others if plan.PRE_LAYER.search(n)):
        add(name, base.tensors[name].shape, "passthrough", (), [input_of(base_node, base.tensors[name])], model_params=((("scale", None),),))
    expert_nodes = [plan.node_of(e.model) for e in spec.experts]
    embed_name = plan.embedding_name(base)
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
    for name in sorted(n for n in base_others if not plan.PRE_LAYER.search(n)):
        add(name, base.tensors[name].shape, "passthrough", (), [input_of(base_node, base.tensors[name])], model_params=((("scale", None),),))

    config = mixtral_config(base.config, len(spec.experts), spec.experts_per_token, out_dtype)
    files = plan.companion_files_for(target, base_node, infos, plans)
    return plan.finish_target_plan(target, tasks, config, files, layer_count, shard_bytes)


def _config_dtype(config: Mapping[str, Any]) -> str | None:
    value = config.get("dtype") or config.get("torch_dtype")
    return value if value in io.FLOAT_DTYPES else None


def _hidden_size(info: io.ModelInfo) -> int:
    if isinstance(info.config.get("hidden_size"), int):
        return info.config["hidden_size"]
    return info.tensors[plan.embedding_name(info)].shape[1]


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


@dataclass
class GateContext:
    """What computing router rows needs beyond the task: the device, a memo and its lock."""

    device: Any
    memo: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        # transformers resolves its names lazily, which is not thread-safe: do it here,
        # on the thread that builds, before worker threads need them.
        import transformers

        transformers.AutoTokenizer, transformers.AutoModelForCausalLM  # noqa: B018


def compute_gate(task, models: Mapping[str, io.ModelInfo], reader: io.TensorReader, context: GateContext, base_folder):
    """One layer's router rows [experts, hidden] in float32, from the experts' prompts."""
    import torch

    params = dict(task.params)
    mode, layer, layers, prompts = params["mode"], params["layer"], params["layers"], params["prompts"]
    experts = len(prompts)
    hidden = task.shape[1]
    memo_key = (mode, keys.digest([params["prompts"], [i.key for i in task.inputs], task.seed, layers, hidden]))
    with context.lock:  # every layer's task needs the same vectors: compute them once
        return _vectors(context, memo_key, mode, prompts, task, models, reader, layers, experts, hidden, base_folder)[layer]


def _vectors(context, memo_key, mode, prompts, task, models, reader, layers, experts, hidden, base_folder):
    import torch

    vectors = context.memo.get(memo_key)
    if vectors is None:
        if mode == "random":
            generator = torch.Generator("cpu").manual_seed(task.seed)
            vectors = torch.randn((layers, experts, hidden), generator=generator)
        elif mode == "uniform_random":
            generator = torch.Generator("cpu").manual_seed(task.seed)
            scale = (1.0 / hidden) ** 0.5
            vectors = torch.rand((layers, experts, hidden), generator=generator) * 2 * scale - scale
        else:
            vectors = _prompt_vectors(mode, prompts, task, models, reader, layers, base_folder, context.device)
        context.memo[memo_key] = vectors
    return vectors


def _prompt_vectors(mode, prompts, task, models, reader, layers, base_folder, device):
    """mergekit-moe's gate vectors: per expert, positive minus negative prompt features, unit norm."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(base_folder)
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    def tokenize(texts):
        return tokenizer([(tokenizer.bos_token or "") + text for text in texts], return_tensors="pt",
                         padding=True, add_special_tokens=False)

    if mode == "cheap_embed":
        item = task.inputs[0]
        embed = reader.read(models[item.node].tensors[item.name])
        vocab = embed.shape[0]

        def features(batch):
            onehot = torch.nn.functional.one_hot(batch["input_ids"], num_classes=vocab)
            h = onehot.float() @ embed.float()
            summed = (h * batch["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
            return (summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(layers, 1)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.bfloat16).to(device)
        model.eval()

        def features(batch):
            with torch.no_grad():
                output = model(**batch.to(device), output_hidden_states=True, return_dict=True)
            states = torch.stack(output.hidden_states[:-1])
            states = states.sum(dim=2) / states.shape[2] if mode == "hidden_avg" else states[:, :, -1, :]
            return (states.sum(dim=1) / states.shape[1]).float().cpu()

    rows = []
    for positive, negative in prompts:
        vector = features(tokenize(positive))
        if negative:
            vector = vector - features(tokenize(negative))
        vector = vector / vector.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        rows.append(vector)
    return torch.stack(rows, dim=0).permute(1, 0, 2)


def stream_concat(task, models: Mapping[str, io.ModelInfo], reader: io.TensorReader, writer: io.ShardedWriter) -> str:
    """Write a stacked tensor input by input (one expert at a time); returns its digest."""
    import torch

    from mbuild.engine import _raw_bytes

    digest = io.bytes_hasher()
    offset = 0
    scales = dict(task.params)["scales"]
    out_dtype = io.torch_dtype(task.dtype)
    for item, scale in zip(task.inputs, scales):
        tensor = reader.read(models[item.node].tensors[item.name])
        if scale is not None:
            tensor = tensor.float() * scale
        data = _raw_bytes(tensor.to(out_dtype))
        if scale is not None and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"non-finite values in {task.name}")
        writer.write_part(task.name, offset, data)
        digest.update(data)
        offset += len(data)
        del tensor, data
    return writer.finish(task.name, digest.hexdigest())

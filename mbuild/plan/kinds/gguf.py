"""The GGUF kind: one model (a source or a target) written as one .gguf file for llama.cpp.

A `gguf: {model: final, type: q8_0}` target expands into one task per output tensor (the
``gguf`` operation): the input tensor renamed, laid out and encoded as llama.cpp's
`convert_hf_to_gguf.py` writes it, read from the gguf package's own tables: names from
`gguf.get_tensor_name_map`, Llama's (and Mistral's) q/k rows permuted into llama.cpp's rope
layout, 1-D tensors kept in F32, the others in the file's type (a quantized type falls back to
F16 where a row is not a whole number of blocks, as the converter does). A task's bytes are the
encoded blocks, so each is keyed and cached like any tensor, and a change of `type` or of one
input tensor recomputes only what it touches.

The file's metadata (architecture, sizes, rope, tokenizer) is the target's config: the
config's part here, the tokenizer's from its files (`files`: tokenizer.json, tokenizer.model,
their configs, so their digests are in the key) when the file is written
(`mbuild.io.gguf_tokenizer`). The output folder holds the .gguf file and
the model card only; the engine writes it through `mbuild.io.gguf_file.GGUFFileWriter`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from mbuild import io, keys
from mbuild.errors import MergefileError
from mbuild.io import gguf_tokenizer
from mbuild.mergefile import Target
from mbuild.plan.companions import TOKENIZER_FILE, companions_of, finish_target_plan
from mbuild.plan.kinds.registry import TargetKind, register
from mbuild.plan.tasks import OutputLookup, TargetPlan, TensorInput, TensorTask, input_key, node_of

GGUF_VERSION = 1
# How the vocabulary is written (`mbuild.io.gguf_tokenizer`): a new one rewrites the file's header only.
TOKENIZER_VERSION = 2
CONVERTER = "https://github.com/ggml-org/llama.cpp/blob/master/convert_hf_to_gguf.py"
# model_type -> llama.cpp's architecture (Mistral is written as Llama, as the converter does).
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# Architectures whose q/k projections llama.cpp wants permuted for its rope layout.
PERMUTED = ("llama",)
# Tensors the converter leaves out: rope tables transformers recomputes.
SKIPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
LAYER = re.compile(r"\.layers\.(\d+)\.")
FILE_TYPES = {  # the Mergefile's type -> (tensor type name, llama.cpp's file type name)
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
}


def _gguf_package():
    try:
        import gguf
    except ImportError:
        return None
    return gguf


def file_name(target: Target) -> str:
    """The name of the one .gguf file in a GGUF target's output folder."""
    return f"{target.name}.gguf"


def tensor_type(gguf, shape: tuple[int, ...], file_type: str) -> str:
    """The GGML type one tensor is written in: F32 for 1-D, the file's type where it fits, else F16."""
    if len(shape) <= 1:
        return "F32"
    wanted = gguf.GGMLQuantizationType[FILE_TYPES[file_type][0]]
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    if shape[-1] % block:
        return "F16"
    return wanted.name


def encoded_bytes(gguf, shape: tuple[int, ...], type_name: str) -> int:
    """How many bytes a tensor of ``shape`` takes encoded as ``type_name``."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    count = 1
    for n in shape:
        count *= n
    return count // block * size


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
    """Expand a GGUF target into one encoding task per tensor, and the file's metadata."""
    gguf = _gguf_package()
    spec = target.gguf
    if gguf is None:
        raise MergefileError("a gguf target needs the gguf package: pip install 'mbuild[gguf]'", target.location("gguf"))
    node = node_of(spec.model)
    info = infos[node]
    config = dict(info.config)
    model_type = config.get("model_type")
    architecture = ARCHITECTURES.get(str(model_type))
    if architecture is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise MergefileError(
            f"model '{spec.model}' is {model_type!r}: a gguf target writes {known} models", target.location("gguf", "model")
        )
    layers = io.layer_count(config) or 0
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[architecture.upper()], layers)
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads

    def order(name: str):
        match = LAYER.search(name)
        # Embeddings, the layers in turn, then the final norm and the head (llama.cpp's own order).
        if match is not None:
            return (1, int(match[1]), name)
        return (0, 0, name) if "embed" in name else (2, 0 if "norm" in name else 1, name)

    tasks: list[TensorTask] = []
    for hf_name in sorted(info.tensors, key=order):
        if SKIPPED.search(hf_name):
            continue
        tensor = info.tensors[hf_name]
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise MergefileError(
                f"model '{spec.model}' has a tensor llama.cpp's {architecture} does not name ({hf_name}): "
                "mbuild never drops a tensor silently, so it cannot write this model as GGUF",
                target.location("gguf", "model"),
            )
        if tensor.dtype not in io.FLOAT_DTYPES:
            raise MergefileError(f"tensor {hf_name} is {tensor.dtype}: a gguf target converts float tensors", target.location("gguf"))
        kind = tensor_type(gguf, tensor.shape, spec.type)
        permute = None
        if architecture in PERMUTED and re.search(r"\.attn_[qk]\.", name):
            permute = heads if ".attn_q." in name else kv_heads
        params = (("type", kind), ("shape", tuple(tensor.shape)), ("permute", permute))
        nbytes = encoded_bytes(gguf, tensor.shape, kind)
        inputs = (TensorInput(node, hf_name, input_key(node, tensor, plans, source_digests, output_digest)),)
        key = None
        if inputs[0].key is not None:
            key = keys.task_key(
                method="gguf", version=GGUF_VERSION, params=dict(params), model_params=[], base_index=None,
                compute_dtype="float32", out_dtype="uint8", shape=(nbytes,), seed=None,
                input_keys=[inputs[0].key], platform=platform,
            )
        tasks.append(TensorTask(name, (nbytes,), "uint8", "float32", "gguf", params, (), None, None, inputs, key))

    files = {n: p for n, p in companions_of(node, infos, plans).items() if TOKENIZER_FILE.match(n) or n == "tokenizer_config.json"}
    if "tokenizer.json" not in files and "tokenizer.model" not in files:
        raise MergefileError(
            f"model '{spec.model}' has no tokenizer.json or tokenizer.model: a gguf target takes its vocabulary from them",
            target.location("gguf", "model"),
        )
    missing = gguf_tokenizer.missing_packages(files)
    if missing:
        raise MergefileError(
            f"model '{spec.model}' has a sentencepiece tokenizer (tokenizer.model): reading it needs "
            f"{' and '.join(missing)}: pip install 'mbuild[gguf]'",
            target.location("gguf", "model"),
        )
    metadata = {
        "file": file_name(target),
        "architecture": architecture,
        "file_type": FILE_TYPES[spec.type][1],
        "values": model_metadata(gguf, target, architecture, config),
        "tokenizer": tokenizer_metadata(config),
    }
    card = model_card(target, FILE_TYPES[spec.type][0])
    plan = finish_target_plan(target, method_of(target), tasks, metadata, files, layers, shard_bytes, card=card)
    return dataclasses.replace(plan, output_format="gguf")


def model_card(target: Target, type_name: str) -> str:
    """The README.md beside the .gguf file: what it is, from what, and the recipe."""
    recipe = yaml.safe_dump({target.name: dict(target.recipe)}, sort_keys=False).rstrip()
    model = target.gguf.model
    return (
        "---\nlibrary_name: gguf\ntags:\n- mbuild\n- gguf\n---\n"
        f"# {target.name}\n\n"
        f"`{file_name(target)}`: the model `{model}` ({model.kind}) in GGUF, its matrices in {type_name} "
        f"(1-D tensors in F32), written by mbuild as llama.cpp's converter writes it ({CONVERTER}).\n\n"
        f"## Recipe\n\n```yaml\n{recipe}\n```\n"
    )


def model_metadata(gguf, target: Target, architecture: str, config: Mapping[str, Any]) -> list[list[Any]]:
    """The file's metadata that the model's config gives, as [key, GGUF value type, value] rows.

    Under llama.cpp's key names for the architecture (`gguf.Keys`); what transformers'
    loader maps back to a config. A rope scaling is refused rather than written wrongly.
    """
    holder = config.get("text_config") if "hidden_size" not in config and isinstance(config.get("text_config"), dict) else config
    rope = holder.get("rope_parameters") or holder.get("rope_scaling") or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise MergefileError(
            f"model '{target.gguf.model}' scales its rope ({rope.get('rope_type') or rope.get('type')}): "
            "mbuild does not write scaled ropes to GGUF yet",
            target.location("gguf", "model"),
        )
    for key in ("max_position_embeddings", "hidden_size", "num_hidden_layers", "intermediate_size",
                "num_attention_heads", "rms_norm_eps", "vocab_size"):
        if not isinstance(holder.get(key), (int, float)) or isinstance(holder.get(key), bool):
            raise MergefileError(
                f"model '{target.gguf.model}': its config has no number '{key}', which the GGUF metadata needs",
                target.location("gguf", "model"),
            )
    theta = (rope.get("rope_theta") if isinstance(rope, dict) else None) or holder.get("rope_theta", 10000.0)
    heads = holder["num_attention_heads"]
    head_dim = holder.get("head_dim") or holder["hidden_size"] // heads
    k = gguf.Keys
    U32, F32, STR = "UINT32", "FLOAT32", "STRING"

    def arch(key: str) -> str:
        return key.format(arch=architecture)

    rows = [
        [k.General.TYPE, STR, "model"],
        [k.General.NAME, STR, target.name],
        [arch(k.LLM.CONTEXT_LENGTH), U32, holder["max_position_embeddings"]],
        [arch(k.LLM.EMBEDDING_LENGTH), U32, holder["hidden_size"]],
        [arch(k.LLM.BLOCK_COUNT), U32, holder["num_hidden_layers"]],
        [arch(k.LLM.FEED_FORWARD_LENGTH), U32, holder["intermediate_size"]],
        [arch(k.Attention.HEAD_COUNT), U32, heads],
        [arch(k.Attention.HEAD_COUNT_KV), U32, holder.get("num_key_value_heads") or heads],
        [arch(k.Rope.FREQ_BASE), F32, float(theta)],
        [arch(k.Attention.LAYERNORM_RMS_EPS), F32, float(holder["rms_norm_eps"])],
        [arch(k.LLM.VOCAB_SIZE), U32, holder["vocab_size"]],
    ]
    if architecture == "llama":
        rows.append([arch(k.Rope.DIMENSION_COUNT), U32, head_dim])
    if head_dim != holder["hidden_size"] // heads:
        rows += [[arch(k.Attention.KEY_LENGTH), U32, head_dim], [arch(k.Attention.VALUE_LENGTH), U32, head_dim]]
    return rows


def tokenizer_metadata(config: Mapping[str, Any]) -> dict[str, Any]:
    """What the tokenizer's part of the file needs beyond the tokenizer files (`mbuild.io.gguf_tokenizer`).

    The config's special token ids, which the converter falls back on when the tokenizer files
    do not name them, and the version of how the vocabulary is written (in the target's key).
    """
    holder = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    ids = {k: v for k, v in {**holder, **config}.items() if k.endswith("_token_id")}
    return {"version": TOKENIZER_VERSION, "config_ids": ids}


def method_of(target: Target) -> tuple[str, int, str]:
    """(name, implementation version, reference) of what a GGUF target runs."""
    return "gguf", GGUF_VERSION, CONVERTER


GGUF = register(TargetKind("gguf", matches=lambda target: target.gguf is not None, method=method_of, expand=expand))

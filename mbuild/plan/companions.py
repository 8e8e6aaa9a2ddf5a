"""An output's non-tensor content: its config, the files copied beside the weights, the
tokenizer glue (an aligned vocabulary, a chat template), and the model card; and
`finish_target_plan`, which turns a kind's tasks and these into the target's TargetPlan.

Every kind shares these, so an output looks the same whatever built it: the config donor's
files, then the tokenizer's, then what the target asks for on top.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from mbuild import io, keys
from mbuild.errors import MergefileError, ModelError
from mbuild.mergefile import ModelRef, Target
from mbuild.nodes import Node
from mbuild.plan.layers import OUTPUT_HEAD
from mbuild.plan.tasks import TargetPlan, node_of

TOKENIZER_FILE = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab.*|merges\.txt|.*\.model|.*\.tiktoken|chat_template.*)$"
)


def finish_target_plan(
    target: Target, method: tuple[str, int, str], tasks, config, files, num_layers, shard_bytes, vocabulary=None, dropped=(),
    card: str | None = None,
) -> TargetPlan:
    """The TargetPlan for expanded tasks: file digests, model card, inputs and the target's key.

    ``method``: (name, version, paper) of what the target runs, as its kind names it;
    ``card``: the kind's own model card (default: a merge's, `model_card`).
    """
    file_digests = {name: file_digest(path) for name, path in files.items()}
    input_nodes = tuple(node_of(r) for r in target.references())
    if card is None:
        card = model_card(target, list(input_nodes), method)
    target_key = None
    if all(t.key for t in tasks) and all(d is not None for d in file_digests.values()):
        target_key = keys.target_key({t.name: t.key for t in tasks}, config, file_digests, card)
    return TargetPlan(
        target=target,
        tasks=tuple(tasks),
        config=config,
        files=files,
        file_digests=file_digests,
        card=card,
        key=target_key,
        input_nodes=input_nodes,
        num_layers=num_layers,
        shard_bytes=shard_bytes,
        vocabulary=vocabulary,
        dropped=tuple(dropped),
    )


# Config lists of layer indices rather than one entry per layer (Mllama's cross-attention
# layers, Qwen-MoE's dense layers): each output layer is listed where its source layer was.
LAYER_INDEX_LISTS = ("cross_attention_layers", "mlp_only_layers")


def _layer_holder(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The part of a config that holds the text layer count: itself, or its `text_config`."""
    if "num_hidden_layers" not in config and isinstance(config.get("text_config"), dict):
        return config["text_config"]
    return config


def output_config(donor: Mapping[str, Any], infos, layer_origin, tasks) -> dict[str, Any]:
    """The donor's config with the layer count (and per-layer lists) made to fit the output."""
    import copy

    config = copy.deepcopy(dict(donor))
    holder = _layer_holder(config)
    old_count = io.layer_count(config)
    new_count = len(layer_origin)
    # Published multimodal configs (Qwen2-VL) repeat the text model's count at top level and in
    # text_config; transformers reads the latter, so both must change.
    holders = [holder]
    text_config = config.get("text_config")
    if holder is config and isinstance(text_config, dict) and io.layer_count(text_config) == old_count:
        holders.append(text_config)
    if old_count is not None and new_count != old_count:
        for counted in holders:
            for key in ("num_hidden_layers", "n_layer", "num_layers"):
                if isinstance(counted.get(key), int):
                    counted[key] = new_count
            for key, value in list(counted.items()):
                if isinstance(value, list) and len(value) == old_count and key not in ("architectures", *LAYER_INDEX_LISTS):
                    rebuilt = []
                    for node, layer in layer_origin:
                        source = infos[node].config.get("text_config") or {}
                        if counted is holder:
                            source = _layer_holder(infos[node].config)
                        source_list = source.get(key) if isinstance(source.get(key), list) else value
                        rebuilt.append(source_list[layer % len(source_list)])
                    counted[key] = rebuilt
    if old_count is not None:
        for key in LAYER_INDEX_LISTS:
            if isinstance(holder.get(key), list):
                listed = {node: set(_layer_holder(infos[node].config).get(key) or ()) for node, _ in layer_origin}
                holder[key] = [out for out, (node, layer) in enumerate(layer_origin) if layer in listed[node]]
    float_dtypes = [t.dtype for t in tasks if t.dtype in io.FLOAT_DTYPES]
    if float_dtypes:
        dtype = max(set(float_dtypes), key=float_dtypes.count)
        written = False
        for key in ("torch_dtype", "dtype"):
            if key in holder:
                holder[key] = dtype
                written = True
        if not written:
            holder["torch_dtype"] = dtype
    return config


def fit_tying(config: dict[str, Any], donor: io.ModelInfo, tasks) -> None:
    """Make the config's `tie_word_embeddings` say whether the output stores a head of its own.

    In a tied/untied mix the donor's flag can be wrong. mergekit copies it: a tied donor over a
    merged head makes loaders that honour the flag (vLLM, transformers before 5) tie the two and
    lose one, and an untied donor over a headless output (a last slice of tied models) leaves
    the head missing, initialised at random.
    """
    holder = config
    if "tie_word_embeddings" not in config and isinstance(config.get("text_config"), dict):
        if "tie_word_embeddings" in config["text_config"]:
            holder = config["text_config"]
    has_head = any(task.name == OUTPUT_HEAD for task in tasks)
    if has_head and holder.get("tie_word_embeddings") is True:
        holder["tie_word_embeddings"] = False
    elif not has_head and OUTPUT_HEAD in donor.tensors and holder.get("tie_word_embeddings") is not True:
        holder["tie_word_embeddings"] = True


def companions_of(node: str, infos, plans) -> dict[str, str]:
    """A model's non-weight files by name: a source's own, or what a target's output will hold."""
    if Node(node).is_target:
        return dict(plans[Node(node).label].files)
    folder = infos[node].folder
    return {p.name: str(p) for p in io.companion_files(folder)} if folder else {}


def companion_files_for(target: Target, config_node: str, infos, plans) -> dict[str, str]:
    """Which non-weight files the output gets, and from where: config donor, then tokenizer."""
    files = {n: p for n, p in companions_of(config_node, infos, plans).items() if n != "config.json"}
    tokenizer_ref = target.tokenizer_source
    if tokenizer_ref == "base":
        tokenizer_ref = target.base_model
    if isinstance(tokenizer_ref, ModelRef):
        files = {n: p for n, p in files.items() if not TOKENIZER_FILE.match(n)}
        files.update({n: p for n, p in companions_of(node_of(tokenizer_ref), infos, plans).items() if TOKENIZER_FILE.match(n)})
    return dict(sorted(files.items()))


def file_digest(path: str) -> str | None:
    """The digest of a (small) file (`keys.file_hasher`), None if it cannot be read."""
    try:
        return io.hash_file(path)
    except OSError:
        return None


def recipe_text(target: Target) -> str:
    """A target's recipe as YAML, under its name, for a model card."""
    return yaml.safe_dump({target.name: dict(target.recipe)}, sort_keys=False).rstrip()


def model_card(target: Target, input_nodes: Sequence[str], method: tuple[str, int, str]) -> str:
    """The README.md of an output: what it is, the recipe as written, and its lineage."""
    recipe = recipe_text(target)
    lineage = "\n".join(f"- `{node.split(':', 1)[1]}` ({node.split(':', 1)[0]})" for node in input_nodes)
    name, _, paper = method
    return (
        "---\nlibrary_name: transformers\ntags:\n- merge\n- mbuild\n---\n"
        f"# {target.name}\n\n"
        f"A merge built by mbuild with **{name}** ({paper}).\n\n"
        f"## Inputs\n\n{lineage}\n\n"
        f"## Recipe\n\n```yaml\n{recipe}\n```\n"
    )


def align_vocabulary(target: Target, refs: Sequence[ModelRef], base_node: str, infos, plans, store: Path):
    """The output vocabulary and each input's row map (see mbuild.vocabulary)."""
    from mbuild import vocabulary

    nodes = list(dict.fromkeys(node_of(ref) for ref in refs))
    spec = target.tokenizer
    extra = [spec.source.node] if isinstance(spec.source, ModelRef) else []
    extra += [t.model.node for _, t in spec.tokens if t.model is not None]
    files = {}
    for node in dict.fromkeys([base_node, *nodes, *extra]):
        companions = companions_of(node, infos, plans)
        files[node] = {n: p for n, p in companions.items() if TOKENIZER_FILE.match(n) or n == "tokenizer_config.json"}
        if not files[node]:
            raise ModelError(f"'{node.split(':', 1)[1]}' has no tokenizer files", target.location("tokenizer_source"))
    sizes = {node: vocab_size(infos[node].config) for node in files}
    names = {node: Node(node).label for node in files}
    try:
        return vocabulary.resolve(spec, base_node, nodes, files, sizes, names, Path(store) / "vocabularies")
    except OSError:  # a read-only or full cache: kept in the system's temporary folder instead
        import tempfile

        elsewhere = Path(tempfile.gettempdir()) / "mbuild-vocabularies"
        return vocabulary.resolve(spec, base_node, nodes, files, sizes, names, elsewhere)


def vocab_size(config: Mapping[str, Any]) -> int | None:
    """The vocabulary size a model's config declares, if any."""
    return io.config_int(config, ("vocab_size",))


def set_vocab_size(config: dict, size: int) -> None:
    """Write the output's vocabulary size where the config keeps it (top level or text_config)."""
    nested = "vocab_size" not in config and isinstance(config.get("text_config"), dict)
    holder = config["text_config"] if nested else config
    holder["vocab_size"] = size


def chat_template_file(target: Target, files, infos, plans, store: Path) -> str:
    """The chat template asked for, written once under the cache; returns its path."""
    asked = target.chat_template
    if asked == "auto":
        counts: dict[str, int] = {}
        for ref in target.references():
            try:
                text = _chat_template_of(node_of(ref), infos, plans)
            except ModelError as error:
                raise ModelError(f"model '{ref}': {error.message}", target.location("chat_template")) from None
            if text:
                counts[text.strip()] = counts.get(text.strip(), 0) + 1
        if not counts:
            raise MergefileError("chat_template: auto, but no input model has a chat template", target.location("chat_template"))
        text = max(counts, key=lambda t: counts[t])  # plurality; first seen wins a tie
    elif asked in TEMPLATES:
        text = TEMPLATES[asked]
    else:
        text = asked
    return str(io.store_text(Path(store) / "templates", text, ".jinja"))


def _chat_template_of(node: str, infos, plans) -> str | None:
    companions = companions_of(node, infos, plans)
    if "chat_template.jinja" in companions:
        path = companions["chat_template.jinja"]
        try:
            return io.read_small_file(path).decode("utf-8")
        except UnicodeDecodeError:
            raise ModelError(f"{path} is not UTF-8 text") from None
    if "tokenizer_config.json" in companions:
        template = io.read_small_json(companions["tokenizer_config.json"]).get("chat_template")
        if isinstance(template, dict):
            template = template.get("default")
        return template if isinstance(template, str) else None
    return None


# Chat templates by name, written from each format's public description.
TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}

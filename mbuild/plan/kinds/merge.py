"""The merge kind: a mergekit body (`models:` or `slices:`) expanded into tensor tasks.

mergekit's normal form first (`_groups`: a models list is one slice over every layer), then
one task per output tensor: layers renumbered through the slices, every parameter resolved
for that tensor (`_resolve`), integer buffers copied, and embeddings re-indexed into the
output vocabulary when the target aligns tokenizers. Before any task, the layer ranges,
architectures and shapes are checked, and afterwards every input tensor no task takes is
refused unless the target allows it (`accounting`): nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from mbuild import io, keys, methods, parameters
from mbuild.errors import MergefileError
from mbuild.mergefile import ModelRef, Target
from mbuild.nodes import Node
from mbuild.plan.companions import (
    TOKENIZER_FILE,
    align_vocabulary,
    chat_template_file,
    companion_files_for,
    finish_target_plan,
    fit_tying,
    output_config,
    set_vocab_size,
    vocab_size,
)
from mbuild.plan.kinds.accounting import check_architectures, untaken
from mbuild.plan.kinds.experts import FUSED_RENAMES, fused_experts
from mbuild.plan.kinds.registry import TargetKind, register
from mbuild.plan.layers import (
    LAYER_NAME,
    OUTPUT_HEAD,
    PRE_LAYER,
    embedding_name,
    goes_first,
    stack_length,
    stack_table,
    text_stack,
)
from mbuild.plan.tasks import OutputLookup, TargetPlan, TensorInput, TensorTask, input_key, node_of


@dataclass
class _Group:
    """One normalised slice: aligned sources, base, and the settings that apply."""

    refs: list[ModelRef]
    ranges: list[tuple[int, int] | None]
    model_settings: list[Mapping[str, Any]]
    settings: Mapping[str, Any]
    base: ModelRef | None
    paths: list[tuple]
    path: tuple

    @property
    def base_index(self) -> int | None:
        """Where the base model stands among the group's models (None without a base)."""
        if self.base is None:
            return None
        at = [i for i, ref in enumerate(self.refs) if node_of(ref) == node_of(self.base)]
        return at[-1] if at else None


def _groups(target: Target) -> list[_Group]:
    """mergekit's normal form: a models list is one slice over every layer, base appended."""
    if target.models:
        refs = [m.model for m in target.models]
        settings = [m.parameters for m in target.models]
        paths = [m.path for m in target.models]
        base = target.base_model
        if base is not None and all(node_of(r) != node_of(base) for r in refs):
            refs.append(base)
            settings.append({})
            paths.append(("base_model",))
        return [_Group(refs, [None] * len(refs), settings, {}, base, paths, ("models",))]
    groups = []
    for output_slice in target.slices:
        groups.append(
            _Group(
                [s.model for s in output_slice.sources],
                [s.layer_range for s in output_slice.sources],
                [s.parameters for s in output_slice.sources],
                output_slice.parameters,
                output_slice.base_model or target.base_model,
                [s.path for s in output_slice.sources],
                output_slice.path,
            )
        )
    return groups


def _float_dtypes(target: Target, in_dtypes: Sequence[str]) -> tuple[str, str]:
    """A float task's output and compute dtypes: the target's, else from its inputs' (as mergekit)."""
    out_dtype = target.out_dtype or target.dtype or _promote(in_dtypes)
    return out_dtype, target.dtype or ("float64" if "float64" in in_dtypes else "float32")


def _promote(dtypes: Sequence[str]) -> str:
    """torch.promote_types over float dtype names, without torch."""
    unique = set(dtypes)
    if len(unique) == 1:
        return dtypes[0]
    if "float64" in unique:
        return "float64"
    return "float32"


def expand(
    target: Target,
    infos: Mapping[str, io.ModelInfo],
    plans: Mapping[str, TargetPlan],
    source_digests: Mapping[str, Mapping[str, str] | None],
    shard_bytes: int,
    output_digest: OutputLookup,
    store: Path,
    *,
    platform: str,
) -> TargetPlan:
    """Expand a merge target into its tensor tasks, checking layer ranges and shapes.

    ``platform``: where its tasks compute, recorded in the key of each that does.
    """
    method = methods.get(target.method)
    groups = _groups(target)
    stack_tables = {node: stack_table(info) for node, info in infos.items()}

    def error(path: tuple, message: str) -> MergefileError:
        return MergefileError(message, target.location(*path))

    # Which stack layer ranges and renumbering address in each model (the text stack).
    used = {node_of(ref) for group in groups for ref in group.refs}
    ranged = {node: _ranged_stack(target, node, infos[node], stack_tables[node][0], error) for node in sorted(used)}

    # Layer ranges against each source's real layer count.
    for group in groups:
        for index, (ref, layer_range) in enumerate(zip(group.refs, group.ranges)):
            info = infos[node_of(ref)]
            stacks = stack_tables[node_of(ref)][0]
            layer_ids = stacks.get(ranged[node_of(ref)], {})
            count = info.num_layers if len(stacks) <= 1 else stack_length(layer_ids)
            if count is None:
                count = stack_length(layer_ids)
            if layer_range is None:
                group.ranges[index] = (0, count)
            elif layer_range[1] > count:
                raise error(
                    group.paths[index] + ("layer_range",),
                    f"layer_range [{layer_range[0]}, {layer_range[1]}] is out of range: '{ref}' has {count} layers",
                )
        lengths = {r[1] - r[0] for r in group.ranges}
        if len(lengths) > 1:
            counts = ", ".join(f"'{r}': {rg[1] - rg[0]}" for r, rg in zip(group.refs, group.ranges))
            raise error(group.path, f"models have different layer counts ({counts}); merge them with slices and layer_range")

    check_architectures(target, groups, infos)
    config_node = node_of(target.base_model) if target.base_model else node_of(groups[0].refs[0])
    vocab = None
    if target.tokenizer is not None:
        refs = [ref for group in groups for ref in group.refs]
        vocab = align_vocabulary(target, refs, config_node, infos, plans, store)

    tasks: list[TensorTask] = []
    seen_names: set[str] = set()
    taken: set[tuple[str, str]] = set()  # (node, tensor) of every input some task reads
    out_layer = 0
    layer_origin: list[tuple[str, int]] = []  # output layer -> (source node, source layer)

    def claim(out_name: str, group: _Group) -> None:
        """Refuse a second task for one output tensor."""
        if out_name in seen_names:
            raise error(group.path, f"two slices produce tensor '{out_name}'")
        seen_names.add(out_name)

    def add_task(out_name: str, group: _Group, in_names: list[str], t: float) -> None:
        claim(out_name, group)
        tensor_infos = []
        for ref, in_name, path in zip(group.refs, in_names, group.paths):
            info = infos[node_of(ref)]
            found = info.tensors.get(in_name)
            if found is None and in_name == OUTPUT_HEAD and info.config.get("tie_word_embeddings", False):
                # A tied model's output head is its input embedding.
                in_name = embedding_name(info)
                found = info.tensors.get(in_name) if in_name else None
            if found is None:
                raise error(path + ("model",), f"model '{ref}' has no tensor '{in_name}'")
            tensor_infos.append(found)
            taken.add((node_of(ref), found.name))
        on_vocabulary = vocab is not None and _is_vocabulary_tensor(out_name, tensor_infos, group, infos)
        shapes = {tuple(ti.shape[1:] if on_vocabulary else ti.shape) for ti in tensor_infos}
        if len(shapes) > 1 and not on_vocabulary and _is_vocabulary_tensor(out_name, tensor_infos, group, infos):
            detail = ", ".join(f"'{r}' {list(ti.shape)}" for r, ti in zip(group.refs, tensor_infos))
            raise error(
                group.path,
                f"vocabulary sizes differ for '{out_name}' ({detail}): set 'tokenizer_source' (base, union or a model) to align them",
            )
        if len(shapes) > 1:
            detail = ", ".join(f"'{r}' {list(ti.shape)}" for r, ti in zip(group.refs, tensor_infos))
            raise error(group.path, f"shape mismatch for tensor '{out_name}': {detail}")
        base_index = group.base_index
        in_dtypes = [ti.dtype for ti in tensor_infos]
        is_float = all(d in io.FLOAT_DTYPES for d in in_dtypes)
        if is_float:
            out_dtype, compute_dtype = _float_dtypes(target, in_dtypes)
            params, model_params = _resolve(method, target, group, out_name, in_names, t, base_index, error)
            op, seed = method.name, (target.seed if method.random else None)
        else:
            # Integer buffers are copied from the first input, as mergekit does.
            out_dtype, compute_dtype = in_dtypes[0], in_dtypes[0]
            params, model_params, op, seed = (), (), "copy", None
            tensor_infos = tensor_infos[:1]
            in_names = in_names[:1]
            base_index = None
        inputs = []
        for ref, info in zip(group.refs, tensor_infos):
            node = node_of(ref)
            key = input_key(node, info, plans, source_digests, output_digest)
            if on_vocabulary and key is not None:
                key += f"|vocabulary:{vocab.digest}"  # the input as re-indexed into the output vocabulary
            inputs.append(TensorInput(node, info.name, key))
        shape = tuple(tensor_infos[0].shape)
        if on_vocabulary:
            shape = (vocab.size, *shape[1:])
        version = method.version if op != "copy" else 1
        tasks.append(
            keyed_task(
                TensorTask(
                    name=out_name,
                    shape=shape,
                    dtype=out_dtype,
                    compute_dtype=compute_dtype,
                    method=op,
                    params=params,
                    model_params=model_params,
                    base_index=base_index,
                    seed=seed,
                    inputs=tuple(inputs),
                    key=None,
                    vocabulary=on_vocabulary,
                ),
                version,
                platform,
            )
        )

    def add_fused_task(out_name: str, group: _Group, part_names: list[list[str]], t: float, fuse: tuple[int, int]) -> None:
        """One fused expert tensor: each model's per-expert tensors (``part_names``) fused, then merged once."""
        claim(out_name, group)
        experts, parts = fuse
        part_infos = []
        for ref, names in zip(group.refs, part_names):
            found = [infos[node_of(ref)].tensors[name] for name in names]
            part_infos.append(found)
            taken.update((node_of(ref), f.name) for f in found)
        layouts = {tuple(tuple(f.shape) for f in found) for found in part_infos}
        per_expert = {tuple(tuple(f.shape) for f in part_infos[0][e * parts : (e + 1) * parts]) for e in range(experts)}
        if len(layouts) > 1 or len(per_expert) > 1:
            raise error(group.path, f"expert tensors of '{out_name}' differ in shape between experts or models")
        lead = part_infos[0]
        shape = (experts, sum(lead[p].shape[0] for p in range(parts)), *lead[0].shape[1:])
        in_dtypes = [f.dtype for found in part_infos for f in found]
        if not all(d in io.FLOAT_DTYPES for d in in_dtypes):
            raise error(group.path, f"expert tensors of '{out_name}' are not floating point")
        base_index = group.base_index
        out_dtype, compute_dtype = _float_dtypes(target, in_dtypes)
        # Parameters resolve by the fused name, as mergekit resolves them for the fused tensor.
        params, model_params = _resolve(method, target, group, out_name, [out_name] * len(group.refs), t, base_index, error)
        seed = target.seed if method.random else None
        inputs = [
            TensorInput(node_of(ref), f.name, input_key(node_of(ref), f, plans, source_digests, output_digest))
            for ref, found in zip(group.refs, part_infos)
            for f in found
        ]
        tasks.append(
            keyed_task(
                TensorTask(
                    name=out_name,
                    shape=shape,
                    dtype=out_dtype,
                    compute_dtype=compute_dtype,
                    method=method.name,
                    params=params,
                    model_params=model_params,
                    base_index=base_index,
                    seed=seed,
                    inputs=tuple(inputs),
                    key=None,
                    fuse=fuse,
                ),
                method.version,
                platform,
            )
        )

    first, last = groups[0], groups[-1]
    first_node, last_node = node_of(first.refs[0]), node_of(last.refs[0])
    first_stacks, first_others = stack_tables[first_node]
    last_stacks, last_others = stack_tables[last_node]
    for name in sorted(n for n in first_others if goes_first(n, first_stacks, ranged[first_node])):
        add_task(name, first, [name] * len(first.refs), 0.0)
    for group in groups:
        length = group.ranges[0][1] - group.ranges[0][0]
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            lead_node = node_of(group.refs[0])
            lead_layers = stack_tables[lead_node][0].get(ranged[lead_node], {})
            source_layer = group.ranges[0][0] + offset
            suffixes = lead_layers.get(source_layer, {})
            in_layers = [
                stack_tables[node_of(ref)][0].get(ranged[node_of(ref)], {}).get(layer_range[0] + offset, {})
                for ref, layer_range in zip(group.refs, group.ranges)
            ]
            fused = fused_experts(target, group.refs, infos, in_layers)
            fused_parts = {part for _, part_suffixes in fused.values() for part in part_suffixes}
            rename = FUSED_RENAMES.get(infos[lead_node].config.get("model_type")) if fused else None
            for suffix in sorted(set(suffixes) - fused_parts | set(fused)):
                layer_prefix = LAYER_NAME.match(next(iter(suffixes.values())))["prefix"]
                if suffix in fused:
                    fuse, part_suffixes = fused[suffix]
                    part_names = [[in_layer[part] for part in part_suffixes] for in_layer in in_layers]
                    add_fused_task(f"{layer_prefix}{out_layer}.{suffix}", group, part_names, t, fuse)
                    continue
                out_suffix = suffix
                if rename is not None and suffix.startswith(rename[0]):
                    out_suffix = rename[1] + suffix[len(rename[0]) :]
                out_name = f"{layer_prefix}{out_layer}.{out_suffix}"
                in_names = []
                for ref, layer_range, in_layer in zip(group.refs, group.ranges, in_layers):
                    if suffix not in in_layer:
                        raise error(group.path, f"model '{ref}' has no '{suffix}' in layer {layer_range[0] + offset}")
                    in_names.append(in_layer[suffix])
                add_task(out_name, group, in_names, t)
            layer_origin.append((lead_node, source_layer))
            out_layer += 1
    # The other stacks (a vision tower, an encoder) whole, from the first slice, each with
    # gradients over its own layers, as mergekit merges each module of a `models:` merge.
    for prefix in sorted(p for p in first_stacks if p != ranged[first_node]):
        length = stack_length(first_stacks[prefix])
        for ref in first.refs:
            theirs = stack_tables[node_of(ref)][0].get(prefix, {})
            if stack_length(theirs) != length:
                raise error(
                    first.path,
                    f"models have different layer counts in '{prefix}' ('{first.refs[0]}': {length}, '{ref}': {stack_length(theirs)})",
                )
        for index in range(length):
            t = index / (length - 1) if length > 1 else 1.0
            suffixes = first_stacks[prefix].get(index, {})
            for suffix in sorted(suffixes):
                in_names = []
                for ref in first.refs:
                    in_layer = stack_tables[node_of(ref)][0][prefix].get(index, {})
                    if suffix not in in_layer:
                        raise error(first.path, f"model '{ref}' has no '{suffix}' in layer {index} of '{prefix}'")
                    in_names.append(in_layer[suffix])
                add_task(suffixes[suffix], first, in_names, t)
    post_layer = {n for n in last_others if not goes_first(n, last_stacks, ranged[last_node])}
    if any(OUTPUT_HEAD in infos[node_of(ref)].tensors for ref in last.refs):
        # A tied/untied mix has a head whichever model leads, as in mergekit: the untied models'
        # heads merge with the tied ones' embeddings (add_task reads those in their place).
        post_layer.add(OUTPUT_HEAD)
    for name in sorted(post_layer):
        add_task(name, last, [name] * len(last.refs), 0.0)

    dropped = untaken(target, groups, infos, taken, stack_tables, ranged)
    config = output_config(infos[config_node].config, infos, layer_origin, tasks)
    fit_tying(config, infos[config_node], tasks)
    files = companion_files_for(target, config_node, infos, plans)
    if vocab is not None:
        files = {n: p for n, p in files.items() if not TOKENIZER_FILE.match(n) and n != "tokenizer_config.json"}
        files.update(vocab.files())
        set_vocab_size(config, vocab.size)
    if target.chat_template is not None:
        files["chat_template.jinja"] = chat_template_file(target, files, infos, plans, store)
    return finish_target_plan(target, method_of(target), tasks, config, files, out_layer, shard_bytes, vocab, dropped)


def keyed_task(task: TensorTask, version: int, platform: str) -> TensorTask:
    """``task`` with its key: known once every input's key is (`keys.task_key`)."""
    if any(i.key is None for i in task.inputs):
        return task
    key = keys.task_key(
        method=task.method,
        version=version,
        params=dict(task.params),
        model_params=[dict(p) for p in task.model_params],
        base_index=task.base_index,
        compute_dtype=task.compute_dtype,
        out_dtype=task.dtype,
        shape=task.shape,
        seed=task.seed,
        input_keys=[i.key for i in task.inputs],
        platform=platform,
        fuse=task.fuse,
    )
    return dataclasses.replace(task, key=key)


def _is_vocabulary_tensor(name: str, tensor_infos, group, infos) -> bool:
    """Embeddings and output heads: tensors whose first axis is the model's vocabulary."""
    if name.endswith("lm_head.weight"):
        return True
    if not PRE_LAYER.search(name) or "position" in name:
        return False
    for ref, info in zip(group.refs, tensor_infos):
        size = vocab_size(infos[node_of(ref)].config)
        if size is not None and info.shape and info.shape[0] != size:
            return False
    return True


def _resolve(method, target: Target, group: _Group, out_name, in_names, t, base_index, error):
    """Resolve every parameter for one tensor: global ones by output name, per-model by input name."""
    global_scopes = (group.settings, target.parameters)
    params = []
    for parameter in method.parameters:
        if parameter.per_model:
            continue
        try:
            params.append((parameter.name, parameters.resolve(parameter, global_scopes, out_name, t)))
        except KeyError:
            raise error(("parameters",), f"{method.name} needs '{parameter.name}' (no value for tensor '{out_name}')") from None
    model_params = []
    for index, (ref, in_name, settings) in enumerate(zip(group.refs, in_names, group.model_settings)):
        values = []
        for parameter in method.parameters:
            if not parameter.per_model or (index == base_index and not parameter.applies_to_base):
                continue
            scopes = (settings, group.settings, target.parameters)
            try:
                values.append((parameter.name, parameters.resolve(parameter, scopes, in_name, t)))
            except KeyError:
                raise error(
                    group.paths[index], f"{method.name} needs '{parameter.name}' for model '{ref}' (tensor '{in_name}')"
                ) from None
        problem = method.check_input(dict(values)) if method.check_input is not None and values else None
        if problem:
            raise error(group.paths[index], f"{problem}, for model '{ref}' (tensor '{in_name}')")
        model_params.append(tuple(values))
    return tuple(params), tuple(model_params)


def _ranged_stack(target: Target, node: str, info: io.ModelInfo, stacks, error) -> str | None:
    """The stack of a model that layer ranges address: its text stack.

    Slices of a model with several stacks are refused where the text stack is ambiguous
    (an encoder-decoder, or no stack under `language_model` or of the config's layer count).
    A `models:` merge takes every stack alike, so there any stack of that count serves.
    """
    prefix = text_stack(stacks, info.config)
    if len(stacks) > 1 and target.slices and (prefix is None or info.config.get("is_encoder_decoder") is True):
        names = ", ".join(f"'{p}' ({stack_length(layers)} layers)" for p, layers in sorted(stacks.items()))
        raise error(
            ("slices",),
            f"model '{Node(node).label}' has several layer stacks ({names}) and which one layer_range addresses "
            "is ambiguous: merge it with 'models:' (every stack merged whole)",
        )
    if prefix is None and stacks:
        count = io.layer_count(info.config)
        prefix = next((p for p in sorted(stacks) if stack_length(stacks[p]) == count), sorted(stacks)[0])
    return prefix


def method_of(target: Target) -> tuple[str, int, str]:
    """(name, implementation version, paper) of the merge method a target runs."""
    method = methods.get(target.method)
    return method.name, method.version, method.paper


MERGE = register(TargetKind("merge", matches=lambda target: target.moe is None and target.gguf is None and target.extract_lora is None, method=method_of, expand=expand))

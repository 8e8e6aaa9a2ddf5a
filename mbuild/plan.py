"""The plan: the DAG of targets and sources, each target expanded into tensor tasks,
with keys and a staleness decision per target. Pure data; never imports torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from mbuild import io, keys, methods, parameters
from mbuild.errors import Location, MergefileError, ModelError
from mbuild.mergefile import Mergefile, ModelRef, Target

# A decoder layer's tensors: "<prefix><index>.<suffix>", e.g. model.layers.3.mlp.up_proj.weight.
LAYER_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks)\.)(?P<index>\d+)\.(?P<suffix>.+)$")
# Non-layer tensors that sit before the layer stack (the rest come after it).
PRE_LAYER = re.compile(r"(embed|wte|wpe|word_embeddings)")
TOKENIZER_FILE = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab.*|merges\.txt|.*\.model|.*\.tiktoken|chat_template.*)$"
)
DEFAULT_SHARD_BYTES = 5 * 1024**3


@dataclass(frozen=True)
class Source:
    """A checkpoint the family reads: a local folder or a resolved hub snapshot."""

    node: str
    ref: ModelRef
    info: io.ModelInfo
    revision: str | None = None


@dataclass(frozen=True)
class TensorInput:
    """One input of a tensor task: a tensor of a source or of an earlier target."""

    node: str
    name: str
    key: str | None


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: an operation with its resolved parameters over input tensors."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    compute_dtype: str
    method: str  # a registered method, or "copy" for non-float buffers
    params: tuple[tuple[str, Any], ...]
    model_params: tuple[tuple[tuple[str, Any], ...], ...]
    base_index: int | None
    seed: int | None
    inputs: tuple[TensorInput, ...]
    key: str | None
    vocabulary: bool = False  # inputs are re-indexed into the target's output vocabulary first

    @property
    def nbytes(self) -> int:
        return io.TensorInfo(self.name, self.dtype, self.shape, None).nbytes

    @property
    def pending(self) -> bool:
        """Whether the key depends on upstream bytes that are not computed yet."""
        return any(i.key is not None and keys.is_pending(i.key) for i in self.inputs)


@dataclass(frozen=True)
class TargetPlan:
    """A target expanded: every output tensor, the config, copied files, card and key."""

    target: Target
    tasks: tuple[TensorTask, ...]
    config: Mapping[str, Any]
    files: Mapping[str, str]  # output file name -> the original file it is copied from
    file_digests: Mapping[str, str | None]
    card: str
    key: str | None
    input_nodes: tuple[str, ...]
    num_layers: int | None
    shard_bytes: int = DEFAULT_SHARD_BYTES
    vocabulary: Any = None  # mbuild.vocabulary.Vocabulary when inputs are aligned by token
    dropped: tuple[str, ...] = ()  # input tensors no output takes ("model: tensor"), allowed by the target

    @property
    def name(self) -> str:
        return self.target.name

    @cached_property
    def _tasks_by_name(self) -> dict[str, TensorTask]:
        return {t.name: t for t in self.tasks}

    def task(self, name: str) -> TensorTask | None:
        """The task producing output tensor ``name``."""
        return self._tasks_by_name.get(name)

    @property
    def pending(self) -> bool:
        """Whether the key waits on upstream bytes not computed yet."""
        return any(t.pending for t in self.tasks)

    @property
    def nbytes(self) -> int:
        return sum(task.nbytes for task in self.tasks)

    def model_info(self) -> io.ModelInfo:
        """What downstream planning sees of this target before it is built."""
        tensors = {t.name: io.TensorInfo(t.name, t.dtype, t.shape, None) for t in self.tasks}
        return io.ModelInfo(folder=None, config=self.config, tensors=tensors)


@dataclass
class Plan:
    """The targets to consider in build order, their expansions and the sources they read."""

    mergefile: Mergefile
    order: tuple[str, ...]
    targets: dict[str, TargetPlan]
    sources: dict[str, Source]
    graph: Any = field(repr=False)
    unhashed: frozenset[str] = frozenset()  # source nodes whose bytes are not yet hashed
    platform: str = ""  # where tasks compute: part of every computing task's key


def node_of(ref: ModelRef) -> str:
    """The graph node a model reference points at."""
    return ref.node


def build_graph(mergefile: Mergefile):
    """The DAG of targets and sources; a cycle is a MergefileError at the closing reference."""
    import networkx as nx

    graph = nx.DiGraph()
    for name, target in mergefile.targets.items():
        graph.add_node("target:" + name, kind="target")
        for ref in target.references():
            graph.add_node(node_of(ref), kind=ref.kind if ref.kind != "target" else "target")
            graph.add_edge(node_of(ref), "target:" + name, line=ref.line)
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return graph
    names = [edge[0].split(":", 1)[1] for edge in cycle] + [cycle[0][0].split(":", 1)[1]]
    closing = cycle[-1]
    target = closing[1].split(":", 1)[1]
    line = graph.edges[closing].get("line")
    raise MergefileError(
        "dependency cycle: " + " -> ".join(names), Location(mergefile.path, line, target)
    )


def select(mergefile: Mergefile, graph, requested: Sequence[str]) -> tuple[str, ...]:
    """The requested targets and every target they depend on, in build order."""
    import networkx as nx

    names = list(mergefile.targets)
    if not requested or list(requested) == ["all"]:
        wanted = set(names)
    else:
        wanted = set()
        for name in requested:
            if name not in mergefile.targets:
                from mbuild.mergefile import _suggest

                raise MergefileError(f"no target named '{name}'{_suggest(name, names)}", Location(mergefile.path))
            wanted.add(name)
            wanted.update(n.split(":", 1)[1] for n in nx.ancestors(graph, "target:" + name) if n.startswith("target:"))
    position = {name: index for index, name in enumerate(names)}
    order = nx.lexicographical_topological_sort(
        graph.subgraph(["target:" + n for n in wanted]), key=lambda node: position[node.split(":", 1)[1]]
    )
    return tuple(node.split(":", 1)[1] for node in order)


DigestLookup = Callable[[Source], "Mapping[str, str] | None"]
OutputLookup = Callable[[str], "str | None"]


def make_plan(
    mergefile: Mergefile,
    requested: Sequence[str] = (),
    digests: DigestLookup = lambda source: None,
    pickles: Any = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    output_digest: OutputLookup = lambda key: None,
    store: Path | None = None,
    previous: Plan | None = None,
    changed: Sequence[str] | None = None,
    platform: str | None = None,
    pinned: Mapping[str, str] | None = None,
) -> Plan:
    """Resolve sources, expand the selected targets into tensor tasks and compute keys.

    ``digests`` gives a source's per-tensor digests (None: not hashed yet);
    ``output_digest`` gives the digest of the bytes a task key once produced, so a
    downstream key names upstream bytes rather than upstream recipes where it can.
    With ``previous`` and ``changed`` (targets just built), only the targets downstream
    of those are expanded again; the rest, and the sources, are taken as they were.
    ``platform``: where tasks compute (`compute_platform.identify`; default: this CPU).
    ``pickles``: a `pickles.Conversions` through which pickled sources are read (None: refused).
    ``pinned``: hub node -> the commit Mergefile.lock pins it to (`lock.pinned_revisions`).
    """
    import networkx as nx

    from mbuild import compute_platform

    if platform is None:
        platform = previous.platform if previous is not None else compute_platform.identify("cpu")

    graph = previous.graph if previous is not None else build_graph(mergefile)
    order = previous.order if previous is not None else select(mergefile, graph, requested)
    if store is None:
        from mbuild.cache import default_cache_dir

        store = default_cache_dir(mergefile.folder)
    stale: set[str] = set(order)
    if previous is not None and changed is not None:
        stale = set()
        for name in changed:
            stale.update(n.split(":", 1)[1] for n in nx.descendants(graph, "target:" + name) if n.startswith("target:"))
    sources: dict[str, Source] = dict(previous.sources) if previous is not None else {}
    plans: dict[str, TargetPlan] = {}
    unhashed: set[str] = set(previous.unhashed) if previous is not None else set()
    pinned = pinned or {}
    source_digests: dict[str, Mapping[str, str] | None] = {}
    for name in order:
        target = mergefile.targets[name]
        if name not in stale:
            plans[name] = previous.targets[name]
            continue
        infos: dict[str, io.ModelInfo] = {}
        for ref in target.references():
            node = node_of(ref)
            if ref.kind == "target":
                infos[node] = plans[ref.location].model_info()
                continue
            if node not in sources:
                sources[node] = _open_source(ref, node, target, pickles, pinned)
            if node not in source_digests:
                found = digests(sources[node])
                source_digests[node] = found
                if found is None:
                    unhashed.add(node)
            infos[node] = sources[node].info
        plans[name] = expand(
            target, infos, plans, source_digests, shard_bytes, output_digest, store, platform=platform
        )
    return Plan(mergefile, order, plans, sources, graph, frozenset(unhashed), platform)


def _open_source(ref: ModelRef, node: str, target: Target, pickles, pinned: Mapping[str, str]) -> Source:
    """A source's tensor table from its headers; pickled ones through ``pickles`` (None: refused)."""
    location = target.mergefile.location(("targets", target.name), target.name)
    location = Location(location.file, ref.line or location.line, target.name)
    try:
        if ref.kind == "hub":
            # Same Mergefile + lock -> same bytes: an unpinned hub model uses the locked commit.
            folder, revision = io.resolve_hub_model(ref.location, ref.revision or pinned.get(node))
            return Source(node, ref, io.read_model(folder, pickles), revision)
        return Source(node, ref, io.read_model(ref.location, pickles))
    except ModelError as error:
        raise ModelError(f"model '{ref}': {error.message}", location) from None


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
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    output_digest: OutputLookup = lambda key: None,
    store: Path | None = None,
    *,
    platform: str,
) -> TargetPlan:
    """Expand one target into its tensor tasks, checking layer ranges and shapes.

    ``platform``: where its tasks compute, recorded in the key of each that does.
    """
    if target.moe is not None:
        from mbuild import moe

        return moe.expand(target, infos, plans, source_digests, shard_bytes, output_digest, platform=platform)
    method = methods.get(target.method)
    groups = _groups(target)
    layer_tables = {node: layer_table(info) for node, info in infos.items()}

    def error(path: tuple, message: str) -> MergefileError:
        return MergefileError(message, target.location(*path))

    # Layer ranges against each source's real layer count.
    for group in groups:
        for index, (ref, layer_range) in enumerate(zip(group.refs, group.ranges)):
            info = infos[node_of(ref)]
            count = info.num_layers
            layer_ids = layer_tables[node_of(ref)][0]
            if count is None:
                count = (max(layer_ids) + 1) if layer_ids else 0
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

    _check_architectures(target, groups, infos)
    config_node = node_of(target.base_model) if target.base_model else node_of(groups[0].refs[0])
    vocab = None
    if target.tokenizer is not None:
        vocab = _vocabulary(target, groups, config_node, infos, plans, store)

    tasks: list[TensorTask] = []
    seen_names: set[str] = set()
    taken: set[tuple[str, str]] = set()  # (node, tensor) of every input some task reads
    out_layer = 0
    layer_origin: list[tuple[str, int]] = []  # output layer -> (source node, source layer)

    def add_task(out_name: str, group: _Group, in_names: list[str], t: float) -> None:
        if out_name in seen_names:
            raise error(group.path, f"two slices produce tensor '{out_name}'")
        seen_names.add(out_name)
        tensor_infos = []
        for ref, in_name, path in zip(group.refs, in_names, group.paths):
            info = infos[node_of(ref)]
            found = info.tensors.get(in_name)
            if found is None and in_name == "lm_head.weight" and info.config.get("tie_word_embeddings", False):
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
        base_index = None
        if group.base is not None:
            for index, ref in enumerate(group.refs):
                if node_of(ref) == node_of(group.base):
                    base_index = index
        in_dtypes = [ti.dtype for ti in tensor_infos]
        is_float = all(d in io.FLOAT_DTYPES for d in in_dtypes)
        if is_float:
            out_dtype = target.out_dtype or target.dtype or _promote(in_dtypes)
            compute_dtype = target.dtype or ("float64" if "float64" in in_dtypes else "float32")
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
        key = None
        if all(i.key is not None for i in inputs):
            key = keys.task_key(
                method=op,
                version=version,
                params=dict(params),
                model_params=[dict(p) for p in model_params],
                base_index=base_index,
                compute_dtype=compute_dtype,
                out_dtype=out_dtype,
                shape=shape,
                seed=seed,
                input_keys=[i.key for i in inputs],
                platform=platform,
            )
        tasks.append(
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
                key=key,
                vocabulary=on_vocabulary,
            )
        )

    first, last = groups[0], groups[-1]
    first_others = layer_tables[node_of(first.refs[0])][1]
    last_others = layer_tables[node_of(last.refs[0])][1]
    for name in sorted(n for n in first_others if PRE_LAYER.search(n)):
        add_task(name, first, [name] * len(first.refs), 0.0)
    for group in groups:
        length = group.ranges[0][1] - group.ranges[0][0]
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            lead_node = node_of(group.refs[0])
            lead_layers, _ = layer_tables[lead_node]
            source_layer = group.ranges[0][0] + offset
            suffixes = lead_layers.get(source_layer, {})
            for suffix in sorted(suffixes):
                out_name = LAYER_NAME.sub(lambda m: f"{m['prefix']}{out_layer}.{m['suffix']}", suffixes[suffix])
                in_names = []
                for ref, layer_range in zip(group.refs, group.ranges):
                    layers, _ = layer_tables[node_of(ref)]
                    in_layer = layers.get(layer_range[0] + offset, {})
                    if suffix not in in_layer:
                        raise error(group.path, f"model '{ref}' has no '{suffix}' in layer {layer_range[0] + offset}")
                    in_names.append(in_layer[suffix])
                add_task(out_name, group, in_names, t)
            layer_origin.append((lead_node, source_layer))
            out_layer += 1
    for name in sorted(n for n in last_others if not PRE_LAYER.search(n)):
        add_task(name, last, [name] * len(last.refs), 0.0)

    dropped = _untaken(target, groups, infos, taken)
    config = _output_config(infos[config_node].config, infos, layer_origin, tasks)
    files = companion_files_for(target, config_node, infos, plans)
    if vocab is not None:
        files = {n: p for n, p in files.items() if not TOKENIZER_FILE.match(n) and n != "tokenizer_config.json"}
        files.update(vocab.files())
        _set_vocab_size(config, vocab.size)
    if target.chat_template is not None:
        files["chat_template.jinja"] = _chat_template_file(target, files, infos, plans, store)
    return finish_target_plan(target, tasks, config, files, out_layer, shard_bytes, vocab, dropped)


def _architecture(info: io.ModelInfo) -> str | None:
    """The architecture class a model's config names (its first), if any."""
    names = info.config.get("architectures")
    if isinstance(names, list) and names and isinstance(names[0], str):
        return names[0]
    return None


def _check_architectures(target: Target, groups: list[_Group], infos: Mapping[str, io.ModelInfo]) -> None:
    """Refuse inputs of different architectures unless the target allows them (mergekit's rule)."""
    if target.mixed_architectures:
        return
    seen: dict[str, str] = {}
    for ref in (ref for group in groups for ref in group.refs):
        architecture = _architecture(infos[node_of(ref)])
        if architecture is not None:
            seen.setdefault(architecture, str(ref))
    if len(seen) > 1:
        shown = ", ".join(f"'{ref}' is {architecture}" for architecture, ref in seen.items())
        raise MergefileError(
            f"the models are of different architectures ({shown}); merging them can drop or misplace "
            "tensors, so mbuild refuses. Say 'allow_mixed_architectures: true' in the target to merge them "
            "anyway (the output takes the first model's architecture)",
            target.location(),
        )


def _untaken(target: Target, groups: list[_Group], infos, taken: set[tuple[str, str]]) -> tuple[str, ...]:
    """Input tensors the target should read but no task does: refused unless the target allows it.

    A `models:` merge takes every tensor of every model; a slice takes its layers and, in the
    first and last slices, the tensors before and after the layer stack.
    """
    expected: dict[str, set[str]] = {}
    for position, group in enumerate(groups):
        for ref, (start, end) in zip(group.refs, group.ranges):
            wanted = expected.setdefault(node_of(ref), set())
            for name in infos[node_of(ref)].tensors:
                match = LAYER_NAME.match(name)
                if target.models:
                    wanted.add(name)
                elif match:
                    if start <= int(match["index"]) < end:
                        wanted.add(name)
                elif (position == 0 and PRE_LAYER.search(name)) or (position == len(groups) - 1 and not PRE_LAYER.search(name)):
                    wanted.add(name)
    dropped: list[str] = []
    for node, names in expected.items():
        missed = sorted(name for name in names if (node, name) not in taken)
        if missed and not target.mixed_architectures:
            label = node.split(":", 1)[1]
            shown = ", ".join(missed[:3]) + (f" and {len(missed) - 3} more" if len(missed) > 3 else "")
            raise MergefileError(
                f"model '{label}' has {len(missed)} tensor(s) that no output tensor takes ({shown}): mbuild never "
                "drops an input tensor silently. If the inputs really differ in architecture, say "
                "'allow_mixed_architectures: true' in the target and they are dropped with a warning",
                target.location(),
            )
        dropped.extend(f"{node.split(':', 1)[1]}: {name}" for name in missed)
    return tuple(dropped)


def finish_target_plan(
    target: Target, tasks, config, files, num_layers, shard_bytes, vocabulary=None, dropped=()
) -> TargetPlan:
    """The TargetPlan for expanded tasks: file digests, model card, inputs and the target's key."""
    file_digests = {name: file_digest(path) for name, path in files.items()}
    input_nodes = tuple(node_of(r) for r in target.references())
    card = model_card(target, list(input_nodes))
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


def _vocabulary(target: Target, groups, base_node: str, infos, plans, store: Path):
    """The output vocabulary and each input's row map (see mbuild.vocabulary)."""
    from mbuild import vocabulary

    nodes = list(dict.fromkeys(node_of(ref) for group in groups for ref in group.refs))
    spec = target.tokenizer
    extra = [spec.source.node] if isinstance(spec.source, ModelRef) else []
    extra += [t.model.node for _, t in spec.tokens if t.model is not None]
    files = {}
    for node in dict.fromkeys([base_node, *nodes, *extra]):
        companions = companions_of(node, infos, plans)
        files[node] = {n: p for n, p in companions.items() if TOKENIZER_FILE.match(n) or n == "tokenizer_config.json"}
        if not files[node]:
            raise ModelError(f"'{node.split(':', 1)[1]}' has no tokenizer files", target.location("tokenizer_source"))
    sizes = {node: _vocab_size(infos[node].config) for node in files}
    names = {node: node.split(":", 1)[1] for node in files}
    try:
        return vocabulary.resolve(spec, base_node, nodes, files, sizes, names, Path(store) / "vocabularies")
    except OSError:  # a read-only or full cache: kept in the system's temporary folder instead
        import tempfile

        elsewhere = Path(tempfile.gettempdir()) / "mbuild-vocabularies"
        return vocabulary.resolve(spec, base_node, nodes, files, sizes, names, elsewhere)


def _vocab_size(config: Mapping[str, Any]) -> int | None:
    return io.config_int(config, ("vocab_size",))


def _set_vocab_size(config: dict, size: int) -> None:
    nested = "vocab_size" not in config and isinstance(config.get("text_config"), dict)
    holder = config["text_config"] if nested else config
    holder["vocab_size"] = size


def _is_vocabulary_tensor(name: str, tensor_infos, group, infos) -> bool:
    """Embeddings and output heads: tensors whose first axis is the model's vocabulary."""
    if name.endswith("lm_head.weight"):
        return True
    if not PRE_LAYER.search(name) or "position" in name:
        return False
    for ref, info in zip(group.refs, tensor_infos):
        size = _vocab_size(infos[node_of(ref)].config)
        if size is not None and info.shape and info.shape[0] != size:
            return False
    return True


def _chat_template_file(target: Target, files, infos, plans, store: Path) -> str:
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


def embedding_name(info: io.ModelInfo) -> str | None:
    """The name of a model's input embedding, if it has one."""
    for name in info.tensors:
        if PRE_LAYER.search(name) and name.endswith("weight") and "position" not in name:
            return name
    return None


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
        model_params.append(tuple(values))
    return tuple(params), tuple(model_params)


def input_key(node: str, info: io.TensorInfo, plans: Mapping[str, TargetPlan], source_digests, output_digest) -> str | None:
    """An input's key: its bytes' digest when known, else the upstream task that makes it."""
    name = info.name
    if node.startswith("target:"):
        upstream = plans[node.split(":", 1)[1]].task(name)
        if upstream is None or upstream.key is None:
            return None
        made = output_digest(upstream.key)
        if made is None:
            return keys.pending_key(upstream.key)
        return keys.content_key(made, upstream.dtype, upstream.shape)
    found = source_digests.get(node)
    if found is None or name not in found:
        return None
    return keys.content_key(found[name], info.dtype, info.shape)


def _output_config(donor: Mapping[str, Any], infos, layer_origin, tasks) -> dict[str, Any]:
    """The donor's config with the layer count (and per-layer lists) made to fit the output."""
    import copy

    config = copy.deepcopy(dict(donor))
    holder = config.get("text_config") if "num_hidden_layers" not in config and isinstance(config.get("text_config"), dict) else config
    old_count = io.layer_count(config)
    new_count = len(layer_origin)
    if old_count is not None and new_count != old_count:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(holder.get(key), int):
                holder[key] = new_count
        for key, value in list(holder.items()):
            if isinstance(value, list) and len(value) == old_count and key != "architectures":
                rebuilt = []
                for node, layer in layer_origin:
                    source_config = infos[node].config
                    source_list = source_config.get(key) if isinstance(source_config.get(key), list) else value
                    rebuilt.append(source_list[layer % len(source_list)])
                holder[key] = rebuilt
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


def companions_of(node: str, infos, plans) -> dict[str, str]:
    """A model's non-weight files by name: a source's own, or what a target's output will hold."""
    if node.startswith("target:"):
        return dict(plans[node.split(":", 1)[1]].files)
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
    """sha256 of a (small) file, None if it cannot be read."""
    try:
        return io.hash_file(path)
    except OSError:
        return None


def model_card(target: Target, input_nodes: Sequence[str]) -> str:
    """The README.md of an output: what it is, the recipe as written, and its lineage."""
    recipe = yaml.safe_dump({target.name: dict(target.recipe)}, sort_keys=False).rstrip()
    lineage = "\n".join(f"- `{node.split(':', 1)[1]}` ({node.split(':', 1)[0]})" for node in input_nodes)
    name, _, paper = recipe_method(target)
    return (
        "---\nlibrary_name: transformers\ntags:\n- mbuild\n- merge\n---\n"
        f"# {target.name}\n\n"
        f"A merge built by mbuild with **{name}** ({paper}).\n\n"
        f"## Inputs\n\n{lineage}\n\n"
        f"## Recipe\n\n```yaml\n{recipe}\n```\n"
    )


def recipe_method(target: Target) -> tuple[str, int, str]:
    """(name, implementation version, paper) of what a target runs: a merge method or an MoE."""
    if target.moe is not None:
        from mbuild import moe

        return "moe", moe.MOE_VERSION, "https://arxiv.org/abs/2401.04088"
    method = methods.get(target.method)
    return method.name, method.version, method.paper


def source_fingerprint(source: Source, found: Mapping[str, str] | None) -> str | None:
    """One hash for a source's content (its tensors' digests and revision)."""
    if found is None:
        return None
    return keys.digest({"revision": source.revision, "tensors": dict(found)})


def plain_recipe(data: Any) -> Any:
    """Recipe data as JSON would give it back (tuples to lists), for comparing with the lock."""
    import json

    return json.loads(keys.canonical(data))

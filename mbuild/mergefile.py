"""Parse a Mergefile (YAML) and validate it into typed, frozen recipes.

A Mergefile maps target names to merge recipes. A recipe body is a mergekit
merge config (``merge_method``, ``models``/``slices``, ``base_model``,
``parameters``, ``dtype`` ...) plus mbuild's own ``output`` and ``seed``.
Everything here works from the text alone: checks that need model metadata
(shapes, layer counts) happen in :mod:`mbuild.plan`.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from mbuild import io, methods
from mbuild.errors import Location, MergefileError

TOP_LEVEL_KEYS = ("targets", "defaults")
RECIPE_KEYS = (
    "merge_method",
    "models",
    "slices",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "output",
    "seed",
    "description",
    "allow_mixed_architectures",
)
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
TOKEN_KEYS = ("source", "force")
# Chat templates mbuild knows by name (written here from each format's public description).
CHAT_TEMPLATES = ("chatml", "llama3")
# A target whose body has `experts:` is a mergekit-moe config.
MOE_KEYS = (
    "base_model",
    "experts",
    "gate_mode",
    "experts_per_token",
    "shared_experts",
    "dtype",
    "architecture",
    "tokenizer_source",
    "output",
    "seed",
    "description",
)
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")
GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "base_model", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
FILTER_KEYS = ("filter", "value")

# Names users write for dtypes, mapped to the canonical torch name.
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float64": "float64",
    "fp64": "float64",
}

TARGET_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
# Bytes of a target name or an output folder's name: mbuild adds up to about 30 to name its
# lock and temporaries beside the output, and a filesystem allows 255 in a name.
NAME_LIMIT = 200
# A real Mergefile is a few KB with a few hundred YAML nodes, nested a dozen deep: these
# bounds only stop a hostile or runaway one (YAML aliases of aliases multiply without end).
MERGEFILE_LIMIT = 1024 * 1024
YAML_NODE_LIMIT = 100_000
YAML_DEPTH_LIMIT = 64
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")


@dataclass(frozen=True)
class ModelRef:
    """A reference to a model as written: a target, a local folder, or a hub repository."""

    text: str
    kind: str  # "target" | "local" | "hub"
    location: str  # target name, absolute folder, or hub repo id
    revision: str | None = None
    line: int | None = None
    node: str = ""  # the graph node: one per model, however its path is spelled

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class InputModel:
    """One entry of a recipe's ``models:`` list."""

    model: ModelRef
    parameters: Mapping[str, Any]
    path: tuple


@dataclass(frozen=True)
class SliceSource:
    """One source of an output slice: a model and the layers taken from it."""

    model: ModelRef
    layer_range: tuple[int, int] | None
    parameters: Mapping[str, Any]
    path: tuple


@dataclass(frozen=True)
class OutputSlice:
    """One ``slices:`` entry: output layers made from aligned source layer ranges."""

    sources: tuple[SliceSource, ...]
    base_model: ModelRef | None
    parameters: Mapping[str, Any]
    path: tuple


@dataclass(frozen=True)
class TokenSource:
    """Where one token's embedding row comes from when a model lacks it (or when forced)."""

    kind: str  # "model" (that model's own row), "model_token" (a given row of a model), "zero"
    model: ModelRef | None = None
    token_id: int | None = None
    token: str | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """The output vocabulary: its source and per-token embedding rules (mergekit's semantics)."""

    source: Any  # "base" | "union" | ModelRef
    tokens: tuple[tuple[str, TokenSource], ...] = ()
    pad_to_multiple_of: int | None = None


@dataclass(frozen=True)
class Expert:
    """One expert of an MoE target: a dense model whose MLPs become expert MLPs."""

    model: ModelRef
    positive_prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    residual_scale: float | None
    path: tuple


@dataclass(frozen=True)
class MoE:
    """The mixture-of-experts part of a recipe (mergekit-moe's config)."""

    experts: tuple[Expert, ...]
    gate_mode: str
    experts_per_token: int
    architecture: str | None


@dataclass(frozen=True)
class Target:
    """A named merge recipe, validated and with every model reference resolved in kind."""

    name: str
    method: str
    models: tuple[InputModel, ...]
    slices: tuple[OutputSlice, ...]
    base_model: ModelRef | None
    parameters: Mapping[str, Any]
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: ModelRef | str | None
    chat_template: str | None
    output: Path
    seed: int
    recipe: Mapping[str, Any]  # the body as written, defaults applied: what the lock records
    mergefile: "Mergefile" = field(repr=False, compare=False)
    moe: MoE | None = None
    tokenizer: TokenizerSpec | None = None
    # Inputs of other architectures may be merged (their tensors no output takes are then
    # named in a warning); without it, mbuild refuses, as mergekit does without --allow-crimes.
    mixed_architectures: bool = False

    def references(self) -> list[ModelRef]:
        """Every model reference in the recipe, in order of appearance, repeats removed."""
        refs: list[ModelRef] = []
        if self.moe:
            refs.extend(expert.model for expert in self.moe.experts)
        for model in self.models:
            refs.append(model.model)
        for output_slice in self.slices:
            refs.extend(source.model for source in output_slice.sources)
            if output_slice.base_model:
                refs.append(output_slice.base_model)
        if self.base_model:
            refs.append(self.base_model)
        if isinstance(self.tokenizer_source, ModelRef):
            refs.append(self.tokenizer_source)
        if self.tokenizer is not None:
            if isinstance(self.tokenizer.source, ModelRef):
                refs.append(self.tokenizer.source)
            refs.extend(t.model for _, t in self.tokenizer.tokens if t.model is not None)
        seen, unique = set(), []
        for ref in refs:
            if ref.node not in seen:
                seen.add(ref.node)
                unique.append(ref)
        return unique

    def location(self, *path: Any) -> Location:
        """Where a part of this recipe is written (the target's own line if not found).

        ``path`` is relative to the target, or absolute when it starts at the top
        ('targets' or 'defaults'), as the paths stored on models and slices do.
        """
        if path and path[0] in TOP_LEVEL_KEYS:
            return self.mergefile.location(tuple(path), self.name)
        return self.mergefile.location(("targets", self.name, *path), self.name)


@dataclass(frozen=True)
class Mergefile:
    """A parsed Mergefile: its path, its targets in written order, and line numbers."""

    path: Path
    targets: Mapping[str, Target]
    lines: Mapping[tuple, int] = field(repr=False)

    @property
    def folder(self) -> Path:
        return self.path.parent

    def location(self, path: tuple, target: str | None = None) -> Location:
        """The line of the deepest written part of ``path``."""
        for end in range(len(path), 0, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return Location(self.path, line, target)
        return Location(self.path, None, target)


def load(path: str | Path) -> Mergefile:
    """Read and validate a Mergefile; raise MergefileError naming file, line and target."""
    path = Path(path).absolute()
    try:
        data = io.read_small_file(path, MERGEFILE_LIMIT, MergefileError)
    except FileNotFoundError:
        raise MergefileError(f"no Mergefile at {path}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise MergefileError("the Mergefile is not UTF-8 text", Location(path, line)) from None
    return parse(text, path)


def parse(text: str, path: Path) -> Mergefile:
    """Validate Mergefile text; ``path`` anchors relative model folders and messages."""
    data, lines = _load_yaml(text, path)
    lines = dict(lines)
    targets: dict[str, Target] = {}
    mergefile = Mergefile(path=path, targets=targets, lines=lines)
    checker = _Checker(mergefile)
    if not isinstance(data, dict):
        raise MergefileError("a Mergefile is a mapping with a 'targets:' key", Location(path, 1))
    checker.unknown_keys(data, TOP_LEVEL_KEYS, ())
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise checker.error(("defaults",), "'defaults' must be a mapping of recipe keys")
    checker.unknown_keys(defaults, RECIPE_KEYS, ("defaults",))
    bodies = data.get("targets")
    if not isinstance(bodies, dict) or not bodies:
        raise checker.error(("targets",), "the Mergefile needs a non-empty 'targets:' mapping")
    for name in bodies:
        if not isinstance(name, str) or not TARGET_NAME.match(name) or name in ("all",):
            raise checker.error(
                ("targets", name),
                f"invalid target name {name!r}: use letters, digits, '_', '-', '.' (and not 'all')",
            )
        if len(name) > NAME_LIMIT:
            raise checker.error(("targets", name), f"target name of {len(name)} characters: at most {NAME_LIMIT}")
    for name, body in bodies.items():
        targets[name] = checker.target(name, body, defaults, set(bodies))
    check_outputs(mergefile)
    return mergefile


def check_outputs(mergefile: Mergefile) -> None:
    """Refuse any output that could replace or delete what is not its own.

    Compared as resolved paths (`out/y/../x` is `out/x`, links followed): an output must be
    a folder or nothing yet, not a link; no two targets may share one or nest one inside the
    other; none may be, hold or lie inside a local source model; none may hold the Mergefile.
    """
    import os

    def real(path: Path) -> Path:
        return Path(os.path.realpath(path))

    def inside(inner: Path, outer: Path) -> bool:
        return inner == outer or outer in inner.parents

    mergefile_file = real(mergefile.path)
    # Every local model any target reads: one target's output must not overlap another's source.
    sources = {
        ref.text: real(Path(ref.location))
        for target in mergefile.targets.values()
        for ref in target.references()
        if ref.kind == "local"
    }
    resolved: dict[str, Path] = {}
    for name, target in mergefile.targets.items():
        output = target.output
        where = target.location("output")
        for part in output.parts:
            if len(os.fsencode(part)) > NAME_LIMIT:
                raise MergefileError(
                    f"output {output}: the name {part[:40]}... is {len(os.fsencode(part))} bytes long, at most {NAME_LIMIT}",
                    where,
                )
        if output.is_symlink():
            raise MergefileError(f"output {output} is a symbolic link: name the real folder in 'output:'", where)
        if output.exists() and not output.is_dir():
            raise MergefileError(
                f"output {output} exists and is not a folder: mbuild never replaces a file; choose another 'output:'",
                where,
            )
        path = real(output)
        if inside(mergefile_file, path):
            raise MergefileError(
                f"output {output} would hold the Mergefile {mergefile.path}: give the target a folder of its own",
                where,
            )
        for other, other_path in resolved.items():
            if path == other_path:
                raise MergefileError(
                    f"output folder {output} is also target '{other}''s: give each target its own 'output:'", where
                )
            if inside(path, other_path) or inside(other_path, path):
                outer, inner = (other, name) if inside(path, other_path) else (name, other)
                raise MergefileError(
                    f"output of target '{inner}' lies inside the output of target '{outer}' ({output}): "
                    "outputs must not nest",
                    where,
                )
        for text, source in sources.items():
            if inside(path, source) or inside(source, path):
                raise MergefileError(
                    f"output {output} overlaps the source model '{text}' ({source}): "
                    "an output must never be, hold or lie inside a model it reads",
                    where,
                )
        resolved[name] = path


class _Checker:
    """Turns the raw YAML of each target into a Target, failing at the first mistake."""

    def __init__(self, mergefile: Mergefile):
        self.mergefile = mergefile
        self.target_name: str | None = None

    def error(self, path: tuple, message: str) -> MergefileError:
        return MergefileError(message, self.mergefile.location(path, self.target_name))

    def unknown_keys(self, mapping: dict, allowed: Iterable[str], path: tuple) -> None:
        allowed = tuple(allowed)
        for key in mapping:
            if key not in allowed:
                hint = _suggest(str(key), allowed)
                raise self.error((*path, key), f"unknown key '{key}'{hint}")

    def target(self, name: str, body: Any, defaults: dict, target_names: set[str]) -> Target:
        self.target_name = name
        path = ("targets", name)
        if not isinstance(body, dict):
            raise self.error(path, "a target is a mapping (merge_method, models or slices, ...)")
        if "experts" in body:
            return self.moe_target(name, body, defaults, target_names)
        self.unknown_keys(body, RECIPE_KEYS, path)
        recipe = dict(defaults)
        recipe.update(body)
        if isinstance(defaults.get("parameters"), dict) and isinstance(body.get("parameters"), dict):
            recipe["parameters"] = {**defaults["parameters"], **body["parameters"]}
        where = lambda key: path + (key,) if key in body else ("defaults", key)  # noqa: E731

        method_name = recipe.get("merge_method")
        if method_name is None:
            raise self.error(path, "missing 'merge_method'")
        try:
            method = methods.get(str(method_name))
        except KeyError:
            known = [m.name for m in methods.all_methods()]
            hint = _suggest(str(method_name), known)
            raise self.error(where("merge_method"), f"unknown merge_method '{method_name}'{hint}") from None

        refs = _RefResolver(self, target_names)
        base_model = None
        if recipe.get("base_model") is not None:
            base_model = refs.resolve(recipe["base_model"], where("base_model"))
        models: list[InputModel] = []
        slices: list[OutputSlice] = []
        has_models, has_slices = "models" in recipe, "slices" in recipe
        if has_models == has_slices:
            raise self.error(path, "give exactly one of 'models' or 'slices'")
        if has_models:
            entries = recipe["models"]
            if not isinstance(entries, list) or not entries:
                raise self.error(where("models"), "'models' must be a non-empty list")
            for index, entry in enumerate(entries):
                entry_path = where("models") + (index,)
                if isinstance(entry, str):
                    entry = {"model": entry}
                if not isinstance(entry, dict) or "model" not in entry:
                    raise self.error(entry_path, "each entry of 'models' needs 'model:'")
                self.unknown_keys(entry, MODEL_KEYS, entry_path)
                model = refs.resolve(entry["model"], entry_path + ("model",))
                parameters = self.parameters(method, entry.get("parameters"), entry_path + ("parameters",), per_model=True)
                models.append(InputModel(model, parameters, entry_path))
            seen: dict[tuple, int] = {}
            for index, model in enumerate(models):
                key = model.model.node
                if key in seen:
                    raise self.error(
                        model.path + ("model",),
                        f"model '{model.model}' is listed twice in 'models' (entries {seen[key] + 1} and {index + 1})",
                    )
                seen[key] = index
        else:
            entries = recipe["slices"]
            if not isinstance(entries, list) or not entries:
                raise self.error(where("slices"), "'slices' must be a non-empty list")
            for index, entry in enumerate(entries):
                slices.append(self.output_slice(method, entry, where("slices") + (index,), refs))

        parameters = self.parameters(method, recipe.get("parameters"), where("parameters"), per_model=None)
        dtype = self.dtype(recipe.get("dtype"), where("dtype"))
        out_dtype = self.dtype(recipe.get("out_dtype"), where("out_dtype"))

        tokenizer_source = recipe.get("tokenizer_source")
        if tokenizer_source is not None and tokenizer_source not in ("base", "union"):
            tokenizer_source = refs.resolve(tokenizer_source, where("tokenizer_source"))
        tokenizer = None
        if "tokenizer" in recipe:
            if tokenizer_source is not None:
                raise self.error(where("tokenizer"), "give 'tokenizer' or 'tokenizer_source', not both")
            tokenizer = self.tokenizer_block(recipe["tokenizer"], where("tokenizer"), refs)
        elif tokenizer_source is not None:
            tokenizer = TokenizerSpec(tokenizer_source)

        chat_template = recipe.get("chat_template")
        if chat_template is not None:
            if not isinstance(chat_template, str) or not chat_template.strip():
                raise self.error(where("chat_template"), "'chat_template' must be a string")
            known = ("auto", *CHAT_TEMPLATES)
            if "{" not in chat_template and chat_template not in known:
                raise self.error(
                    where("chat_template"),
                    f"unknown chat_template '{chat_template}'{_suggest(chat_template, known)}: "
                    f"use auto, {', '.join(CHAT_TEMPLATES)}, or a Jinja template",
                )

        output = recipe.get("output", f"build/{name}")
        if "output" in body and not isinstance(output, str):
            raise self.error(where("output"), "'output' must be a folder path")
        if "output" in defaults and "output" not in body:
            raise self.error(("defaults", "output"), "'output' cannot be a default: each target needs its own folder")
        output_path = (self.mergefile.folder / Path(str(output)).expanduser()).absolute()

        seed = recipe.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise self.error(where("seed"), f"'seed' must be a non-negative integer, not {seed!r}")

        mixed = recipe.get("allow_mixed_architectures", False)
        if not isinstance(mixed, bool):
            raise self.error(where("allow_mixed_architectures"), "'allow_mixed_architectures' must be true or false")

        self._check_method_shape(method, models, slices, base_model, path)
        target = Target(
            name=name,
            method=method.name,
            models=tuple(models),
            slices=tuple(slices),
            base_model=base_model,
            parameters=parameters,
            dtype=dtype,
            out_dtype=out_dtype,
            tokenizer_source=tokenizer_source,
            chat_template=chat_template,
            output=output_path,
            seed=seed,
            recipe=recipe,
            mergefile=self.mergefile,
            tokenizer=tokenizer,
            mixed_architectures=mixed,
        )
        self.target_name = None
        return target

    def moe_target(self, name: str, body: dict, defaults: dict, target_names: set[str]) -> Target:
        """A mergekit-moe config: dense experts (sources or targets) into a Mixtral-style MoE."""
        path = ("targets", name)
        self.unknown_keys(body, MOE_KEYS, path)
        recipe = {k: v for k, v in defaults.items() if k in ("dtype", "seed")}
        recipe.update(body)
        where = lambda key: path + (key,) if key in body else ("defaults", key)  # noqa: E731
        refs = _RefResolver(self, target_names)
        if recipe.get("base_model") is None:
            raise self.error(path, "an MoE target needs 'base_model' (attention, embeddings and norms come from it)")
        base_model = refs.resolve(recipe["base_model"], where("base_model"))
        if recipe.get("shared_experts"):
            raise self.error(
                where("shared_experts"),
                "shared_experts (Qwen MoE / DeepSeek output) are not supported yet: mbuild builds Mixtral-style MoEs",
            )
        gate_mode = recipe.get("gate_mode", "hidden")
        if gate_mode not in GATE_MODES:
            raise self.error(where("gate_mode"), f"unknown gate_mode '{gate_mode}'{_suggest(str(gate_mode), GATE_MODES)}")
        per_token = recipe.get("experts_per_token", 2)
        if isinstance(per_token, bool) or not isinstance(per_token, int) or per_token < 1:
            raise self.error(where("experts_per_token"), f"'experts_per_token' must be a positive integer, not {per_token!r}")
        raw_experts = recipe.get("experts")
        if not isinstance(raw_experts, list) or not raw_experts:
            raise self.error(where("experts"), "'experts' must be a non-empty list")
        experts = []
        for index, raw in enumerate(raw_experts):
            expert_path = where("experts") + (index,)
            if not isinstance(raw, dict) or "source_model" not in raw:
                raise self.error(expert_path, "each expert needs 'source_model:'")
            self.unknown_keys(raw, EXPERT_KEYS, expert_path)
            if raw.get("noise_scale") is not None:
                raise self.error(expert_path + ("noise_scale",), "noise_scale is not supported yet")
            prompts = {}
            for key in ("positive_prompts", "negative_prompts"):
                value = raw.get(key) or []
                if isinstance(value, str):
                    value = [value]
                if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                    raise self.error(expert_path + (key,), f"'{key}' must be a list of strings")
                prompts[key] = tuple(value)
            if gate_mode not in ("random", "uniform_random") and not prompts["positive_prompts"]:
                raise self.error(expert_path, f"gate_mode {gate_mode} needs 'positive_prompts' for every expert")
            residual = raw.get("residual_scale")
            if residual is not None and (isinstance(residual, bool) or not isinstance(residual, (int, float))):
                raise self.error(expert_path + ("residual_scale",), "'residual_scale' must be a number")
            model = refs.resolve(raw["source_model"], expert_path + ("source_model",))
            experts.append(
                Expert(model, prompts["positive_prompts"], prompts["negative_prompts"],
                       float(residual) if residual is not None else None, expert_path)
            )
        if len(experts) < per_token:
            raise self.error(where("experts"), f"{len(experts)} expert(s) but experts_per_token is {per_token}")
        if gate_mode not in ("random", "uniform_random"):
            signature = {(e.positive_prompts, e.negative_prompts) for e in experts}
            if len(experts) > 1 and len(signature) == 1:
                raise self.error(where("experts"), "every expert has the same prompts: the router could not tell them apart")
        dtype = self.dtype(recipe.get("dtype"), where("dtype"))
        tokenizer_source = recipe.get("tokenizer_source")
        if tokenizer_source is not None:
            tokenizer_source = base_model if tokenizer_source == "base" else refs.resolve(tokenizer_source, where("tokenizer_source"))
        output = recipe.get("output", f"build/{name}")
        if not isinstance(output, str):
            raise self.error(where("output"), "'output' must be a folder path")
        seed = recipe.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise self.error(where("seed"), f"'seed' must be a non-negative integer, not {seed!r}")
        architecture = recipe.get("architecture")
        if architecture not in (None, "mixtral"):
            raise self.error(where("architecture"), f"architecture '{architecture}' is not supported: mbuild builds Mixtral MoEs")
        target = Target(
            name=name,
            method="moe",
            models=(),
            slices=(),
            base_model=base_model,
            parameters={},
            dtype=dtype,
            out_dtype=None,
            tokenizer_source=tokenizer_source,
            chat_template=None,
            output=(self.mergefile.folder / output).expanduser().absolute(),
            seed=seed,
            recipe=recipe,
            mergefile=self.mergefile,
            moe=MoE(tuple(experts), gate_mode, per_token, architecture),
        )
        self.target_name = None
        return target

    def tokenizer_block(self, value: Any, path: tuple, refs: "_RefResolver") -> TokenizerSpec:
        """mergekit's `tokenizer:` block: source, per-token embedding sources, padding."""
        if not isinstance(value, dict):
            raise self.error(path, "'tokenizer' must be a mapping (source, tokens, pad_to_multiple_of)")
        self.unknown_keys(value, TOKENIZER_KEYS, path)
        source = value.get("source", "union")
        if source not in ("base", "union"):
            source = refs.resolve(source, path + ("source",))
        pad = value.get("pad_to_multiple_of")
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
            raise self.error(path + ("pad_to_multiple_of",), f"'pad_to_multiple_of' must be a positive integer, not {pad!r}")
        tokens = []
        raw_tokens = value.get("tokens") or {}
        if not isinstance(raw_tokens, dict):
            raise self.error(path + ("tokens",), "'tokens' maps token strings to {source, force}")
        for token, rule in raw_tokens.items():
            token_path = path + ("tokens", token)
            if not isinstance(rule, dict):
                raise self.error(token_path, "each token needs a mapping with 'source' (and optionally 'force')")
            self.unknown_keys(rule, TOKEN_KEYS, token_path)
            force = rule.get("force", False)
            if not isinstance(force, bool):
                raise self.error(token_path + ("force",), "'force' must be true or false")
            raw = rule.get("source")
            if isinstance(raw, str):
                tokens.append((str(token), TokenSource("model", refs.resolve(raw, token_path + ("source",)), force=force)))
            elif isinstance(raw, dict) and raw.get("kind") == "zero":
                tokens.append((str(token), TokenSource("zero", force=force)))
            elif isinstance(raw, dict) and raw.get("kind") == "model_token":
                if ("token_id" in raw) == ("token" in raw):
                    raise self.error(token_path + ("source",), "a model_token source needs exactly one of 'token_id' or 'token'")
                model = refs.resolve(raw.get("model"), token_path + ("source", "model"))
                tokens.append((str(token), TokenSource("model_token", model, raw.get("token_id"), raw.get("token"), force)))
            else:
                raise self.error(token_path + ("source",), "a token's source is a model, {kind: zero}, or {kind: model_token, model, token_id|token}")
        return TokenizerSpec(source, tuple(tokens), pad)

    def output_slice(self, method, entry: Any, path: tuple, refs: "_RefResolver") -> OutputSlice:
        if not isinstance(entry, dict) or "sources" not in entry:
            raise self.error(path, "each slice needs 'sources:'")
        self.unknown_keys(entry, SLICE_KEYS, path)
        raw_sources = entry["sources"]
        if not isinstance(raw_sources, list) or not raw_sources:
            raise self.error(path + ("sources",), "'sources' must be a non-empty list")
        sources = []
        for index, raw in enumerate(raw_sources):
            source_path = path + ("sources", index)
            if not isinstance(raw, dict) or "model" not in raw:
                raise self.error(source_path, "each slice source needs 'model:'")
            self.unknown_keys(raw, SOURCE_KEYS, source_path)
            model = refs.resolve(raw["model"], source_path + ("model",))
            layer_range = None
            if "layer_range" in raw:
                layer_range = self.layer_range(raw["layer_range"], source_path + ("layer_range",))
            parameters = self.parameters(method, raw.get("parameters"), source_path + ("parameters",), per_model=True)
            sources.append(SliceSource(model, layer_range, parameters, source_path))
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sources if s.layer_range}
        if len(lengths) > 1:
            raise self.error(path + ("sources",), f"all sources of a slice must span the same number of layers, got {sorted(lengths)}")
        base_model = refs.resolve(entry["base_model"], path + ("base_model",)) if entry.get("base_model") else None
        parameters = self.parameters(method, entry.get("parameters"), path + ("parameters",), per_model=None)
        return OutputSlice(tuple(sources), base_model, parameters, path)

    def layer_range(self, value: Any, path: tuple) -> tuple[int, int]:
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            raise self.error(path, f"'layer_range' must be [start, end] (integers, end exclusive), not {value!r}")
        start, end = value
        if start < 0 or end <= start:
            raise self.error(path, f"layer_range [{start}, {end}] is empty or negative: end must be greater than start >= 0")
        return (start, end)

    def dtype(self, value: Any, path: tuple) -> str | None:
        if value is None:
            return None
        canonical = DTYPE_NAMES.get(str(value).lower())
        if canonical is None:
            raise self.error(path, f"unknown dtype '{value}'{_suggest(str(value), list(DTYPE_NAMES))}")
        return canonical

    def parameters(self, method, value: Any, path: tuple, per_model: bool | None) -> dict:
        """Check a ``parameters:`` mapping: known names, well-formed settings, values in range.

        ``per_model`` is True under a model or slice source (only per-model parameters
        make sense there) and None at target or slice level (both kinds allowed).
        """
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(path, "'parameters' must be a mapping of parameter names to values")
        for name, setting in value.items():
            try:
                parameter = method.parameter(str(name))
            except KeyError:
                names = [p.name for p in method.parameters]
                hint = _suggest(str(name), names) or (
                    f" ({method.name} takes: {', '.join(names)})" if names else f" ({method.name} takes no parameters)"
                )
                raise self.error((*path, name), f"unknown parameter '{name}' for {method.name}{hint}") from None
            if per_model and not parameter.per_model:
                raise self.error(
                    (*path, name),
                    f"'{name}' is one value per tensor for {method.name}; set it under the target's (or slice's) parameters, not under a model",
                )
            self.setting(parameter, setting, (*path, name))
        return dict(value)

    def setting(self, parameter, setting: Any, path: tuple) -> None:
        """Check one setting: a scalar, a gradient list, or a list of filter rules."""
        if isinstance(setting, dict):
            setting = [setting]
            singular = True
        else:
            singular = False
        if isinstance(setting, list):
            if not setting:
                raise self.error(path, f"empty list for '{parameter.name}'")
            if all(isinstance(item, dict) for item in setting):
                for index, rule in enumerate(setting):
                    rule_path = path if singular else path + (index,)
                    self.unknown_keys(rule, FILTER_KEYS, rule_path)
                    if "value" not in rule:
                        raise self.error(rule_path, f"filter rule for '{parameter.name}' needs 'value:'")
                    if rule.get("filter") is not None and not isinstance(rule["filter"], str):
                        raise self.error(rule_path + ("filter",), "'filter' must be a string")
                    self.setting(parameter, rule["value"], rule_path + ("value",))
                return
            for index, item in enumerate(setting):
                if isinstance(item, (dict, list)):
                    raise self.error(path + (index,), f"mixed list for '{parameter.name}': give either values (a gradient) or filter rules")
                self.scalar(parameter, item, path + (index,))
            return
        self.scalar(parameter, setting, path)

    def scalar(self, parameter, value: Any, path: tuple) -> None:
        try:
            parameter.validate(value)
        except (ValueError, TypeError) as error:
            raise self.error(path, f"bad value for '{parameter.name}': {error}") from None

    def _check_method_shape(self, method, models, slices, base_model, path) -> None:
        """Input-count and base-model rules a method declares, checked per slice."""
        groups: list[tuple[tuple, list[ModelRef], ModelRef | None]] = []
        if models:
            refs = [m.model for m in models]
            if base_model is not None and all(r.node != base_model.node for r in refs):
                refs.append(base_model)
            groups.append((path + ("models",), refs, base_model))
        for output_slice in slices:
            refs = [s.model for s in output_slice.sources]
            groups.append((output_slice.path, refs, output_slice.base_model or base_model))
        for group_path, refs, base in groups:
            has_base = base is not None and any(r.node == base.node for r in refs)
            if method.base == "required" and not has_base:
                where = "" if base is None else f" ('{base}' is not among this slice's sources)"
                raise self.error(group_path, f"{method.name} needs a 'base_model'{where}")
            count = len(refs)
            if count < method.min_models:
                raise self.error(group_path, f"{method.name} needs at least {method.min_models} models, got {count}")
            if method.max_models is not None and count > method.max_models:
                raise self.error(group_path, f"{method.name} takes at most {method.max_models} model(s) per slice, got {count}")


class _RefResolver:
    """Decides what each model string means: a target name wins, then a folder, then the hub."""

    def __init__(self, checker: _Checker, target_names: set[str]):
        self.checker = checker
        self.target_names = target_names

    def resolve(self, value: Any, path: tuple) -> ModelRef:
        line = self.checker.mergefile.location(path).line
        if not isinstance(value, str) or not value.strip():
            raise self.checker.error(path, f"a model reference must be a non-empty string, not {value!r}")
        text = value.strip()
        if text in self.target_names:
            return ModelRef(text, "target", text, None, line, "target:" + text)
        folder = Path(os.path.normpath(self.checker.mergefile.folder / Path(text).expanduser()))
        if "+" in text and not folder.exists():
            raise self.checker.error(path, f"'{text}': LoRA references (model+adapter) are not supported yet")
        if folder.exists():
            if not folder.is_dir():
                raise self.checker.error(path, f"model '{text}' is a file, not a model folder ({folder.absolute()})")
            absolute = Path(os.path.normpath(folder.absolute()))
            try:
                shown = absolute.relative_to(self.checker.mergefile.folder).as_posix()
            except ValueError:
                shown = absolute.as_posix()
            return ModelRef(text, "local", str(absolute), None, line, "local:" + shown)
        looks_local = text.startswith((".", "/", "~")) or not HUB_ID.match(text)
        if looks_local:
            hint = _suggest(text, sorted(self.target_names))
            raise self.checker.error(
                path,
                f"model '{text}' not found: no folder {folder.absolute()} and no target of that name{hint}",
            )
        repo, _, revision = text.partition("@")
        if revision and any(part in ("", ".", "..") for part in revision.split("/")):
            # huggingface_hub finds a branch's commit in the file refs/<revision> of its cache.
            raise self.checker.error(path, f"'{text}': a revision is a branch, tag or commit, never a path with '.', '..' or '//'")
        return ModelRef(text, "hub", repo, revision or None, line, f"hub:{repo}@{revision or 'main'}")


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (a duplicate target is a silent overwrite in YAML)."""


def _load_yaml(text: str, path: Path) -> tuple[Any, dict[tuple, int]]:
    """Load YAML and remember the 1-based line of every mapping key and list item."""
    try:
        check_nesting(text, path)
        node = yaml.compose(text, Loader=_LineLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(error, "problem", None) or str(error)
        raise MergefileError(f"invalid YAML: {problem}", Location(path, line)) from None
    if node is None:
        raise MergefileError("the Mergefile is empty", Location(path, 1))
    converter = _Converter(text, path)
    return converter.value(node, (), 0), converter.lines


def check_nesting(text: str, path: Path) -> None:
    """Refuse YAML nested deeper than YAML_DEPTH_LIMIT before composing it: PyYAML composes by recursion."""
    depth = 0
    for event in yaml.parse(text, Loader=_LineLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > YAML_DEPTH_LIMIT:
                line = event.start_mark.line + 1
                raise MergefileError(f"the Mergefile nests deeper than {YAML_DEPTH_LIMIT} levels", Location(path, line))
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


class _Converter:
    """Turns composed YAML nodes into plain values, remembering the line of each key and item.

    An alias is a second reference to one node, and its value is copied wherever it is used:
    the copies are counted and their depth bounded, or a few lines of aliases of aliases would
    expand to billions of values, and an alias used inside itself would recurse without end.
    """

    def __init__(self, text: str, path: Path):
        self.path = path
        self.lines: dict[tuple, int] = {}
        self.constructor = _LineLoader(text)
        self.count = 0

    def error(self, node: yaml.Node, message: str) -> MergefileError:
        return MergefileError(message, Location(self.path, node.start_mark.line + 1))

    def value(self, node: yaml.Node, where: tuple, depth: int) -> Any:
        self.count += 1
        if self.count > YAML_NODE_LIMIT:
            raise self.error(node, f"the Mergefile expands to more than {YAML_NODE_LIMIT} YAML values (aliases of aliases?)")
        if depth > YAML_DEPTH_LIMIT:
            raise self.error(node, f"the Mergefile nests deeper than {YAML_DEPTH_LIMIT} levels (an alias used inside itself?)")
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node)
        if isinstance(node, yaml.MappingNode) and node.tag == _LineLoader.DEFAULT_MAPPING_TAG:
            return self.mapping(node, where, depth)
        if isinstance(node, yaml.SequenceNode) and node.tag == _LineLoader.DEFAULT_SEQUENCE_TAG:
            return self.sequence(node, where, depth)
        raise self.error(node, f"unsupported YAML tag {node.tag}")

    def mapping(self, node: yaml.MappingNode, where: tuple, depth: int) -> dict:
        result: dict = {}
        merged: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self.merge(key_node, value_node, where, depth, merged)
                continue
            key = self.key(key_node)
            if key in result:
                raise self.error(key_node, f"duplicate key '{key}'")
            self.lines[where + (key,)] = key_node.start_mark.line + 1
            result[key] = self.value(value_node, where + (key,), depth + 1)
        for merge_key, merge_value in merged.items():
            result.setdefault(merge_key, merge_value)
        return result

    def merge(self, key_node: yaml.Node, value_node: yaml.Node, where: tuple, depth: int, merged: dict) -> None:
        """`<<: *anchor` (or a list of anchors): keys written beside it win."""
        sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        for source in sources:
            value = self.value(source, where, depth + 1)
            if not isinstance(value, dict):
                raise self.error(key_node, "'<<' must merge a mapping")
            for merge_key, merge_value in value.items():
                merged.setdefault(merge_key, merge_value)

    def sequence(self, node: yaml.SequenceNode, where: tuple, depth: int) -> list:
        items = []
        for index, item in enumerate(node.value):
            self.lines[where + (index,)] = item.start_mark.line + 1
            items.append(self.value(item, where + (index,), depth + 1))
        return items

    def key(self, node: yaml.Node) -> Any:
        """A mapping key: a plain value (a list or mapping as a key is never meant in a Mergefile)."""
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, "a key must be a plain value, not a list or a mapping")
        return self.scalar(node)

    def scalar(self, node: yaml.ScalarNode) -> Any:
        try:
            return self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError) as error:  # ValueError: an integer of too many digits
            raise self.error(node, f"invalid YAML value: {getattr(error, 'problem', None) or error}") from None

"""The walk over each target's body that builds its `Target`, failing at the first mistake.

It reads merge and MoE recipes, their models, slices and tokenizer blocks, and checks the
input rules each merge method declares; the keys each part of a body may hold are listed
here, beside the code that reads them. Single values are checked by `values`, model
references resolved by `references`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mbuild import methods
from mbuild.mergefile.recipe import (
    Expert,
    GGUFExport,
    LoraExtraction,
    InputModel,
    ModelRef,
    MoE,
    OutputSlice,
    SliceSource,
    Target,
    TokenizerSpec,
    TokenSource,
)
from mbuild.mergefile.evaluation import eval_target
from mbuild.mergefile.references import ReferenceResolver
from mbuild.mergefile.values import ValueChecker, suggest

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
    "expert_tensors",
)
# How a merge takes an MoE checkpoint stored one tensor per expert (README: "Per-expert MoE
# checkpoints"): fused into one tensor per module first, as mergekit does, or each alone.
EXPERT_TENSORS = ("fused", "separate")
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
# mergekit-moe's output architectures, by its names, in the order it prefers them.
MOE_OUTPUTS = ("Mixtral", "DeepSeek MoE", "Qwen MoE", "Qwen3 MoE")
# A target whose body has `gguf:` writes one model as a GGUF file (README: "GGUF targets").
GGUF_TARGET_KEYS = ("gguf", "output", "description")
GGUF_KEYS = ("model", "type")
# The tensor types a GGUF target writes: those gguf-py quantizes (its k-quants only dequantize).
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1")
# A target whose body has `extract_lora:` writes a PEFT adapter (README: "LoRA extraction targets").
LORA_TARGET_KEYS = ("extract_lora", "output", "description")
LORA_KEYS = ("model", "base", "rank", "modules", "exclude")
MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "base_model", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")


class Checker(ValueChecker):
    """Turns the raw YAML of each target into a Target, failing at the first mistake."""

    def target(self, name: str, body: Any, defaults: dict, target_names: set[str]) -> Target:
        self.target_name = name
        self.ignored = []
        path = ("targets", name)
        if not isinstance(body, dict):
            raise self.error(path, "a target is a mapping (merge_method, models or slices, ...)")
        if "experts" in body:
            return self.moe_target(name, body, defaults, target_names)
        if "gguf" in body:
            return self.gguf_target(name, body, target_names)
        if "extract_lora" in body:
            return self.lora_target(name, body, target_names)
        if "eval" in body:
            return eval_target(self, name, body, target_names)
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
            hint = suggest(str(method_name), known)
            raise self.error(where("merge_method"), f"unknown merge_method '{method_name}'{hint}") from None

        refs = ReferenceResolver(self, target_names)
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

        if isinstance(defaults.get("parameters"), dict) and isinstance(body.get("parameters"), dict):
            # Merged above; each setting is checked (and reported) where it is written.
            unset = {k: v for k, v in defaults["parameters"].items() if k not in body["parameters"]}
            parameters = {
                **self.parameters(method, unset, ("defaults", "parameters"), per_model=None),
                **self.parameters(method, body["parameters"], path + ("parameters",), per_model=None),
            }
        else:
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
                    f"unknown chat_template '{chat_template}'{suggest(chat_template, known)}: "
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
        expert_tensors = recipe.get("expert_tensors", "fused")
        if expert_tensors not in EXPERT_TENSORS:
            raise self.error(where("expert_tensors"), f"'expert_tensors' must be fused or separate, not {expert_tensors!r}")

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
            recipe=_without_ignored(recipe, [ignored_path for ignored_path, _ in self.ignored]),
            mergefile=self.mergefile,
            tokenizer=tokenizer,
            mixed_architectures=mixed,
            expert_tensors=expert_tensors,
            warnings=tuple(warning for _, warning in self.ignored),
        )
        self.target_name = None
        return target

    def moe_target(self, name: str, body: dict, defaults: dict, target_names: set[str]) -> Target:
        """A mergekit-moe config: dense experts (sources or targets) into a Mixtral, Qwen2-MoE or Qwen3-MoE."""
        path = ("targets", name)
        self.unknown_keys(body, MOE_KEYS, path)
        recipe = {k: v for k, v in defaults.items() if k in ("dtype", "seed")}
        recipe.update(body)
        where = lambda key: path + (key,) if key in body else ("defaults", key)  # noqa: E731
        refs = ReferenceResolver(self, target_names)
        if recipe.get("base_model") is None:
            raise self.error(path, "an MoE target needs 'base_model' (attention, embeddings and norms come from it)")
        base_model = refs.resolve(recipe["base_model"], where("base_model"))
        gate_mode = recipe.get("gate_mode", "hidden")
        if gate_mode not in GATE_MODES:
            raise self.error(where("gate_mode"), f"unknown gate_mode '{gate_mode}'{suggest(str(gate_mode), GATE_MODES)}")
        per_token = recipe.get("experts_per_token", 2)
        if isinstance(per_token, bool) or not isinstance(per_token, int) or per_token < 1:
            raise self.error(where("experts_per_token"), f"'experts_per_token' must be a positive integer, not {per_token!r}")
        raw_experts = recipe.get("experts")
        if not isinstance(raw_experts, list) or not raw_experts:
            raise self.error(where("experts"), "'experts' must be a non-empty list")
        experts = [self.moe_expert(raw, where("experts") + (index,), refs) for index, raw in enumerate(raw_experts)]
        for expert in experts:
            if gate_mode not in ("random", "uniform_random") and not expert.positive_prompts:
                raise self.error(expert.path, f"gate_mode {gate_mode} needs 'positive_prompts' for every expert")
        raw_shared = recipe.get("shared_experts") or []
        if not isinstance(raw_shared, list):
            raise self.error(where("shared_experts"), "'shared_experts' must be a list of experts")
        shared = [self.moe_expert(raw, where("shared_experts") + (index,), refs) for index, raw in enumerate(raw_shared)]
        if len({bool(e.positive_prompts) for e in shared}) > 1:
            # mergekit-moe asserts the same: one router row per shared expert, or none at all.
            raise self.error(where("shared_experts"), "give 'positive_prompts' to every shared expert or to none")
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
        if architecture is not None and (
            not isinstance(architecture, str) or not any(n.lower().startswith(architecture.lower()) for n in MOE_OUTPUTS)
        ):
            # mergekit-moe picks the outputs whose name starts with this, ignoring case.
            raise self.error(
                where("architecture"), f"unknown MoE architecture {architecture!r}: one of {', '.join(MOE_OUTPUTS)}"
            )
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
            moe=MoE(tuple(experts), gate_mode, per_token, architecture, tuple(shared)),
        )
        self.target_name = None
        return target

    def gguf_target(self, name: str, body: dict, target_names: set[str]) -> Target:
        """A GGUF export: `gguf: {model: ..., type: q8_0}`, one model into one .gguf file."""
        path = ("targets", name)
        self.unknown_keys(body, GGUF_TARGET_KEYS, path)
        spec = body["gguf"]
        if not isinstance(spec, dict) or "model" not in spec:
            raise self.error(path + ("gguf",), "'gguf' is a mapping with 'model:' and 'type:'")
        self.unknown_keys(spec, GGUF_KEYS, path + ("gguf",))
        model = ReferenceResolver(self, target_names).resolve(spec["model"], path + ("gguf", "model"))
        kind = spec.get("type")
        if kind not in GGUF_TYPES:
            raise self.error(
                path + ("gguf", "type"),
                f"unknown GGUF type {kind!r}{suggest(str(kind), GGUF_TYPES)}: one of {', '.join(GGUF_TYPES)}",
            )
        output = body.get("output", f"build/{name}")
        if not isinstance(output, str):
            raise self.error(path + ("output",), "'output' must be a folder path")
        target = Target(
            name=name,
            method="gguf",
            models=(),
            slices=(),
            base_model=None,
            parameters={},
            dtype=None,
            out_dtype=None,
            tokenizer_source=None,
            chat_template=None,
            output=(self.mergefile.folder / output).expanduser().absolute(),
            seed=0,
            recipe=dict(body),
            mergefile=self.mergefile,
            gguf=GGUFExport(model, kind),
        )
        self.target_name = None
        return target

    def kind_body(self, name: str, body: dict, kind: str, target_keys, keys, required, shape: str) -> dict:
        """The body of a non-merge kind's target (`kind: {...}`), its keys checked: the target's
        against ``target_keys``, the body's against ``keys``, each of ``required`` present.
        ``shape`` says what the body holds, for the error when it is not a mapping."""
        path = ("targets", name)
        where = path + (kind,)
        self.unknown_keys(body, target_keys, path)
        spec = body[kind]
        if not isinstance(spec, dict):
            raise self.error(where, f"'{kind}' is a mapping with {shape}")
        self.unknown_keys(spec, keys, where)
        for key in required:
            if key not in spec:
                raise self.error(where, f"'{kind}' needs '{key}:'")
        return spec

    def lora_target(self, name: str, body: dict, target_names: set[str]) -> Target:
        """A LoRA extraction: `extract_lora: {model: tuned, base: base, rank: 16}` into a PEFT adapter."""
        path = ("targets", name)
        where = path + ("extract_lora",)
        spec = self.kind_body(name, body, "extract_lora", LORA_TARGET_KEYS, LORA_KEYS, LORA_KEYS[:3],
                              "'model:', 'base:' and 'rank:'")
        refs = ReferenceResolver(self, target_names)
        model = refs.resolve(spec["model"], where + ("model",))
        base = refs.resolve(spec["base"], where + ("base",))
        rank = spec["rank"]
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise self.error(where + ("rank",), f"'rank' must be a whole number of at least 1, not {rank!r}")
        patterns = {key: self.lora_patterns(spec.get(key, []), where + (key,)) for key in ("modules", "exclude")}
        output = body.get("output", f"build/{name}")
        if not isinstance(output, str):
            raise self.error(path + ("output",), "'output' must be a folder path")
        target = Target(
            name=name, method="extract_lora", models=(), slices=(), base_model=None, parameters={}, dtype=None,
            out_dtype=None, tokenizer_source=None, chat_template=None,
            output=(self.mergefile.folder / output).expanduser().absolute(), seed=0, recipe=dict(body),
            mergefile=self.mergefile, extract_lora=LoraExtraction(model, base, rank, patterns["modules"], patterns["exclude"]),
        )
        self.target_name = None
        return target

    def lora_patterns(self, raw: Any, path: tuple) -> tuple[str, ...]:
        """`modules:` or `exclude:` of an extraction: a regex or a list of them."""
        import re

        patterns = [raw] if isinstance(raw, str) else raw
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise self.error(path, "a regular expression or a list of them (matched against names like 'model.layers.0.mlp.up_proj')")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as error:
                raise self.error(path, f"{pattern!r} is not a regular expression: {error}") from None
        return tuple(patterns)

    def moe_expert(self, raw: Any, path: tuple, refs: ReferenceResolver) -> Expert:
        """One expert (or shared expert) of an MoE recipe."""
        if not isinstance(raw, dict) or "source_model" not in raw:
            raise self.error(path, "each expert needs 'source_model:'")
        self.unknown_keys(raw, EXPERT_KEYS, path)
        if raw.get("noise_scale") is not None:
            raise self.error(
                path + ("noise_scale",),
                "noise_scale is refused: mergekit-moe draws the noise from torch's unseeded global generator, so its "
                "values depend on every random draw made before in the process, not on the recipe, and no build "
                "could reproduce or cache them",
            )
        prompts = {}
        for key in ("positive_prompts", "negative_prompts"):
            value = raw.get(key) or []
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise self.error(path + (key,), f"'{key}' must be a list of strings")
            prompts[key] = tuple(value)
        residual = raw.get("residual_scale")
        if residual is not None and (isinstance(residual, bool) or not isinstance(residual, (int, float))):
            raise self.error(path + ("residual_scale",), "'residual_scale' must be a number")
        model = refs.resolve(raw["source_model"], path + ("source_model",))
        return Expert(model, prompts["positive_prompts"], prompts["negative_prompts"],
                      float(residual) if residual is not None else None, path)

    def tokenizer_block(self, value: Any, path: tuple, refs: ReferenceResolver) -> TokenizerSpec:
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

    def output_slice(self, method, entry: Any, path: tuple, refs: ReferenceResolver) -> OutputSlice:
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


def _without_ignored(recipe: dict, paths: list[tuple]) -> dict:
    """The recipe without the settings at ``paths`` (absolute Mergefile paths), as if never written.

    An ignored setting changes no byte, so it enters neither the lock, the model card nor any
    key: the target builds, and stays fresh, exactly as the same target without it. Only what
    lies along each path is copied; the parsed YAML, shared by targets through defaults, is kept.
    """
    for path in paths:
        # A path starts at ('targets', name) or at ('defaults',); the recipe holds both merged.
        recipe = _without(recipe, path[2:] if path[0] == "targets" else path[1:])
    return recipe


def _without(data: Any, path: tuple) -> Any:
    """A copy of ``data`` without the entry at ``path``, and without a ``parameters`` mapping left empty."""
    head, rest = path[0], path[1:]
    copy = list(data) if isinstance(data, list) else dict(data)
    if not rest:
        del copy[head]
        return copy
    inner = _without(copy[head], rest)
    if head == "parameters" and not inner:
        del copy[head]
    else:
        copy[head] = inner
    return copy

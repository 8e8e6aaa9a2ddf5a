"""The typed recipe a Mergefile becomes: frozen dataclasses, one per part a user writes.

Kept apart from the checks that build them, so that code which only reads a recipe (the
planner, MoE expansion, the importer) depends on these types and not on the rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mbuild.errors import Location, MergefileWarning

TOP_LEVEL_KEYS = ("targets", "defaults", "search")  # `search:` is read by mbuild/search.py
TARGET_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
# Bytes of a target name or an output folder's name: mbuild adds up to about 30 to name its
# lock and temporaries beside the output, and a filesystem allows 255 in a name.
NAME_LIMIT = 200


@dataclass(frozen=True)
class ModelRef:
    """A reference to a model as written: a target, a local folder, a hub repository, or a
    base model with a LoRA adapter applied (``base+adapter``)."""

    text: str
    kind: str  # "target" | "local" | "hub" | "lora"
    location: str  # target name, absolute folder, or hub repo id ("lora": the text)
    revision: str | None = None
    line: int | None = None
    node: str = ""  # the graph node: one per model, however its path is spelled
    # "lora" only: the base model and the adapter, each a local or hub reference.
    lora: "tuple[ModelRef, ModelRef] | None" = None

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
    shared_experts: tuple[Expert, ...] = ()  # always-on experts (Qwen2-MoE's one shared expert)


@dataclass(frozen=True)
class GGUFExport:
    """A `gguf:` target's body: one model written as one GGUF file of a given tensor type."""

    model: ModelRef
    type: str  # a name of `mergefile.checker.GGUF_TYPES`


@dataclass(frozen=True)
class LoraExtraction:
    """An `extract_lora:` target's body: `model - base` factored into a rank-`rank` PEFT adapter."""

    model: ModelRef
    base: ModelRef
    rank: int
    modules: tuple[str, ...] = ()  # regexes: only the projections one matches (re.search); none: all
    exclude: tuple[str, ...] = ()  # regexes: the projections one matches are left out


@dataclass(frozen=True)
class Evaluation:
    """An `eval:` target's body: one model scored on a metric (README: "Eval targets")."""

    model: ModelRef
    metric: str  # a name of `mergefile.evaluation.METRICS`
    data: Path | None  # the text or JSONL file (None for lm-eval, whose task brings its data)
    max_tokens: int | None = None
    window: int | None = None  # tokens per forward pass (None: the model's context, at most 1024)
    stride: int | None = None  # perplexity: tokens the window moves by (None: half the window)
    dtype: str | None = None  # None: the model's own dtype
    task: str | None = None  # lm-eval's task name, or the absolute path of a task file (YAML)
    num_fewshot: int | None = None  # lm-eval's few-shot examples
    limit: int | None = None  # lm-eval: at most this many items of the task


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
    # "fused": a per-expert MoE checkpoint's experts merged as one tensor per module, as
    # mergekit does; "separate": each expert tensor merged alone.
    expert_tensors: str = "fused"
    gguf: GGUFExport | None = None  # a GGUF export of one model rather than a merge
    extract_lora: LoraExtraction | None = None  # a LoRA adapter extracted from two models
    evaluation: Evaluation | None = None  # a model scored on a metric rather than a merge
    # What the recipe says that mbuild ignores, as mergekit does (a parameter its method does
    # not read): left out of the recipe above and of every key, and shown by the CLI.
    warnings: tuple[MergefileWarning, ...] = field(default=(), compare=False)

    def references(self) -> list[ModelRef]:
        """Every model reference in the recipe, in order of appearance, repeats removed."""
        refs: list[ModelRef] = []
        if self.gguf:
            refs.append(self.gguf.model)
        if self.extract_lora:
            refs.extend((self.extract_lora.model, self.extract_lora.base))
        if self.evaluation:
            refs.append(self.evaluation.model)
        if self.moe:
            refs.extend(expert.model for expert in self.moe.experts + self.moe.shared_experts)
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
class Sweep:
    """A target written with `matrix:` (or reading one by its bare name): its points, each a target.

    ``parameters`` in the order written; ``points`` maps each point's target name to its
    values as written in YAML, in that order (`final[t=0.3,density=0.4]` -> ("0.3", "0.4")).
    """

    name: str
    parameters: tuple[str, ...]
    points: Mapping[str, tuple[str, ...]]


@dataclass(frozen=True)
class Mergefile:
    """A parsed Mergefile: its path, its targets in written order, and line numbers."""

    path: Path
    targets: Mapping[str, Target]
    lines: Mapping[tuple, int] = field(repr=False)
    # Sweeps by their written name; each point is in `targets` (mergefile/matrix.py).
    sweeps: Mapping[str, Sweep] = field(default_factory=dict, repr=False)

    def expand_names(self, names) -> list[str]:
        """Target names with each sweep's name replaced by its points' names (`mbuild final`)."""
        return [point for name in names for point in (self.sweeps[name].points if name in self.sweeps else (name,))]

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def warnings(self) -> tuple[MergefileWarning, ...]:
        """What the targets say that mbuild ignores, in written order."""
        return tuple(warning for target in self.targets.values() for warning in target.warnings)

    def location(self, path: tuple, target: str | None = None) -> Location:
        """The line of the deepest written part of ``path``."""
        for end in range(len(path), 0, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return Location(self.path, line, target)
        return Location(self.path, None, target)

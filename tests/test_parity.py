"""End-to-end byte parity with mergekit: the real CLI against mergekit's Python API.

Each architecture's family gets one Mergefile holding the recipes below, and one holding the
design's chain; every `mbuild all` starts in the background at once (a build costs seconds,
mostly start-up, a mergekit run of these tiny models a tenth). Each test runs mergekit on the
same recipe body, with target names replaced by mbuild's built folders, and asks for the same
tensor names, dtypes and bits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

mergekit = pytest.importorskip("mergekit")

import torch  # noqa: E402
from conftest import load_tensors  # noqa: E402
from parity import Build, assert_same_tensors, run_mergekit  # noqa: E402

ARCHITECTURES = ("llama", "mistral", "qwen2")
DTYPES = ("float32", "bfloat16")

SLERP_T = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


def method_recipes(family: dict[str, Path], dtype: str) -> dict[str, dict]:
    """One recipe per method and option, every one computing in `dtype`; keyed by target name."""
    base, math, code = (str(family[name]) for name in ("base", "math", "code"))

    def weighted(*pairs):
        return [{"model": model, "parameters": parameters} for model, parameters in pairs]

    return {
        # Overlapping and repeated layer ranges; pre-layer tensors come from the first slice's
        # model, post-layer ones (norm, lm_head) from the last slice's.
        f"frankenmerge-{dtype}": {
            "merge_method": "passthrough",
            "dtype": dtype,
            "slices": [
                {"sources": [{"model": base, "layer_range": [0, 4]}]},
                {"sources": [{"model": math, "layer_range": [2, 6]}]},
                {"sources": [{"model": math, "layer_range": [2, 6]}]},
                {"sources": [{"model": code, "layer_range": [6, 8]}]},
            ],
        },
        f"linear-normalized-{dtype}": {
            "merge_method": "linear",
            "dtype": dtype,
            "models": weighted((base, {"weight": 0.5}), (math, {"weight": 0.3}), (code, {"weight": 0.7})),
            "parameters": {"normalize": True},
        },
        f"linear-unnormalized-{dtype}": {
            "merge_method": "linear",
            "dtype": dtype,
            "models": weighted((base, {"weight": 0.7}), (math, {"weight": 0.2}), (code, {"weight": 0.4})),
            "parameters": {"normalize": False},
        },
        f"slerp-{dtype}": {
            "merge_method": "slerp",
            "dtype": dtype,
            "base_model": base,
            "models": [{"model": base}, {"model": math}],
            "parameters": {"t": SLERP_T},
        },
        f"task-arithmetic-{dtype}": {
            "merge_method": "task_arithmetic",
            "dtype": dtype,
            "base_model": base,
            "models": weighted((math, {"weight": 0.7}), (code, {"weight": 0.5})),
            "parameters": {"lambda": 0.9},
        },
        f"ties-{dtype}": {
            "merge_method": "ties",
            "dtype": dtype,
            "base_model": base,
            "models": [{"model": base}]
            + weighted((math, {"weight": 0.6, "density": 0.5}), (code, {"weight": 0.4, "density": 0.7})),
            "parameters": {"normalize": True, "lambda": 1.2, "int8_mask": True},
        },
        f"ties-unnormalized-{dtype}": {
            "merge_method": "ties",
            "dtype": dtype,
            "base_model": base,
            "models": weighted((math, {"weight": 0.9, "density": 0.3}), (code, {"weight": 0.8, "density": 0.6})),
            "parameters": {"normalize": False, "int8_mask": False},
        },
    }


def out_dtype_recipes(family: dict[str, Path]) -> dict[str, dict]:
    """Recipes whose stored dtype differs from the dtype they compute in."""
    base, math, code = (str(family[name]) for name in ("base", "math", "code"))
    return {
        "ties-float32-to-bfloat16": {
            "merge_method": "ties",
            "dtype": "float32",
            "out_dtype": "bfloat16",
            "base_model": base,
            "models": [
                {"model": math, "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": code, "parameters": {"weight": 0.4, "density": 0.5}},
            ],
        },
        "slerp-bfloat16-to-float32": {
            "merge_method": "slerp",
            "dtype": "bfloat16",
            "out_dtype": "float32",
            "base_model": base,
            "models": [{"model": base}, {"model": code}],
            "parameters": {"t": SLERP_T},
        },
        # bf16 sources handed to the kernel unconverted: the float32 result must not pass through bf16.
        "linear-float32-to-float32": {
            "merge_method": "linear",
            "dtype": "float32",
            "out_dtype": "float32",
            "models": [
                {"model": math, "parameters": {"weight": 0.3}},
                {"model": code, "parameters": {"weight": 0.9}},
            ],
        },
        "linear-float32-to-float16": {
            "merge_method": "linear",
            "dtype": "float32",
            "out_dtype": "float16",
            "models": [
                {"model": math, "parameters": {"weight": 1.0}},
                {"model": code, "parameters": {"weight": 3.0}},
            ],
        },
    }


def parameter_form_recipes(family: dict[str, Path]) -> dict[str, dict]:
    """Recipes that write parameters in their other forms: per slice, per model, filtered, as gradients."""
    base, math, code = (str(family[name]) for name in ("base", "math", "code"))

    def aligned(start: int, end: int, *models: str, **parameters) -> dict:
        sources = [{"model": model, "layer_range": [start, end]} for model in models]
        return {"sources": sources, **({"parameters": parameters} if parameters else {})}

    scale_by_name = [{"filter": "o_proj", "value": 0.0}, {"value": 1.5}]
    density_by_name = [{"filter": "self_attn", "value": 0.3}, {"value": 0.9}]
    return {
        # A gradient restarts in every slice; a one-layer slice takes its last value; a slice's
        # own parameters win over the recipe's.
        "slerp-slices-float32": {
            "merge_method": "slerp",
            "dtype": "float32",
            "base_model": base,
            "slices": [aligned(0, 3, base, math), aligned(3, 4, base, math), aligned(4, 8, base, math, t=0.2)],
            "parameters": {"t": [0.1, 0.9, 0.4]},
        },
        "task-arithmetic-filtered-bfloat16": {
            "merge_method": "task_arithmetic",
            "dtype": "bfloat16",
            "base_model": base,
            "models": [
                {"model": math, "parameters": {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.7}]}},
                {"model": code, "parameters": {"weight": [0.2, 1.0]}},
            ],
            "parameters": {"normalize": True},
        },
        "passthrough-scaled-float16": {
            "merge_method": "passthrough",
            "dtype": "float16",
            "slices": [
                {"sources": [{"model": base, "layer_range": [0, 4], "parameters": {"scale": scale_by_name}}]},
                {"sources": [{"model": math, "layer_range": [4, 8]}]},
            ],
        },
        "ties-density-gradient-float32": {
            "merge_method": "ties",
            "dtype": "float32",
            "base_model": base,
            "models": [
                {"model": math, "parameters": {"weight": 1.0, "density": [0.2, 0.8]}},
                {"model": code, "parameters": {"weight": 0.5, "density": density_by_name}},
            ],
        },
    }


def all_recipes(family: dict[str, Path]) -> dict[str, dict]:
    """Every recipe of this file for one family, keyed by target name."""
    recipes = {}
    for dtype in DTYPES:
        recipes.update(method_recipes(family, dtype))
    recipes.update(out_dtype_recipes(family))
    recipes.update(parameter_form_recipes(family))
    return recipes


# mergekit's TIES takes about a second on these models, the other methods a tenth: the full
# matrix runs on Llama; Mistral (Llama's tensor names) and Qwen2 (q/k/v biases, tied
# embeddings) run every cheap recipe and the TIES ones that add coverage.
_CHEAP = ("frankenmerge", "linear-normalized", "linear-unnormalized", "slerp", "task-arithmetic")
_CHEAP_RECIPES = [f"{method}-{dtype}" for method in _CHEAP for dtype in DTYPES] + [
    "slerp-slices-float32",
    "task-arithmetic-filtered-bfloat16",
    "passthrough-scaled-float16",
]
COVERAGE = {
    "llama": sorted(all_recipes({"base": "", "math": "", "code": ""})),
    "mistral": _CHEAP_RECIPES + ["ties-bfloat16", "slerp-bfloat16-to-float32"],
    "qwen2": _CHEAP_RECIPES + ["ties-float32", "ties-bfloat16", "slerp-bfloat16-to-float32", "linear-float32-to-float16"],
}


# The design's chain: three depth up-scales, TIES on them, then SLERP back toward the base.
CHAIN = """
defaults:
  dtype: float32
  out_dtype: bfloat16
targets:
  base-deep:
    merge_method: passthrough
    slices:
      - sources: [{{model: {base}, layer_range: [0, 6]}}]
      - sources: [{{model: {base}, layer_range: [2, 8]}}]
  math-deep:
    merge_method: passthrough
    slices:
      - sources: [{{model: {math}, layer_range: [0, 6]}}]
      - sources: [{{model: {math}, layer_range: [2, 8]}}]
  code-deep:
    merge_method: passthrough
    slices:
      - sources: [{{model: {code}, layer_range: [0, 6]}}]
      - sources: [{{model: {code}, layer_range: [2, 8]}}]
  deep-ties:
    merge_method: ties
    base_model: base-deep
    models:
      - model: math-deep
        parameters: {{weight: 0.6, density: 0.5}}
      - model: code-deep
        parameters: {{weight: 0.4, density: 0.5}}
    parameters:
      normalize: true
  final:
    merge_method: slerp
    base_model: base-deep
    models:
      - model: base-deep
      - model: deep-ties
    parameters:
      t:
        - filter: self_attn
          value: [0, 0.5, 0.3, 0.7, 1]
        - filter: mlp
          value: [1, 0.5, 0.7, 0.3, 0]
        - value: 0.5
"""
CHAIN_ORDER = ("base-deep", "math-deep", "code-deep", "deep-ties", "final")
# Mistral has Llama's tensor names; Qwen2 adds biases and tied embeddings.
CHAIN_ARCHITECTURES = ("llama", "qwen2")


# ---------------------------------------------------------------------------------------------
# Helpers


def mergekit_body(build: Build, target: str) -> dict:
    """The recipe as mergekit takes it: target names replaced by the folders mbuild built them in."""
    found: set[str] = set()
    outputs = {name: str(build.root / "build" / name) for name in build.targets}
    body = _replace_targets(build.targets[target], outputs, found)
    if found:
        build.wait()  # mergekit reads mbuild's upstream outputs
    return body


def _replace_targets(value, outputs: dict[str, str], found: set[str], key: str | None = None):
    # Only model positions name models: a filter string that equals a target name stays as written.
    if isinstance(value, dict):
        return {k: _replace_targets(v, outputs, found, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_targets(v, outputs, found, key) for v in value]
    if key in ("model", "base_model") and isinstance(value, str) and value in outputs:
        found.add(value)
        return outputs[value]
    return value


# ---------------------------------------------------------------------------------------------
# Fixtures: every `mbuild all` of this file started at once; one mergekit run per recipe


@pytest.fixture(scope="module")
def builds(families, tmp_path_factory):
    """Return (kind, arch) -> Build, kind "recipes" (what COVERAGE lists) or "chain" (CHAIN)."""
    started: dict[tuple[str, str], Build] = {}
    try:
        for architecture in ARCHITECTURES:
            family = families(architecture)
            every = all_recipes(family)
            recipes = {name: every[name] for name in COVERAGE[architecture]}
            root = tmp_path_factory.mktemp(f"recipes-{architecture}")
            started["recipes", architecture] = Build(root, recipes, "all", process=True)
            if architecture in CHAIN_ARCHITECTURES:
                root = tmp_path_factory.mktemp(f"chain-{architecture}")
                started["chain", architecture] = Build(root, CHAIN.format(**family), "all", process=True)
        yield started
    finally:
        for build in started.values():
            build.stop()


@pytest.fixture(scope="module")
def mergekit_outputs(builds, tmp_path_factory):
    """Return (arch, target) -> (mergekit's output folder, its config), each recipe merged once."""
    made: dict[tuple[str, str], tuple[Path, dict]] = {}

    def get(architecture: str, target: str) -> tuple[Path, dict]:
        if (architecture, target) not in made:
            out = tmp_path_factory.mktemp(f"mergekit-{architecture}-{target}")
            config = run_mergekit(mergekit_body(builds["recipes", architecture], target), out)
            made[architecture, target] = (out, config)
        return made[architecture, target]

    return get


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize(
    ("architecture", "target"), [(arch, target) for arch, targets in COVERAGE.items() for target in targets]
)
def test_target_matches_mergekit_bit_for_bit(builds, mergekit_outputs, architecture, target):
    reference, _ = mergekit_outputs(architecture, target)
    build = builds["recipes", architecture]
    assert_same_tensors(load_tensors(build.output(target)), load_tensors(reference))
    # Stored in out_dtype when given, else in the dtype the recipe computes in.
    recipe = build.targets[target]
    stored = {tensor.dtype for tensor in load_tensors(build.output(target)).values()}
    assert stored == {getattr(torch, recipe.get("out_dtype", recipe["dtype"]))}


@pytest.mark.parametrize("architecture", CHAIN_ARCHITECTURES)
def test_chain_each_stage_matches_mergekit_on_mbuilds_upstream_outputs(builds, tmp_path, architecture):
    build = builds["chain", architecture]
    assert list(build.targets) == list(CHAIN_ORDER)
    for target in CHAIN_ORDER:
        run_mergekit(mergekit_body(build, target), tmp_path / target)
        assert_same_tensors(load_tensors(build.output(target)), load_tensors(tmp_path / target))
    assert json.loads((build.output("final") / "config.json").read_text())["num_hidden_layers"] == 12


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_passthrough_layer_count_in_config_matches_mergekit(builds, mergekit_outputs, architecture):
    target = "frankenmerge-float32"
    _, expected = mergekit_outputs(architecture, target)
    ours = json.loads((builds["recipes", architecture].output(target) / "config.json").read_text())
    assert ours["num_hidden_layers"] == expected["num_hidden_layers"] == 4 + 4 + 4 + 2
    # transformers 5 refuses a config whose per-layer list disagrees with the layer count.
    if "layer_types" in ours:
        assert len(ours["layer_types"]) == ours["num_hidden_layers"]


@pytest.mark.parametrize("target", ["frankenmerge-float32", "linear-normalized-bfloat16", "ties-float32"])
def test_tied_embeddings_give_exactly_mergekits_names(builds, mergekit_outputs, families, target):
    assert json.loads((families("qwen2")["base"] / "config.json").read_text())["tie_word_embeddings"] is True
    reference, _ = mergekit_outputs("qwen2", target)
    ours = load_tensors(builds["recipes", "qwen2"].output(target))
    assert sorted(ours) == sorted(load_tensors(reference))
    assert "lm_head.weight" not in ours
    assert "model.embed_tokens.weight" in ours

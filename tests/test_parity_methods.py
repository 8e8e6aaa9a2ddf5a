"""Every registered merge method, end to end, on the tiny Llama, Mistral and Qwen2 families.

Each architecture gets one Mergefile holding a target per method (and per-option variants), all
computing in float32, built by one in-process `mbuild` call at `-j 1`. Deterministic methods are
compared with mergekit 0.1.5 run in-process on the same recipe body: the same tensor names,
dtypes, shapes and bits. Random methods (DARE, DELLA, and Arcee Fusion on tensors over a million
elements, whose quantiles come from a sample) cannot give mergekit's bytes, since mergekit draws
from the global RNG: the same seed must give the same bytes at `-j 1` and at `-j 4` (a second
build, with its own cache), another `seed:` other bytes, and every value must be finite.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import load_tensors
from parity import Build, assert_same_tensors, deterministic_recipes, random_recipes, run_mergekit, same_bits

ARCHITECTURES = ("llama", "mistral", "qwen2")
DTYPE = "float32"
OTHER_SEED = 7


RANDOM_METHODS = ("dare_linear", "dare_ties", "della", "della_linear")
# Arcee Fusion judges a tensor over this many elements on a seeded sample of it (as mergekit does
# with its global RNG); smaller tensors are deterministic and covered by the parity tests above.
QUANTILE_SAMPLE = 1_000_000
LARGE_FUSION = "arcee_fusion-large"


def large_fusion_recipe(large: dict[str, Path]) -> dict:
    return {
        "merge_method": "arcee_fusion",
        "base_model": str(large["base"]),
        "models": [{"model": str(large["base"])}, {"model": str(large["math"])}],
    }


def randomized(target: str, tensor: torch.Tensor) -> bool:
    """Whether a random target's tensor depends on the seed: all of DARE's and DELLA's, Arcee Fusion's large ones."""
    return tensor.numel() > QUANTILE_SAMPLE if target == LARGE_FUSION else True


ALL_DETERMINISTIC = sorted(deterministic_recipes({"base": "", "math": "", "code": ""}))
COVERAGE = {architecture: ALL_DETERMINISTIC for architecture in ARCHITECTURES}
# Llama also runs Arcee Fusion on a one-layer model whose MLP matrices have 64 x 16384 elements.
RANDOM_COVERAGE = {architecture: list(RANDOM_METHODS) for architecture in ARCHITECTURES}
RANDOM_COVERAGE["llama"].append(LARGE_FUSION)
RANDOM_CASES = [(architecture, target) for architecture, targets in RANDOM_COVERAGE.items() for target in targets]
# Known mismatches with mergekit: (architecture, target) -> reason. Each becomes a strict xfail.
KNOWN_MISMATCHES: dict[tuple[str, str], str] = {}


def _parity_cases():
    for architecture, targets in COVERAGE.items():
        for target in targets:
            reason = KNOWN_MISMATCHES.get((architecture, target))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(architecture, target, marks=marks, id=f"{architecture}-{target}")


# ---------------------------------------------------------------------------------------------
# Building


@pytest.fixture(scope="module")
def large_family(tmp_path_factory):
    """A one-layer Llama and a mock fine-tune whose MLP matrices are over QUANTILE_SAMPLE elements."""
    import make_models

    root = tmp_path_factory.mktemp("family-large")
    options = dict(num_hidden_layers=1, overrides={"intermediate_size": 16384})
    base = make_models.make_model(root / "base", "llama", "tiny", seed=0, **options)
    math = make_models.make_model(root / "math", "llama", "tiny", seed=1, base=base)
    return {"base": base, "math": math}


@pytest.fixture(scope="module")
def builds(families, request, tmp_path_factory):
    """Return (kind, architecture) -> Build, each built on first use.

    "methods": the architecture's one Mergefile: every recipe of COVERAGE and every random one
    at the default seed, built at -j 1. "random": every random recipe again at the default seed
    and at OTHER_SEED, built at -j 4 with its own cache (nothing is reused from -j 1).
    """
    made: dict[tuple[str, str], Build] = {}

    def get(kind: str, architecture: str) -> Build:
        if (kind, architecture) not in made:
            family = families(architecture)
            random = random_recipes(family)
            if architecture == "llama":
                random[LARGE_FUSION] = large_fusion_recipe(request.getfixturevalue("large_family"))
            if kind == "methods":
                every = deterministic_recipes(family)
                targets = {**{name: every[name] for name in COVERAGE[architecture]}, **random}
                jobs = 1
            else:
                seeded = {f"{name}-seed{OTHER_SEED}": {**body, "seed": OTHER_SEED} for name, body in random.items()}
                targets = {**random, **seeded}
                jobs = 4
            targets = {name: {**body, "dtype": DTYPE} for name, body in targets.items()}
            # -k: a method that fails fails its own tests, not every target's; --json: its error
            # is in the report (-q alone prints nothing for a target that failed under -k).
            root = tmp_path_factory.mktemp(f"{kind}-{architecture}")
            made[kind, architecture] = Build(root, targets, "-q", "-j", str(jobs), "-k", "--json")
        return made[kind, architecture]

    return get


# ---------------------------------------------------------------------------------------------
# Tests


def test_every_registered_method_is_covered_on_every_architecture():
    from mbuild.methods import all_methods

    recipes = deterministic_recipes({"base": "", "math": "", "code": ""})
    for architecture in ARCHITECTURES:
        covered = {recipes[target]["merge_method"] for target in COVERAGE[architecture]}
        seeded = {"arcee_fusion" if target == LARGE_FUSION else target for target in RANDOM_COVERAGE[architecture]}
        assert covered | seeded == {method.name for method in all_methods()}, architecture
    # The methods mbuild seeds are exactly those checked for seeding here.
    assert {method.name for method in all_methods() if method.random} == {*RANDOM_METHODS, "arcee_fusion"}


@pytest.mark.parametrize(("architecture", "target"), list(_parity_cases()))
def test_method_matches_mergekit_bit_for_bit(builds, tmp_path, architecture, target):
    pytest.importorskip("mergekit")
    build = builds("methods", architecture)
    run_mergekit(build.targets[target], tmp_path / "mergekit")
    mine = load_tensors(build.output(target))
    assert_same_tensors(mine, load_tensors(tmp_path / "mergekit"), ("mbuild", "mergekit"))
    assert {tensor.dtype for tensor in mine.values()} == {getattr(torch, DTYPE)}


@pytest.mark.parametrize(("architecture", "target"), RANDOM_CASES)
def test_random_method_same_seed_same_bytes_at_j1_and_j4(builds, architecture, target):
    one = load_tensors(builds("methods", architecture).output(target))
    four = load_tensors(builds("random", architecture).output(target))
    assert_same_tensors(four, one, ("-j 4", "-j 1"))


@pytest.mark.parametrize(("architecture", "target"), RANDOM_CASES)
def test_random_method_other_seed_other_bytes(builds, architecture, target):
    build = builds("random", architecture)
    first = load_tensors(build.output(target))
    second = load_tensors(build.output(f"{target}-seed{OTHER_SEED}"))
    assert sorted(first) == sorted(second)
    random = [name for name in sorted(first) if randomized(target, first[name])]
    assert random, "no tensor of this target depends on the seed"
    unchanged = [name for name in random if same_bits(first[name], second[name])]
    assert not unchanged, f"seed 0 and seed {OTHER_SEED} give the same bytes for {unchanged}"
    # What the seed does not reach stays put.
    changed = [name for name in sorted(first) if name not in random and not same_bits(first[name], second[name])]
    assert not changed, f"seed {OTHER_SEED} changed deterministic tensors {changed}"


@pytest.mark.parametrize(("architecture", "target"), RANDOM_CASES)
def test_random_method_output_is_finite_and_merged(builds, families, large_family, architecture, target):
    build = builds("random", architecture)
    base = load_tensors((large_family if target == LARGE_FUSION else families(architecture))["base"])
    for name in (target, f"{target}-seed{OTHER_SEED}"):
        tensors = load_tensors(build.output(name))
        shapes = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
        assert shapes == {key: tuple(tensor.shape) for key, tensor in base.items()}
        assert {tensor.dtype for tensor in tensors.values()} == {getattr(torch, DTYPE)}
        infinite = [key for key, tensor in tensors.items() if not torch.isfinite(tensor).all()]
        assert not infinite, f"{name}: non-finite values in {infinite}"
        # Every seeded tensor moved off the base: a build that copied the base is no merge.
        seeded = [key for key in tensors if randomized(target, tensors[key])]
        copied = [key for key in seeded if torch.equal(tensors[key], base[key].float())]
        assert not copied, f"{name}: {copied} equal the base"

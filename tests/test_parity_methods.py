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

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import load_tensors

ARCHITECTURES = ("llama", "mistral", "qwen2")
DTYPE = "float32"
OTHER_SEED = 7

# Same-sized integer views, so equality is on bits (-0.0 differs from 0.0, NaN equals NaN).
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float64: torch.int64}


def _weighted(*pairs) -> list[dict]:
    return [{"model": model, "parameters": parameters} for model, parameters in pairs]


def deterministic_recipes(family: dict[str, Path]) -> dict[str, dict]:
    """Recipes of every deterministic method (target name -> mergekit body), parameters from mergekit's docs."""
    base, math, code = (str(family[name]) for name in ("base", "math", "code"))
    # The mock fine-tunes move every element by about 2% of its tensor's spread (~4e-4 for the
    # matrices, ~2e-3 for norms); thresholds below sit inside that range, so both branches run.
    return {
        "linear": {
            "merge_method": "linear",
            "models": _weighted((base, {"weight": 0.5}), (math, {"weight": 0.3}), (code, {"weight": 0.7})),
            "parameters": {"normalize": True},
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": math}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]},
        },
        "nuslerp": {
            "merge_method": "nuslerp",
            "models": _weighted((math, {"weight": 0.4}), (code, {"weight": 0.6})),
        },
        "nuslerp-base-row-wise": {
            "merge_method": "nuslerp",
            "base_model": base,
            "models": _weighted((math, {"weight": 1.0}), (code, {"weight": 2.0})),
            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        },
        "nuslerp-base-column-wise": {
            "merge_method": "nuslerp",
            "base_model": base,
            "models": _weighted((math, {"weight": 0.7}), (code, {"weight": 0.3})),
            "parameters": {"nuslerp_flatten": False},
        },
        "multislerp": {
            "merge_method": "multislerp",
            "models": _weighted((base, {"weight": 0.2}), (math, {"weight": 0.3}), (code, {"weight": 0.5})),
        },
        "multislerp-base": {
            "merge_method": "multislerp",
            "base_model": base,
            "models": _weighted((math, {"weight": 2.0}), (code, {"weight": 1.0})),
            "parameters": {"normalize_weights": True},
        },
        "karcher": {
            "merge_method": "karcher",
            "models": [{"model": base}, {"model": math}, {"model": code}],
            "parameters": {"max_iter": 20, "tol": 1e-6},
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": _weighted((math, {"weight": 0.7}), (code, {"weight": 0.4})),
            "parameters": {"lambda": 0.8},
        },
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "models": _weighted((math, {"weight": 0.6, "density": 0.5}), (code, {"weight": 0.4, "density": 0.7})),
            "parameters": {"normalize": True, "int8_mask": True},
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs",
            "base_model": base,
            "models": _weighted(
                (math, {"weight": 0.6, "density": 0.9, "gamma": 0.01}),
                (code, {"weight": 0.4, "density": 0.8, "gamma": 0.05}),
            ),
        },
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties",
            "base_model": base,
            "models": _weighted(
                (math, {"weight": 0.6, "density": 0.9, "gamma": 0.01}),
                (code, {"weight": 0.4, "density": 0.8, "gamma": 0.05}),
            ),
            "parameters": {"normalize": True, "lambda": 1.1},
        },
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": base,
            "models": [{"model": base}, {"model": math}, {"model": code}],
        },
        "model_stock-filter-wise": {
            "merge_method": "model_stock",
            "base_model": base,
            "models": [{"model": base}, {"model": math}, {"model": code}],
            "parameters": {"filter_wise": True},
        },
        "sce": {
            "merge_method": "sce",
            "base_model": base,
            "models": [{"model": base}, {"model": math}, {"model": code}],
            "parameters": {"select_topk": 0.5},
        },
        "nearswap": {
            "merge_method": "nearswap",
            "base_model": base,
            "models": [{"model": base}, {"model": math}],
            "parameters": {"t": 0.0005},
        },
        "arcee_fusion": {
            "merge_method": "arcee_fusion",
            "base_model": base,
            "models": [{"model": base}, {"model": math}],
        },
        "ram": {
            "merge_method": "ram",
            "base_model": base,
            "models": [{"model": base}, {"model": math}, {"model": code}],
            "parameters": {"epsilon": 0.0003},
        },
        "ramplus_tl": {
            "merge_method": "ramplus_tl",
            "base_model": base,
            "models": [{"model": base}, {"model": math}, {"model": code}],
            "parameters": {"r": 0.3, "alpha": 0.5, "epsilon": 0.0003},
        },
        "passthrough": {
            "merge_method": "passthrough",
            "models": [{"model": math, "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}],
        },
    }


RANDOM_METHODS = ("dare_linear", "dare_ties", "della", "della_linear")
# Arcee Fusion judges a tensor over this many elements on a seeded sample of it (as mergekit does
# with its global RNG); smaller tensors are deterministic and covered by the parity tests above.
QUANTILE_SAMPLE = 1_000_000
LARGE_FUSION = "arcee_fusion-large"


def random_recipes(family: dict[str, Path]) -> dict[str, dict]:
    """Recipes of every random method (target name -> body, without a seed)."""
    base, math, code = (str(family[name]) for name in ("base", "math", "code"))
    # Both models thin at density < 1, so every tensor depends on the seed.
    dare = _weighted((math, {"weight": 0.6, "density": 0.5}), (code, {"weight": 0.4, "density": 0.7}))
    della = _weighted(
        (math, {"weight": 0.6, "density": 0.5, "epsilon": 0.1}),
        (code, {"weight": 0.4, "density": 0.6, "epsilon": 0.2}),
    )
    return {
        "dare_linear": {"merge_method": "dare_linear", "base_model": base, "models": dare},
        "dare_ties": {
            "merge_method": "dare_ties",
            "base_model": base,
            "models": dare,
            "parameters": {"normalize": True, "lambda": 1.1},
        },
        "della": {"merge_method": "della", "base_model": base, "models": della, "parameters": {"lambda": 1.1}},
        "della_linear": {"merge_method": "della_linear", "base_model": base, "models": della},
    }


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


class Build:
    """One in-process `mbuild all` of one Mergefile, with its own cache; remembers exit code and output."""

    def __init__(self, root: Path, targets: dict[str, dict], jobs: int):
        from mbuild.cli import main

        self.root = root
        self.targets = targets
        path = root / "Mergefile"
        path.write_text(yaml.safe_dump({"targets": targets}, sort_keys=False))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            # -k: a method that fails fails its own tests, not every target's; --json: its error
            # is in the report (-q alone prints nothing for a target that failed under -k).
            self.returncode = main(
                ["-f", str(path), "-q", "-j", str(jobs), "-k", "--json", "--cache-dir", str(root / "cache")]
            )
        self.log = f"{out.getvalue()}\n{err.getvalue()}".strip()
        try:
            self.reports = json.loads(out.getvalue())["targets"]
        except (ValueError, KeyError):
            self.reports = {}

    def output(self, target: str) -> Path:
        """The folder `target` was built in; fails with mbuild's report if it was not built."""
        folder = self.root / "build" / target
        if not (folder / "mbuild.json").is_file():
            report = self.reports.get(target)
            detail = json.dumps(report, indent=2) if report else self.log
            pytest.fail(f"mbuild did not build {target} (exit code {self.returncode}):\n{detail}")
        return folder


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
            with pytest.MonkeyPatch.context() as patch:
                patch.delenv("MBUILD_CACHE", raising=False)
                made[kind, architecture] = Build(tmp_path_factory.mktemp(f"{kind}-{architecture}"), targets, jobs)
        return made[kind, architecture]

    return get


# ---------------------------------------------------------------------------------------------
# Comparing


def run_mergekit(body: dict, out: Path) -> None:
    """Run mergekit in-process on a recipe body, single-threaded: the reference bytes.

    mergekit's bytes follow torch's thread count (reductions, and MKL's dot products even on
    small tensors), so only its single-threaded output is a reference every machine gives.
    """
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mbuild.engine import torch_single_threaded

    with torch_single_threaded():
        run_merge(MergeConfiguration.model_validate(body), str(out), MergeOptions(quiet=True))


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(BITS[tensor.dtype]) if tensor.dtype in BITS else tensor


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) and torch.equal(_bits(a), _bits(b))


def assert_same_tensors(mine: dict, reference: dict, who: tuple[str, str]) -> None:
    """Same tensor names, dtypes, shapes and bits in two {name: tensor} maps."""
    assert reference, f"{who[1]} has no tensors"
    assert sorted(mine) == sorted(reference), (
        f"only in {who[0]}: {sorted(set(mine) - set(reference))}; "
        f"only in {who[1]}: {sorted(set(reference) - set(mine))}"
    )
    problems = []
    for name in sorted(reference):
        a, b = mine[name], reference[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{name}: {who[0]} {a.dtype} {tuple(a.shape)}, {who[1]} {b.dtype} {tuple(b.shape)}")
        elif not same_bits(a, b):
            diff = (a.double() - b.double()).abs()
            problems.append(
                f"{name}: {int((diff > 0).sum())}/{diff.numel()} elements differ, max abs diff {diff.max().item():.3g}"
            )
    shown = "\n".join(problems[:12]) + (f"\n... and {len(problems) - 12} more" if len(problems) > 12 else "")
    assert not problems, f"{len(problems)} of {len(reference)} tensors differ ({who[0]} vs {who[1]}):\n{shown}"


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

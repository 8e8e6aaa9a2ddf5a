"""Every registered merge method, end to end, on the tiny Llama, Mistral and Qwen2 families.

Each architecture gets one Mergefile holding a target per method (and a few per-option variants),
all computing in float32, built by one in-process `mbuild` call at `-j 1`. Deterministic methods
are compared with mergekit 0.1.5 run in-process on the same recipe body: the same tensor names,
dtypes, shapes and bits. Random methods (DARE, DELLA, and Arcee Fusion on tensors over a million
elements, whose quantiles come from a sample) cannot match mergekit, which draws from the global
RNG; for them the same seed must give the same bytes at `-j 1` and `-j 4`, another seed other
bytes, and every value must be finite.
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
# Tensors over this many elements make Arcee Fusion sample its quantiles (mbuild and mergekit alike).
QUANTILE_SAMPLE = 1_000_000

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


def random_recipes(family: dict[str, Path]) -> dict[str, dict]:
    """Recipes of every random method (method name -> body, without a seed)."""
    base, math, code = (str(family[name]) for name in ("base", "math", "code"))
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


def registered_methods() -> set[str]:
    from mbuild.methods import _REGISTRY

    return set(_REGISTRY)


# Every method mbuild registers is covered, deterministically or by the random checks.
DETERMINISTIC = sorted(deterministic_recipes({"base": "", "math": "", "code": ""}))
PARITY_CASES = [(architecture, target) for architecture in ARCHITECTURES for target in DETERMINISTIC]
RANDOM_CASES = [(architecture, method) for architecture in ARCHITECTURES for method in RANDOM_METHODS]
# Known mismatches with mergekit: (architecture, target) -> reason. Each is a strict xfail.
KNOWN_MISMATCHES: dict[tuple[str, str], str] = {}


def _parity_params():
    for architecture, target in PARITY_CASES:
        reason = KNOWN_MISMATCHES.get((architecture, target))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        yield pytest.param(architecture, target, marks=marks, id=f"{architecture}-{target}")


# ---------------------------------------------------------------------------------------------
# Building


class Build:
    """One in-process `mbuild all` of one Mergefile; remembers its exit code and output."""

    def __init__(self, root: Path, targets: dict[str, dict], jobs: int):
        self.root = root
        self.targets = targets
        root.mkdir(parents=True, exist_ok=True)
        path = root / "Mergefile"
        path.write_text(yaml.safe_dump({"targets": targets}, sort_keys=False))
        from mbuild.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            # -k: a method that fails fails its own tests, not every target's.
            self.returncode = main(
                ["-f", str(path), "-q", "-j", str(jobs), "-k", "--cache-dir", str(root / "cache")]
            )
        self.log = f"{out.getvalue()}\n{err.getvalue()}"

    def output(self, target: str) -> Path:
        folder = self.root / "build" / target
        assert (folder / "mbuild.json").exists(), (
            f"mbuild did not build {target} in {self.root} (exit code {self.returncode}):\n{self.log}"
        )
        return folder


@pytest.fixture(scope="module")
def builds(families, tmp_path_factory, monkeypatch_module):
    """Return (kind, architecture) -> Build; kind "j1" (every target of one family) or "j4".

    "j1": one Mergefile per architecture (every deterministic recipe, every random one at the
    default seed and at OTHER_SEED) built at -j 1. "j4": one Mergefile with every architecture's
    random recipes at the default seed, built once at -j 4 with its own cache; under key "all".
    Each is built on first use.
    """
    made: dict[tuple[str, str], Build] = {}

    def get(kind: str, architecture: str) -> Build:
        key = (kind, architecture if kind == "j1" else "all")
        if key not in made:
            if kind == "j1":
                family = families(architecture)
                targets = dict(deterministic_recipes(family))
                for method, body in random_recipes(family).items():
                    targets[method] = body
                    targets[f"{method}-seed{OTHER_SEED}"] = {**body, "seed": OTHER_SEED}
                targets = {name: {**body, "dtype": DTYPE} for name, body in targets.items()}
                made[key] = Build(tmp_path_factory.mktemp(f"methods-{architecture}"), targets, jobs=1)
            else:
                targets = {
                    f"{arch}-{method}": {**body, "dtype": DTYPE}
                    for arch in ARCHITECTURES
                    for method, body in random_recipes(families(arch)).items()
                }
                made[key] = Build(tmp_path_factory.mktemp("methods-j4"), targets, jobs=4)
        return made[key]

    return get


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MBUILD_CACHE", raising=False)
        yield patch


# ---------------------------------------------------------------------------------------------
# Comparing


def run_mergekit(body: dict, out: Path) -> None:
    """Run mergekit in-process on a recipe body."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(body), str(out), MergeOptions(quiet=True))


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(BITS[tensor.dtype]) if tensor.dtype in BITS else tensor


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def differences(mine: dict, reference: dict, who: tuple[str, str] = ("mbuild", "mergekit")) -> list[str]:
    """What differs between two {name: tensor} maps: names, dtypes, shapes or bits; [] if nothing."""
    if sorted(mine) != sorted(reference):
        return [
            f"only in {who[0]}: {sorted(set(mine) - set(reference))}; "
            f"only in {who[1]}: {sorted(set(reference) - set(mine))}"
        ]
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
    return problems


# ---------------------------------------------------------------------------------------------
# Tests


def test_every_registered_method_is_covered():
    covered = {body["merge_method"] for body in deterministic_recipes({"base": "", "math": "", "code": ""}).values()}
    assert covered.isdisjoint(RANDOM_METHODS)
    assert covered | set(RANDOM_METHODS) == registered_methods()


@pytest.mark.parametrize(("architecture", "target"), list(_parity_params()))
def test_method_matches_mergekit_bit_for_bit(builds, tmp_path, architecture, target):
    pytest.importorskip("mergekit")
    build = builds("j1", architecture)
    body = build.targets[target]
    run_mergekit(body, tmp_path / "mergekit")
    mine, reference = load_tensors(build.output(target)), load_tensors(tmp_path / "mergekit")
    assert reference, "mergekit wrote no tensors"
    problems = differences(mine, reference)
    assert not problems, f"{len(problems)} of {len(reference)} tensors differ:\n" + "\n".join(problems)
    assert {tensor.dtype for tensor in mine.values()} == {getattr(torch, DTYPE)}


@pytest.mark.parametrize(("architecture", "method"), RANDOM_CASES)
def test_random_method_same_seed_same_bytes_at_any_jobs(builds, architecture, method):
    one = load_tensors(builds("j1", architecture).output(method))
    four = load_tensors(builds("j4", architecture).output(f"{architecture}-{method}"))
    problems = differences(one, four, ("-j 1", "-j 4"))
    assert not problems, f"{len(problems)} of {len(four)} tensors differ:\n" + "\n".join(problems)


@pytest.mark.parametrize(("architecture", "method"), RANDOM_CASES)
def test_random_method_other_seed_other_bytes(builds, architecture, method):
    build = builds("j1", architecture)
    first = load_tensors(build.output(method))
    second = load_tensors(build.output(f"{method}-seed{OTHER_SEED}"))
    assert sorted(first) == sorted(second)
    # Every tensor is thinned at random (density < 1 for both models), so every one changes.
    same = [name for name in sorted(first) if same_bits(first[name], second[name])]
    assert not same, f"seed 0 and seed {OTHER_SEED} give the same bytes for {same}"


@pytest.mark.parametrize(("architecture", "method"), RANDOM_CASES)
def test_random_method_output_is_finite_and_complete(builds, families, architecture, method):
    build = builds("j1", architecture)
    base = load_tensors(families(architecture)["base"])
    for target in (method, f"{method}-seed{OTHER_SEED}"):
        tensors = load_tensors(build.output(target))
        assert {name: tuple(t.shape) for name, t in tensors.items()} == {
            name: tuple(t.shape) for name, t in base.items()
        }
        assert {t.dtype for t in tensors.values()} == {getattr(torch, DTYPE)}
        bad = [name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()]
        assert not bad, f"{target}: non-finite values in {bad}"
        # The merge moved the base: a build that only copied it is no merge.
        moved = [name for name in tensors if not torch.equal(tensors[name], base[name].float())]
        assert len(moved) == len(tensors), f"{target}: {sorted(set(tensors) - set(moved))} equal the base"

"""The parity harness: mbuild runs in folders of their own, mergekit run single-threaded, and
the byte comparisons between them.

Shared by every test that holds mbuild's bytes against a reference: whole targets
(`test_parity.py`), every method end to end (`test_parity_methods.py`), kernels on tensors
(`test_parity_kernels.py`), builds under other thread counts (`test_determinism.py`) and
aligned vocabularies (`test_vocabulary.py`). mergekit's bytes follow torch's thread count
(reductions, and MKL's dot products even on small tensors), so only its single-threaded output
is a reference every machine gives.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping

import pytest
import torch
import yaml

from conftest import ROOT

# Same-sized integer views, so equality is on bits (-0.0 differs from 0.0, NaN equals NaN).
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float64: torch.int64}


# ---------------------------------------------------------------------------------------------
# Comparing


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(BITS[tensor.dtype]) if tensor.dtype in BITS else tensor


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) and torch.equal(_bits(a), _bits(b))


def assert_same_tensors(mine: Mapping, reference: Mapping, who: tuple[str, str] = ("mbuild", "mergekit")) -> None:
    """Same tensor names, dtypes, shapes and bits in two {name: tensor} maps; ``who`` names them in messages."""
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
# Running mergekit


def run_mergekit(body: dict, out: Path, **options) -> dict:
    """Run mergekit in-process on a recipe body, single-threaded; return the config it wrote (or meant to).

    ``options``: more of mergekit's `MergeOptions` (``lora_merge_cache`` for a 'model+lora').
    """
    from huggingface_hub.errors import StrictDataclassClassValidationError
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mbuild.engine import torch_single_threaded

    config = MergeConfiguration.model_validate(body)
    try:
        with torch_single_threaded():
            run_merge(config, str(out), MergeOptions(quiet=True, **options))
    except StrictDataclassClassValidationError as error:
        # mergekit 0.1.5 sets num_hidden_layers but leaves Qwen2's per-layer `layer_types` at
        # the input's length, which transformers 5 refuses to save. The tensors are written by
        # then; rebuild the config mergekit meant to save, in memory.
        if "layer_types" not in str(error):
            raise
        from mergekit.architecture import get_architecture_info
        from mergekit.merge import _model_out_config

        return _model_out_config(config, get_architecture_info(config, MergeOptions())).to_dict()
    return json.loads((out / "config.json").read_text())


def mergekit_merge(mergekit_methods, name, tensors, *, base_index=None, **values):
    """Run mergekit's method on one tensor group, per-model values given as a list over all inputs."""
    group = mergekit_methods.TensorGroup.from_tensors(tensors, base_index=base_index)
    parameters = {
        key: {index: v for index, v in enumerate(value) if v is not None} if isinstance(value, list) else value
        for key, value in values.items()
    }
    (out,) = mergekit_methods.get(name)([group], parameters=parameters, dtype=tensors[0].dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Running mbuild


class Build:
    """`mbuild ARGUMENTS` over one Mergefile in a folder of its own, with its own cache (cache/ there).

    ``mergefile`` is the Mergefile's text, or its targets as a mapping. In-process by default;
    ``process=True`` starts the real CLI in a subprocess (``prefix`` before it, ``env`` over the
    environment) and returns at once, so a test can merge with mergekit meanwhile: `finish`,
    `wait` and `output` join it.
    """

    def __init__(
        self,
        root: Path,
        mergefile: str | Mapping[str, dict],
        *arguments: str,
        process: bool = False,
        env: Mapping[str, str] | None = None,
        prefix: tuple[str, ...] = (),
    ):
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        text = mergefile if isinstance(mergefile, str) else yaml.safe_dump({"targets": dict(mergefile)}, sort_keys=False)
        (root / "Mergefile").write_text(text)
        data = yaml.safe_load(text)
        defaults = data.get("defaults") or {}
        # Each target's body as mergekit takes it: the Mergefile's defaults merged in.
        self.targets: dict[str, dict] = {name: {**defaults, **body} for name, body in data["targets"].items()}
        self.keep_going = "-k" in arguments or "--keep-going" in arguments
        command = ["-f", str(root / "Mergefile"), "--cache-dir", str(root / "cache"), *arguments]
        self.returncode: int | None = None
        self.log = ""
        self.reports: dict = {}
        self.process = None
        if process:
            environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
            environment.pop("MBUILD_CACHE", None)
            self.process = subprocess.Popen(
                [*prefix, sys.executable, "-m", "mbuild.cli", *command],
                cwd=root,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=environment,
            )
        else:
            from mbuild.cli import main

            out, err = io.StringIO(), io.StringIO()
            with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                patch.delenv("MBUILD_CACHE", raising=False)
                self.returncode = main(command)
            self._record(out.getvalue(), err.getvalue())

    def _record(self, stdout: str, stderr: str) -> None:
        self.log = f"{stdout}\n{stderr}".strip()
        try:
            self.reports = json.loads(stdout)["targets"]
        except (ValueError, KeyError, TypeError):
            self.reports = {}

    def finish(self) -> "Build":
        """Wait for the run if it is a subprocess still going; keep its exit code and output."""
        if self.process is not None and self.returncode is None:
            stdout, stderr = self.process.communicate()
            self.returncode = self.process.returncode
            self._record(stdout, stderr)
        return self

    def wait(self) -> "Build":
        """Wait for the run; fail with mbuild's output unless it succeeded."""
        assert self.finish().returncode == 0, f"mbuild in {self.root} failed:\n{self.log}"
        return self

    def stop(self) -> None:
        """End the run if it still goes (a test run cut short)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        self.finish()

    def output(self, target: str) -> Path:
        """The folder `target` was built in, beside the Mergefile; fails with mbuild's report if it was not.

        Unless the run was told to keep going (-k), a failed run fails every output.
        """
        if not self.keep_going:
            self.wait()
        self.finish()
        folder = self.root / "build" / target
        if not (folder / "mbuild.json").is_file():
            report = self.reports.get(target)
            detail = json.dumps(report, indent=2) if report else self.log
            pytest.fail(f"mbuild did not build {target} (exit code {self.returncode}):\n{detail}")
        return folder


# ---------------------------------------------------------------------------------------------
# Recipes of every method, for the tiny families (a family: {"base", "math", "code"} folders)


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


def perturb(model, seed: int, scale: float) -> None:
    """Add seeded noise to every parameter, scaled by its spread: a mock fine-tune of ``model``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            spread = parameter.float().std().item() if parameter.numel() > 1 else 1.0
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale * (spread or 1.0))


def method_recipe(method: str, models: Mapping[str, Path]) -> dict:
    """A target body over {"base", "ft0", "ft1"}: linear, TIES, SLERP, or a passthrough of layers 0-1 then 1."""
    base, ft0, ft1 = (str(models[n]) for n in ("base", "ft0", "ft1"))
    if method == "linear":
        return {
            "merge_method": "linear",
            "dtype": "float32",
            "models": [{"model": ft0, "parameters": {"weight": 0.4}}, {"model": ft1, "parameters": {"weight": 0.6}}],
        }
    if method == "ties":
        return {
            "merge_method": "ties",
            "dtype": "float32",
            "base_model": base,
            "models": [
                {"model": ft0, "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": ft1, "parameters": {"weight": 0.4, "density": 0.7}},
            ],
            "parameters": {"normalize": True},
        }
    if method == "slerp":
        return {
            "merge_method": "slerp",
            "dtype": "float32",
            "base_model": ft0,
            "models": [{"model": ft0}, {"model": ft1}],
            "parameters": {"t": 0.3},
        }
    return {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": ft0, "layer_range": [0, 2]}]},
            {"sources": [{"model": ft1, "layer_range": [1, 2]}]},
        ],
    }

"""Shared fixtures and helpers: tiny real model families (Llama, Mistral, Qwen2 with tied
embeddings), Mergefiles over them, and the CLI run in-process or in a subprocess.

Plain helpers are imported by the tests as ``from conftest import NAME``; the method kernels'
helpers are in `kernels.py`, the comparisons with mergekit in `parity.py`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import make_models  # noqa: E402


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """Return a function arch -> {"base", "math", "code"} folders, each family made once per session."""
    made: dict[str, dict[str, Path]] = {}

    def get(architecture: str = "llama") -> dict[str, Path]:
        if architecture not in made:
            root = tmp_path_factory.mktemp(f"family-{architecture}")
            made[architecture] = make_models.make_family(root, "tiny", architecture)
        return made[architecture]

    return get


@pytest.fixture
def llama(families):
    return families("llama")


@pytest.fixture(params=[True, False], ids=["c", "without-c"])
def native(request, monkeypatch):
    """Each test once with the C loops (skipped where they were not built) and once without."""
    from mbuild.methods import native as c_loops

    if not request.param:
        monkeypatch.setattr(c_loops, "library", lambda: None)
    elif c_loops.library() is None:
        pytest.skip("the C extension was not built (no compiler at install)")
    return request.param


@pytest.fixture(scope="module")
def mergekit_methods():
    """mergekit's method registry (skips the test without mergekit)."""
    pytest.importorskip("mergekit")
    from mergekit import merge_methods

    return merge_methods


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """An empty project folder with its own cache; returns a helper to write the Mergefile."""
    monkeypatch.delenv("MBUILD_CACHE", raising=False)

    class Workspace:
        root = tmp_path

        def write(self, text: str, name: str = "Mergefile") -> Path:
            path = tmp_path / name
            path.write_text(text)
            return path

        def mbuild(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
            """Run the real CLI in a subprocess, in this folder.

            Its output is piped and block-buffered, as a user's pipe is (PYTHONUNBUFFERED
            dropped): output left in a buffer at exit would be lost, and a test would see it.
            """
            env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
            env["PYTHONPATH"] = str(ROOT)
            result = subprocess.run(
                [sys.executable, "-m", "mbuild.cli", *args],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                env=env,
            )
            if check and result.returncode != 0:
                raise AssertionError(f"mbuild {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
            return result

    return Workspace()


GRAIN = 32768  # torch splits work between threads past this many elements


def grain_family(root: Path, layers: int, hidden: int, intermediate: int, rows: int) -> dict[str, Path]:
    """A Llama (bfloat16) and two mock fine-tunes whose every matrix is past torch's grain."""
    options = dict(
        num_hidden_layers=layers,
        overrides={"hidden_size": hidden, "intermediate_size": intermediate, "num_attention_heads": 4,
                   "num_key_value_heads": 2},
        embedding_rows=rows,
    )
    base = make_models.make_model(root / "base", "llama", "tiny", seed=0, **options)
    math = make_models.make_model(root / "math", "llama", "tiny", seed=1, base=base)
    code = make_models.make_model(root / "code", "llama", "tiny", seed=2, base=base)
    small = [name for name, tensor in load_tensors(base).items() if tensor.ndim == 2 and tensor.numel() < GRAIN]
    assert not small, f"matrices below torch's grain: {small}"
    return {"base": base, "math": math, "code": code}


def load_tensors(folder: Path) -> dict:
    """Every tensor of a model folder, by name."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under a folder, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Running the CLI in-process


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; its exit code, stdout and stderr."""
    from mbuild.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def build_json(path: Path, *args: str, expect: int = 0) -> dict:
    """Run `mbuild -f PATH --json ARGS` in-process; return its per-target report.

    Only stdout is taken: what the command says on stderr stays for `capsys` to read.
    """
    from mbuild.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["-f", str(path), "--json", *args])
    assert code == expect, out.getvalue()
    return json.loads(out.getvalue())["targets"]


# ---------------------------------------------------------------------------------------------
# Mergefiles over a family ({"base", "math", "code"} folders)


def linear_mergefile(folder: Path, family: dict[str, Path], outputs: dict[str, str | None], weight: float = 0.5) -> Path:
    """A Mergefile of linear targets over the family, one per name, each with the given `output:`."""
    lines = ["targets:"]
    for name, output in outputs.items():
        lines += [
            f"  {name}:",
            "    merge_method: linear",
            "    models:",
            f"      - model: {family['math']}",
            f"        parameters: {{weight: {weight}}}",
            f"      - model: {family['code']}",
            "        parameters: {weight: 0.5}",
        ]
        if output is not None:
            lines.append(f"    output: {output}")
    path = folder / "Mergefile"
    path.write_text("\n".join(lines) + "\n")
    return path


FRANKEN_TIES = """
targets:
  franken:
    merge_method: passthrough
    {franken_dtype}
    slices:
      - sources: [{{model: {base}, layer_range: [0, 5]}}]
      - sources: [{{model: {base}, layer_range: [3, 8]}}]
  franken-math:
    merge_method: passthrough
    slices:
      - sources: [{{model: {math}, layer_range: [0, 5]}}]
      - sources: [{{model: {math}, layer_range: [3, 8]}}]
  tuned:
    merge_method: ties
    base_model: franken
    dtype: float32
    {out_dtype}
    models:
      - model: franken-math
        parameters: {{weight: {weight}, density: 0.5}}
"""
LINEAR_SIDE = """  broken-or-not:
    merge_method: linear
    models:
      - model: {base}
        parameters: {{weight: {linear_weight}}}
      - model: {code}
        parameters: {{weight: 0.5}}
"""


def franken_ties(family, weight=0.7, franken_dtype="", out_dtype="", linear_weight=0.5) -> str:
    """Mergefile text: depth up-scales of base and math (10 layers each), TIES of them ('tuned'),
    and, unless ``linear_weight`` is None, a linear merge of base and code beside them ('broken-or-not').

    ``franken_dtype`` and ``out_dtype`` are lines added to 'franken' and 'tuned'.
    """
    text = FRANKEN_TIES.format(weight=weight, franken_dtype=franken_dtype, out_dtype=out_dtype, **family)
    if linear_weight is not None:
        text += LINEAR_SIDE.format(linear_weight=linear_weight, **family)
    return text

"""Shared fixtures: tiny real model families (Llama, Mistral, Qwen2 with tied embeddings)."""

from __future__ import annotations

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


def load_tensors(folder: Path) -> dict:
    """Every tensor of a model folder, by name."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def build_json(path: Path, *args: str, expect: int = 0) -> dict:
    """Run `mbuild -f PATH --json ARGS` in-process; return its per-target report."""
    import contextlib
    import io as stdio
    import json

    from mbuild.cli import main

    out = stdio.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["-f", str(path), "--json", *args])
    assert code == expect, out.getvalue()
    return json.loads(out.getvalue())["targets"]

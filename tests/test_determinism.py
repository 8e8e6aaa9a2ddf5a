"""A task's bytes are a function of its key alone: the same whatever -j, cores or thread settings.

Torch splits reductions (norms, dot products) and vectorised loops between its threads once a
tensor is larger than its parallel grain (32768 elements), and the rounding follows the split.
So every tensor of the family here is larger than that grain: 256 x 1024 MLP matrices and a
3840 x 256 embedding and head. Every method, in float32, bfloat16 and float16, is built

- in-process at -j 1, -j 2 and -j 4, each with a cache of its own (nothing is reused);
- in a subprocess pinned to one core (`taskset -c 0`), and in one with OMP_NUM_THREADS=3 and
  MKL_NUM_THREADS=3 in its environment;

and every build must give the same bytes, which for the deterministic methods are mergekit's
run single-threaded (mergekit's own bytes change with its thread count, as torch's reductions
do: see `test_the_family_crosses_the_grain_where_threads_change_bytes`).

What does change bytes is the compute platform (torch's vector kernels, its version, the
device): it is part of every computing task's key, tested at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import build_json, franken_ties, load_tensors
from conftest import grain_family as make_grain_family
from parity import Build, assert_same_tensors, deterministic_recipes, random_recipes, run_mergekit, same_bits

DTYPES = ("float32", "bfloat16", "float16")
# Each build configuration: (name, jobs, how it runs). "process" runs the CLI in a subprocess.
CONFIGURATIONS = {
    "j1": dict(jobs=1),
    "j2": dict(jobs=2),
    "j4": dict(jobs=4),
    "one-core": dict(jobs=2, process=True, taskset=True),
    "omp3": dict(jobs=1, process=True, env={"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}),
}
# mergekit returns these methods' results in float32 whatever the compute dtype, and writes them
# so when no out_dtype is set; mbuild writes the compute dtype, as for every other method. The
# bytes are compared with `out_dtype` set to the compute dtype, so both cast the same way.
FLOAT32_RESULTS = {"arcee_fusion", "ramplus_tl"}


@pytest.fixture(scope="module")
def grain_family(tmp_path_factory):
    """A two-layer Llama (bfloat16) and two mock fine-tunes, every tensor above torch's grain."""
    # 3840 x 256 = 983,040 elements: above the grain, below Arcee Fusion's sampling size.
    return make_grain_family(tmp_path_factory.mktemp("family-grain"), 2, 256, 1024, 3840)


def recipes(family) -> tuple[dict[str, dict], set[str]]:
    """Every method in every compute dtype (target name -> body), and the deterministic names."""
    targets, deterministic = {}, set()
    for dtype in DTYPES:
        for name, body in deterministic_recipes(family).items():
            targets[f"{name}-{dtype}"] = {**body, "dtype": dtype}
            if body["merge_method"] in FLOAT32_RESULTS:
                targets[f"{name}-{dtype}"]["out_dtype"] = dtype
            deterministic.add(f"{name}-{dtype}")
        for name, body in random_recipes(family).items():
            targets[f"{name}-{dtype}"] = {**body, "dtype": dtype}
    return targets, deterministic


def build(root: Path, targets: dict[str, dict], jobs: int, process=False, taskset=False, env=None) -> Path:
    """Build every target in a folder of its own with its own cache; return the folder."""
    prefix: tuple[str, ...] = ()
    if taskset:
        if shutil.which("taskset") is None:
            pytest.skip("taskset is not installed")
        prefix = ("taskset", "-c", "0")
    return Build(root, targets, "-q", "-j", str(jobs), process=process, env=env, prefix=prefix).wait().root


@pytest.fixture(scope="module")
def builds(grain_family, tmp_path_factory):
    """Configuration name -> the folder it was built in, each built on first use."""
    targets, _ = recipes(grain_family)
    root = tmp_path_factory.mktemp("determinism")
    made: dict[str, Path] = {}

    def get(configuration: str) -> Path:
        if configuration not in made:
            made[configuration] = build(root / configuration, targets, **CONFIGURATIONS[configuration])
        return made[configuration]

    return get


@contextlib.contextmanager
def torch_threads(count: int):
    """Torch's intra-op thread count set to `count` for the block, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _target_names():
    targets, deterministic = recipes({"base": "", "math": "", "code": ""})
    return sorted(targets), deterministic


TARGETS, DETERMINISTIC = _target_names()


@pytest.mark.parametrize("configuration", [c for c in CONFIGURATIONS if c != "j1"])
def test_every_method_same_bytes_in_every_configuration(builds, configuration):
    reference, other = builds("j1"), builds(configuration)
    problems = []
    for target in TARGETS:
        try:
            assert_same_tensors(
                load_tensors(other / "build" / target), load_tensors(reference / "build" / target), (configuration, "j1")
            )
        except AssertionError as error:
            problems.append(f"{target}: {str(error).splitlines()[0]}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("target", sorted(DETERMINISTIC))
def test_deterministic_method_equals_mergekit_single_threaded(builds, grain_family, tmp_path, target):
    pytest.importorskip("mergekit")
    targets, _ = recipes(grain_family)
    run_mergekit(targets[target], tmp_path / "mergekit")  # single-threaded
    mine = load_tensors(builds("j1") / "build" / target)
    assert_same_tensors(mine, load_tensors(tmp_path / "mergekit"), ("mbuild", "mergekit at 1 thread"))


def test_the_family_crosses_the_grain_where_threads_change_bytes(grain_family):
    """The test above could fail: on these tensors torch's own reductions differ by thread count."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: torch's thread count cannot change a reduction here")
    tensors = load_tensors(grain_family["math"])
    row = tensors["model.embed_tokens.weight"].float().reshape(1, -1)
    with torch_threads(1):
        one = torch.linalg.vector_norm(row, dim=1)
        dot_one = (row * row.flip(1)).sum(dim=1)
    with torch_threads(3):
        three = torch.linalg.vector_norm(row, dim=1)
        dot_three = (row * row.flip(1)).sum(dim=1)
    assert not (same_bits(one, three) and same_bits(dot_one, dot_three))


# ---------------------------------------------------------------------------------------------
# The compute platform


def test_x86_vector_class_follows_the_cpu_and_what_torch_is_told():
    from mbuild.compute_platform import _x86_capability

    avx512 = {"sse2", "avx2", "fma", "avx512f", "avx512vl", "avx512bw", "avx512dq"}
    assert _x86_capability(avx512, "") == "avx512"
    assert _x86_capability(avx512, "AVX2") == "avx2"
    assert _x86_capability(avx512, "default") == "default"
    assert _x86_capability(avx512 - {"avx512bw"}, "") == "avx2"
    assert _x86_capability({"sse2", "avx2"}, "") == "default"  # torch's AVX2 kernels need FMA
    assert _x86_capability({"sse2", "avx2", "fma"}, "avx512") == "avx2"  # cannot be told past the CPU


def test_the_platform_predicted_without_torch_is_the_one_torch_runs():
    from mbuild import compute_platform

    assert compute_platform.identify("cpu") == compute_platform.as_torch_sees_it("cpu")


def test_other_vector_kernels_key_every_computed_tensor_apart(builds, grain_family, tmp_path):
    """Arcee Fusion's bytes differ between torch's AVX2 and AVX-512 kernels: never one key for both."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("torch runs its AVX-512 kernels only where the CPU has AVX-512")
    every, _ = recipes(grain_family)
    targets = {name: every[name] for name in ("arcee_fusion-float32", "linear-float32")}
    other = build(tmp_path / "avx2", targets, jobs=2, process=True, env={"ATEN_CPU_CAPABILITY": "avx2"})
    reference = builds("j1")
    for name in targets:
        platforms = [json.loads((root / "Mergefile.lock").read_text())["targets"][name]["platform"] for root in (reference, other)]
        assert platforms[0].startswith("cpu:x86_64-avx512:") and platforms[1].startswith("cpu:x86_64-avx2:")
        keys = [
            {entry["key"] for entry in json.loads((root / "build" / name / "mbuild.json").read_text())["tensors"].values()}
            for root in (reference, other)
        ]
        assert len(keys[0]) == 21 and not keys[0] & keys[1]


def test_a_changed_platform_is_a_reason_and_a_rebuild(llama, tmp_path, monkeypatch):
    from mbuild import compute_platform

    project = tmp_path / "Mergefile"
    project.write_text(franken_ties(llama))
    here = compute_platform.identify("cpu")
    build_json(project, "-j", "1")
    elsewhere = here.replace("cpu:", "cpu:elsewhere-", 1)
    monkeypatch.setattr(compute_platform, "identify", lambda device="cpu": elsewhere)
    monkeypatch.setattr(compute_platform, "as_torch_sees_it", lambda device="cpu": elsewhere)
    reasons = build_json(project, "--dry-run")["tuned"]["reasons"]
    assert f"compute platform: {here} → {elsewhere}" in reasons
    rebuilt = build_json(project, "-j", "1")
    assert rebuilt["tuned"]["status"] == "built" and rebuilt["tuned"]["tensors_computed"] > 0
    assert json.loads(project.with_name("Mergefile.lock").read_text())["targets"]["tuned"]["platform"] == elsewhere


def test_a_build_is_refused_when_torch_computes_elsewhere_than_the_keys_say(llama, tmp_path, monkeypatch):
    from mbuild import compute_platform
    from mbuild.cli import main

    project = tmp_path / "Mergefile"
    project.write_text(franken_ties(llama))
    monkeypatch.setattr(compute_platform, "identify", lambda device="cpu": "cpu:x86_64-imagined:torch-0.0")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(["-f", str(project), "-q"]) == 2
    assert "the plan keyed its tensors for cpu:x86_64-imagined:torch-0.0" in err.getvalue()
    assert not (tmp_path / "build").exists() or not any((tmp_path / "build").iterdir())


def test_a_lock_from_thread_dependent_keys_explains_the_one_rebuild(llama, tmp_path):
    from mbuild import io as mbuild_io
    from mbuild import lock

    project = tmp_path / "Mergefile"
    project.write_text(franken_ties(llama))
    build_json(project, "-j", "1")
    lock_file = project.with_name("Mergefile.lock")
    data = json.loads(lock_file.read_text())
    assert data["version"] == lock.LOCK_VERSION == 3
    manifest_path = tmp_path / "build" / "franken" / mbuild_io.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["key"] = "made-with-thread-dependent-keys"  # as the previous version's output is
    manifest_path.write_text(json.dumps(manifest))
    data["version"] = 2
    for entry in data["targets"].values():
        del entry["platform"]
    lock_file.write_text(json.dumps(data))
    assert build_json(project, "--dry-run")["franken"]["reasons"] == [lock.EARLIER_THREADS]
    assert build_json(project, "-j", "1")["franken"]["status"] == "built"
    assert json.loads(lock_file.read_text())["version"] == 3
    assert build_json(project, "--dry-run")["franken"]["stale"] is False


def test_a_byte_copy_is_keyed_alike_on_every_platform():
    from mbuild import keys

    common = dict(
        version=1, params={}, model_params=[], base_index=None, compute_dtype="int64", out_dtype="int64",
        shape=[4], seed=None, input_keys=["bytes:int64:4:abc"],
    )
    assert keys.task_key(method="copy", platform="cpu:a", **common) == keys.task_key(
        method="copy", platform="cuda:b", **common
    )
    assert keys.task_key(method="linear", platform="cpu:a", **common) != keys.task_key(
        method="linear", platform="cpu:b", **common
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tasks_are_keyed_apart_from_cpu_tasks_and_dare_draws_alike(grain_family, tmp_path):
    every, _ = recipes(grain_family)
    targets = {name: every[name] for name in ("dare_ties-float32", "linear-float32")}
    roots = {}
    for device in ("cpu", "cuda"):
        root = tmp_path / device
        root.mkdir()
        (root / "Mergefile").write_text(yaml.safe_dump({"targets": targets}, sort_keys=False))
        from mbuild.cli import main

        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["-f", str(root / "Mergefile"), "-q", "--device", device, "--cache-dir", str(root / "c")]) == 0
        roots[device] = root
    for name in targets:
        manifests = [json.loads((roots[d] / "build" / name / "mbuild.json").read_text()) for d in ("cpu", "cuda")]
        assert not {e["key"] for e in manifests[0]["tensors"].values()} & {e["key"] for e in manifests[1]["tensors"].values()}
    # The same seed drops the same elements on either device (draws are made on the CPU): the
    # results agree to rounding, where another mask would move elements by whole deltas.
    cpu, cuda = (load_tensors(roots[d] / "build" / "dare_ties-float32") for d in ("cpu", "cuda"))
    for tensor_name in cpu:
        assert torch.allclose(cpu[tensor_name], cuda[tensor_name], rtol=1e-5, atol=1e-7), tensor_name


def test_mbuild_methods_states_the_byte_rule(workspace):
    listing = json.loads(workspace.mbuild("methods", "--json").stdout)
    by_name = {row["name"]: row for row in listing}
    assert "single-threaded (OMP_NUM_THREADS=1)" in by_name["slerp"]["bytes"]
    assert "reproducible from 'seed'" in by_name["dare_ties"]["bytes"]
    text = workspace.mbuild("methods").stdout
    assert "mergekit's own bytes change with its thread count" in text

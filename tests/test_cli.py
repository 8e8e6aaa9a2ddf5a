"""The command line: dry-run, JSON reports, status, graph, methods, gc, clean, explain, -k and error reporting."""

from __future__ import annotations

import gc
import json
import sys

import pytest

from conftest import build_json, franken_ties, run_cli
from mbuild import io
from mbuild.cache import TensorCache
from mbuild.cli import console
from mbuild.cli import main

FAMILY = """
targets:
  franken:
    merge_method: passthrough
    slices:
      - sources: [{{model: {base}, layer_range: [0, 6]}}]
      - sources: [{{model: {base}, layer_range: [2, 8]}}]
  franken-code:
    merge_method: passthrough
    slices:
      - sources: [{{model: {code}, layer_range: [0, 6]}}]
      - sources: [{{model: {code}, layer_range: [2, 8]}}]
  final:
    merge_method: slerp
    base_model: franken
    models: [{{model: franken}}, {{model: franken-code}}]
    parameters: {{t: {t}}}
"""


@pytest.fixture
def project(llama, tmp_path):
    path = tmp_path / "Mergefile"
    path.write_text(FAMILY.format(t=0.3, **llama))
    return path


def no_tensor_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(io.TensorReader, "read", refuse)
    monkeypatch.setattr(io, "hash_tensor_bytes", refuse)


def test_dry_run_json_reads_no_tensor_and_explains(project, llama, monkeypatch, capsys):
    assert main(["-f", str(project), "--json"]) == 0
    capsys.readouterr()
    project.write_text(FAMILY.format(t=0.7, **llama))
    no_tensor_reads(monkeypatch)
    assert main(["final", "-f", str(project), "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["targets"]
    assert set(report) == {"franken", "franken-code", "final"}
    assert report["franken"]["stale"] is False and report["franken"]["reasons"] == []
    final = report["final"]
    assert final["stale"] is True
    assert final["reasons"] == ["parameters.t: 0.3 → 0.7"]
    assert final["layers"] == 12
    assert final["bytes"] == sum(t.nbytes for t in io.read_model(project.parent / "build" / "final").tensors.values())
    assert final["bytes_to_read"] == 2 * final["bytes"]
    assert final["tensors_to_compute"] == final["tensors"]  # t is one value for every tensor
    assert final["peak_memory"] > 0
    assert not (project.parent / "Mergefile.lock").read_text().count("0.7")  # nothing recorded


def test_dry_run_table_shows_reasons(project, capsys):
    assert main(["-f", str(project), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "never built" in out and "3 of 3 target(s) would be built" in out
    assert not (project.parent / "build").exists()


def test_build_json_then_noop(project, capsys):
    assert main(["-f", str(project), "--json", "-j", "1"]) == 0
    first = json.loads(capsys.readouterr().out)["targets"]
    assert {name: r["status"] for name, r in first.items()} == dict.fromkeys(first, "built")
    total = len(io.read_model(project.parent / "build" / "final").tensors)
    # Output layers 2-5 and 6-9 repeat source layers 2-5: identical tasks, computed once.
    assert first["final"]["tensors_computed"] == total - 4 * 9
    assert first["final"]["tensors_reused"] == 4 * 9
    assert main(["-f", str(project)]) == 0
    assert "nothing to do, 3 target(s) up to date" in capsys.readouterr().out


def test_status_and_graph(project, capsys):
    assert main(["status", "-f", str(project)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["franken", "stale"], ["franken-code", "stale"], ["final", "stale"]]
    assert main(["graph", "-f", str(project)]) == 0
    text = capsys.readouterr().out
    assert "final [slerp] <- franken, franken-code" in text
    assert main(["graph", "-f", str(project), "--format", "dot"]) == 0
    dot = capsys.readouterr().out
    assert dot.startswith("digraph mbuild {") and '"franken" -> "final";' in dot


def test_methods_lists_every_method_with_parameters(capsys):
    assert main(["methods", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert {"linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties", "passthrough"} <= set(rows)
    t = next(p for p in rows["slerp"]["parameters"] if p["name"] == "t")
    assert t["default"] == "required" and t["per_model"] is False


def test_a_mistake_exits_2_with_location_and_touches_nothing(project, llama, capsys):
    project.write_text(FAMILY.format(t=0.3, **llama).replace("merge_method: slerp", "merge_method: slurp"))
    assert main(["-f", str(project)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mbuild: error: {project}:")
    assert "target 'final'" in err and "did you mean 'slerp'" in err
    assert not (project.parent / "build").exists()
    assert not (project.parent / "Mergefile.lock").exists()


def test_unknown_target_on_the_command_line(project, capsys):
    assert main(["fnal", "-f", str(project)]) == 2
    assert "no target named 'fnal' (did you mean 'final'?)" in capsys.readouterr().err


def test_cuda_without_a_gpu_is_a_clear_error(project, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["-f", str(project), "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_console_build_ends_with_its_output_flushed_and_its_exit_code(project, llama, workspace):
    # A build leaves the process without interpreter teardown: what it printed must still arrive.
    assert workspace.root == project.parent  # the workspace runs mbuild beside this Mergefile
    built = workspace.mbuild("--json", "-j", "1", check=False)
    assert built.returncode == 0, built.stderr
    report = json.loads(built.stdout)["targets"]
    assert {name: r["status"] for name, r in report.items()} == dict.fromkeys(["franken", "franken-code", "final"], "built")
    assert io.read_model(project.parent / "build" / "final").tensors
    # A build that fails while computing keeps its exit code and its message.
    broken = _with_a_nan(llama["code"], project.parent / "broken")
    project.write_text(
        f"targets:\n  mixed:\n    merge_method: linear\n"
        f"    models: [{{model: {llama['base']}, parameters: {{weight: 1}}}}, {{model: {broken}, parameters: {{weight: 1}}}}]\n"
    )
    failed = workspace.mbuild("--keep-going", check=False)
    assert failed.returncode == 1
    assert "mbuild: error:" in failed.stderr and "non-finite" in failed.stderr


def _with_a_nan(model, folder):
    """A copy of `model` with one NaN in its first tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model, folder)
    path = next(folder.glob("*.safetensors"))
    tensors = load_file(path)
    first = sorted(tensors)[0]
    tensors[first].view(-1)[0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


@pytest.fixture
def recording_module(tmp_path, monkeypatch):
    """A module that records, when imported, whether the garbage collector was on."""
    (tmp_path / "gc_probe.py").write_text(
        "import gc\nSEEN = gc.isenabled()\nimport os\nif os.environ.get('GC_PROBE_FAIL'):\n    raise RuntimeError('probe')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "gc_probe"
    sys.modules.pop("gc_probe", None)
    gc.unfreeze()
    gc.enable()


@pytest.mark.parametrize("fails", [False, True], ids=["imports", "import-fails"])
def test_side_import_runs_without_the_collector_then_freezes(recording_module, monkeypatch, fails):
    if fails:
        monkeypatch.setenv("GC_PROBE_FAIL", "1")
    gc.unfreeze()
    side = console.SideImport(recording_module)
    side.start()
    side.join()
    assert gc.isenabled(), "the collector must be back on after the import"
    assert gc.get_freeze_count() > 0
    if fails:
        assert recording_module not in sys.modules
    else:
        assert sys.modules[recording_module].SEEN is False


def test_side_import_leaves_a_disabled_collector_disabled(recording_module):
    gc.disable()
    side = console.SideImport(recording_module)
    side.start()
    side.join()
    assert not gc.isenabled()


def test_side_import_starts_for_a_build_not_for_a_noop(project, monkeypatch):
    assert main(["-f", str(project), "-q", "-j", "1"]) == 0
    started = []
    monkeypatch.setattr(console.SideImport, "start", lambda self: started.append(self.name))
    # Hashes remembered, nothing stale: no import.
    assert main(["-f", str(project), "-q"]) == 0
    assert started == []
    # Hashes remembered, but a target to build: torch is imported on the side all the same.
    assert main(["-f", str(project), "-q", "--force", "-j", "1"]) == 0
    assert started == ["torch"]


def test_an_error_is_printed_before_waiting_for_the_side_import(project, monkeypatch, capsys):
    from mbuild import engine
    from mbuild.errors import BuildError

    def fail(self):
        raise BuildError("no space left on the output disk")

    seen_at_join = []
    monkeypatch.setattr(engine.Builder, "run", fail)  # a failure once the build, and the import, started
    monkeypatch.setattr(console.SideImport, "start", lambda self: console.SideImport.started.append(self))
    monkeypatch.setattr(console.SideImport, "join", lambda self: seen_at_join.append(capsys.readouterr().err))
    assert main(["-f", str(project), "-q"]) == 2
    assert seen_at_join and "no space left on the output disk" in seen_at_join[0], seen_at_join


# ---------------------------------------------------------------------------------------------
# gc, clean, explain and -k, over `franken_ties`: TIES on two up-scales, and a linear target beside


@pytest.fixture
def tuned_project(llama, tmp_path):
    path = tmp_path / "Mergefile"
    path.write_text(franken_ties(llama))
    return path


def test_gc_drops_what_no_target_needs_and_keeps_the_rest(tuned_project, llama):
    build_json(tuned_project, "-j", "1")
    tuned_project.write_text(franken_ties(llama, weight=0.2))
    build_json(tuned_project, "-j", "1")
    cache = TensorCache(tuned_project.parent / "cache" / "tensors")
    before = len(cache.keys())
    cache.close()
    code, out, _ = run_cli("gc", "-f", str(tuned_project), "--json")
    assert code == 0
    dropped = json.loads(out)["dropped"]
    assert dropped > 0  # the weight 0.7 tensors of 'tuned'
    cache = TensorCache(tuned_project.parent / "cache" / "tensors")
    assert len(cache.keys()) == before - dropped
    cache.close()
    assert main(["clean", "-f", str(tuned_project)]) == 0
    rebuilt = build_json(tuned_project, "-j", "1")
    assert all(r["tensors_computed"] == 0 for r in rebuilt.values())


def test_clean_removes_outputs_but_never_a_foreign_folder(tuned_project, capsys):
    build_json(tuned_project, "-j", "1")
    assert main(["clean", "-f", str(tuned_project), "tuned"]) == 0
    assert not (tuned_project.parent / "build" / "tuned").exists()
    assert (tuned_project.parent / "build" / "franken").exists()
    foreign = tuned_project.parent / "build" / "tuned"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    assert main(["clean", "-f", str(tuned_project), "tuned"]) == 2
    assert (foreign / "mine.txt").exists()


def test_explain_names_the_parameter_and_the_tensors(tuned_project, llama, capsys):
    build_json(tuned_project, "-j", "1")
    tuned_project.write_text(franken_ties(llama, weight=0.2))
    assert main(["explain", "-f", str(tuned_project), "tuned", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["targets"]["tuned"]
    assert report["stale"] and report["reasons"] == ["models[0].parameters.weight: 0.7 → 0.2"]
    assert set(report["changes"]) == {"franken-math.weight: 0.7 → 0.2"}
    # TIES with a single model of weight w normalises it away except where the delta is pruned:
    # every tensor's key changes because its parameters did.
    assert len(report["changes"]["franken-math.weight: 0.7 → 0.2"]) == report["tensors"]


def test_keep_going_builds_what_does_not_depend_on_a_failure(tuned_project, llama, capsys):
    # A weight beyond float32's range makes 'broken-or-not' non-finite; the others build.
    tuned_project.write_text(franken_ties(llama, linear_weight="1.0e+39"))
    report = build_json(tuned_project, "-j", "1", "-k", expect=1)
    assert report["broken-or-not"]["status"] == "failed"
    assert "non-finite" in report["broken-or-not"]["error"]
    assert report["tuned"]["status"] == "built"
    # Even with --json (or --quiet) the failure is said on stderr.
    assert "mbuild: error:" in capsys.readouterr().err

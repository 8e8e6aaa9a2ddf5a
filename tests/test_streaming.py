"""Out-of-core: a first build reads each source byte once, memory is budgeted, the kernel is advised.

Reads are counted at the system call every tensor read goes through (`os.preadv`), per file,
so a source hashed in one pass and read again to compute shows up as twice its size.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import build_json, grain_family, load_tensors


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return grain_family(tmp_path_factory.mktemp("streaming-family"), 4, 256, 512, 1024)


def mergefile(family) -> str:
    """TIES over all three models, and a frankenmerge that reads only layers 0-2 of the base."""
    return f"""
targets:
  tuned:
    merge_method: ties
    base_model: {family['base']}
    models:
      - model: {family['math']}
        parameters: {{weight: 0.6, density: 0.5}}
      - model: {family['code']}
        parameters: {{weight: 0.4, density: 0.5}}
  stacked:
    merge_method: passthrough
    slices:
      - sources: [{{model: {family['base']}, layer_range: [0, 2]}}]
      - sources: [{{model: {family['base']}, layer_range: [1, 3]}}]
"""


@pytest.fixture
def reads(monkeypatch):
    """Bytes of tensor data (past a safetensors file's header) read through os.preadv, by file path."""
    counted: Counter = Counter()
    real = os.preadv

    def counting(fd, buffers, offset, *rest):
        got = real(fd, buffers, offset, *rest)
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.endswith(".safetensors"):
            start = data_start(path)
            counted[path] += max(0, offset + got - max(offset, start))
        return got

    monkeypatch.setattr(os, "preadv", counting)
    return counted


def data_start(path: str) -> int:
    with open(path, "rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


def source_bytes(folder: Path) -> dict[str, int]:
    """Each weight file of a model, by resolved path: the bytes of its tensor data."""
    return {str(f.resolve()): f.stat().st_size - data_start(str(f)) for f in folder.glob("*.safetensors")}


@pytest.mark.parametrize("target, models", [("tuned", ("base", "math", "code")), ("stacked", ("base",))])
def test_a_first_build_reads_each_source_byte_once(family, tmp_path, reads, monkeypatch, target, models):
    """TIES reads all of three models; the frankenmerge takes layers 0-2 of four, and its other
    tensors are read once, to complete the base's digests. Before, each was hashed and then read."""
    monkeypatch.delenv("MBUILD_CACHE", raising=False)
    path = tmp_path / "Mergefile"
    path.write_text(mergefile(family))
    assert build_json(path, "-q", "-j", "2", target)[target]["status"] == "built"
    sizes = {f: n for name in models for f, n in source_bytes(family[name]).items()}
    assert {f: reads[f] for f in sizes} == sizes
    # A rebuild after a recipe change reads what it computes with, and hashes nothing.
    reads.clear()
    path.write_text(mergefile(family).replace("weight: 0.6", "weight: 0.5").replace("[1, 3]", "[0, 3]"))
    assert build_json(path, "-q", "-j", "2", target)[target]["status"] == "built"
    if target == "tuned":
        assert {f: reads[f] for f in sizes} == sizes  # TIES reads all three models, once
    else:
        assert sum(reads[f] for f in sizes) == 0  # the same layers, rearranged: every tensor from the cache


def test_hashing_while_reading_keys_and_caches_as_hashing_first_does(family, tmp_path, monkeypatch):
    """The same target built where its sources are new (hashed as read) and where they were
    hashed before (a first build of another target) has the same manifest keys and lock."""
    monkeypatch.delenv("MBUILD_CACHE", raising=False)
    text = mergefile(family)
    new = tmp_path / "new" / "Mergefile"
    new.parent.mkdir()
    new.write_text(text)
    assert build_json(new, "-q", "tuned")["tuned"]["status"] == "built"
    known = tmp_path / "known" / "Mergefile"
    known.parent.mkdir()
    other = "".join(f"      - model: {family[name]}\n        parameters: {{weight: 1.0}}\n" for name in family)
    known.write_text(text.replace("  stacked:", f"  other:\n    merge_method: linear\n    models:\n{other}  stacked:"))
    build_json(known, "-q", "other")  # every source of 'tuned' hashed now
    assert build_json(known, "-q", "tuned")["tuned"]["status"] == "built"
    manifests = [json.loads((p.parent / "build" / "tuned" / "mbuild.json").read_text()) for p in (new, known)]
    assert manifests[0]["key"] == manifests[1]["key"]
    assert {n: (e["key"], e["digest"]) for n, e in manifests[0]["tensors"].items()} == {
        n: (e["key"], e["digest"]) for n, e in manifests[1]["tensors"].items()
    }
    locks = [json.loads((p.parent / "Mergefile.lock").read_text())["targets"]["tuned"] for p in (new, known)]
    assert locks[0]["inputs"] == locks[1]["inputs"]
    # What the first build cached serves a rebuild of the removed output: nothing computed.
    from conftest import run_cli

    assert run_cli("clean", "-f", str(new), "tuned")[0] == 0
    again = build_json(new, "-q", "tuned")
    assert again["tuned"]["tensors_computed"] == 0 and again["tuned"]["status"] == "built"


def test_a_source_replaced_while_it_is_read_fails_the_target(family, tmp_path, monkeypatch):
    from mbuild import engine

    monkeypatch.delenv("MBUILD_CACHE", raising=False)
    path = tmp_path / "Mergefile"
    path.write_text(mergefile(family))
    real = engine.io.file_identity
    calls: Counter = Counter()

    def identity(file):
        calls[file] += 1
        size, mtime, inode = real(file)
        return (size, mtime + (1 if calls[file] > 1 else 0), inode)  # touched after the first look

    monkeypatch.setattr(engine.io, "file_identity", identity)
    reports = build_json(path, "-q", "-k", "tuned", expect=1)
    assert reports["tuned"]["status"] == "failed"
    assert "changed while this build read it" in reports["tuned"]["error"]
    assert not (tmp_path / "build" / "tuned").exists()
    monkeypatch.setattr(engine.io, "file_identity", real)
    from mbuild.cache import State

    state = State(tmp_path / "cache")
    assert not any(state.known(f) for model in family.values() for f in source_bytes(model))


class SleepyWork:
    """Tasks that take a moment each, recording how many ran at once."""

    def __init__(self):
        self.running = 0
        self.most = 0
        self.lock = threading.Lock()

    def run(self, task):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.05)
        with self.lock:
            self.running -= 1
        return "computed"


@pytest.mark.parametrize("budget, expected", [(None, 2), (150, 1), (250, 2)])
def test_tasks_that_together_exceed_the_memory_budget_run_one_after_another(budget, expected):
    from mbuild.executors import LocalExecutor

    work = SleepyWork()
    outcomes = []
    LocalExecutor(2, budget, cost=lambda task: 100).run(range(8), work, lambda o, n: outcomes.append(o))
    assert outcomes == ["computed"] * 8
    assert work.most == expected


def test_a_task_over_the_budget_still_runs_alone():
    from mbuild.executors import LocalExecutor

    work = SleepyWork()
    outcomes = []
    LocalExecutor(2, 10, cost=lambda task: 100).run(range(3), work, lambda o, n: outcomes.append(o))
    assert len(outcomes) == 3 and work.most == 1


def test_streaming_advises_the_kernel_and_changes_no_byte(family, tmp_path, monkeypatch):
    monkeypatch.delenv("MBUILD_CACHE", raising=False)
    path = tmp_path / "plain" / "Mergefile"
    path.parent.mkdir()
    path.write_text(mergefile(family))
    build_json(path, "-q", "-j", "2")
    advice: list[tuple[str, int]] = []
    real = os.posix_fadvise

    def recording(fd, offset, length, what):
        advice.append((os.readlink(f"/proc/self/fd/{fd}"), what))
        return real(fd, offset, length, what)

    monkeypatch.setattr(os, "posix_fadvise", recording)
    monkeypatch.setenv("MBUILD_STREAMING", "1")
    streamed = tmp_path / "streamed" / "Mergefile"
    streamed.parent.mkdir()
    streamed.write_text(mergefile(family))
    build_json(streamed, "-q", "-j", "2")
    for name in ("tuned", "stacked"):
        mine, other = (load_tensors(p.parent / "build" / name) for p in (streamed, path))
        assert mine.keys() == other.keys() and all(mine[k].equal(other[k]) for k in mine), name
    sources = {f for model in family.values() for f in source_bytes(model)}
    dropped_inputs = {f for f, what in advice if what == os.POSIX_FADV_DONTNEED and f in sources}
    asked_ahead = {f for f, what in advice if what == os.POSIX_FADV_WILLNEED and f in sources}
    dropped_outputs = [f for f, what in advice if what == os.POSIX_FADV_DONTNEED and "/build/" in f]
    assert dropped_inputs == sources and asked_ahead and dropped_outputs


def test_a_task_larger_than_the_memory_available_is_announced_before_anything_runs(family, tmp_path, monkeypatch,
                                                                                   capsys):
    from mbuild import memory

    monkeypatch.delenv("MBUILD_CACHE", raising=False)
    path = tmp_path / "Mergefile"
    path.write_text(mergefile(family))
    monkeypatch.setattr(memory, "available_memory", lambda: memory.BASELINE + 1000)
    reports = build_json(path, "-q", "tuned")
    assert reports["tuned"]["status"] == "built"  # a warning: the estimate may be high
    err = capsys.readouterr().err
    assert "of target 'tuned' needs about" in err and "may be killed for memory" in err
    monkeypatch.undo()
    path.write_text(mergefile(family).replace("weight: 0.6", "weight: 0.55"))
    monkeypatch.delenv("MBUILD_CACHE", raising=False)
    build_json(path, "-q", "tuned")
    assert "may be killed" not in capsys.readouterr().err


def test_a_first_build_killed_midway_resumes_from_what_it_computed(family, tmp_path, monkeypatch):
    """Sources hashed as they are read have no keys until the end: what a killed first build
    computed is cached under provisional keys (the task and its files' identities) meanwhile."""
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    monkeypatch.delenv("MBUILD_CACHE", raising=False)
    clean = tmp_path / "clean" / "Mergefile"
    clean.parent.mkdir()
    clean.write_text(mergefile(family))
    reference = build_json(clean, "-q", "-j", "1", "tuned")["tuned"]
    path = tmp_path / "killed" / "Mergefile"
    path.parent.mkdir()
    path.write_text(mergefile(family))
    script = (
        "import sys, time; from mbuild import operations; real = operations.compute_task\n"
        "def slow(task, models, reader, device, target, *rest):\n"
        "    if 'layers.3.' in task.name: time.sleep(60)\n"
        "    return real(task, models, reader, device, target, *rest)\n"
        "operations.compute_task = slow\n"
        f"from mbuild.cli import main; sys.exit(main(['-f', {str(path)!r}, '-j', '1', '-q', 'tuned']))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    build = path.parent / "build"
    deadline = time.time() + 60
    while time.time() < deadline and not list(build.glob(".tuned.mbuild-tmp-*")):
        time.sleep(0.05)
    time.sleep(1.5)  # stuck on layer 3: the embedding and layers 0-2 are computed
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (build / "tuned").exists()
    report = build_json(path, "-q", "-j", "1", "tuned")["tuned"]
    assert report["status"] == "built"
    assert report["tensors_reused"] >= 3 * 9, report  # layers 0-2 at least
    assert report["tensors_computed"] + report["tensors_reused"] == reference["tensors_computed"]
    manifests = [json.loads((p.parent / "build" / "tuned" / "mbuild.json").read_text()) for p in (clean, path)]
    assert {n: (e["key"], e["digest"]) for n, e in manifests[0]["tensors"].items()} == {
        n: (e["key"], e["digest"]) for n, e in manifests[1]["tensors"].items()
    }

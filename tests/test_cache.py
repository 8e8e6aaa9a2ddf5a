"""The tensor cache: reuse, early cutoff, resume after kill -9, concurrency, housekeeping."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, build_json, franken_ties, load_tensors
from mbuild import io, keys
from mbuild.cache import State, TensorCache
from mbuild.cli import main


def run(path: Path, *args: str, expect: int = 0) -> dict:
    return build_json(path, "-j", "1", *args, expect=expect)


def same_tensors(a: Path, b: Path) -> bool:
    x, y = load_tensors(a), load_tensors(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture
def project(llama, tmp_path):
    path = tmp_path / "Mergefile"
    path.write_text(franken_ties(llama))
    return path


@pytest.fixture
def reference(llama, tmp_path_factory):
    """A clean build of the family, to compare bytes with."""
    folder = tmp_path_factory.mktemp("reference")
    (folder / "Mergefile").write_text(franken_ties(llama))
    run(folder / "Mergefile")
    return folder / "build"


def test_undoing_an_edit_recomputes_nothing(project, llama):
    run(project)
    project.write_text(franken_ties(llama, weight=0.2))
    edited = run(project)
    assert edited["tuned"]["status"] == "built" and edited["tuned"]["tensors_computed"] > 0
    project.write_text(franken_ties(llama))
    undone = run(project)
    assert undone["tuned"]["status"] == "built"
    assert undone["tuned"]["tensors_computed"] == 0
    assert undone["tuned"]["tensors_reused"] == len(load_tensors(project.parent / "build" / "tuned"))


def test_identical_upstream_bytes_stop_the_cascade(project, llama):
    run(project)
    # The passthrough now scales by 1.0: new tasks, new keys, the same bytes.
    project.write_text(franken_ties(llama, franken_dtype="parameters: {scale: 1.0}"))
    plan = build_json(project, "--dry-run")
    assert plan["franken"]["stale"] and plan["franken"]["action"] == "rebuild"
    assert plan["tuned"]["stale"]
    assert plan["tuned"]["action"] == "rebuild unless upstream bytes are unchanged"
    assert plan["franken-math"]["stale"] is False
    report = run(project)
    assert report["franken"]["status"] == "built"
    assert report["tuned"]["status"] == "fresh"  # early cutoff: its inputs' bytes did not change


def test_a_recipe_change_that_keeps_every_task_is_cached_not_recomputed(project, llama):
    run(project)
    # Asking for float32 math explicitly is what a passthrough did anyway: same tasks, new recipe.
    project.write_text(franken_ties(llama, franken_dtype="dtype: float32\n    out_dtype: bfloat16"))
    plan = build_json(project, "--dry-run")
    assert plan["franken"]["stale"] and plan["franken"]["action"] == "cached"
    assert plan["tuned"]["stale"] is False  # its inputs' bytes are known to be the same
    report = run(project)
    assert report["franken"]["tensors_computed"] == 0 and report["tuned"]["status"] == "fresh"


def test_dry_run_says_cached_when_every_tensor_is_in_the_cache(project, llama):
    run(project)
    project.write_text(franken_ties(llama, weight=0.2))
    run(project)
    project.write_text(franken_ties(llama))
    plan = build_json(project, "--dry-run")
    assert plan["tuned"]["stale"] and plan["tuned"]["action"] == "cached"
    assert plan["tuned"]["tensors_to_compute"] == 0 and plan["tuned"]["bytes_to_read"] == 0


def test_computed_bytes_are_on_disk_once_shared_by_output_and_cache(project, reference):
    run(project)
    cache_folder = project.parent / "cache" / "tensors"
    assert not list(cache_folder.rglob("*.val"))  # no second copy of any tensor

    def inodes(folder):
        return {path.stat().st_ino for path in folder.rglob("*.safetensors")}

    blobs = {path.stat().st_ino for path in (cache_folder / "blobs").iterdir()}
    assert blobs == inodes(project.parent / "build")  # every output shard shared, nothing else held
    # The outputs gone, the cache still holds every tensor: nothing is computed again.
    assert main(["clean", "-f", str(project)]) == 0
    report = run(project)
    assert all(r["status"] == "built" and r["tensors_computed"] == 0 for r in report.values())
    for name in report:
        assert same_tensors(project.parent / "build" / name, reference / name)
    # The new outputs took over every entry, so the old shards were let go.
    assert {path.stat().st_ino for path in (cache_folder / "blobs").iterdir()} == inodes(project.parent / "build")


def test_corrupt_entries_are_dropped_and_recomputed(project, llama, reference):
    run(project)
    assert main(["clean", "-f", str(project)]) == 0  # blobs share the outputs' bytes: damage only the cache
    blobs = sorted((project.parent / "cache" / "tensors" / "blobs").iterdir())
    assert blobs
    for blob in blobs:
        data = bytearray(blob.read_bytes())
        for position in range(len(data) // 2, len(data), 256):
            data[position] ^= 0xFF
        blob.write_bytes(bytes(data))
    report = run(project)
    for name in report:
        assert report[name]["status"] == "built" and report[name]["tensors_computed"] > 0
        assert same_tensors(project.parent / "build" / name, reference / name)


def test_without_hard_links_the_cache_keeps_verified_copies(project, reference, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    run(project)
    cache_folder = project.parent / "cache" / "tensors"
    assert not (cache_folder / "blobs").exists() or not list((cache_folder / "blobs").iterdir())
    values = sorted(cache_folder.rglob("*.val"))
    assert values, "large tensors should live as files"
    assert main(["clean", "-f", str(project), "tuned"]) == 0
    assert run(project)["tuned"]["tensors_computed"] == 0
    for value in values:
        data = bytearray(value.read_bytes())
        data[len(data) // 2] ^= 0xFF
        value.write_bytes(bytes(data))
    assert main(["clean", "-f", str(project), "tuned"]) == 0
    report = run(project)
    assert report["tuned"]["status"] == "built" and report["tuned"]["tensors_computed"] > 0
    assert same_tensors(project.parent / "build" / "tuned", reference / "tuned")


def test_force_recomputes_everything(project):
    run(project)
    report = run(project, "--force")
    assert all(r["status"] == "built" and r["tensors_reused"] == 0 for r in report.values())


def test_kill_9_mid_target_resumes_from_committed_tensors(project, llama, reference):
    script = (
        "import sys, time; from mbuild import operations; real = operations.compute_task\n"
        "def slow(task, models, reader, device, target, *rest):\n"
        "    if target.name == 'tuned' and 'layers.8.' in task.name: time.sleep(60)\n"
        "    return real(task, models, reader, device, target, *rest)\n"
        "operations.compute_task = slow\n"
        f"from mbuild.cli import main; sys.exit(main(['-f', {str(project)!r}, '-j', '1', 'tuned']))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    build = project.parent / "build"
    deadline = time.time() + 60
    while time.time() < deadline and not list(build.glob(".tuned.mbuild-tmp-*")):
        time.sleep(0.05)
    time.sleep(1.0)  # it is now stuck on layer 8 of tuned, earlier tensors committed
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (build / "tuned").exists()
    report = run(project)
    assert report["tuned"]["status"] == "built"
    assert report["tuned"]["tensors_reused"] >= 8 * 9  # layers 0-7 were committed before the kill
    assert same_tensors(build / "tuned", reference / "tuned")


def test_two_builds_at_once_both_finish_with_correct_bytes(project, reference):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "mbuild.cli", "-f", str(project), "--json", "-j", "1"]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outputs = [p.communicate(timeout=300) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    reports = [json.loads(out)["targets"] for out, _ in outputs]
    for name in ("franken", "franken-math", "tuned", "broken-or-not"):
        statuses = sorted(r[name]["status"] for r in reports)
        assert statuses in (["built", "fresh"], ["built", "built"]), (name, statuses)
        assert same_tensors(project.parent / "build" / name, reference / name)
    assert not list((project.parent / "build").glob(".*.mbuild-tmp-*"))


def test_cache_bound_is_explicit_and_enforced(project, tmp_path):
    report = run(project, "--cache-size", "300K", "--force")
    assert report["tuned"]["status"] == "built"
    cache = TensorCache(project.parent / "cache" / "tensors", 300_000)
    assert cache.store.size_limit == 300_000
    assert cache.volume() < 300_000 + 200_000  # bounded (diskcache culls to the limit lazily)
    cache.close()
    free = shutil.disk_usage(tmp_path).free
    default = TensorCache(tmp_path / "fresh")
    # Half the free disk (the README's words); other processes write meanwhile.
    assert abs(default.store.size_limit - free // 2) < 64 * 1024**2
    assert default.store.eviction_policy == "least-recently-used"
    default.close()


def test_state_remembers_files_by_identity(llama, tmp_path):
    from mbuild import io

    state = State(tmp_path / "cache")
    model = io.read_model(llama["base"])
    assert state.digests(model, compute=False) is None
    computed = state.digests(model, compute=True)
    assert computed == state.digests(model, compute=False)
    assert set(computed) == set(model.tensors)


def shard_file(folder: Path, name: str, size: int = 1000) -> Path:
    path = folder / name
    path.write_bytes(bytes(range(256)) * (size // 256) + bytes(size % 256))
    return path


def place(cache: TensorCache, key: str, shard: Path, blob: str) -> None:
    cache.put_at(key, blob, 100, 50, keys.tensor_digest(shard.read_bytes()[100:150]))


def test_blobs_are_bounded_least_recently_used_first(tmp_path):
    cache = TensorCache(tmp_path / "cache", size_limit=2500)
    shards = [shard_file(tmp_path, name) for name in ("a", "b", "c", "d")]
    a, b = cache.link(shards[0]), cache.link(shards[1])
    place(cache, "in-a", shards[0], a)
    place(cache, "in-b", shards[1], b)
    # Both still being written by this (live) process: neither may go to make room.
    assert cache.link(shards[2]) is None
    cache.done_with([a, b])
    assert cache.get("in-a")[0] == shards[0].read_bytes()[100:150]  # 'a' is now the more recent
    c = cache.link(shards[2])
    assert c is not None and cache.volume() - cache.store.volume() == 2000
    assert not cache.contains("in-b") and cache.contains("in-a")
    assert sorted(p.name for p in cache.blob_folder.iterdir()) == sorted([a, c])
    # A blob larger than the whole bound is never linked, and evicts nothing.
    assert cache.link(shard_file(tmp_path, "huge", 3000)) is None
    assert sorted(p.name for p in cache.blob_folder.iterdir()) == sorted([a, c]) and cache.contains("in-a")
    cache.close()


def test_prune_keeps_blobs_in_use_and_drops_the_rest(tmp_path):
    cache = TensorCache(tmp_path / "cache", size_limit=10_000)
    shards = [shard_file(tmp_path, name) for name in ("a", "b", "c")]
    used, empty, writing = (cache.link(shard) for shard in shards)
    place(cache, "in-used", shards[0], used)
    cache.done_with([used, empty])
    (cache.blob_folder / "stray").write_bytes(b"left by a crash between link and row")
    assert cache.prune() == 2  # 'empty' and the stray file
    assert sorted(p.name for p in cache.blob_folder.iterdir()) == sorted([used, writing])
    cache.delete("in-used")
    cache.done_with([writing])
    assert cache.prune() == 2
    assert list(cache.blob_folder.iterdir()) == [] and cache.volume() == cache.store.volume()
    # The shards themselves (the outputs) are untouched.
    assert all(shard.read_bytes()[:256] == bytes(range(256)) for shard in shards)
    cache.close()


def test_a_blob_that_vanished_is_a_miss(tmp_path):
    cache = TensorCache(tmp_path / "cache", size_limit=10_000)
    shard = shard_file(tmp_path, "a")
    blob = cache.link(shard)
    place(cache, "in-a", shard, blob)
    (cache.blob_folder / blob).unlink()
    assert cache.get("in-a") is None
    assert not cache.contains("in-a") and cache.volume() == cache.store.volume()
    cache.close()


def test_switching_a_new_state_file_to_wal_waits_out_a_lock(tmp_path, monkeypatch):
    # Two builds started together both open a new state.db; while one switches it to WAL,
    # SQLite may tell the other "database is locked" at once, without its busy timeout.
    real_connect = sqlite3.connect

    def contended(message, refusals):
        class Contended:
            def __init__(self, *args, **kwargs):
                self.real, self.refusals = real_connect(*args, **kwargs), refusals

            def execute(self, sql, *args):
                if sql.startswith("PRAGMA journal_mode") and self.refusals:
                    self.refusals -= 1
                    raise sqlite3.OperationalError(message)
                return self.real.execute(sql, *args)

            def __enter__(self):
                return self.real.__enter__()

            def __exit__(self, *exc):
                return self.real.__exit__(*exc)

            def __getattr__(self, name):
                return getattr(self.real, name)

        return Contended

    monkeypatch.setattr(sqlite3, "connect", contended("database is locked", 3))
    state = State(tmp_path / "cache")
    state.remember_outputs({"key": "digest"})
    assert state.output_digest("key") == "digest"
    state.close()
    # Any other error is not waited out: the state carries on in memory, with a warning.
    monkeypatch.setattr(sqlite3, "connect", contended("disk I/O error", 1))
    told = []
    started = time.monotonic()
    elsewhere = State(tmp_path / "elsewhere", warn=told.append)
    elsewhere.remember_outputs({"key": "digest"})
    assert time.monotonic() - started < 5
    assert len(told) == 1 and "disk I/O error" in told[0]
    assert elsewhere.output_digest("key") == "digest"


def test_digests_remembered_by_an_earlier_version_are_forgotten(llama, tmp_path):
    """state.db from before BLAKE3: its sha256 file digests must never pass for today's."""

    model = io.read_model(llama["base"])
    (file,) = model.weight_files
    folder = tmp_path / "cache"
    folder.mkdir()
    old = sqlite3.connect(folder / "state.db")
    old.execute("CREATE TABLE files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, inode INTEGER, digests TEXT)")
    old.execute("CREATE TABLE outputs (key TEXT PRIMARY KEY, sha256 TEXT, used REAL)")
    stale = {name: "0" * 64 for name in model.tensors}
    old.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?)", (str(file), *io.file_identity(file), json.dumps(stale)))
    old.execute("INSERT INTO outputs VALUES ('task', 'old', 0)")
    old.commit()
    old.close()
    state = State(folder)
    assert state.digests(model, compute=False) is None
    assert state.output_digest("task") is None
    computed = state.digests(model, compute=True)
    assert computed != stale and computed == {n: keys.tensor_digest(raw) for n, raw in _tensor_bytes(model).items()}
    state.close()
    # Opened again, today's digests stay.
    again = State(folder)
    assert again.digests(model, compute=False) == computed
    again.close()


def _tensor_bytes(model) -> dict[str, bytes]:
    raw = Path(next(iter(model.weight_files))).read_bytes()
    return {name: raw[t.start : t.end] for name, t in model.tensors.items()}


def test_cache_places_of_an_earlier_version_are_dropped_and_their_blobs_pruned(tmp_path):

    folder = tmp_path / "cache"
    (folder / "blobs").mkdir(parents=True)
    shard = shard_file(folder / "blobs", "oldblob")
    old = sqlite3.connect(folder / "links.db")
    old.execute("CREATE TABLE blobs (id TEXT PRIMARY KEY, size INTEGER, used REAL, writer INTEGER)")
    old.execute(
        "CREATE TABLE places (key TEXT PRIMARY KEY, blob TEXT, offset INTEGER, length INTEGER, sha256 TEXT)"
    )
    old.execute("INSERT INTO blobs VALUES ('oldblob', 1000, 0, NULL)")
    data = shard.read_bytes()[100:150]
    old.execute("INSERT INTO places VALUES ('key', 'oldblob', 100, 50, ?)", (keys.tensor_digest(data),))
    old.commit()
    old.close()
    cache = TensorCache(folder, size_limit=10_000)
    assert cache.get("key") is None and not cache.contains("key")
    cache.prune()
    assert not shard.exists()
    cache.close()


def test_a_lock_from_before_blake3_explains_the_one_rebuild(project):
    from mbuild import lock

    run(project)
    lock_file = project.with_name("Mergefile.lock")
    data = json.loads(lock_file.read_text())
    assert data["version"] == lock.LOCK_VERSION
    manifest_path = project.parent / "build" / "franken" / io.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["key"] = "made-with-sha256-keys"  # as an earlier version's output is
    manifest_path.write_text(json.dumps(manifest))
    for entry in data["targets"].values():  # and its fingerprints, of sha256 digests
        entry["inputs"] = {node: "0" * 64 for node in entry["inputs"]}
    lock_file.write_text(json.dumps(data))
    assert any("content changed" in reason for reason in build_json(project, "--dry-run")["franken"]["reasons"])
    data["version"] = 1
    lock_file.write_text(json.dumps(data))
    assert build_json(project, "--dry-run")["franken"]["reasons"] == [lock.EARLIER_DIGESTS]
    # The remembered sha256 file digests are forgotten too: still the one reason, not "changed on disk".
    state = sqlite3.connect(project.parent / "cache" / "state.db")
    state.execute("PRAGMA user_version = 1")
    state.commit()
    state.close()
    assert build_json(project, "--dry-run")["franken"]["reasons"] == [lock.EARLIER_DIGESTS]
    built = run(project)
    assert built["franken"]["status"] == "built"
    assert json.loads(lock_file.read_text())["version"] == lock.LOCK_VERSION
    assert build_json(project, "--dry-run")["franken"]["stale"] is False

"""Faults in mbuild's own state: a damaged, read-only or full cache, a damaged Mergefile.lock, a small disk.

The cache (state.db, tensors/ with links.db and diskcache's cache.db) only remembers what can be
computed again: a fault there costs caching, with one warning line, never the build, and the
outputs come out with the same bytes. What cannot be worked around (no room for the output
itself) is one message that says what to do. Tests that need a filesystem of their own mount a
small tmpfs and skip where that is not possible (not root, no mount).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import linear_mergefile, run_cli
from mbuild import io
from mbuild.cache import State, TensorCache


def output_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of a built output but its manifest (which records mtimes), with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != io.MANIFEST_NAME}


def run_to_the_end(*args: str) -> tuple[int, str, str]:
    """Run the CLI in-process and close what it left open, as the end of its process would:
    damage done afterwards is then to files at rest, not hidden by an open connection's journal."""
    result = run_cli(*args)
    gc.collect()
    return result


def warnings(err: str) -> list[str]:
    """The warning lines of a command's stderr."""
    return [line for line in err.splitlines() if line.startswith("mbuild: warning:")]


@pytest.fixture(scope="module")
def reference(families, tmp_path_factory) -> dict[str, bytes]:
    """The bytes of the linear target built with nothing wrong."""
    folder = tmp_path_factory.mktemp("reference")
    assert run_cli("-f", str(linear_mergefile(folder, families("llama"), {"merged": None})), "-q")[0] == 0
    return output_bytes(folder / "build" / "merged")


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs: ``tmpfs(name, size)`` returns its folder; skips where mounting is impossible."""
    mounted: list[Path] = []

    def mount(name: str, size: int) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root")
        folder = tmp_path / name
        folder.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {result.stderr.decode().strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def make_read_only(folder: Path) -> None:
    """Remount a tmpfs read-only (root could write past a chmod), once nothing holds a file open for writing."""
    gc.collect()
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)


def fill(folder: Path, leave: int = 0) -> None:
    """Take a filesystem's free space with a file of no use, leaving about ``leave`` bytes."""
    size = max(0, shutil.disk_usage(folder).free - leave)
    with open(folder / "ballast", "wb") as handle:
        try:
            handle.write(b"\0" * size)
            handle.flush()
        except OSError:
            pass  # full: as meant


# ---------------------------------------------------------------------------------------------
# Damaged state files are started afresh


def garbage(path: Path) -> None:
    """Overwrite a file with random bytes of its size."""
    path.write_bytes(os.urandom(path.stat().st_size))


def truncated(path: Path) -> None:
    """Cut a file to half its size, as a write stopped by a crash or a full disk would."""
    os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize("damage", [garbage, truncated])
def test_a_damaged_state_db_is_deleted_and_started_afresh(llama, tmp_path, reference, damage):
    path = linear_mergefile(tmp_path, llama, {"merged": None})
    assert run_cli("-f", str(path), "-q")[0] == 0
    state = tmp_path / "cache" / "state.db"
    for command in (["-q"], ["--dry-run", "--json"], ["-q", "--force"], ["status"], ["gc"]):
        damage(state)
        code, _, err = run_to_the_end(*command[:1], "-f", str(path), *command[1:])
        assert code == 0, err
        (warning,) = warnings(err)
        assert f"{state} was damaged" in warning and "started afresh" in warning
        assert output_bytes(tmp_path / "build" / "merged") == reference
    code, out, err = run_cli("-f", str(path))
    assert code == 0 and "nothing to do" in out and not warnings(err)  # a sound state.db again


@pytest.mark.parametrize("damage", [garbage, truncated])
@pytest.mark.parametrize("name", ["links.db", "cache.db"])
def test_a_damaged_tensor_cache_index_is_deleted_and_started_afresh(llama, tmp_path, reference, name, damage):
    path = linear_mergefile(tmp_path, llama, {"merged": None})
    assert run_cli("-f", str(path), "-q")[0] == 0
    index = tmp_path / "cache" / "tensors" / name
    for command in (["--dry-run", "--json"], ["gc"], ["-q", "--force"]):
        assert run_to_the_end("-f", str(path), "-q", "--force")[0] == 0  # a full cache to damage
        damage(index)
        code, _, err = run_to_the_end(*command[:1], "-f", str(path), *command[1:])
        assert code == 0, err
        (warning,) = warnings(err)
        assert f"{index} was damaged" in warning and "started afresh" in warning
        assert output_bytes(tmp_path / "build" / "merged") == reference
    # Started afresh, the cache serves again: an edit undone reuses what the forced build cached.
    assert run_cli("-f", str(linear_mergefile(tmp_path, llama, {"merged": None}, weight=0.7)), "-q")[0] == 0
    linear_mergefile(tmp_path, llama, {"merged": None})
    code, out, err = run_cli("-f", str(path), "--json", "-q")
    assert code == 0 and not warnings(err)
    report = json.loads(out)["targets"]["merged"]
    assert report["tensors_computed"] == 0 and report["tensors_reused"] > 0
    assert output_bytes(tmp_path / "build" / "merged") == reference


# ---------------------------------------------------------------------------------------------
# A cache that cannot be written costs only caching


def test_a_read_only_cache_folder_costs_only_caching(llama, tmp_path, tmpfs, reference):
    cache = tmpfs("cache", 64 * 1024 * 1024)
    path = linear_mergefile(tmp_path, llama, {"merged": None})
    assert run_cli("-f", str(path), "-q", "--cache-dir", str(cache))[0] == 0
    make_read_only(cache)
    for command in (["-q"], ["--dry-run", "--json"], ["-q", "--force"], ["status"], ["gc"], ["explain"]):
        extra = ["merged"] if command == ["explain"] else []
        code, out, err = run_cli(*command[:1], "-f", str(path), *command[1:], "--cache-dir", str(cache), *extra)
        assert code == 0, err
        assert warnings(err) and all(len(line.splitlines()) == 1 for line in warnings(err))
        assert "Traceback" not in err
    assert output_bytes(tmp_path / "build" / "merged") == reference


def test_texts_and_vocabularies_the_plan_keeps_in_the_cache_go_elsewhere_when_it_is_read_only(llama, tmp_path, tmpfs):
    # A chat template and a union vocabulary are written into the cache while planning.
    text = linear_mergefile(tmp_path, llama, {"merged": None}).read_text()
    extra = "    chat_template: chatml\n    tokenizer_source: union\n"
    path = tmp_path / "Mergefile"
    path.write_text(text.replace("    merge_method: linear\n", "    merge_method: linear\n" + extra))
    assert run_cli("-f", str(path), "-q", "--cache-dir", str(tmp_path / "writable"))[0] == 0
    expected = output_bytes(tmp_path / "build" / "merged")
    assert "chat_template.jinja" in expected and "tokenizer.json" in expected
    cache = tmpfs("cache", 1024 * 1024)
    make_read_only(cache)
    code, _, err = run_cli("-f", str(path), "-q", "--force", "--cache-dir", str(cache))
    assert code == 0, err
    assert output_bytes(tmp_path / "build" / "merged") == expected


@pytest.mark.parametrize("leave", [0, 256 * 1024], ids=["full", "nearly-full"])
def test_a_full_cache_dir_of_its_own_costs_only_caching(llama, tmp_path, tmpfs, reference, leave):
    cache = tmpfs("cache", 2 * 1024 * 1024)
    fill(cache, leave)
    path = linear_mergefile(tmp_path, llama, {"merged": None})
    code, _, err = run_cli("-f", str(path), "-q", "--cache-dir", str(cache))
    assert code == 0, err
    assert any("caching skipped" in line for line in warnings(err)), err
    assert output_bytes(tmp_path / "build" / "merged") == reference
    assert "merged" in json.loads((tmp_path / "Mergefile.lock").read_text())["targets"]
    code, _, err = run_cli("-f", str(path), "-q", "--force", "--cache-dir", str(cache))
    assert code == 0, err
    assert output_bytes(tmp_path / "build" / "merged") == reference


def test_no_room_for_the_output_is_one_message_that_says_what_to_do(llama, tmp_path, tmpfs, reference):
    shard = len(reference["model.safetensors"])
    # Room for the weights and the lock file, not for the rest of the output folder.
    disk = tmpfs("disk", (shard // 4096 + 2) * 4096)
    path = linear_mergefile(tmp_path, llama, {"merged": str(disk / "merged")})
    code, _, err = run_cli("-f", str(path), "-q", "--cache-dir", str(tmp_path / "cache"))
    assert code == 2 and "Traceback" not in err
    (message,) = [line for line in err.splitlines() if line.startswith("mbuild: error:")]
    assert "target 'merged'" in message and "No space left on device" in message
    assert "free some space there and run mbuild again" in message
    assert sorted(p.name for p in disk.iterdir()) == [".merged.mbuild-lock"]  # no half-built output


# ---------------------------------------------------------------------------------------------
# The default bound of the tensor cache: half the free disk where it lives


def test_the_default_cache_bound_is_half_the_free_disk_however_small(tmpfs):
    disk = tmpfs("disk", 8 * 1024 * 1024)
    (disk / "ballast").write_bytes(b"\0" * 2 * 1024 * 1024)
    free = shutil.disk_usage(disk).free
    cache = TensorCache(disk / "tensors")
    # Opening the cache (its index files) takes some pages itself: measured when it opens.
    assert free // 2 - 256 * 1024 <= cache.size_limit <= free // 2
    cache.close()


def test_a_build_on_a_small_disk_evicts_what_it_cached_and_succeeds(llama, tmp_path, tmpfs, reference):
    shard = len(reference["model.safetensors"])
    # A whole project on a disk of five shards: each rebuild leaves its output's shard in the
    # cache, so without eviction the third or fourth build runs out of space.
    disk = tmpfs("project", shard * 5)
    for weight in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6):
        path = linear_mergefile(disk, llama, {"merged": None}, weight=weight)
        code, _, err = run_to_the_end("-f", str(path), "-q")
        assert code == 0, err
    linear_mergefile(disk, llama, {"merged": None})
    assert run_to_the_end("-f", str(path), "-q")[0] == 0
    assert output_bytes(disk / "build" / "merged") == reference


# ---------------------------------------------------------------------------------------------
# Mergefile.lock


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe\x00garbage",
        b"[1, 2]",
        b'{"version": "3", "sources": {}, "targets": {}}',
        b'{"version": 3, "sources": [], "targets": {}}',
        b'{"version": 3, "sources": {}, "targets": ["merged"]}',
        b'{"version": 3, "sources": {}, "targets": {"merged": 5}}',
        b'{"version": 3, "sources": {}, "targets": {"merged": {"inputs": ["x"]}}}',
        b'{"version": 3, "sources": {"hub:org/model": "abc"}, "targets": {}}',
    ],
    ids=["not-utf8", "a-list", "version-text", "sources-list", "targets-list", "entry", "inputs-list", "source"],
)
def test_an_unreadable_lock_is_one_warning_and_is_rewritten(llama, tmp_path, reference, content):
    path = linear_mergefile(tmp_path, llama, {"merged": None}, weight=0.7)
    assert run_cli("-f", str(path), "-q")[0] == 0
    lock = tmp_path / "Mergefile.lock"
    linear_mergefile(tmp_path, llama, {"merged": None})  # stale: its reasons are read against the lock
    for command in (["--dry-run", "--json"], ["status"], ["explain"], ["-q"]):
        lock.write_bytes(content)
        extra = ["merged"] if command == ["explain"] else []
        code, _, err = run_cli(*command[:1], "-f", str(path), *command[1:], *extra)
        assert code == 0, err
        (warning,) = warnings(err)
        assert str(lock) in warning and "rewritten by the next build" in warning
    assert json.loads(lock.read_text())["targets"]["merged"]["recipe"]["models"][0]["parameters"]["weight"] == 0.5
    assert output_bytes(tmp_path / "build" / "merged") == reference
    code, _, err = run_cli("-f", str(path), "-q")
    assert code == 0 and not warnings(err)


# ---------------------------------------------------------------------------------------------
# Texts kept in the cache (chat templates)


def test_a_damaged_stored_text_is_written_again(tmp_path):
    kept = io.store_text(tmp_path, "{{ messages }} and more", ".jinja")
    kept.write_text("{{ mess")  # a write cut short
    assert io.store_text(tmp_path, "{{ messages }} and more", ".jinja").read_text() == "{{ messages }} and more"


def test_a_text_is_kept_elsewhere_when_the_cache_is_read_only(tmpfs):
    cache = tmpfs("cache", 1024 * 1024)
    make_read_only(cache)
    kept = io.store_text(cache / "templates", "{{ messages }}", ".jinja")
    assert kept.read_text() == "{{ messages }}" and cache not in kept.parents


def test_state_carries_on_in_memory_when_its_file_cannot_be_written(tmpfs):
    folder = tmpfs("cache", 1024 * 1024)
    make_read_only(folder)
    told = []
    state = State(folder, warn=told.append)
    state.remember_outputs({"key": "digest"})
    assert state.output_digest("key") == "digest"
    assert len(told) == 1 and "kept in memory this run" in told[0]
    state.close()


def test_a_cache_dir_that_is_a_file_costs_only_caching_and_says_so(llama, tmp_path):
    path = linear_mergefile(tmp_path, llama, {"merged": None})
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("mine")
    code, _, err = run_to_the_end("-f", str(path), "-q", "--cache-dir", str(not_a_folder))
    assert code == 0, err
    assert warnings(err) and all("a file stands where the cache needs a folder" in w for w in warnings(err))
    assert not_a_folder.read_text() == "mine"
    assert (tmp_path / "build" / "merged" / "mbuild.json").is_file()

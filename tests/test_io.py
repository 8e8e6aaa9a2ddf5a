"""Model I/O: headers without tensors, the sharded writer, and hub models from a local HF cache."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, load_tensors
from mbuild import io, keys


def test_headers_are_read_without_tensor_data(llama):
    info = io.read_model(llama["base"])
    assert info.num_layers == 8
    embed = info.tensors["model.embed_tokens.weight"]
    assert embed.dtype == "bfloat16" and embed.shape == (384, 64)
    assert embed.end - embed.start == embed.nbytes
    reader = io.TensorReader()
    tensor = reader.read(embed)
    reader.close()
    assert torch.equal(tensor, load_tensors(llama["base"])["model.embed_tokens.weight"])


def test_writer_lays_out_shards_and_refuses_wrong_sizes(tmp_path):
    from mbuild.errors import BuildError

    layout = [("a", "float32", (4, 4)), ("b", "bfloat16", (10,)), ("c", "float32", (8,))]
    writer = io.ShardedWriter(tmp_path, layout, max_shard_bytes=70)
    assert len(writer.shards) == 2
    with pytest.raises(BuildError):
        writer.write("a", b"\0" * 10)
    writer.write("c", torch.arange(8, dtype=torch.float32).numpy().tobytes())
    writer.write("a", torch.ones(4, 4).numpy().tobytes())
    writer.write("b", torch.zeros(10, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())
    writer.close()
    tensors = load_tensors(tmp_path)
    assert torch.equal(tensors["c"], torch.arange(8, dtype=torch.float32)) and torch.equal(tensors["a"], torch.ones(4, 4))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 64 + 20 + 32


def test_writer_never_writes_into_a_file_shared_elsewhere(tmp_path):
    # The cache hard-links output shards: writing into an existing file would change its bytes.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_bytes(b"earlier output")
    os.link(tmp_path / "out" / "model.safetensors", tmp_path / "shared")
    writer = io.ShardedWriter(tmp_path / "out", [("a", "float32", (2,))], max_shard_bytes=1000)
    writer.write("a", torch.ones(2).numpy().tobytes())
    writer.close()
    assert (tmp_path / "shared").read_bytes() == b"earlier output"
    assert torch.equal(load_tensors(tmp_path / "out")["a"], torch.ones(2))


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_tensor_digests_are_the_blake3_of_each_tensors_bytes(llama, tmp_path, monkeypatch, chunk):
    import blake3

    from mbuild.errors import ModelError
    from mbuild.io import reading

    monkeypatch.setattr(reading, "READ_CHUNK", chunk)  # 7: every tensor in many pieces through one buffer
    model = io.read_model(llama["base"])
    path = next(iter(model.weight_files))
    raw = Path(path).read_bytes()
    expected = {name: blake3.blake3(raw[t.start : t.end]).hexdigest() for name, t in model.tensors.items()}
    seen = []
    for workers in (1, 2):
        assert io.hash_tensor_bytes(model.tensors.values(), workers=workers, progress=seen.append) == expected
    assert sum(seen) == 2 * sum(t.end - t.start for t in model.tensors.values())
    last = max(model.tensors.values(), key=lambda t: t.end)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: last.end - 3])
    with pytest.raises(ModelError, match="truncated"):
        io.hash_tensor_bytes([dataclasses.replace(last, file=str(cut))])


def fake_hub_snapshot(cache: Path, repo: str, commit: str, source: Path, main: bool = True) -> None:
    """Lay out one snapshot of a model the way huggingface_hub's cache does."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in source.iterdir():
        shutil.copyfile(path, snapshot / path.name)
    if main:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(commit)


def run_offline(tmp_path: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mbuild.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True)


def test_hub_models_resolve_offline_and_the_lock_pins_their_revision(llama, tmp_path):
    cache = tmp_path / "hub"
    first, second = "a" * 40, "b" * 40
    fake_hub_snapshot(cache, "acme/tiny", first, llama["base"])
    (tmp_path / "Mergefile").write_text(
        "targets:\n  deep:\n    merge_method: passthrough\n    slices:\n"
        "      - sources: [{model: acme/tiny, layer_range: [0, 8]}]\n"
        "      - sources: [{model: acme/tiny, layer_range: [4, 8]}]\n"
    )
    result = run_offline(tmp_path, cache, "all", "--json")
    assert result.returncode == 0, result.stderr
    lock = json.loads((tmp_path / "Mergefile.lock").read_text())
    assert lock["sources"]["hub:acme/tiny@main"]["revision"] == first
    built = load_tensors(tmp_path / "build" / "deep")
    assert torch.equal(built["model.layers.9.mlp.up_proj.weight"], load_tensors(llama["base"])["model.layers.5.mlp.up_proj.weight"])

    # main moves on; the lock keeps the family on the commit it was built from.
    fake_hub_snapshot(cache, "acme/tiny", second, llama["math"])
    result = run_offline(tmp_path, cache, "all", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["targets"]["deep"]["status"] == "fresh"

    # Asking for the new commit explicitly builds from it.
    text = (tmp_path / "Mergefile").read_text().replace("acme/tiny,", f"acme/tiny@{second},")
    (tmp_path / "Mergefile").write_text(text)
    result = run_offline(tmp_path, cache, "all", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["targets"]["deep"]["status"] == "built"
    rebuilt = load_tensors(tmp_path / "build" / "deep")
    assert torch.equal(rebuilt["model.layers.9.mlp.up_proj.weight"], load_tensors(llama["math"])["model.layers.5.mlp.up_proj.weight"])


def test_a_hub_model_missing_from_the_offline_cache_is_a_clear_error(tmp_path):
    (tmp_path / "Mergefile").write_text("targets:\n  x:\n    merge_method: passthrough\n    models: [{model: acme/absent}]\n")
    result = run_offline(tmp_path, tmp_path / "empty-cache", "all")
    assert result.returncode == 2
    assert "hub model 'acme/absent' not found in the local Hugging Face cache (HF_HUB_OFFLINE=1)" in result.stderr
    assert "Mergefile:4: target 'x'" in result.stderr
    assert "Traceback" not in result.stderr


def test_tensor_digest_is_blake3():
    # BLAKE3's published digest of the empty input, and of one the test computes apart.
    assert keys.tensor_digest(b"") == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    hasher = keys.tensor_hasher(b"ab")
    hasher.update(memoryview(b"c"))
    assert hasher.hexdigest() == keys.tensor_digest(b"abc") != keys.tensor_digest(b"abd")


def test_publish_swaps_in_one_step_or_falls_back_to_two_renames(tmp_path, monkeypatch):
    from mbuild.io import outputs

    for swap in (True, False):
        if not swap:
            monkeypatch.setattr(outputs, "_renameat2", lambda: None)
        output, new = tmp_path / f"out-{swap}", tmp_path / f".new-{swap}"
        output.mkdir()
        (output / "old.txt").write_text("old")
        new.mkdir()
        (new / "new.txt").write_text("new")
        io.publish(new, output)
        assert sorted(p.name for p in output.iterdir()) == ["new.txt"]
        assert not new.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(
            p.name for p in tmp_path.iterdir() if p.name.startswith("out-")
        )

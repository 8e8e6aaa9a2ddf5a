"""Hub models through huggingface_hub's real client, against `fake_hub` (a local server that
stands for the hub): `mbuild check` finds a plan's mistakes from headers alone, a build
downloads only the files a merge reads and checks their hashes, and HF_HUB_OFFLINE=1 builds
from the cache or says which model it lacks."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, load_tensors, run_cli
from fake_hub import FakeHub, use

sys.path.insert(0, str(ROOT / "examples"))
import make_models  # noqa: E402

# What a hub repository often holds beside what a merge reads: pickles, a folder of other weights.
EXTRAS = {"pytorch_model.bin": b"\0" * 4096, "original/consolidated.00.pth": b"\1" * 4096}
# Its model card, whose license the cards of what is built from it carry.
CARD = b"---\nlicense: apache-2.0\n---\n# tiny\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny Llamas: a base, a fine-tune of it, and three that cannot be merged with it."""
    root = tmp_path_factory.mktemp("hub-models")
    base = make_models.make_model(root / "base", num_hidden_layers=4)
    return {
        "base": base,
        "tuned": make_models.make_model(root / "tuned", seed=1, base=base),
        "narrow": make_models.make_model(root / "narrow", seed=2, num_hidden_layers=4, overrides={"intermediate_size": 96}),
        "deep": make_models.make_model(root / "deep", seed=3, num_hidden_layers=6),
        "vocab": make_models.make_model(root / "vocab", seed=4, num_hidden_layers=4, embedding_rows=512),
    }


@pytest.fixture
def hub(tmp_path, monkeypatch, models):
    """A fake hub holding each model as acme/NAME (with EXTRAS), and an empty Hugging Face cache."""
    server = FakeHub(tmp_path / "server")
    for name, folder in models.items():
        server.add(f"acme/{name}", folder, {**EXTRAS, "README.md": CARD})
    use(monkeypatch, server, tmp_path / "hf-cache")
    server.clear()
    yield server
    server.close()


def mergefile(folder: Path, body: str) -> Path:
    path = folder / "Mergefile"
    path.write_text("targets:\n  x:\n" + body)
    return path


def linear(folder: Path, first: str, second: str) -> Path:
    return mergefile(folder, (
        "    merge_method: linear\n    models:\n"
        f"      - model: {first}\n        parameters: {{weight: 0.5}}\n"
        f"      - model: {second}\n        parameters: {{weight: 0.5}}\n"
    ))


def errors(stderr: str) -> list[str]:
    """The error lines of a command's stderr (huggingface_hub's progress bars go there too)."""
    return [line for line in stderr.splitlines() if line.startswith("mbuild: error:")]


def needed(folder: Path) -> dict[str, int]:
    """The files of a hub model a merge reads, with their sizes: all of the saved model's, and the card."""
    return {**{p.name: p.stat().st_size for p in sorted(folder.iterdir())}, "README.md": len(CARD)}


# ---------------------------------------------------------------------------------------------
# Check before download


MISMATCHES = {
    "shape": ("linear", "narrow", ":4: target 'x'",
              "shape mismatch for tensor 'model.layers.0.mlp.down_proj.weight': 'acme/base' [64, 128], 'acme/narrow' [64, 96]"),
    "vocabulary": ("linear", "vocab", ":4: target 'x'", "vocabulary sizes differ for 'model.embed_tokens.weight'"),
    "layer-count": ("slerp", "deep", ":6: target 'x'", "models have different layer counts ('acme/base': 4, 'acme/deep': 6)"),
}


@pytest.mark.parametrize("kind", list(MISMATCHES))
def test_check_finds_a_mismatch_between_hub_models_from_headers_alone(hub, tmp_path, models, kind):
    method, other, where, expected = MISMATCHES[kind]
    if method == "linear":
        path = linear(tmp_path, "acme/base", f"acme/{other}")
    else:
        path = mergefile(tmp_path, (
            "    merge_method: slerp\n    base_model: acme/base\n    parameters: {t: 0.5}\n"
            f"    models:\n      - model: acme/base\n      - model: acme/{other}\n"
        ))
    code, _, err = run_cli("check", "-f", str(path))
    assert code == 2
    assert f"{path}{where}" in err and expected in err, err
    assert "Traceback" not in err
    assert hub.tensor_bytes_fetched() == 0
    assert not [r for r in hub.requests if r.path.endswith(".safetensors") and r.method == "GET" and r.range is None]
    # The planner's own message: the same mistake over local folders reads the same, models named alike.
    local = tmp_path / "local"
    local.mkdir()
    for name in ("base", other):
        shutil.copytree(models[name], local / "acme" / name)
    code, _, local_err = run_cli("check", "-f", str(path.rename(local / "Mergefile")))
    assert code == 2
    assert errors(local_err.replace(str(local / "Mergefile"), "M").replace(str(local) + "/", "")) == errors(err.replace(str(path), "M"))


def test_check_reports_the_bytes_a_build_downloads(hub, tmp_path, models):
    path = linear(tmp_path, "acme/base", "acme/tuned")
    code, out, err = run_cli("check", "-f", str(path), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["problems"] == []
    by_model = {m["model"]: m for m in report["models"]}
    assert set(by_model) == {"acme/base@main", "acme/tuned@main"}
    for name in ("base", "tuned"):
        files = needed(models[name])
        row = by_model[f"acme/{name}@main"]
        assert row["files"] == len(files)
        assert row["needed_bytes"] == sum(files.values())
        # Only the weights are left: the small files the check read are in the cache now.
        assert row["download_bytes"] == files["model.safetensors"]
        assert row["commit"] == hub.branches[f"acme/{name}"]["main"]
    assert report["download_bytes"] == report["disk_needed"] == sum(m["download_bytes"] for m in report["models"])
    assert report["disk_free"] > 0
    assert hub.tensor_bytes_fetched() == 0
    # A dry run plans from headers too: it answers without downloading a weight.
    hub.clear()
    code, out, err = run_cli("-f", str(path), "-n")
    assert code == 0, err
    assert hub.tensor_bytes_fetched() == 0
    assert "hub models to download" in out and "acme/base@main" in out and "acme/tuned@main" in out
    # ... and its JSON lists them as the check does.
    code, out, err = run_cli("-f", str(path), "-n", "--json")
    assert code == 0, err
    listed = {row["model"]: row["download_bytes"] for row in json.loads(out)["downloads"]}
    assert listed == {m["model"]: m["download_bytes"] for m in report["models"]}
    assert hub.tensor_bytes_fetched() == 0


# ---------------------------------------------------------------------------------------------
# Downloads


def passthrough(folder: Path, model: str) -> Path:
    return mergefile(folder, f"    merge_method: passthrough\n    slices:\n      - sources: [{{model: {model}, layer_range: [0, 4]}}]\n")


def test_a_build_downloads_only_the_files_a_merge_reads(hub, tmp_path, models):
    path = passthrough(tmp_path, "acme/base")
    code, _, err = run_cli("-f", str(path), "-q")
    assert code == 0, err
    assert sorted(hub.downloads()) == sorted(needed(models["base"]))
    assert not [r.path for r in hub.requests if "pytorch_model.bin" in r.path or "/original/" in r.path]
    # The hub's model card came for its license, which the built card carries.
    front = (tmp_path / "build" / "x" / "README.md").read_text().split("---\n")[1]
    assert yaml.safe_load(front)["license"] == "apache-2.0"
    built, source = load_tensors(tmp_path / "build" / "x"), load_tensors(models["base"])
    assert built.keys() == source.keys()
    assert all(built[name].equal(source[name]) for name in source)
    # Built again: the cache answers, the lock's commit is used, and the hub is not asked.
    hub.clear()
    code, out, err = run_cli("-f", str(path), "--json")
    assert code == 0, err
    assert json.loads(out)["targets"]["x"]["status"] == "fresh"
    assert hub.requests == []


def test_a_weight_file_whose_hash_differs_from_the_hubs_is_refused(hub, tmp_path):
    hub.corrupt("acme/base", "model.safetensors")
    path = passthrough(tmp_path, "acme/base")
    code, _, err = run_cli("-f", str(path), "-q")
    assert code == 2
    assert f"{path}:5: target 'x'" in err and "acme/base" in err and "model.safetensors" in err and "sha256" in err, err
    assert err.count("error") == 1
    assert not (tmp_path / "build" / "x").exists()
    storage = tmp_path / "hf-cache" / "models--acme--base"
    assert not list(storage.glob("snapshots/*/model.safetensors"))
    assert all(blob.stat().st_size < 100_000 for blob in (storage / "blobs").iterdir())  # the small files only


# ---------------------------------------------------------------------------------------------
# Offline


def test_an_offline_build_uses_the_cache_and_names_the_model_it_lacks(hub, tmp_path, monkeypatch, models):
    online = tmp_path / "online"
    online.mkdir()
    code, _, err = run_cli("-f", str(passthrough(online, "acme/base")), "-q")  # fills the cache
    assert code == 0, err
    code, _, err = run_cli("check", "-f", str(passthrough(online, "acme/deep")))  # its small files only
    assert code == 0, err
    use(monkeypatch, None, tmp_path / "hf-cache", offline=True)
    hub.clear()
    project = tmp_path / "project"
    project.mkdir()
    code, _, err = run_cli("-f", str(passthrough(project, "acme/base")), "-q")
    assert code == 0, err
    assert load_tensors(project / "build" / "x").keys() == load_tensors(models["base"]).keys()
    code, _, err = run_cli("check", "-f", str(project / "Mergefile"))
    assert code == 0, err
    code, _, err = run_cli("-f", str(passthrough(project, "acme/tuned")), "-q")
    assert code == 2
    assert err.strip().splitlines() == [
        f"mbuild: error: {project / 'Mergefile'}:5: target 'x': model 'acme/tuned': "
        "hub model 'acme/tuned' not found in the local Hugging Face cache (HF_HUB_OFFLINE=1)"
    ]
    code, _, err = run_cli("-f", str(passthrough(project, "acme/deep")), "-n")
    assert code == 2
    assert errors(err) == [
        f"mbuild: error: {project / 'Mergefile'}:5: target 'x': model 'acme/deep': hub model 'acme/deep' is only "
        "partly in the local Hugging Face cache (HF_HUB_OFFLINE=1): its weights were never downloaded"
    ]
    assert hub.requests == []


def sharded(source: Path, folder: Path) -> Path:
    """A copy of a model in two shards with an index, and beside them the whole model again (as
    some repositories keep a consolidated file the index does not name)."""
    from safetensors.torch import save_file

    shutil.copytree(source, folder)
    tensors = load_tensors(source)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, members in shards.items():
        save_file({name: tensors[name] for name in members}, str(folder / shard), metadata={"format": "pt"})
    weight_map = {name: shard for shard, members in shards.items() for name in members}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "model.safetensors").rename(folder / "consolidated.safetensors")
    return folder


def test_a_sharded_model_is_checked_from_each_shards_header_and_downloads_only_its_shards(hub, tmp_path, models):
    folder = sharded(models["base"], tmp_path / "sharded")
    hub.add("acme/sharded", folder, {"README.md": CARD})
    hub.clear()
    path = passthrough(tmp_path, "acme/sharded")
    code, out, err = run_cli("check", "-f", str(path), "--json")
    assert code == 0, err
    wanted = {name: size for name, size in needed(folder).items() if name != "consolidated.safetensors"}
    (row,) = json.loads(out)["models"]
    assert (row["files"], row["needed_bytes"]) == (len(wanted), sum(wanted.values()))
    assert row["download_bytes"] == sum(size for name, size in wanted.items() if name.endswith(".safetensors"))
    header_reads = [r for r in hub.requests if r.range is not None]
    assert len(header_reads) == 4 and hub.tensor_bytes_fetched() == 0  # two reads per shard
    code, _, err = run_cli("-f", str(path), "-q")
    assert code == 0, err
    assert "consolidated.safetensors" not in {Path(r.path).name for r in hub.requests}
    built, source = load_tensors(tmp_path / "build" / "x"), load_tensors(models["base"])
    assert built.keys() == source.keys() and all(built[name].equal(source[name]) for name in source)


# ---------------------------------------------------------------------------------------------
# What the hub cannot answer


def test_a_model_or_revision_the_hub_does_not_have_is_one_clear_error(hub, tmp_path):
    code, _, err = run_cli("check", "-f", str(passthrough(tmp_path, "acme/absent")))
    assert code == 2
    assert errors(err) == [f"mbuild: error: {tmp_path / 'Mergefile'}:5: target 'x': model 'acme/absent': hub model "
                           f"'acme/absent' not found on the hub at {hub.url} (a private or gated model needs a token: "
                           "`hf auth login`)"]
    code, _, err = run_cli("-f", str(passthrough(tmp_path, "acme/base@v9")), "-n")
    assert code == 2
    assert "hub model 'acme/base' has no revision 'v9' on the hub" in err and len(errors(err)) == 1


def test_a_hub_that_does_not_answer_leaves_the_cache_to_answer(hub, tmp_path, monkeypatch):
    path = passthrough(tmp_path, "acme/base")
    code, _, err = run_cli("-f", str(path), "-q")  # fills the cache, pins the commit
    assert code == 0, err
    (tmp_path / "Mergefile.lock").unlink()  # unpinned: main is asked of the hub, which is down
    use(monkeypatch, None, tmp_path / "hf-cache")  # a port nothing listens on
    code, out, err = run_cli("-f", str(path), "--json")
    assert code == 0, err
    assert json.loads(out)["targets"]["x"]["status"] == "fresh"
    code, _, err = run_cli("-f", str(passthrough(tmp_path, "acme/tuned")), "-n")
    assert code == 2
    assert f"hub model 'acme/tuned' is not in the local Hugging Face cache and could not be listed: the hub at http://127.0.0.1:9 did not answer" in err


def test_a_header_on_the_hub_that_lies_is_refused_as_a_local_one_is(hub, tmp_path, models):
    folder = shutil.copytree(models["base"], tmp_path / "lying")
    raw = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(raw[: len(raw) - 64])  # the last tensor runs past the end
    hub.add("acme/lying", folder)
    code, _, err = run_cli("check", "-f", str(passthrough(tmp_path, "acme/lying")))
    assert code == 2
    assert "model.safetensors is truncated: tensor" in err and len(errors(err)) == 1, err
    assert hub.tensor_bytes_fetched() == 0


def test_the_files_a_merge_reads_of_a_hub_listing():
    from mbuild.errors import ModelError
    from mbuild.io.hub import needed_files

    small = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "chat_template.jinja"]
    shards = {"model.safetensors.index.json": ["model-1.safetensors", "model-2.safetensors"],
              "pytorch_model.bin.index.json": ["pytorch_model-1.bin"]}
    small += ["README.md"]
    other = [".gitattributes", "original/consolidated.00.pth", "onnx/model.onnx", "training_args.bin"]
    listing = small + other + ["pytorch_model.bin", "consolidated.safetensors", "model-1.safetensors",
                               "model-2.safetensors", "model.safetensors.index.json", "pytorch_model.bin.index.json",
                               "pytorch_model-1.bin"]
    assert needed_files(listing, shards.get) == sorted(small + ["model.safetensors.index.json", *shards["model.safetensors.index.json"]])
    # Without an index, every top-level safetensors file; with none, the pickles (not training state).
    assert needed_files(small + other + ["a.safetensors", "b.safetensors", "pytorch_model.bin"], shards.get) == sorted(
        small + ["a.safetensors", "b.safetensors"])
    assert needed_files(small + other + ["pytorch_model.bin"], shards.get) == sorted(small + ["pytorch_model.bin"])
    assert needed_files(small + ["pytorch_model.bin.index.json", "pytorch_model-1.bin"], shards.get) == sorted(
        small + ["pytorch_model.bin.index.json", "pytorch_model-1.bin"])
    with pytest.raises(ModelError, match="the index lists shard.s. the hub does not have: model-2.safetensors"):
        needed_files(small + ["model.safetensors.index.json", "model-1.safetensors"], shards.get)

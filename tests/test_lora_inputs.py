"""LoRA inputs (``base+adapter``): the adapter applied as mergekit and PEFT apply it, keyed by
both sides, and refused clearly when it does not fit.

The adapters are made by PEFT itself over a tiny bfloat16 Llama whose matrices are past
torch's grain: one on attention projections, one with rsLoRA and per-module rank and alpha
patterns, one on the embedding and the head (PEFT's transposed ``lora_embedding_A/B``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, build_json, grain_family, load_tensors, run_cli
from parity import assert_same_tensors, run_mergekit

peft = pytest.importorskip("peft")

ADAPTERS = {
    "attention": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "o_proj", "gate_proj"],
        rank_pattern={"o_proj": 2}, alpha_pattern={"gate_proj": 3},
    ),
    "embeddings": dict(r=8, lora_alpha=16, target_modules=["embed_tokens", "lm_head", "k_proj"]),
}


def make_adapter(base: Path, folder: Path, seed: int, **config) -> Path:
    """A PEFT LoRA adapter over ``base`` with random non-zero A and B (B starts at zero in PEFT)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    wrapped.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory):
    """{"base", "math", and one adapter folder per entry of ADAPTERS}."""
    root = tmp_path_factory.mktemp("lora")
    family = grain_family(root, layers=2, hidden=256, intermediate=512, rows=512)
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        family[name] = make_adapter(family["base"], root / "adapters" / name, seed, **config)
    return family


def mergefile(folder: Path, family, adapter: str) -> Path:
    """Two targets over base+adapter: the applied model alone, and a linear merge with 'math'."""
    reference = f"{family['base']}+{family[adapter]}"
    text = f"""\
        targets:
          applied:
            merge_method: passthrough
            models: [{{model: {reference}}}]
            dtype: bfloat16
          mixed:
            merge_method: linear
            models:
              - {{model: {reference}, parameters: {{weight: 0.7}}}}
              - {{model: {family['math']}, parameters: {{weight: 0.3}}}}
            dtype: float32
            out_dtype: bfloat16
        """
    path = folder / "Mergefile"
    path.write_text(textwrap.dedent(text))
    return path


def mergekit_body(family, adapter: str, target: str) -> dict:
    reference = f"{family['base']}+{family[adapter]}"
    if target == "applied":
        return {"merge_method": "passthrough", "models": [{"model": reference}], "dtype": "bfloat16"}
    return {
        "merge_method": "linear",
        "models": [
            {"model": reference, "parameters": {"weight": 0.7}},
            {"model": str(family["math"]), "parameters": {"weight": 0.3}},
        ],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }


@pytest.fixture(scope="module")
def mergekit_outputs(lora_family, tmp_path_factory):
    """mergekit's outputs, single-threaded, made once per (adapter, target)."""
    pytest.importorskip("mergekit")
    root = tmp_path_factory.mktemp("mergekit-lora")
    made: dict[tuple[str, str], Path] = {}

    def get(adapter: str, target: str) -> Path:
        if (adapter, target) not in made:
            out = root / f"{adapter}-{target}"
            run_mergekit(mergekit_body(lora_family, adapter, target), out, lora_merge_cache=str(root / "lora-cache"))
            made[adapter, target] = out
        return made[adapter, target]

    return get


@pytest.mark.parametrize("jobs", ["1", "2"])
@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_bytes_equal_mergekits(lora_family, mergekit_outputs, tmp_path, monkeypatch, adapter, jobs):
    monkeypatch.setenv("MBUILD_CACHE", str(tmp_path / "cache"))
    path = mergefile(tmp_path, lora_family, adapter)
    report = build_json(path, "all", "-j", jobs)
    assert {name: entry["status"] for name, entry in report.items()} == {"applied": "built", "mixed": "built"}
    base = load_tensors(lora_family["base"])
    for target in ("applied", "mixed"):
        mine = load_tensors(tmp_path / "build" / target)
        assert_same_tensors(mine, load_tensors(mergekit_outputs(adapter, target)))
    # The adapter mattered: every tensor it names changed, and only those.
    applied = load_tensors(tmp_path / "build" / "applied")
    changed = {name for name in base if not applied[name].equal(base[name])}
    adapted = {key.removeprefix("base_model.model.").split(".lora_")[0] + ".weight"
               for key in load_tensors(lora_family[adapter]) if ".lora_" in key}
    assert changed == adapted and adapted


def peft_merged(family, adapter: str, dtype=None) -> dict:
    """PEFT's own merge_and_unload() of the adapter into the base, by tensor name."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(family["base"], **({"dtype": dtype} if dtype else {}))
    merged = peft.PeftModel.from_pretrained(model, family[adapter]).merge_and_unload()
    return {name: tensor.detach().clone() for name, tensor in merged.state_dict().items()}


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_applied_model_is_pefts_merge_and_unload(lora_family, tmp_path, monkeypatch, adapter):
    import torch

    from mbuild.engine import torch_single_threaded

    monkeypatch.setenv("MBUILD_CACHE", str(tmp_path / "cache"))
    build_json(mergefile(tmp_path, lora_family, adapter), "applied")
    mine = load_tensors(tmp_path / "build" / "applied")
    # The base in its own dtype (bfloat16), as mergekit loads it: the same arithmetic, the same bits.
    with torch_single_threaded():
        exact = peft_merged(lora_family, adapter)
    assert_same_tensors(mine, exact, ("mbuild", "peft"))
    # The base in float32: PEFT's float32 result rounds to ours within bfloat16's precision.
    wide = peft_merged(lora_family, adapter, dtype=torch.float32)
    for name, tensor in mine.items():
        torch.testing.assert_close(tensor.float(), wide[name], rtol=1 / 128, atol=1e-3, msg=name)


def test_a_weight_saved_with_the_adapter_is_the_one_it_changes(lora_family, tmp_path, monkeypatch):
    # PEFT saves an adapted embedding layer's weight with the adapter and loads it over the
    # base's: the adapter then applies to that weight, in mbuild as in PEFT.
    from mbuild.engine import torch_single_threaded

    monkeypatch.setenv("MBUILD_CACHE", str(tmp_path / "cache"))
    adapter = shutil.copytree(lora_family["embeddings"], tmp_path / "embeddings")

    def retrain(tensors):
        name = "base_model.model.model.embed_tokens.base_layer.weight"
        tensors[name] = (tensors[name].float() * 1.5).to(tensors[name].dtype)

    replace_adapter(adapter, retrain)
    family = dict(lora_family, embeddings=adapter)
    build_json(mergefile(tmp_path, family, "embeddings"), "applied")
    mine = load_tensors(tmp_path / "build" / "applied")
    with torch_single_threaded():
        merged = peft_merged(family, "embeddings")
    assert_same_tensors(mine, merged, ("mbuild", "peft"))
    with torch_single_threaded():
        over_the_base = peft_merged(lora_family, "embeddings")["model.embed_tokens.weight"]
    assert not mine["model.embed_tokens.weight"].equal(over_the_base)


def replace_adapter(folder: Path, change) -> None:
    """Rewrite an adapter's weights through ``change(tensors)`` (new bytes, same layout)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def test_a_changed_adapter_rebuilds_exactly_what_reads_it(lora_family, tmp_path, monkeypatch):
    monkeypatch.setenv("MBUILD_CACHE", str(tmp_path / "cache"))
    adapters = {name: shutil.copytree(lora_family[name], tmp_path / name) for name in ("attention", "rslora")}
    base = shutil.copytree(lora_family["base"], tmp_path / "base")
    text = f"""\
        targets:
          with-attention:
            merge_method: passthrough
            models: [{{model: {base}+{adapters['attention']}}}]
          with-rslora:
            merge_method: linear
            models:
              - {{model: {base}+{adapters['rslora']}, parameters: {{weight: 0.5}}}}
              - {{model: {lora_family['math']}, parameters: {{weight: 0.5}}}}
          without:
            merge_method: linear
            models:
              - {{model: {base}, parameters: {{weight: 0.5}}}}
              - {{model: {lora_family['math']}, parameters: {{weight: 0.5}}}}
        """
    path = tmp_path / "Mergefile"
    path.write_text(textwrap.dedent(text))
    first = build_json(path, "all")
    assert {name: entry["status"] for name, entry in first.items()} == dict.fromkeys(first, "built")
    adapted = len([k for k in load_tensors(adapters["attention"]) if "lora_A" in k])  # tensors it changes

    again = build_json(path, "all")
    assert {name: (entry["status"], entry["tensors_computed"]) for name, entry in again.items()} == dict.fromkeys(
        again, ("fresh", 0)
    )

    # New bytes in one adapter: only its target is stale, and only the tensors it changes are computed.
    def double_b(tensors):
        for name in tensors:
            if "lora_B" in name:
                tensors[name] = tensors[name] * 2

    replace_adapter(adapters["attention"], double_b)
    after = build_json(path, "all")
    assert after["with-attention"]["status"] == "built"
    assert after["with-attention"]["tensors_computed"] == adapted
    assert (after["with-rslora"]["status"], after["without"]["status"]) == ("fresh", "fresh")

    # A new scaling (lora_alpha) with the same tensor bytes is a change too.
    config = json.loads((adapters["rslora"] / "adapter_config.json").read_text())
    config["lora_alpha"] = 5
    (adapters["rslora"] / "adapter_config.json").write_text(json.dumps(config))
    after = build_json(path, "all")
    assert {name: entry["status"] for name, entry in after.items()} == {
        "with-attention": "fresh", "with-rslora": "built", "without": "fresh"
    }
    assert build_json(path, "all")["with-rslora"]["tensors_computed"] == 0

    # gc removes the adapted tensors of the adapters as they were, and keeps those in use.
    folder = tmp_path / "cache" / "lora"
    in_use = adapted + len([k for k in load_tensors(adapters["rslora"]) if "lora_A" in k])
    # Old: the attention adapter's 4, and rslora's q_proj and o_proj (gate_proj's alpha comes
    # from alpha_pattern, so its scaling and its adapted tensors stayed).
    old = 4 + 4
    assert len(list(folder.glob("*.safetensors"))) == in_use + old
    code, out, err = run_cli("gc", "-f", str(path), "--json")
    assert code == 0, err
    assert json.loads(out)["removed_conversions"] == old
    assert len(list(folder.glob("*.safetensors"))) == in_use
    assert {entry["tensors_computed"] for entry in build_json(path, "all").values()} == {0}

    # A base tensor that both adapters change: one tensor of every target is computed again.
    from safetensors.torch import load_file, save_file

    (weights,) = base.glob("*.safetensors")
    tensors = load_file(weights)
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name].neg().contiguous()
    save_file(tensors, str(weights), metadata={"format": "pt"})
    after = build_json(path, "all")
    assert {name: (entry["status"], entry["tensors_computed"]) for name, entry in after.items()} == dict.fromkeys(
        after, ("built", 1)
    )


def failure(path: Path, *args: str) -> str:
    """The one error line a build (or a dry run) prints, checking it failed and wrote nothing."""
    code, out, err = run_cli("-f", str(path), *args)
    assert code != 0, out + err
    assert not (path.parent / "build").exists()
    assert not list((path.parent / "cache" / "lora").glob("*.safetensors"))
    assert "Traceback" not in err
    return err.strip()


def one_target(folder: Path, reference: str) -> Path:
    path = folder / "Mergefile"
    path.write_text(f"targets:\n  applied:\n    merge_method: passthrough\n    models:\n      - model: {reference}\n")
    return path


def test_an_adapter_that_does_not_fit_is_one_error_at_its_line(lora_family, tmp_path, monkeypatch):
    monkeypatch.setenv("MBUILD_CACHE", str(tmp_path / "cache"))
    base = lora_family["base"]

    missing_config = shutil.copytree(lora_family["attention"], tmp_path / "no-config")
    (missing_config / "adapter_config.json").unlink()
    error = failure(one_target(tmp_path, f"{base}+{missing_config}"), "all")
    assert error.endswith(
        f"Mergefile:5: target 'applied': '{base}+{missing_config}': the adapter {missing_config} has no adapter_config.json"
        " (a folder PEFT's save_pretrained wrote)"
    )

    # A module the base does not have: found from the headers, by a dry run as by a build.
    renamed = shutil.copytree(lora_family["attention"], tmp_path / "renamed")

    def rename(tensors):
        for name in [n for n in tensors if ".q_proj." in n]:
            tensors[name.replace(".q_proj.", ".query.")] = tensors.pop(name)

    replace_adapter(renamed, rename)
    path = one_target(tmp_path, f"{base}+{renamed}")
    for args in (("all", "--dry-run"), ("all",)):
        error = failure(path, *args)
        where = f"mbuild: error: {path}:5: target 'applied': model '{base}+{renamed}'"
        assert error.startswith(f"{where}: the adapter {renamed} changes ")
        assert "self_attn.query, but the base model has no tensor model.layers.0.self_attn.query.weight" in error

    # A pair whose product is not the base tensor's shape.
    mismatched = shutil.copytree(lora_family["attention"], tmp_path / "mismatched")

    def cut(tensors):
        name = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
        tensors[name] = tensors[name][:64].clone()

    replace_adapter(mismatched, cut)
    error = failure(one_target(tmp_path, f"{base}+{mismatched}"), "all")
    assert error.endswith(
        f"the adapter {mismatched} does not fit model.layers.1.self_attn.v_proj.weight: A [8, 256] and B [64, 8] "
        "make [64, 256], the base tensor is [128, 256]"
    )
    assert ":5: target 'applied'" in error

    # Another kind of PEFT adapter (DoRA here) is refused rather than merged as plain LoRA.
    dora = shutil.copytree(lora_family["attention"], tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=True)))
    error = failure(one_target(tmp_path, f"{base}+{dora}"), "all")
    assert error.endswith(f"the adapter {dora} sets 'use_dora': only plain LoRA adapters can be applied")

    # The base of a LoRA reference must be a model, not a target; and one '+' only.
    path = tmp_path / "Mergefile"
    path.write_text(
        f"targets:\n  first:\n    merge_method: passthrough\n    models: [{{model: {base}}}]\n"
        f"  second:\n    merge_method: passthrough\n    models:\n      - model: first+{lora_family['attention']}\n"
    )
    error = failure(path, "all")
    assert error.endswith(":8: target 'second': 'first': the base model of a LoRA reference must be a folder or a hub ID, not a target")
    error = failure(one_target(tmp_path, f"{base}+{lora_family['attention']}+{lora_family['rslora']}"), "all")
    assert "a LoRA reference is 'MODEL+ADAPTER', one '+' between two models" in error


def hub_snapshot(cache: Path, repo: str, commit: str, source: Path) -> None:
    """One snapshot of a repository laid out as huggingface_hub's cache lays it, made its main."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(source, folder / "snapshots" / commit)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)


def test_hub_sides_resolve_offline_and_the_lock_pins_both(lora_family, tmp_path):
    cache = tmp_path / "hub"
    hub_snapshot(cache, "acme/base", "a" * 40, lora_family["base"])
    hub_snapshot(cache, "acme/chat", "b" * 40, lora_family["attention"])
    path = tmp_path / "Mergefile"
    path.write_text(
        "targets:\n"
        "  from-hub:\n    merge_method: passthrough\n    models: [{model: acme/base+acme/chat}]\n"
        f"  local:\n    merge_method: passthrough\n    models: [{{model: {lora_family['base']}+{lora_family['attention']}}}]\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), PYTHONPATH=str(ROOT), MBUILD_CACHE=str(tmp_path / "cache"))

    def build(*args: str) -> dict:
        result = subprocess.run([sys.executable, "-m", "mbuild.cli", *args, "--json"], cwd=tmp_path, env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return {name: entry["status"] for name, entry in json.loads(result.stdout)["targets"].items()}

    assert build("all") == {"from-hub": "built", "local": "built"}
    lock = json.loads((tmp_path / "Mergefile.lock").read_text())
    assert lock["sources"]["lora:hub:acme/base@main+hub:acme/chat@main"]["revision"] == "a" * 40 + "+" + "b" * 40
    assert_same_tensors(load_tensors(tmp_path / "build" / "from-hub"), load_tensors(tmp_path / "build" / "local"))

    # The adapter's main moves on; the lock keeps the family on the commits it was built from.
    hub_snapshot(cache, "acme/chat", "c" * 40, lora_family["rslora"])
    assert build("all") == {"from-hub": "fresh", "local": "fresh"}
    # Asking for the new commit builds from it.
    path.write_text(path.read_text().replace("acme/chat}", f"acme/chat@{'c' * 40}}}"))
    assert build("all") == {"from-hub": "built", "local": "fresh"}

"""The engine: outputs that load, atomic publication, sharding, honest failures, seeded DARE."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, build_json, franken_ties, load_tensors, snapshot
from mbuild import io, operations
from mbuild.cli import main


def tuned_bf16(family, weight=0.7) -> str:
    """`franken_ties` with 'tuned' stored in bfloat16, and no linear target beside it."""
    return franken_ties(family, weight, out_dtype="out_dtype: bfloat16", linear_weight=None)


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_outputs_are_complete_hf_folders_that_load_and_give_finite_logits(families, tmp_path, architecture):
    import transformers

    family = families(architecture)
    path = tmp_path / "Mergefile"
    path.write_text(tuned_bf16(family))
    build_json(path)
    out = tmp_path / "build" / "tuned"
    config = json.loads((out / "config.json").read_text())
    source_config = json.loads((family["base"] / "config.json").read_text())
    assert config["num_hidden_layers"] == 10
    assert len(config.get("layer_types", [None] * 10)) == 10
    for key in ("eos_token_id", "bos_token_id", "rope_theta", "tie_word_embeddings", "vocab_size"):
        assert config.get(key) == source_config.get(key)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja", "README.md"):
        assert (out / name).exists(), name
    assert "merge_method: ties" in (out / "README.md").read_text()
    names = set(load_tensors(out))
    if source_config.get("tie_word_embeddings"):
        assert "lm_head.weight" not in names  # tied embeddings stay tied
    assert {t.dtype for t in load_tensors(out).values()} == {torch.bfloat16}
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == transformers.AutoTokenizer.from_pretrained(family["base"]).chat_template
    ids = tokenizer("merging models", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape[-1] == config["vocab_size"]
    assert torch.isfinite(logits).all()
    # A repeated layer range: output layers 3-4 and 5-6 come from the same source layers.
    tensors = load_tensors(out)
    assert not torch.equal(tensors["model.layers.3.mlp.up_proj.weight"], tensors["model.layers.4.mlp.up_proj.weight"])
    franken = load_tensors(tmp_path / "build" / "franken")
    assert torch.equal(franken["model.layers.3.mlp.up_proj.weight"], franken["model.layers.5.mlp.up_proj.weight"])


def test_sharded_output_has_an_exact_index(llama, tmp_path):
    path = tmp_path / "Mergefile"
    path.write_text(tuned_bf16(llama))
    build_json(path, "--shard-size", "200K")  # downstream targets read the sharded outputs
    out = tmp_path / "build" / "franken"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    info = io.read_model(out)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in info.tensors.values())
    assert set(index["weight_map"]) == set(info.tensors)
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    # Same bytes as a single-file build.
    single = tmp_path / "single"
    single.mkdir()
    (single / "Mergefile").write_text(tuned_bf16(llama))
    build_json(single / "Mergefile")
    for name in ("franken", "tuned"):
        one, many = load_tensors(single / "build" / name), load_tensors(tmp_path / "build" / name)
        assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)


def test_failed_build_leaves_previous_output_intact(llama, tmp_path, monkeypatch):
    path = tmp_path / "Mergefile"
    path.write_text(tuned_bf16(llama))
    build_json(path)
    out = tmp_path / "build" / "tuned"
    before = snapshot(out)
    path.write_text(tuned_bf16(llama, weight=0.2))
    calls = {"n": 0}
    real = operations.compute_task

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 20:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(operations, "compute_task", failing)
    assert main(["-f", str(path), "-q"]) == 2  # one message, no traceback (tests/test_faults_state.py)
    assert snapshot(out) == before
    assert not list(out.parent.glob(".tuned.mbuild-tmp-*"))  # no temporary left behind
    monkeypatch.setattr(operations, "compute_task", real)
    report = build_json(path)
    assert report["tuned"]["status"] == "built"
    assert snapshot(out) != before


def test_kill_9_mid_build_keeps_previous_output_and_next_run_finishes(llama, tmp_path):
    path = tmp_path / "Mergefile"
    path.write_text(tuned_bf16(llama))
    build_json(path)
    out = tmp_path / "build" / "tuned"
    before = snapshot(out)
    path.write_text(tuned_bf16(llama, weight=0.3))
    # Slow every task down so the kill lands mid-target.
    script = (
        "import sys, time; from mbuild import operations; real = operations.compute_task\n"
        "def slow(*a, **k):\n    time.sleep(0.05); return real(*a, **k)\n"
        "operations.compute_task = slow\n"
        f"from mbuild.cli import main; sys.exit(main(['-f', {str(path)!r}, '-j', '1']))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.parent.glob(".tuned.mbuild-tmp-*")):
        time.sleep(0.02)
    time.sleep(0.3)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert list(out.parent.glob(".tuned.mbuild-tmp-*")), "the kill should land while tuned is being built"
    assert snapshot(out) == before
    report = build_json(path)
    assert report["tuned"]["status"] == "built"
    assert not list(out.parent.glob(".tuned.mbuild-tmp-*")) and not list(out.parent.glob(".tuned.mbuild-old-*"))


def test_interrupted_publish_is_recovered(llama, tmp_path):
    path = tmp_path / "Mergefile"
    path.write_text(tuned_bf16(llama))
    build_json(path)
    out = tmp_path / "build" / "tuned"
    before = snapshot(out)
    # A crash between "move the old output aside" and "move the new one in".
    os.rename(out, out.parent / ".tuned.mbuild-old-999999999")
    report = build_json(path)
    assert report["tuned"]["status"] == "built"
    assert snapshot(out)["model.safetensors"] == before["model.safetensors"]


RECIPES_OVER_BROKEN = {
    # The C loops' finite checks where built (linear's one pass, SLERP's cast into the output), torch's otherwise.
    "linear": "merge_method: linear\n    models:\n"
    "      - model: {base}\n        parameters: {{weight: 0.5}}\n"
    "      - model: broken\n        parameters: {{weight: 0.5}}\n",
    "slerp": "merge_method: slerp\n    base_model: {base}\n    parameters: {{t: 0.5}}\n"
    "    models: [{{model: {base}}}, {{model: broken}}]\n",
}


@pytest.mark.parametrize("method", sorted(RECIPES_OVER_BROKEN))
def test_non_finite_values_are_an_error_naming_the_tensor(llama, tmp_path, method):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(llama["math"], broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.2.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    path = tmp_path / "Mergefile"
    path.write_text("targets:\n  mix:\n    " + RECIPES_OVER_BROKEN[method].format(base=llama["base"]))
    result = subprocess.run([sys.executable, "-m", "mbuild.cli", "-f", str(path)], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 2
    assert "model.layers.2.mlp.up_proj.weight" in result.stderr and "non-finite" in result.stderr
    assert "target 'mix'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "build" / "mix").exists()


def test_a_folder_not_made_by_mbuild_is_never_replaced(llama, tmp_path, capsys):
    path = tmp_path / "Mergefile"
    path.write_text(tuned_bf16(llama))
    precious = tmp_path / "build" / "franken"
    precious.mkdir(parents=True)
    (precious / "notes.txt").write_text("mine")
    assert main(["-f", str(path), "-q", "franken"]) == 2
    message = capsys.readouterr().err
    assert "exists and was not made by mbuild" in message and f"{path}:3: target 'franken'" in message
    assert (precious / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in precious.iterdir()) == ["notes.txt"]


DARE = """
targets:
  dare:
    merge_method: dare_ties
    base_model: {base}
    seed: {seed}
    models:
      - model: {math}
        parameters: {{weight: 0.5, density: 0.3}}
      - model: {code}
        parameters: {{weight: 0.5, density: 0.3}}
"""


def test_dare_is_reproducible_from_the_seed_whatever_the_parallelism(llama, tmp_path):
    outputs = {}
    for label, seed, jobs in (("a", 1, "1"), ("b", 1, "4"), ("c", 2, "1")):
        folder = tmp_path / label
        folder.mkdir()
        (folder / "Mergefile").write_text(DARE.format(seed=seed, **llama))
        build_json(folder / "Mergefile", "-j", jobs)
        outputs[label] = load_tensors(folder / "build" / "dare")
    a, b, c = outputs["a"], outputs["b"], outputs["c"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(a[name], c[name])
    # Roughly `density` of each delta survives: the merged delta is non-zero where either model kept it.
    base = load_tensors(llama["base"])[name].float()
    kept = (a[name].float() != base).float().mean().item()
    expected = 1 - (1 - 0.3) ** 2
    assert abs(kept - expected) < 0.05


def test_integer_buffers_are_copied_not_merged(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    for name in ("base", "math"):
        folder = tmp_path / name
        shutil.copytree(llama[name], folder)
        tensors = load_file(folder / "model.safetensors")
        tensors["model.position_buffer"] = torch.arange(16, dtype=torch.int64) * (2 if name == "math" else 1)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    path = tmp_path / "Mergefile"
    path.write_text(
        "targets:\n  mix:\n    merge_method: linear\n    models:\n"
        "      - model: base\n        parameters: {weight: 0.5}\n      - model: math\n        parameters: {weight: 0.5}\n"
    )
    build_json(path)
    merged = load_tensors(tmp_path / "build" / "mix")
    assert merged["model.position_buffer"].dtype == torch.int64
    assert torch.equal(merged["model.position_buffer"], torch.arange(16, dtype=torch.int64))

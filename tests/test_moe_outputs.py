"""MoE outputs beyond Mixtral: Qwen2-MoE with a shared expert and Qwen3-MoE, against mergekit-moe
(and Mixtral's hidden-state routers, which the other MoE tests do not compare)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_json, load_tensors
from mbuild import mergefile, plan
from mbuild.errors import MergefileError

EXPERTS = [
    {"positive_prompts": ["The integral of x squared"]},
    {"positive_prompts": ["def add(a, b):"], "residual_scale": 0.7},
    {"positive_prompts": ["Merging models combines"], "negative_prompts": ["def add"]},
]
SHARED = {"positive_prompts": ["Hello, how are you"], "negative_prompts": ["The integral"], "residual_scale": 0.9}


def make_qwen3(folder: Path, seed: int, base: Path | None = None) -> Path:
    """A tiny Qwen3 (examples/make_models.py makes Llama, Mistral and Qwen2), or a mock fine-tune of one."""
    import make_models
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    if base is None:
        tokenizer = make_models.make_tokenizer(folder)
        config = transformers.Qwen3Config(
            vocab_size=len(tokenizer), max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
            rope_scaling=None, head_dim=16, **make_models.SIZES["tiny"],
        )
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(base)
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for parameter in model.parameters():
            # Norms start at exactly 1: vary them too, so a wrong source shows.
            scale = parameter.float().std().item() if parameter.ndim > 1 else 1.0
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05 * scale)
    model = model.to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-qwen3")
    base = make_qwen3(root / "base", 0)
    return {"base": base, "math": make_qwen3(root / "math", 1, base), "code": make_qwen3(root / "code", 2, base)}


def recipe(family, architecture: str, gate_mode: str) -> dict:
    """A mergekit-moe config over a family: three experts (the base, math, code), and for Qwen2 a shared one."""
    models = [family["math"], family["code"], family["base"]]
    config = {
        "base_model": str(family["base"]),
        "gate_mode": gate_mode,
        "dtype": "bfloat16",
        "experts": [dict(expert, source_model=str(model)) for expert, model in zip(EXPERTS, models)],
    }
    if architecture == "qwen2":
        config["architecture"] = "qwen"
        config["shared_experts"] = [dict(SHARED, source_model=str(family["code"]))]
    return config


def mergefile_text(config: dict) -> str:
    return "targets:\n  moe:\n" + "".join(f"    {key}: {json.dumps(value)}\n" for key, value in config.items())


def mergekit_moe(config: dict, folder: Path) -> Path:
    """mergekit-moe's output for a config, single-threaded."""
    (folder / "moe.json").write_text(json.dumps(config))
    reference = folder / "mergekit-moe"
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from mergekit.scripts.moe import main; sys.exit(main())",
         str(folder / "moe.json"), str(reference), "--device", "cpu"],
        capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return reference


@pytest.mark.parametrize("gate_mode", ["cheap_embed", "hidden"])
@pytest.mark.parametrize("architecture", ["qwen2", "qwen3", "llama"])
def test_qwen_moe_outputs_equal_mergekit_moe_and_load(families, qwen3, tmp_path, architecture, gate_mode):
    pytest.importorskip("mergekit")
    import transformers

    family = qwen3 if architecture == "qwen3" else families(architecture)
    config = recipe(family, architecture, gate_mode)
    path = tmp_path / "Mergefile"
    path.write_text(mergefile_text(config))
    assert build_json(path)["moe"]["status"] == "built"
    out = tmp_path / "build" / "moe"
    reference = mergekit_moe(config, tmp_path)
    ours, theirs = load_tensors(out), load_tensors(reference)
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype, name
        assert torch.equal(ours[name], theirs[name]), name
    assert json.loads((out / "config.json").read_text()) == json.loads((reference / "config.json").read_text())

    # The layout is the one each architecture keeps on disk: per expert (and a shared expert with
    # its gate) for Qwen2-MoE, fused for Qwen3-MoE.
    if architecture == "qwen2":
        assert ours["model.layers.1.mlp.experts.2.down_proj.weight"].shape == (64, 128)
        assert ours["model.layers.1.mlp.shared_expert_gate.weight"].shape == (1, 64)
        code = load_tensors(family["code"])
        expected = (code["model.layers.1.mlp.down_proj.weight"].float() * 0.9).to(torch.bfloat16)
        assert torch.equal(ours["model.layers.1.mlp.shared_expert.down_proj.weight"], expected)
    elif architecture == "qwen3":
        assert ours["model.layers.1.mlp.experts.gate_up_proj"].shape == (3, 256, 64)
        assert "model.layers.1.mlp.shared_expert_gate.weight" not in ours
    routers = ours["model.layers.0.mlp.gate.weight"].float()
    assert routers.shape == (3, 64) and torch.allclose(routers.norm(dim=1), torch.ones(3), atol=1e-2)

    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    expected_class = {"qwen2": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM", "llama": "MixtralForCausalLM"}
    assert type(model).__name__ == expected_class[architecture]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 42, 7, 3]])).logits
    assert torch.isfinite(logits).all()


def test_a_qwen3_moe_of_one_dense_model_computes_that_model(qwen3, tmp_path):
    import transformers

    path = tmp_path / "Mergefile"
    path.write_text(
        f"targets:\n  same:\n    base_model: {qwen3['math']}\n    gate_mode: random\n    dtype: float32\n    experts:\n"
        + "".join(f"      - source_model: {qwen3['math']}\n" for _ in range(4))
    )
    build_json(path)
    dense = transformers.AutoModelForCausalLM.from_pretrained(qwen3["math"], dtype=torch.float32)
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "build" / "same", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad():
        assert torch.allclose(dense(ids).logits, moe(ids).logits, atol=1e-4, rtol=1e-4)


def test_editing_the_shared_prompt_recomputes_only_the_routers(families, tmp_path):
    config = recipe(families("qwen2"), "qwen2", "cheap_embed")
    path = tmp_path / "Mergefile"
    path.write_text(mergefile_text(config))
    build_json(path)
    config["shared_experts"][0]["positive_prompts"] = ["Good morning"]
    path.write_text(mergefile_text(config))
    report = build_json(path)
    # Every router row is computed with the others (the shared row included), as mergekit does.
    assert report["moe"]["tensors_computed"] == 16
    assert report["moe"]["tensors_reused"] == len(load_tensors(tmp_path / "build" / "moe")) - 16


def plan_error(tmp_path, text: str) -> MergefileError:
    path = tmp_path / "Mergefile"
    path.write_text(text)
    with pytest.raises(MergefileError) as caught:
        plan.make_plan(mergefile.load(path), store=path.parent / "cache")
    return caught.value


def test_qwen2_experts_without_a_shared_expert_are_refused_with_mergekits_reasons(families, tmp_path):
    qwen2 = families("qwen2")
    error = plan_error(
        tmp_path,
        f"targets:\n  moe:\n    base_model: {qwen2['base']}\n    gate_mode: random\n    experts:\n"
        f"      - source_model: {qwen2['math']}\n      - source_model: {qwen2['code']}\n",
    )
    assert "Qwen MoE needs exactly one shared expert" in error.message
    assert "Mixtral needs Llama or Mistral models, not qwen2" in error.message
    assert error.location.target == "moe"


def test_an_output_mergekit_builds_and_mbuild_does_not_is_named(llama, qwen3, tmp_path):
    # An unprompted shared expert over Llama models makes mergekit-moe build a DeepSeek MoE.
    error = plan_error(
        tmp_path,
        f"targets:\n  moe:\n    base_model: {llama['base']}\n    gate_mode: random\n    experts:\n"
        f"      - source_model: {llama['math']}\n      - source_model: {llama['code']}\n"
        f"    shared_experts:\n      - source_model: {llama['base']}\n",
    )
    assert "would build a DeepSeek MoE from llama models" in error.message
    error = plan_error(
        tmp_path,
        f"targets:\n  moe:\n    base_model: {qwen3['base']}\n    architecture: mixtral\n    gate_mode: random\n    experts:\n"
        f"      - source_model: {qwen3['math']}\n      - source_model: {qwen3['code']}\n",
    )
    assert error.message.startswith("no MoE output architecture fits: Mixtral needs Llama or Mistral models, not qwen3")
    assert error.location.line == 4


@pytest.mark.parametrize(
    "body, fragment",
    [
        ("    gate_mode: random\n    experts:\n      - {{source_model: {math}, noise_scale: 0.01}}\n",
         "unseeded global generator"),
        ("    gate_mode: random\n    architecture: qwen4\n    experts_per_token: 1\n    experts:\n      - source_model: {math}\n",
         "unknown MoE architecture 'qwen4'"),
        ("    gate_mode: random\n    experts:\n      - source_model: {math}\n    shared_experts:\n"
         "      - {{source_model: {math}, positive_prompts: [a]}}\n      - source_model: {code}\n",
         "to every shared expert or to none"),
        ("    gate_mode: random\n    experts:\n      - source_model: {math}\n    shared_experts: {{source_model: {math}}}\n",
         "'shared_experts' must be a list"),
    ],
    ids=["noise_scale", "architecture", "shared-prompts", "shared-not-a-list"],
)
def test_moe_output_recipe_mistakes(families, tmp_path, body, fragment):
    qwen2 = families("qwen2")
    path = tmp_path / "Mergefile"
    path.write_text(f"targets:\n  moe:\n    base_model: {qwen2['base']}\n" + body.format(**qwen2))
    with pytest.raises(MergefileError) as caught:
        mergefile.load(path)
    assert fragment in caught.value.message and caught.value.location.target == "moe"

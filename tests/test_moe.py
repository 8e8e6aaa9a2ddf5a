"""MoE targets: Mixtral from dense experts (sources or targets), routers from prompts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import build_json, load_tensors
from mbuild import mergefile, plan
from mbuild.errors import MergefileError

MOE = """
targets:
  blend:
    merge_method: linear
    models:
      - model: {math}
        parameters: {{weight: 0.5}}
      - model: {code}
        parameters: {{weight: 0.5}}
  moe:
    base_model: {base}
    gate_mode: {gate_mode}
    dtype: bfloat16
    seed: {seed}
    experts:
      - source_model: {math}
        positive_prompts: ["The integral of x squared"]
      - source_model: {code}
        positive_prompts: ["{code_prompt}"]
      - source_model: blend
        positive_prompts: ["Merging models combines"]
        negative_prompts: ["def add"]
"""


def moe_text(family, gate_mode="cheap_embed", seed=0, code_prompt="def add(a, b):") -> str:
    return MOE.format(gate_mode=gate_mode, seed=seed, code_prompt=code_prompt, **family)


def test_moe_loads_with_every_weight_used_and_an_expert_target_built_first(llama, tmp_path):
    import transformers

    path = tmp_path / "Mergefile"
    path.write_text(moe_text(llama))
    the_plan = plan.make_plan(mergefile.load(path), ["moe"], store=path.parent / "cache")
    assert the_plan.order == ("blend", "moe")  # the expert that is a target comes first
    report = build_json(path)
    assert list(report) == ["blend", "moe"] and report["moe"]["status"] == "built"
    out = tmp_path / "build" / "moe"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["num_local_experts"] == 3 and config["num_experts_per_tok"] == 2
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    logits = model(tokenizer("routing tokens to experts", return_tensors="pt").input_ids).logits
    assert torch.isfinite(logits).all()
    tensors = load_tensors(out)
    blend = load_tensors(tmp_path / "build" / "blend")
    # Expert 2 of every layer is the 'blend' target's MLP.
    intermediate = blend["model.layers.3.mlp.gate_proj.weight"].shape[0]
    fused = tensors["model.layers.3.mlp.experts.gate_up_proj"][2]
    assert torch.equal(fused[:intermediate], blend["model.layers.3.mlp.gate_proj.weight"])
    assert torch.equal(fused[intermediate:], blend["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(tensors["model.layers.3.mlp.experts.down_proj"][2], blend["model.layers.3.mlp.down_proj.weight"])
    gate = tensors["model.layers.0.mlp.gate.weight"].float()
    assert gate.shape == (3, 64)
    assert torch.allclose(gate.norm(dim=1), torch.ones(3), atol=1e-2)  # unit rows, as mergekit makes them


def test_an_moe_of_one_dense_model_computes_that_model(llama, tmp_path):
    import transformers

    path = tmp_path / "Mergefile"
    path.write_text(
        f"targets:\n  same:\n    base_model: {llama['math']}\n    gate_mode: random\n    dtype: float32\n    experts:\n"
        + "".join(f"      - source_model: {llama['math']}\n" for _ in range(4))
    )
    build_json(path)
    dense = transformers.AutoModelForCausalLM.from_pretrained(llama["math"], dtype=torch.float32)
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "build" / "same", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad():
        expected, actual = dense(ids).logits, moe(ids).logits
    assert torch.allclose(expected, actual, atol=1e-4, rtol=1e-4)


def test_cheap_embed_router_equals_mergekit_moe(llama, tmp_path):
    pytest.importorskip("mergekit")
    path = tmp_path / "Mergefile"
    path.write_text(moe_text(llama))
    build_json(path)
    config = {
        "base_model": str(llama["base"]),
        "gate_mode": "cheap_embed",
        "dtype": "bfloat16",
        "experts": [
            {"source_model": str(llama["math"]), "positive_prompts": ["The integral of x squared"]},
            {"source_model": str(llama["code"]), "positive_prompts": ["def add(a, b):"]},
            {
                "source_model": str(tmp_path / "build" / "blend"),
                "positive_prompts": ["Merging models combines"],
                "negative_prompts": ["def add"],
            },
        ],
    }
    (tmp_path / "moe.json").write_text(json.dumps(config))
    reference = tmp_path / "mergekit-moe"
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from mergekit.scripts.moe import main; sys.exit(main())",
         str(tmp_path / "moe.json"), str(reference)],
        capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    ours, theirs = load_tensors(tmp_path / "build" / "moe"), load_tensors(reference)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    assert json.loads((reference / "config.json").read_text()) == json.loads(
        (tmp_path / "build" / "moe" / "config.json").read_text()
    )


def test_editing_a_prompt_recomputes_only_the_routers(llama, tmp_path):
    path = tmp_path / "Mergefile"
    path.write_text(moe_text(llama))
    build_json(path)
    path.write_text(moe_text(llama, code_prompt="def mul(a, b):"))
    report = build_json(path)
    assert report["blend"]["status"] == "fresh"
    assert report["moe"]["tensors_computed"] == 8  # one router per layer
    assert report["moe"]["tensors_reused"] == len(load_tensors(tmp_path / "build" / "moe")) - 8


def test_random_gates_follow_the_seed(llama, tmp_path):
    routers = {}
    for seed in (1, 1, 2):
        folder = tmp_path / f"run{len(routers)}-{seed}"
        folder.mkdir()
        (folder / "Mergefile").write_text(moe_text(llama, gate_mode="random", seed=seed))
        build_json(folder / "Mergefile")
        routers.setdefault(seed, []).append(load_tensors(folder / "build" / "moe")["model.layers.2.mlp.gate.weight"])
    assert torch.equal(routers[1][0], routers[1][1])
    assert not torch.equal(routers[1][0], routers[2][0])


def test_hidden_gates_differ_by_layer(llama, tmp_path):
    path = tmp_path / "Mergefile"
    path.write_text(moe_text(llama, gate_mode="hidden"))
    build_json(path)
    tensors = load_tensors(tmp_path / "build" / "moe")
    first, last = tensors["model.layers.0.mlp.gate.weight"], tensors["model.layers.7.mlp.gate.weight"]
    assert not torch.equal(first, last)
    assert torch.allclose(last.float().norm(dim=1), torch.ones(3), atol=1e-2)


def test_a_shape_mismatched_expert_is_a_clear_error(llama, tmp_path):
    import make_models

    make_models.make_model(tmp_path / "wide", "llama", overrides={"intermediate_size": 96})
    path = tmp_path / "Mergefile"
    path.write_text(
        f"targets:\n  moe:\n    base_model: {llama['base']}\n    gate_mode: random\n    experts:\n"
        f"      - source_model: {llama['math']}\n      - source_model: wide\n"
    )
    with pytest.raises(MergefileError) as caught:
        plan.make_plan(mergefile.load(path), store=path.parent / "cache")
    assert "shape mismatch for tensor 'model.layers.0.mlp.gate_proj.weight'" in caught.value.message
    assert "'wide' [96, 64]" in caught.value.message
    assert caught.value.location.line == 7 and caught.value.location.target == "moe"


@pytest.mark.parametrize(
    "body, fragment",
    [
        ("    gate_mode: cheap_embed\n    experts:\n      - source_model: {math}\n", "needs 'positive_prompts'"),
        ("    gate_mode: hiden\n    experts:\n      - source_model: {math}\n", "did you mean 'hidden'"),
        ("    experts_per_token: 3\n    gate_mode: random\n    experts:\n      - source_model: {math}\n", "experts_per_token is 3"),
        ("    gate_mode: random\n    experts:\n      - {{source_model: {math}, noise_scale: 0.1}}\n", "noise_scale is refused"),
    ],
)
def test_moe_recipe_mistakes(llama, tmp_path, body, fragment):
    path = tmp_path / "Mergefile"
    path.write_text(f"targets:\n  moe:\n    base_model: {llama['base']}\n" + body.format(**llama))
    with pytest.raises(MergefileError) as caught:
        mergefile.load(path)
    assert fragment in caught.value.message and caught.value.location.target == "moe"


def test_qwen_experts_are_refused_with_the_reason(families, tmp_path):
    qwen = families("qwen2")
    path = tmp_path / "Mergefile"
    path.write_text(
        f"targets:\n  moe:\n    base_model: {qwen['base']}\n    gate_mode: random\n    experts:\n"
        f"      - source_model: {qwen['math']}\n      - source_model: {qwen['code']}\n"
    )
    with pytest.raises(MergefileError) as caught:
        plan.make_plan(mergefile.load(path), store=path.parent / "cache")
    assert "Llama or Mistral" in caught.value.message and "qwen2" in caught.value.message

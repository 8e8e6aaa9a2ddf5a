"""Merging MoE checkpoints stored one tensor per expert (Qwen3-MoE, Qwen2-MoE, Mixtral as transformers saves them).

mergekit fuses each layer's experts first (transformers 5's `mlp.experts.gate_up_proj` and
`mlp.experts.down_proj`) and merges each fused tensor once, so TIES' top-k, SLERP's angle and
Model Stock's statistics are taken over all experts of a module. mbuild does the same by
default (`expert_tensors: fused`), byte for byte; `expert_tensors: separate` merges each
expert tensor alone and keeps the per-expert layout. A passthrough over layer ranges (a
frankenmerge) fuses or keeps them alike. DeepSeek-V3 and GLM-4-MoE are in
`test_moe_architectures.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

mergekit = pytest.importorskip("mergekit")

import torch  # noqa: E402
import transformers  # noqa: E402
from conftest import load_tensors  # noqa: E402
from parity import Build, assert_same_tensors, mergekit_merge, run_mergekit, same_bits  # noqa: E402

EXPERTS = 4
# One expert's matrices (160 × 64 = 10240 elements) are under the 32768-element grain where
# bytes are compared; the fused tensors (4 × 320 × 64, 4 × 64 × 160) are above it.
HIDDEN, EXPERT_WIDTH = 64, 160
# mergekit 0.1.5 has no table for Qwen2-MoE; the one it infers has no post-layer tensors, so its
# passthrough takes the final norm and head from the first slice (mbuild: from the last, as
# mergekit's tables say for Mixtral and Qwen3-MoE).
NO_MERGEKIT_TABLE = {"qwen2_moe"}
# Each architecture's per-expert up projection (the second part of `gate_up_proj`).
UP_PROJ = {
    "qwen3_moe": "model.layers.{layer}.mlp.experts.{e}.up_proj.weight",
    "qwen2_moe": "model.layers.{layer}.mlp.experts.{e}.up_proj.weight",
    "mixtral": "model.layers.{layer}.block_sparse_moe.experts.{e}.w3.weight",
}


def make_moe(folder: Path, architecture: str, seed: int, base: Path | None = None) -> Path:
    """A tiny per-expert MoE checkpoint (2 layers, 4 experts), or a mock fine-tune of ``base``."""
    torch.manual_seed(seed)
    if base is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.02)
    else:
        common = dict(
            vocab_size=64,
            hidden_size=HIDDEN,
            intermediate_size=128,
            moe_intermediate_size=EXPERT_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_experts=EXPERTS,
            num_experts_per_tok=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
        if architecture == "mixtral":
            del common["moe_intermediate_size"], common["num_experts"]
            config = transformers.MixtralConfig(
                **{**common, "intermediate_size": EXPERT_WIDTH}, num_local_experts=EXPERTS
            )
        elif architecture == "qwen3_moe":
            config = transformers.Qwen3MoeConfig(head_dim=32, decoder_sparse_step=1, mlp_only_layers=[], **common)
        else:
            config = transformers.Qwen2MoeConfig(shared_expert_intermediate_size=96, **common)
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["qwen3_moe", "qwen2_moe", "mixtral"])
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"family-{request.param}")
    base = make_moe(root / "base", request.param, 0)
    return {
        "architecture": request.param,
        "base": base,
        "math": make_moe(root / "math", request.param, 1, base),
        "code": make_moe(root / "code", request.param, 2, base),
    }


def recipes(family) -> dict[str, dict]:
    """mergekit bodies of the methods whose statistics span a tensor (and linear, element-wise)."""
    base, math, code = str(family["base"]), str(family["math"]), str(family["code"])
    return {
        "linear": {
            "merge_method": "linear",
            "models": [{"model": math, "parameters": {"weight": 0.6}}, {"model": code, "parameters": {"weight": 0.4}}],
            "dtype": "float32",
        },
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": math, "parameters": {"weight": 0.5, "density": 0.5}},
                {"model": code, "parameters": {"weight": 0.5, "density": 0.3}},
            ],
            "dtype": "float32",
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": math,
            "models": [{"model": math}, {"model": code}],
            "parameters": {"t": 0.3},
            "dtype": "float32",
        },
        "nuslerp": {
            "merge_method": "nuslerp",
            "models": [{"model": math, "parameters": {"weight": 0.7}}, {"model": code, "parameters": {"weight": 0.3}}],
            "dtype": "float32",
        },
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": base,
            "models": [{"model": math}, {"model": code}],
            "dtype": "float32",
        },
        # A frankenmerge: both layers of math, then code's layer 1 as layer 2.
        "passthrough": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": math, "layer_range": [0, 2]}]},
                {"sources": [{"model": code, "layer_range": [1, 2]}]},
            ],
            "dtype": "float32",
        },
    }


@pytest.fixture(scope="module")
def builds(family, tmp_path_factory):
    """mbuild's fused (default) and separate builds of every recipe, and mergekit's outputs."""
    root = tmp_path_factory.mktemp(f"moe-inputs-{family['architecture']}")
    bodies = recipes(family)
    fused = Build(root / "fused", bodies)
    separate = Build(root / "separate", {name: {**body, "expert_tensors": "separate"} for name, body in bodies.items()})
    references = {}
    for name, body in bodies.items():
        run_mergekit(body, root / "mergekit" / name)
        references[name] = load_tensors(root / "mergekit" / name)
    return fused, separate, references


@pytest.mark.parametrize("method", ["linear", "ties", "slerp", "nuslerp", "model_stock", "passthrough"])
def test_fused_experts_match_mergekit_bit_for_bit(builds, family, method):
    fused, _, references = builds
    ours, theirs = load_tensors(fused.output(method)), dict(references[method])
    assert "model.layers.1.mlp.experts.gate_up_proj" in ours
    assert ours["model.layers.1.mlp.experts.down_proj"].numel() > 32768
    if method == "passthrough" and family["architecture"] in NO_MERGEKIT_TABLE:
        first, last = load_tensors(family["math"]), load_tensors(family["code"])
        for name in ("model.norm.weight", "lm_head.weight"):
            assert torch.equal(theirs.pop(name), first[name]) and torch.equal(ours.pop(name), last[name]), name
    assert_same_tensors(ours, theirs)


@pytest.mark.parametrize("method", ["ties", "slerp", "model_stock"])
def test_separate_experts_merge_each_expert_alone(builds, mergekit_methods, family, method):
    _, separate, references = builds
    ours = load_tensors(separate.output(method))
    assert UP_PROJ[family["architecture"]].format(layer=0, e=3) in ours
    assert not any(name.endswith("gate_up_proj") for name in ours)
    inputs = {role: load_tensors(family[role]) for role in ("base", "math", "code")}
    name = UP_PROJ[family["architecture"]].format(layer=1, e=2)
    if method == "ties":
        tensors = [inputs["math"][name], inputs["code"][name], inputs["base"][name]]
        expected = mergekit_merge(
            mergekit_methods, "ties", tensors, base_index=2, weight=[0.5, 0.5, None], density=[0.5, 0.3, None]
        )
    elif method == "slerp":
        tensors = [inputs["math"][name], inputs["code"][name]]
        expected = mergekit_merge(mergekit_methods, "slerp", tensors, base_index=0, t=0.3)
    else:
        tensors = [inputs["math"][name], inputs["code"][name], inputs["base"][name]]
        expected = mergekit_merge(mergekit_methods, "model_stock", tensors, base_index=2)
    assert same_bits(ours[name], expected.to(ours[name].dtype))
    # The fused statistics give other values: the option changes what is computed.
    fused = references[method]["model.layers.1.mlp.experts.gate_up_proj"][2, EXPERT_WIDTH:]
    assert not torch.equal(fused, ours[name])


def test_separate_is_the_per_expert_layout_and_a_bad_value_is_refused(builds, tmp_path, family):
    _, separate, _ = builds
    ours = load_tensors(separate.output("linear"))
    assert sorted(ours) == sorted(load_tensors(family["math"]))
    assert sum(".experts." in name for name in ours) == 2 * EXPERTS * 3
    body = {**recipes(family)["linear"], "expert_tensors": "stacked"}
    bad = Build(tmp_path / "bad", {"bad": body})
    assert bad.returncode != 0
    assert "expert_tensors" in bad.log


def test_fused_output_loads_in_transformers_with_every_weight(builds):
    fused, _, _ = builds
    model, loading = transformers.AutoModelForCausalLM.from_pretrained(fused.output("ties"), output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def test_a_frankenmerge_keeps_every_layer_of_its_slices_and_loads(builds, family):
    """Passthrough over layer ranges: layers 0-1 of math then code's layer 1, fused and separate."""
    fused, separate, references = builds
    code = load_tensors(family["code"])

    def with_layer_2(names) -> list[str]:
        moved = {n.replace("model.layers.1.", "model.layers.2.", 1) for n in names if n.startswith("model.layers.1.")}
        return sorted(set(names) | moved)

    # The layouts of a models: merge (mergekit's fused names, the inputs' per-expert ones), plus layer 2.
    fused_out, separate_out = load_tensors(fused.output("passthrough")), load_tensors(separate.output("passthrough"))
    assert sorted(fused_out) == with_layer_2(references["linear"])
    assert sorted(separate_out) == with_layer_2(load_tensors(family["math"]))
    up = UP_PROJ[family["architecture"]]
    assert torch.equal(separate_out[up.format(layer=2, e=3)], code[up.format(layer=1, e=3)])
    part = fused_out["model.layers.2.mlp.experts.gate_up_proj"][3, EXPERT_WIDTH:]
    assert torch.equal(part, code[up.format(layer=1, e=3)])
    for build in (fused, separate):
        model, loading = transformers.AutoModelForCausalLM.from_pretrained(build.output("passthrough"), output_loading_info=True)
        assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
        assert model.config.num_hidden_layers == 3
        with torch.no_grad():
            logits = model(torch.tensor([[1, 2, 3, 4]])).logits
        assert torch.isfinite(logits).all()

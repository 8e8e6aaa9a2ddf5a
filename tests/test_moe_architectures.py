"""Coverage: DeepSeek-V3 and GLM-4-MoE, decoders with dense and MoE layers, four methods each.

Each is a tiny model of transformers' own class: layer 0 dense (`first_k_dense_replace: 1`),
layer 1 MoE with four routed experts stored one tensor per expert (as transformers saves them),
a shared expert and a router with its `e_score_correction_bias`; DeepSeek-V3 with MLA
attention (low-rank q and kv projections). Every build (linear, TIES with a base, SLERP, a
passthrough frankenmerge) must keep every input tensor, the experts fused as mergekit fuses
them (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), load in transformers with no
missing or unexpected keys and give finite logits, and equal mergekit's bytes single-threaded.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

mergekit = pytest.importorskip("mergekit")

import torch  # noqa: E402
import transformers  # noqa: E402
from conftest import load_tensors  # noqa: E402
from parity import Build, assert_same_tensors, mergekit_merge, run_mergekit, same_bits  # noqa: E402
from parity import method_recipe as recipe  # noqa: E402
from parity import perturb as _perturb  # noqa: E402

EXPERTS = 4
COMMON = dict(
    vocab_size=640,
    hidden_size=96,
    intermediate_size=128,
    moe_intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    n_routed_experts=EXPERTS,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    n_shared_experts=1,
    first_k_dense_replace=1,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
# name -> (config class, model class, extra config options)
ARCHITECTURES = {
    "deepseek-v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16),
    ),
    "glm4-moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(num_key_value_heads=2, head_dim=24, use_qk_norm=True)),
}
METHODS = ("linear", "ties", "slerp", "passthrough")
# Where mergekit 0.1.5 silently drops tensors. DeepSeek-V3: it has no table, and the one it
# infers lists the fused experts only as optional (layer 0 is dense); it then skips optional
# tensors whose names no checkpoint holds, and the per-expert checkpoint holds only the
# per-expert names, so its output has no routed experts (and does not load). mbuild's are
# checked against mergekit's kernels on the inputs fused by transformers' conversion.
# With no table, a passthrough's final norm and head also come from mergekit's first slice.
MERGEKIT_DROPS_EXPERTS = {"deepseek-v3"}
POST_LAYER = ("model.norm.weight", "lm_head.weight")
# One expert's tensor of a layer: fused into the tensor named by its group (transformers 5's layout).
PER_EXPERT = re.compile(r"^(?P<layer>model\.layers\.\d+\.mlp\.experts\.)\d+\.(?P<part>gate_proj|up_proj|down_proj)\.weight$")


def make_family(root: Path, name: str) -> dict[str, Path]:
    """A base of one architecture and two mock fine-tunes of it: {"base", "ft0", "ft1"} folders."""
    config_class, model_class, extra = ARCHITECTURES[name]
    config = getattr(transformers, config_class)(**COMMON, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)._from_config(config, dtype=torch.float32)
    _perturb(model, 1000, 0.1)  # from_config leaves norms at 1 and biases at 0
    folders = {}
    for index, label in enumerate(("base", "ft0", "ft1")):
        if index:
            _perturb(model, index, 0.02)
            with torch.no_grad():  # a buffer, not a parameter: fine-tuned as the router's bias is
                for layer in model.model.layers[COMMON["first_k_dense_replace"] :]:
                    layer.mlp.gate.e_score_correction_bias.add_(0.01 * index)
        folder = root / name / label
        model.save_pretrained(folder)
        folders[label] = folder
    return folders


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def family(request, tmp_path_factory):
    return request.param, make_family(tmp_path_factory.mktemp("moe-architectures"), request.param)


def fused_names(names) -> set[str]:
    """A checkpoint's tensor names with each layer's per-expert tensors fused."""
    out = set()
    for name in names:
        match = PER_EXPERT.match(name)
        if match is None:
            out.add(name)
        else:
            out.add(match["layer"] + ("down_proj" if match["part"] == "down_proj" else "gate_up_proj"))
    return out


def expected_names(method: str, models: dict[str, Path]) -> set[str]:
    names = fused_names(load_tensors(models["base"]))
    if method != "passthrough":
        return names
    moved = {"model.layers.2." + n[len("model.layers.1.") :] for n in names if n.startswith("model.layers.1.")}
    return names | moved


@pytest.fixture(scope="module")
def builds(family, tmp_path_factory):
    """All four targets of one architecture, built once by mbuild."""
    name, models = family
    root = tmp_path_factory.mktemp(f"mbuild-{name}")
    targets = {method: recipe(method, models) for method in METHODS}
    targets["linear-separate"] = {**recipe("linear", models), "expert_tensors": "separate"}
    return Build(root, targets)


def test_the_models_have_dense_and_moe_layers(family):
    name, models = family
    names = set(load_tensors(models["base"]))
    assert "model.layers.0.mlp.up_proj.weight" in names and not any(n.startswith("model.layers.0.mlp.experts.") for n in names)
    assert {f"model.layers.1.mlp.experts.{e}.up_proj.weight" for e in range(EXPERTS)} <= names
    assert {"model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.1.mlp.shared_experts.down_proj.weight"} <= names
    if name == "deepseek-v3":
        assert {"model.layers.1.self_attn.q_a_proj.weight", "model.layers.1.self_attn.kv_b_proj.weight"} <= names


@pytest.mark.parametrize("method", METHODS)
def test_builds_whole_and_loads(family, builds, method):
    name, models = family
    folder = builds.output(method)
    out = load_tensors(folder)
    assert set(out) == expected_names(method, models)
    fused_shape = (EXPERTS, 2 * COMMON["moe_intermediate_size"], COMMON["hidden_size"])
    assert out["model.layers.1.mlp.experts.gate_up_proj"].shape == fused_shape
    if method != "passthrough":
        base = load_tensors(models["base"])
        bias = "model.layers.1.mlp.gate.e_score_correction_bias"
        assert not torch.equal(out[bias], base[bias])  # merged, not taken from one model
    cls = getattr(transformers, ARCHITECTURES[name][1])
    model, loading = cls.from_pretrained(folder, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    if method == "passthrough":
        assert model.config.num_hidden_layers == 3
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 17, 33, 65]])).logits
    assert torch.isfinite(logits).all()


def _fused_input(folder: Path, name: str) -> torch.Tensor:
    """One fused expert tensor of a checkpoint, fused by transformers' own conversion (as mergekit reads it)."""
    from mergekit.architecture.conversion import convert_checkpoint_tensors

    model_type = transformers.AutoConfig.from_pretrained(folder).model_type
    return convert_checkpoint_tensors(model_type, load_tensors(folder), name)


def _expected_experts(method: str, models: dict[str, Path], name: str, mergekit_methods) -> torch.Tensor:
    """mergekit's kernel on one fused expert tensor, the inputs fused as mergekit fuses them."""
    body = recipe(method, models)
    if method == "passthrough":
        layer = int(name.split(".")[2])
        source, source_name = ("ft0", name) if layer < 2 else ("ft1", name.replace(".2.", ".1.", 1))
        return _fused_input(models[source], source_name)
    ft0, ft1, base = (_fused_input(models[label], name) for label in ("ft0", "ft1", "base"))
    if method == "linear":
        return mergekit_merge(mergekit_methods, "linear", [ft0, ft1], weight=[0.4, 0.6])
    if method == "ties":
        weights = dict(weight=[0.6, 0.4, None], density=[0.5, 0.7, None])
        return mergekit_merge(mergekit_methods, "ties", [ft0, ft1, base], base_index=2, **weights, **body["parameters"])
    return mergekit_merge(mergekit_methods, "slerp", [ft0, ft1], base_index=0, t=0.3)


def test_separate_experts_keep_the_checkpoint_layout_and_load(family, builds):
    name, models = family
    folder = builds.output("linear-separate")
    out, ft0, ft1 = load_tensors(folder), load_tensors(models["ft0"]), load_tensors(models["ft1"])
    assert sorted(out) == sorted(ft0)
    expert = "model.layers.1.mlp.experts.2.up_proj.weight"
    assert torch.allclose(out[expert], 0.4 * ft0[expert] + 0.6 * ft1[expert], rtol=1e-6, atol=1e-7)
    _, loading = getattr(transformers, ARCHITECTURES[name][1]).from_pretrained(folder, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading


@pytest.mark.parametrize("method", METHODS)
def test_equals_mergekit(family, builds, method, tmp_path, mergekit_methods):
    name, models = family
    run_mergekit(recipe(method, models), tmp_path / "mergekit")
    mine, theirs = load_tensors(builds.output(method)), load_tensors(tmp_path / "mergekit")
    assert mine["model.layers.1.mlp.experts.gate_up_proj"].numel() > 32768  # past torch's grain
    if name in MERGEKIT_DROPS_EXPERTS:
        routed = {n for n in mine if ".mlp.experts." in n}
        assert sorted(set(mine) - set(theirs)) == sorted(routed) and set(theirs) <= set(mine)
        for tensor_name in sorted(routed):
            expected = _expected_experts(method, models, tensor_name, mergekit_methods)
            assert same_bits(mine[tensor_name], expected), tensor_name
        mine = {n: t for n, t in mine.items() if n not in routed}
        if method == "passthrough":
            # The inferred table has no post-layer tensors, only "pre" ones, taken from the first
            # slice; mbuild takes the final norm and head from the last, as mergekit's tables do.
            first, last = load_tensors(models["ft0"]), load_tensors(models["ft1"])
            for tensor_name in POST_LAYER:
                assert torch.equal(theirs.pop(tensor_name), first[tensor_name]), tensor_name
                assert torch.equal(mine.pop(tensor_name), last[tensor_name]), tensor_name
    assert_same_tensors(mine, theirs)

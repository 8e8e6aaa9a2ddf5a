"""Models with several layer stacks: vision towers beside a text decoder, encoder and decoder.

Layers are keyed per stack (`plan.layers.stack_table`), so a vision layer and a text layer with
the same suffix never meet, and every stack is merged whole, each with gradients over its own
layers (mergekit's modules). Each architecture is a tiny model of transformers' own class with
two mock fine-tunes; every merge (linear, TIES, SLERP) must keep the inputs' tensor set, load in
transformers with no missing or unexpected keys, and equal mergekit's bytes (single-threaded)
where mergekit builds it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from conftest import load_tensors
from parity import Build, assert_same_tensors, run_mergekit
from parity import perturb as _perturb


def _text(**overrides) -> dict:
    options = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, vocab_size=128
    )
    options.update(overrides)
    return options


def _gemma3():
    text = transformers.Gemma3TextConfig(**_text(head_dim=16))
    vision = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=28, patch_size=14, vision_use_head=False
    )
    return transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4)


def _llava():
    text = transformers.LlamaConfig(**_text(head_dim=16))
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32
    )
    return transformers.LlavaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_index=100)


def _qwen2_vl():
    text = _text(rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]})
    vision = dict(depth=3, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2)
    return transformers.Qwen2VLConfig(text_config=text, vision_config=vision)


def _mllama():
    # Layer 1 of the text stack is a cross-attention layer (cross_attn.*, gates), the others self-attention.
    text = transformers.MllamaTextConfig(
        **_text(num_hidden_layers=3), cross_attention_layers=[1], bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    vision = transformers.MllamaVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=2, image_size=28,
        patch_size=14, max_num_tiles=2, vision_output_dim=64, intermediate_layers_indices=[0],
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
    )  # fmt: skip
    return transformers.MllamaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_index=100)


def _whisper():
    return transformers.WhisperConfig(
        vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16, max_target_positions=32,
        pad_token_id=1, bos_token_id=2, eos_token_id=2, decoder_start_token_id=3, suppress_tokens=[], begin_suppress_tokens=[],
    )  # fmt: skip


# name -> (config, model class, the stacks' prefixes and layer counts)
ARCHITECTURES = {
    "gemma3": (
        _gemma3,
        "Gemma3ForConditionalGeneration",
        {"language_model.model.layers.": 2, "vision_tower.vision_model.encoder.layers.": 3},
    ),
    "llava": (
        _llava,
        "LlavaForConditionalGeneration",
        {"language_model.model.layers.": 2, "vision_tower.encoder.layers.": 3},
    ),
    "mllama": (
        _mllama,
        "MllamaForConditionalGeneration",
        {
            "language_model.model.layers.": 3,
            "vision_model.transformer.layers.": 2,
            "vision_model.global_transformer.layers.": 1,
        },
    ),
    "qwen2-vl": (_qwen2_vl, "Qwen2VLForConditionalGeneration", {"model.layers.": 2, "visual.blocks.": 3}),
    "whisper": (_whisper, "WhisperForConditionalGeneration", {"model.encoder.layers.": 2, "model.decoder.layers.": 3}),
}
# How mergekit 0.1.5 builds them: "all" tensors, "some" (Llava and Mllama: it has no table for
# them, and its inference writes the vision tower and projector in transformers 5's layout,
# `model.` before each name, and drops the whole language model but Mllama's head, which it
# writes as `lm_head.weight`), or "fails" (Whisper: its table's decoder prefix `model.decoder`
# lacks a dot, so it asks for `model.decoderembed_tokens.weight`).
MERGEKIT = {"gemma3": "all", "qwen2-vl": "all", "llava": "some", "mllama": "some", "whisper": "fails"}
# The language model's tensors mergekit keeps where it keeps "some", by the checkpoint's names.
MERGEKIT_KEEPS = {"mllama": {"language_model.lm_head.weight"}}


def _as_on_the_hub(name: str, folder: Path) -> None:
    """Store a checkpoint as the published ones are, which mergekit's tables name.

    transformers 5 saves Gemma 3's tower as `vision_tower.*` and Qwen2-VL's layer count only in
    `text_config`; google/gemma-3-* hold `vision_tower.vision_model.*` and Qwen/Qwen2-VL-* a
    top-level `num_hidden_layers`. transformers loads both forms.
    """
    import json

    from safetensors.torch import load_file, save_file

    if name == "gemma3":
        path = folder / "model.safetensors"
        tensors = load_file(path)
        renamed = {n.replace("vision_tower.", "vision_tower.vision_model.", 1): t for n, t in tensors.items()}
        save_file(renamed, path, metadata={"format": "pt"})
    if name == "qwen2-vl":
        config = json.loads((folder / "config.json").read_text())
        text = config["text_config"]
        config.update({key: text[key] for key in ("num_hidden_layers", "hidden_size", "vocab_size")})
        (folder / "config.json").write_text(json.dumps(config, indent=2))


def make_family(root: Path, name: str, shard: str | None = None) -> dict[str, Path]:
    """A base of one architecture and two mock fine-tunes of it: {"base", "ft0", "ft1"} folders."""
    make_config, class_name, _ = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = getattr(transformers, class_name)._from_config(make_config(), dtype=torch.float32)
    _perturb(model, 1000, 0.1)  # from_config leaves norms at 1 and biases at 0
    folders = {}
    for index, label in enumerate(("base", "ft0", "ft1")):
        if index:
            _perturb(model, index, 0.02)
        folder = root / name / label
        options = {"max_shard_size": shard} if shard and label == "ft0" else {}
        model.to(torch.bfloat16).save_pretrained(folder, **options)
        model.float()
        _as_on_the_hub(name, folder)
        folders[label] = folder
    return folders


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def family(request, tmp_path_factory):
    return request.param, make_family(tmp_path_factory.mktemp("multi-stack"), request.param)


def recipes(models: dict[str, Path]) -> dict[str, dict]:
    base, ft0, ft1 = (str(models[n]) for n in ("base", "ft0", "ft1"))
    return {
        # mergekit computes in `dtype`, else the inputs' (bfloat16 here); mbuild then in float32.
        "linear": {
            "merge_method": "linear",
            "dtype": "float32",
            "models": [{"model": ft0, "parameters": {"weight": 0.4}}, {"model": ft1, "parameters": {"weight": 0.6}}],
        },
        "ties": {
            "merge_method": "ties",
            "dtype": "bfloat16",
            "base_model": base,
            "models": [
                {"model": ft0, "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": ft1, "parameters": {"weight": [0.2, 0.8], "density": 0.7}},
            ],
            "parameters": {"normalize": True},
        },
        "slerp": {
            "merge_method": "slerp",
            "dtype": "bfloat16",
            "base_model": ft0,
            "models": [{"model": ft0}, {"model": ft1}],
            "parameters": {"t": 0.3},
        },
    }


def test_the_models_have_several_stacks(family):
    from mbuild import io
    from mbuild.plan.layers import stack_length, stack_table, text_stack

    name, models = family
    info = io.read_model(models["base"])
    stacks, _ = stack_table(info)
    assert {prefix: stack_length(layers) for prefix, layers in stacks.items()} == ARCHITECTURES[name][2]
    text = text_stack(stacks, info.config)
    # Whisper's two stacks are an encoder and a decoder, neither the text stack: slices are refused.
    language = "language_model.model.layers."
    assert text == {"gemma3": language, "llava": language, "mllama": language, "qwen2-vl": "model.layers."}.get(name)


def test_every_stack_merges_whole_and_loads(family, tmp_path):
    name, models = family
    build = Build(tmp_path, recipes(models))
    inputs = load_tensors(models["base"])
    cls = getattr(transformers, ARCHITECTURES[name][1])
    for target in ("linear", "ties", "slerp"):
        folder = build.output(target)
        out = load_tensors(folder)
        assert sorted(out) == sorted(inputs), target
        changed = [n for n in out if not torch.equal(out[n], inputs[n])]
        assert len(changed) > len(out) // 2  # a merge, not a copy of the base
        _, loading = cls.from_pretrained(folder, output_loading_info=True)
        assert not loading["missing_keys"] and not loading["unexpected_keys"], (target, loading)


def test_linear_takes_each_tensor_from_its_own_name(family, tmp_path):
    """Every output tensor is 0.4 of ft0's and 0.6 of ft1's tensor of the same name (no stack mixes)."""
    name, models = family
    folder = Build(tmp_path, recipes(models)).output("linear")
    out, ft0, ft1 = load_tensors(folder), load_tensors(models["ft0"]), load_tensors(models["ft1"])
    for tensor_name, tensor in out.items():
        expected = 0.4 * ft0[tensor_name].float() + 0.6 * ft1[tensor_name].float()
        assert torch.allclose(tensor.float(), expected, rtol=2**-7, atol=1e-6), tensor_name  # one bfloat16 step


def _checkpoint_name(name: str) -> str:
    """A tensor name in transformers 5's layout, as mergekit writes it, named as the checkpoint names it."""
    return "language_model.lm_head.weight" if name == "lm_head.weight" else name.removeprefix("model.")


def test_equals_mergekit(family, tmp_path):
    """Same bytes as mergekit single-threaded, for every tensor mergekit writes (see MERGEKIT)."""
    name, models = family
    if MERGEKIT[name] == "fails":
        with pytest.raises(RuntimeError, match="model.decoderembed_tokens.weight"):
            run_mergekit(recipes(models)["linear"], tmp_path / "mergekit-linear")
        return
    build = Build(tmp_path / "mbuild", recipes(models))
    for target, body in recipes(models).items():
        run_mergekit(body, tmp_path / f"mergekit-{target}")
        mine, theirs = load_tensors(build.output(target)), load_tensors(tmp_path / f"mergekit-{target}")
        if (name, target) == ("qwen2-vl", "ties"):
            # mergekit's table plans Qwen2-VL's merger MLP as two layers of fixed names, so a
            # gradient gives it its value at t = 1; mbuild gives tensors outside a stack t = 0.
            merger = sorted(n for n in mine if n.startswith("visual.merger.mlp."))
            assert len(merger) == 4 and all(not torch.equal(mine[n], theirs[n]) for n in merger)
            at_end = {**body, "models": [body["models"][0], {**body["models"][1], "parameters": {"weight": 0.8, "density": 0.7}}]}
            end = Build(tmp_path / "mbuild-at-end", {"ties": at_end}).output("ties")
            assert_same_tensors({n: t for n, t in load_tensors(end).items() if n in merger}, {n: theirs[n] for n in merger})
            mine = {n: t for n, t in mine.items() if n not in merger}
            theirs = {n: t for n, t in theirs.items() if n not in merger}
        if MERGEKIT[name] == "some":
            theirs = {_checkpoint_name(n): t for n, t in theirs.items()}
            kept = MERGEKIT_KEEPS.get(name, set())
            assert sorted(theirs) == sorted(n for n in mine if not n.startswith("language_model.") or n in kept)
            mine = {n: t for n, t in mine.items() if n in theirs}
        assert_same_tensors(mine, theirs)


def test_whisper_encoder_and_decoder_in_different_shards_never_mix(tmp_path):
    """The issue's report: with ft0 sharded, an encoder tensor was merged with ft1's decoder tensor."""
    models = make_family(tmp_path / "models", "whisper", shard="40KB")
    shards = sorted(models["ft0"].glob("*.safetensors"))
    assert len(shards) > 2
    from safetensors import safe_open

    def stacks_in(path):
        with safe_open(str(path), "pt") as handle:
            return {".encoder." in k for k in handle.keys()}

    assert any(stacks_in(s) == {True} for s in shards) and any(stacks_in(s) == {False} for s in shards)
    folder = Build(tmp_path / "build", recipes(models)).output("linear")
    out, ft0, ft1 = load_tensors(folder), load_tensors(models["ft0"]), load_tensors(models["ft1"])
    assert sorted(out) == sorted(ft1)
    for tensor_name, tensor in out.items():
        expected = 0.4 * ft0[tensor_name].float() + 0.6 * ft1[tensor_name].float()
        assert torch.allclose(tensor.float(), expected, rtol=2**-7, atol=1e-6), tensor_name  # one bfloat16 step


def test_a_frankenmerge_keeps_the_vision_tower_of_its_first_slice(tmp_path):
    models = make_family(tmp_path / "models", "qwen2-vl")
    ft0, ft1 = str(models["ft0"]), str(models["ft1"])
    body = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": ft0, "layer_range": [0, 2]}]},
            {"sources": [{"model": ft1, "layer_range": [1, 2]}]},
        ],
    }
    folder = Build(tmp_path / "build", {"franken": body}).output("franken")
    out, first, last = load_tensors(folder), load_tensors(models["ft0"]), load_tensors(models["ft1"])
    assert sorted(n for n in out if n.startswith("model.layers.")) == sorted(
        [n for n in first if n.startswith("model.layers.")] + [n.replace(".1.", ".2.", 1) for n in last if n.startswith("model.layers.1.")]
    )
    for tensor_name in (n for n in first if n.startswith("visual.")):
        assert torch.equal(out[tensor_name], first[tensor_name]), tensor_name
    for tensor_name in ("model.embed_tokens.weight",):
        assert torch.equal(out[tensor_name], first[tensor_name])
    for tensor_name in ("model.norm.weight", "lm_head.weight"):
        assert torch.equal(out[tensor_name], last[tensor_name])
    assert torch.equal(out["model.layers.2.mlp.up_proj.weight"], last["model.layers.1.mlp.up_proj.weight"])
    config = transformers.AutoConfig.from_pretrained(folder)
    assert config.text_config.num_hidden_layers == 3
    _, loading = transformers.Qwen2VLForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]


def test_slices_of_an_encoder_decoder_are_refused(tmp_path):
    models = make_family(tmp_path / "models", "whisper")
    body = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(models["ft0"]), "layer_range": [0, 2]}]}]}
    build = Build(tmp_path / "build", {"franken": body})
    assert build.returncode != 0
    assert "several layer stacks" in build.log and "model.decoder.layers." in build.log and "models:" in build.log


def test_a_frankenmerge_of_mllama_moves_its_cross_attention_layers(tmp_path):
    """Layers 0-1 of ft0 then 1-2 of ft1: the cross-attention layer (1) sits at 1 and 2 of the output."""
    models = make_family(tmp_path / "models", "mllama")
    ft0, ft1 = str(models["ft0"]), str(models["ft1"])
    body = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": ft0, "layer_range": [0, 2]}]},
            {"sources": [{"model": ft1, "layer_range": [1, 3]}]},
        ],
    }
    folder = Build(tmp_path / "build", {"franken": body}).output("franken")
    out, last = load_tensors(folder), load_tensors(models["ft1"])
    gate = "language_model.model.layers.{}.cross_attn_attn_gate"
    assert torch.equal(out[gate.format(2)], last[gate.format(1)]) and gate.format(3) not in out
    config = transformers.AutoConfig.from_pretrained(folder)
    assert (config.text_config.num_hidden_layers, config.text_config.cross_attention_layers) == (4, [1, 2])
    model, loading = transformers.MllamaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 17]])).logits
    assert torch.isfinite(logits).all()

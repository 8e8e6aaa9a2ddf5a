"""Coverage: tiny decoders of every single-stack architecture users merge, four methods each.

Each architecture is a tiny model of transformers' own class (`_from_config`, 2 layers, hidden
96 so the embedding, 640 x 96, is past torch's 32768-element grain) and two mock fine-tunes of
it. Every build (linear, TIES with a base, SLERP, a passthrough frankenmerge) must keep exactly
the expected tensor set, load in transformers with no missing or unexpected keys and give
finite logits, and equal mergekit's bytes single-threaded where mergekit builds it.
Multi-stack models are in `test_multi_stack.py`, MoE models in `test_moe_outputs.py`,
`test_moe_inputs.py` and `test_moe_architectures.py` (DeepSeek-V3, GLM-4-MoE).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from conftest import load_tensors
from parity import Build, assert_same_tensors, run_mergekit
from parity import method_recipe as recipe
from parity import perturb as _perturb

SIZES = dict(hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=640)

# name -> (config class, model class, extra config options)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=24)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(num_key_value_heads=2, head_dim=24)),
    "gemma3-text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(num_key_value_heads=2, head_dim=24)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=2, pad_token_id=0)),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(num_key_value_heads=2)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(num_key_value_heads=2, pad_token_id=0)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(num_key_value_heads=2)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(num_key_value_heads=2)),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict()),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(new_decoder_architecture=True, num_kv_heads=2)),
}
METHODS = ("linear", "ties", "slerp", "passthrough")

# Where mergekit 0.1.5 cannot build an architecture (every method): name -> its error, and why.
# Falcon: its table requires `lm_head.weight`, which a tied Falcon checkpoint (transformers'
# default, `tie_word_embeddings=True`) does not hold. GPT-NeoX: its table lists the attention
# buffers `attention.bias` and `attention.masked_bias`, which transformers 5 does not save.
MERGEKIT_FAILS = {
    "falcon": r"Tensor lm_head\.weight required but not present",
    "gpt-neox": r"Tensor gpt_neox\.layers\.\d+\.attention\.(masked_)?bias required but not present",
}


def _config(name: str):
    config_class, _, extra = ARCHITECTURES[name]
    if not hasattr(transformers, config_class):
        pytest.skip(f"transformers {transformers.__version__} has no {config_class}")
    options = dict(SIZES)
    if name == "falcon":
        options = dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=640)
    options.update(extra)
    return getattr(transformers, config_class)(**options)


def make_family(root: Path, name: str) -> dict[str, Path]:
    config = _config(name)
    torch.manual_seed(0)
    model = getattr(transformers, ARCHITECTURES[name][1])._from_config(config, dtype=torch.float32)
    _perturb(model, 1000, 0.1)  # from_config leaves norms at 1 and biases at 0
    folders = {}
    for index, label in enumerate(("base", "ft0", "ft1")):
        if index:
            _perturb(model, index, 0.02)
        folder = root / name / label
        model.save_pretrained(folder)
        folders[label] = folder
    return folders


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def family(request, tmp_path_factory):
    return request.param, make_family(tmp_path_factory.mktemp("architectures"), request.param)


def _layer_prefix(names) -> str:
    for prefix in ("model.layers.", "gpt_neox.layers.", "transformer.h."):
        if any(n.startswith(prefix) for n in names):
            return prefix
    raise AssertionError(f"no layer stack in {sorted(names)[:5]}")


def expected_names(method: str, models: dict[str, Path]) -> set[str]:
    names = set(load_tensors(models["base"]))
    if method != "passthrough":
        return names
    prefix = _layer_prefix(names)
    outside = {n for n in names if not n.startswith(prefix)}
    first = {n for n in names if n.startswith(prefix)}
    moved = {prefix + "2." + n[len(prefix) + 2 :] for n in names if n.startswith(prefix + "1.")}
    return outside | first | moved


@pytest.fixture(scope="module")
def builds(family, tmp_path_factory):
    """All four targets of one architecture, built once by mbuild."""
    name, models = family
    root = tmp_path_factory.mktemp(f"mbuild-{name}")
    return Build(root, {method: recipe(method, models) for method in METHODS})


@pytest.mark.parametrize("method", METHODS)
def test_builds_whole_and_loads(family, builds, method):
    name, models = family
    folder = builds.output(method)
    out = load_tensors(folder)
    assert set(out) == expected_names(method, models)
    cls = getattr(transformers, ARCHITECTURES[name][1])
    model, loading = cls.from_pretrained(folder, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    if method == "passthrough":
        assert model.config.num_hidden_layers == 3
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 17, 33, 65]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("method", METHODS)
def test_equals_mergekit(family, builds, method, tmp_path):
    name, models = family
    if name in MERGEKIT_FAILS:
        with pytest.raises(RuntimeError, match=MERGEKIT_FAILS[name]):
            run_mergekit(recipe(method, models), tmp_path / "mergekit")
        return
    run_mergekit(recipe(method, models), tmp_path / "mergekit")
    mine, theirs = load_tensors(builds.output(method)), load_tensors(tmp_path / "mergekit")
    assert any(t.numel() > 32768 for t in mine.values())  # past torch's grain
    assert_same_tensors(mine, theirs)

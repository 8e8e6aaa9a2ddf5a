"""Tied and untied checkpoints merged together (`tie_word_embeddings`, no `lm_head.weight`).

mergekit merges the output head as the tied models' input embedding with the untied models'
`lm_head`, whichever model comes first, and writes a head whenever one input stores one. mbuild
must give the same tensors and bytes in every order, and a config whose `tie_word_embeddings`
says whether the output stores a head (mergekit copies the donor's flag; see
`companions.fit_tying`), so that transformers loads it with no missing or unexpected keys.

The models are Llama with the embedding padded to 640 rows (640 x 64 = 40960 elements, past
the 32768 where kernels split work), so the merged head's bytes are a real test of equality.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import make_models
from conftest import load_tensors
from mbuild import mergefile, plan
from mbuild.nodes import Node

HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"
ROWS = 640


@pytest.fixture(scope="module")
def tied_mix(tmp_path_factory) -> dict[str, Path]:
    """Two untied and two tied Llama checkpoints of equal shapes: {name: folder}."""
    root = tmp_path_factory.mktemp("tied-mix")
    untied = make_models.make_model(root / "untied", "llama", seed=0, tie_embeddings=False, embedding_rows=ROWS)
    tied = make_models.make_model(root / "tied", "llama", seed=5, tie_embeddings=True, embedding_rows=ROWS)
    return {
        "untied": untied,
        "untied-tune": make_models.make_model(root / "untied-tune", "llama", seed=1, base=untied),
        "tied": tied,
        "tied-tune": make_models.make_model(root / "tied-tune", "llama", seed=6, base=tied),
    }


def test_the_models_are_a_tied_untied_mix(tied_mix):
    for name, folder in tied_mix.items():
        tensors = load_tensors(folder)
        tied = json.loads((folder / "config.json").read_text())["tie_word_embeddings"]
        assert tied == name.startswith("tied")
        assert (HEAD in tensors) == (not tied)
        assert tensors[EMBED].shape == (ROWS, 64) and tensors[EMBED].numel() > 32768


def recipes(models: dict[str, Path]) -> dict[str, dict]:
    """Every order of tied and untied models, by target name."""
    untied, untied_tune, tied, tied_tune = (str(models[n]) for n in ("untied", "untied-tune", "tied", "tied-tune"))

    def weighted(*triples):
        return [{"model": m, "parameters": {"weight": w, "density": d} if d else {"weight": w}} for m, w, d in triples]

    return {
        "linear-tied-first": {
            "merge_method": "linear",
            "dtype": "float32",
            "base_model": tied,
            "models": weighted((tied, 0.3, None), (untied, 0.7, None)),
        },
        "linear-untied-first": {
            "merge_method": "linear",
            "dtype": "float32",
            "base_model": untied,
            "models": weighted((untied, 0.7, None), (tied, 0.3, None)),
        },
        # No base model: mergekit's config donor is then any model (a set's order), so only the
        # tensors are compared with it.
        "linear-tied-first-no-base-bfloat16": {
            "merge_method": "linear",
            "dtype": "bfloat16",
            "models": weighted((tied, 0.4, None), (untied_tune, 0.6, None), (untied, 0.5, None)),
            "parameters": {"normalize": False},
        },
        "ties-tied-first": {
            "merge_method": "ties",
            "dtype": "float32",
            "base_model": tied,
            "models": [{"model": tied}] + weighted((untied, 0.6, 0.5), (untied_tune, 0.4, 0.7)),
            "parameters": {"normalize": True, "lambda": 1.2, "int8_mask": True},
        },
        # The tied base is appended after the untied models: an untied model leads.
        "ties-untied-first": {
            "merge_method": "ties",
            "dtype": "float32",
            "base_model": tied,
            "models": weighted((untied, 0.6, 0.5), (untied_tune, 0.4, 0.7)),
        },
        # Tied models lead, over an untied base.
        "ties-tied-models-untied-base-bfloat16": {
            "merge_method": "ties",
            "dtype": "bfloat16",
            "base_model": untied,
            "models": weighted((tied, 0.9, 0.3), (tied_tune, 0.8, 0.6)),
            "parameters": {"normalize": False},
        },
        # The head comes from the last slice's models: none here, so the output is tied.
        "slices-untied-then-tied": {
            "merge_method": "passthrough",
            "dtype": "float32",
            "slices": [
                {"sources": [{"model": untied, "layer_range": [0, 4]}]},
                {"sources": [{"model": tied, "layer_range": [4, 8]}]},
            ],
        },
        "slices-tied-then-untied": {
            "merge_method": "passthrough",
            "dtype": "float32",
            "slices": [
                {"sources": [{"model": tied, "layer_range": [0, 4]}]},
                {"sources": [{"model": untied, "layer_range": [4, 8]}]},
            ],
        },
    }


# Targets whose output stores a head of its own (every other is tied).
WITH_HEAD = {
    "linear-tied-first",
    "linear-untied-first",
    "linear-tied-first-no-base-bfloat16",
    "ties-tied-first",
    "ties-untied-first",
    "ties-tied-models-untied-base-bfloat16",
    "slices-tied-then-untied",
}
TARGETS = sorted(WITH_HEAD | {"slices-untied-then-tied"})


@pytest.fixture(scope="module")
def mix_build(tied_mix, tmp_path_factory):
    """`mbuild all` on every recipe above, in the background while mergekit runs."""
    from parity import Build

    every = recipes(tied_mix)
    assert sorted(every) == TARGETS
    build = Build(tmp_path_factory.mktemp("tied-mix-build"), every, "all", process=True)
    try:
        yield build
    finally:
        build.stop()


def test_the_head_merges_tied_embeddings_with_untied_heads_in_either_order(tied_mix, tmp_path):
    every = recipes(tied_mix)
    path = tmp_path / "Mergefile"
    path.write_text(yaml.safe_dump({"targets": every}, sort_keys=False))
    the_plan = plan.make_plan(mergefile.load(path), store=tmp_path / "cache")

    def head_inputs(target: str) -> list[tuple[str, str]]:
        task = next(t for t in the_plan.targets[target].tasks if t.name == HEAD)
        return [(Path(Node(i.node).label).name, i.name) for i in task.inputs]

    assert head_inputs("linear-tied-first") == [("tied", EMBED), ("untied", HEAD)]
    assert head_inputs("linear-untied-first") == [("untied", HEAD), ("tied", EMBED)]
    assert head_inputs("ties-tied-models-untied-base-bfloat16") == [("tied", EMBED), ("tied-tune", EMBED), ("untied", HEAD)]
    assert head_inputs("slices-tied-then-untied") == [("untied", HEAD)]
    for target in TARGETS:
        names = [t.name for t in the_plan.targets[target].tasks]
        assert (HEAD in names) == (target in WITH_HEAD), target
        # The config says tied exactly when the output has no head, whatever its donor said.
        assert the_plan.targets[target].config["tie_word_embeddings"] is (target not in WITH_HEAD), target


@pytest.mark.parametrize("target", TARGETS)
def test_tied_untied_mix_matches_mergekit_bit_for_bit(mix_build, tmp_path, target):
    pytest.importorskip("mergekit")
    from parity import assert_same_tensors, run_mergekit

    recipe = mix_build.targets[target]
    theirs = run_mergekit(recipe, tmp_path / "mergekit")
    ours = mix_build.output(target)
    tensors = load_tensors(ours)
    assert_same_tensors(tensors, load_tensors(tmp_path / "mergekit"))
    assert (HEAD in tensors) == (target in WITH_HEAD)
    config = json.loads((ours / "config.json").read_text())
    assert config["tie_word_embeddings"] is (target not in WITH_HEAD)
    if "base_model" in recipe:
        # Same config as mergekit's (the base's), but for the flag mergekit copies from a tied base.
        differ = {key for key in set(config) | set(theirs) if config.get(key) != theirs.get(key)}
        assert differ <= {"tie_word_embeddings"}, differ
        assert (differ == {"tie_word_embeddings"}) == (theirs["tie_word_embeddings"] and target in WITH_HEAD)


@pytest.mark.parametrize("target", TARGETS)
def test_tied_untied_mix_loads_in_transformers_with_every_key(mix_build, target):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = mix_build.output(target)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert not any(info.get(kind) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    stored = load_tensors(out)
    assert torch.equal(model.model.embed_tokens.weight, stored[EMBED].float())
    if target in WITH_HEAD:
        # The merged head is the model's head, not tied to the embedding.
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
        assert torch.equal(model.lm_head.weight, stored[HEAD].float())
    else:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 200]])).logits
    assert logits.shape == (1, 4, ROWS) and torch.isfinite(logits).all()

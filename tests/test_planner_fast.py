"""The merge kind's expansion on in-memory model descriptions: no model files, no tensors, milliseconds.

Each test describes a few tiny "models" as `io.ModelInfo` tables of `io.TensorInfo` (what a
source's safetensors headers and config would give the planner), parses a one-target Mergefile
whose models are hub IDs (so nothing is looked up on disk), and calls
`mbuild.plan.kinds.merge.expand` directly, as `plan.planner` does for each target.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mbuild import io, keys, mergefile
from mbuild.errors import MergefileError
from mbuild.plan.kinds import merge
from mbuild.plan.tasks import DEFAULT_SHARD_BYTES, TargetPlan

# Never created: the Mergefile's folder anchors messages, and its model names are hub IDs.
NOWHERE = Path("/nonexistent-mbuild-fast-planner")
HIDDEN, VOCAB = 4, 10


def node(repo: str) -> str:
    """The graph node of a hub model at its default revision, as the lock and manifests write it."""
    return f"hub:{repo}@main"


def model(layers: int, *, tied: bool = False, architecture: str = "LlamaForCausalLM", biases: bool = False) -> io.ModelInfo:
    """A Llama-shaped model's header table: an embedding, `layers` decoder layers, a norm and (untied) a head."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        shapes[prefix + "input_layernorm.weight"] = (HIDDEN,)
        shapes[prefix + "self_attn.q_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[prefix + "mlp.up_proj.weight"] = (2 * HIDDEN, HIDDEN)
        if biases:
            shapes[prefix + "self_attn.q_proj.bias"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    if not tied:
        shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    config = {
        "architectures": [architecture],
        "num_hidden_layers": layers,
        "hidden_size": HIDDEN,
        "vocab_size": VOCAB,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
    }
    tensors = {name: io.TensorInfo(name, "bfloat16", shape, None) for name, shape in shapes.items()}
    return io.ModelInfo(folder=None, config=config, tensors=tensors)


def expand(
    text: str, infos: dict[str, io.ModelInfo], name: str = "x", *, digests=None, plans=None, output_digest=None
) -> TargetPlan:
    """Expand target `name` of Mergefile `text`; sources' digests unknown unless given."""
    target = mergefile.parse(text, NOWHERE / "Mergefile").targets[name]
    source_digests = {node: (digests or {}).get(node) for node in infos}
    return merge.expand(
        target,
        infos,
        plans or {},
        source_digests,
        DEFAULT_SHARD_BYTES,
        output_digest or (lambda key: None),
        NOWHERE / "cache",
        platform="test-cpu",
    )


def digest(text: str) -> str:
    """A made-up 64-hex-digit digest (the planner only compares and records them)."""
    return hashlib.sha256(text.encode()).hexdigest()


def digests_of(info: io.ModelInfo, salt: str) -> dict[str, str]:
    """Made-up tensor digests, different per model (`salt`) and per tensor."""
    return {name: digest(f"{salt}:{name}") for name in info.tensors}


def refusal(text: str, infos: dict[str, io.ModelInfo]) -> MergefileError:
    with pytest.raises(MergefileError) as caught:
        expand(text, infos)
    return caught.value


SLICES = """targets:
  x:
    merge_method: passthrough
    slices:
      - sources: [{{model: acme/base, layer_range: [0, {end}]}}]
      - sources: [{{model: acme/math, layer_range: [1, 3]}}]
"""

LINEAR = """targets:
  x:
    merge_method: linear
    models:
      - model: acme/{first}
        parameters: {{weight: 0.3}}
      - model: acme/{second}
        parameters: {{weight: 0.7}}
{extra}"""


def linear(first: str, second: str, extra: str = "") -> str:
    return LINEAR.format(first=first, second=second, extra=extra)


def test_a_layer_range_past_the_models_layers_is_refused_at_its_line():
    infos = {node("acme/base"): model(3), node("acme/math"): model(3)}
    error = refusal(SLICES.format(end=4), infos)
    assert "layer_range [0, 4] is out of range: 'acme/base' has 3 layers" in error.message
    assert (error.location.line, error.location.target) == (5, "x")
    assert expand(SLICES.format(end=3), infos).num_layers == 5  # the last layer itself is in range


def test_slices_renumber_layers_and_take_the_ends_from_the_first_and_last_slice():
    infos = {node("acme/base"): model(3), node("acme/math"): model(3)}
    plan = expand(SLICES.format(end=2), infos)
    suffixes = ("input_layernorm.weight", "mlp.up_proj.weight", "self_attn.q_proj.weight")
    layers = [f"model.layers.{layer}.{suffix}" for layer in range(4) for suffix in suffixes]
    assert sorted(task.name for task in plan.tasks) == sorted(
        ["model.embed_tokens.weight", *layers, "model.norm.weight", "lm_head.weight"]
    )
    # Output layers 0-1 are base's 0-1; output layers 2-3 are math's 1-2.
    origin = {task.name: (task.inputs[0].node, task.inputs[0].name) for task in plan.tasks}
    assert origin["model.layers.1.mlp.up_proj.weight"] == (node("acme/base"), "model.layers.1.mlp.up_proj.weight")
    assert origin["model.layers.2.mlp.up_proj.weight"] == (node("acme/math"), "model.layers.1.mlp.up_proj.weight")
    assert origin["model.layers.3.self_attn.q_proj.weight"] == (node("acme/math"), "model.layers.2.self_attn.q_proj.weight")
    assert origin["model.embed_tokens.weight"] == (node("acme/base"), "model.embed_tokens.weight")
    assert origin["model.norm.weight"] == (node("acme/math"), "model.norm.weight")
    assert origin["lm_head.weight"] == (node("acme/math"), "lm_head.weight")
    assert plan.num_layers == 4 and plan.config["num_hidden_layers"] == 4
    assert {task.method for task in plan.tasks} == {"passthrough"}


def test_a_tied_models_head_is_read_from_its_embedding():
    infos = {node("acme/untied"): model(2), node("acme/tied"): model(2, tied=True)}
    plan = expand(linear("untied", "tied"), infos)
    head = plan.task("lm_head.weight")
    assert [(i.node, i.name) for i in head.inputs] == [
        (node("acme/untied"), "lm_head.weight"),
        (node("acme/tied"), "model.embed_tokens.weight"),
    ]
    assert head.shape == (VOCAB, HIDDEN) and plan.dropped == ()


def test_mixed_architectures_are_refused_unless_allowed_and_then_the_untaken_tensors_are_listed():
    infos = {node("acme/llama"): model(2), node("acme/qwen"): model(2, architecture="Qwen2ForCausalLM", biases=True)}
    error = refusal(linear("llama", "qwen"), infos)
    assert "different architectures ('acme/llama' is LlamaForCausalLM, 'acme/qwen' is Qwen2ForCausalLM)" in error.message
    assert error.location.target == "x"
    plan = expand(linear("llama", "qwen", "    allow_mixed_architectures: true\n"), infos)
    assert plan.dropped == (
        "acme/qwen@main: model.layers.0.self_attn.q_proj.bias",
        "acme/qwen@main: model.layers.1.self_attn.q_proj.bias",
    )
    assert plan.task("model.layers.0.self_attn.q_proj.bias") is None
    assert plan.config["architectures"] == ["LlamaForCausalLM"]  # the first model's


def test_tensors_no_output_takes_are_refused_and_named_even_within_one_architecture():
    infos = {node("acme/llama"): model(2), node("acme/biased"): model(2, biases=True)}
    error = refusal(linear("llama", "biased"), infos)
    assert "model 'acme/biased@main' has 2 tensor(s) that no output tensor takes" in error.message
    assert "model.layers.0.self_attn.q_proj.bias, model.layers.1.self_attn.q_proj.bias" in error.message


def test_keys_are_unknown_without_digests_and_known_and_repeatable_with_them():
    base, math = model(2), model(2)
    infos = {node("acme/base"): base, node("acme/math"): math}
    text = linear("base", "math")
    unknown = expand(text, infos)
    assert unknown.key is None and [task.key for task in unknown.tasks] == [None] * len(unknown.tasks)

    digests = {node("acme/base"): digests_of(base, "base"), node("acme/math"): digests_of(math, "math")}
    first, again = expand(text, infos, digests=digests), expand(text, infos, digests=digests)
    first_keys = {task.name: task.key for task in first.tasks}
    assert None not in first_keys.values() and len(set(first_keys.values())) == len(first_keys)
    assert first.key is not None and not first.pending
    assert {task.name: task.key for task in again.tasks} == first_keys and again.key == first.key

    # One source tensor's bytes changed: exactly the task reading it gets a new key, and the target.
    changed = {**digests, node("acme/math"): {**digests[node("acme/math")], "model.norm.weight": "0" * 64}}
    other = expand(text, infos, digests=changed)
    moved = {task.name for task in other.tasks if task.key != first_keys[task.name]}
    assert moved == {"model.norm.weight"} and other.key != first.key

    # A tensor whose digest is missing leaves its task's key, and so the target's, unknown.
    partial = {**digests, node("acme/math"): {k: v for k, v in digests[node("acme/math")].items() if k != "lm_head.weight"}}
    some = expand(text, infos, digests=partial)
    assert [task.name for task in some.tasks if task.key is None] == ["lm_head.weight"] and some.key is None


def test_a_key_downstream_of_a_target_waits_on_its_bytes_then_names_them():
    text = """targets:
  up:
    merge_method: linear
    models:
      - model: acme/base
        parameters: {weight: 0.5}
      - model: acme/math
        parameters: {weight: 0.5}
  down:
    merge_method: passthrough
    models: [{model: up}]
"""
    base, math = model(2), model(2)
    infos = {node("acme/base"): base, node("acme/math"): math}
    digests = {node("acme/base"): digests_of(base, "base"), node("acme/math"): digests_of(math, "math")}
    up = expand(text, infos, "up", digests=digests)
    downstream = {"target:up": up.model_info()}
    waiting = expand(text, downstream, "down", plans={"up": up})
    assert waiting.pending
    assert [task.inputs[0].key for task in waiting.tasks] == [keys.pending_key(up.task(t.name).key) for t in waiting.tasks]
    made = {task.key: digest(task.name) for task in up.tasks}
    known = expand(text, downstream, "down", plans={"up": up}, output_digest=made.get)
    assert not known.pending and known.key not in (None, waiting.key)
    norm = known.task("model.norm.weight").inputs[0]
    assert (norm.node, norm.key) == ("target:up", keys.content_key(made[up.task("model.norm.weight").key], "bfloat16", (HIDDEN,)))

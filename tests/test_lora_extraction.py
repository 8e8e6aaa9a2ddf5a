"""LoRA extraction targets (`extract_lora: {model: ..., base: ..., rank: N}`): the PEFT adapter
loaded onto the base by PEFT itself, its reconstruction of the tuned model as the rank grows,
building like any target, and malformed bodies.

On the tiny Llama family (hidden size 64, so every projection has rank at most 64), the
relative error ‖merged − tuned‖ / ‖tuned − base‖ over the covered projections falls with the
rank and is float32 round-off at rank 64.
"""

from __future__ import annotations

import json
import warnings

import pytest

from conftest import build_json, run_cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_mergefile(workspace, llama, targets: dict[str, int]):
    """A Mergefile with one extraction of `math` over `base` per (name -> rank)."""
    lines = ["targets:"]
    for name, rank in targets.items():
        lines += [f"  {name}:", f"    extract_lora: {{model: {llama['math']}, base: {llama['base']}, rank: {rank}}}"]
    return workspace.write("\n".join(lines) + "\n")


def load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def covered(state) -> dict:
    return {k: v for k, v in state.items() if any(f".{m}.weight" in k for m in MODULES) and ".layers." in k}


def with_adapter(family, folder):
    """The family's base with the adapter in ``folder`` loaded by PEFT (a missing or unexpected key fails)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns of missing or unexpected adapter keys
        return peft.PeftModel.from_pretrained(load(family["base"]), folder)


def reconstruction_error(merged, tuned_state, base_state) -> float:
    """‖merged − tuned‖ / ‖tuned − base‖ over the covered projections."""
    num = sum(float((merged[k] - tuned_state[k]).norm() ** 2) for k in merged)
    den = sum(float((tuned_state[k] - base_state[k]).norm() ** 2) for k in merged)
    return (num / den) ** 0.5


def test_peft_loads_the_adapter_and_the_error_falls_with_the_rank(workspace, llama):
    ranks = {"r4": 4, "r16": 16, "r64": 64}
    build_json(lora_mergefile(workspace, llama, ranks))
    base_state, tuned_state = covered(load(llama["base"]).state_dict()), covered(load(llama["math"]).state_dict())
    assert len(base_state) == 8 * len(MODULES)
    errors = {}
    for name, rank in ranks.items():
        folder = workspace.root / "build" / name
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["r"] == rank and config["lora_alpha"] == rank
        assert sorted(config["target_modules"]) == sorted(MODULES)
        saved = safetensors_torch.load_file(folder / "adapter_model.safetensors")
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in saved
        assert {t.dtype for t in saved.values()} == {torch.float32}
        model = with_adapter(llama, folder)
        # Every LoRA weight of the model came from the file, and every tensor of the file went in.
        lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        assert len(lora) == len(saved) == 2 * len(base_state)
        for key, value in saved.items():
            loaded = lora[key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")]
            assert torch.equal(loaded, value), key
        merged = covered(model.merge_and_unload().state_dict())
        assert set(merged) == set(tuned_state)
        errors[rank] = reconstruction_error(merged, tuned_state, base_state)
    assert errors[4] > errors[16] > errors[64], errors
    assert errors[4] > 0.1 and errors[64] < 1e-5, errors


@pytest.mark.parametrize("architecture", ["mistral", "qwen2"])
def test_mistral_and_qwen2_adapters_load_in_peft_and_reconstruct(workspace, families, architecture):
    """Mistral (Llama's projections, sliding-window config) and Qwen2 (biased q/k/v, tied
    embeddings): the adapter covers every projection, PEFT loads it, and the merge comes back to
    the tuned projections at full rank. Biases are not a LoRA's: the merge keeps the base's."""
    family = families(architecture)
    build_json(lora_mergefile(workspace, family, {"r4": 4, "r64": 64}))
    base_model, tuned_model = load(family["base"]).state_dict(), load(family["math"]).state_dict()
    base_state, tuned_state = covered(base_model), covered(tuned_model)
    layers = json.loads((family["base"] / "config.json").read_text())["num_hidden_layers"]
    assert len(base_state) == layers * len(MODULES)
    errors = {}
    for name, rank in {"r4": 4, "r64": 64}.items():
        folder = workspace.root / "build" / name
        assert sorted(json.loads((folder / "adapter_config.json").read_text())["target_modules"]) == sorted(MODULES)
        merged_model = with_adapter(family, folder).merge_and_unload().state_dict()
        merged = covered(merged_model)
        assert set(merged) == set(tuned_state)
        errors[rank] = reconstruction_error(merged, tuned_state, base_state)
        biases = [k for k in base_model if k.endswith("_proj.bias")]
        assert bool(biases) == (architecture == "qwen2")
        for key in biases:
            assert torch.equal(merged_model[key], base_model[key]) and not torch.equal(tuned_model[key], base_model[key])
    assert errors[4] > 0.1 and errors[64] < 1e-5, errors


def test_a_second_build_does_nothing_and_a_new_rank_rebuilds(workspace, llama):
    path = lora_mergefile(workspace, llama, {"ad": 8})
    planned = json.loads(run_cli("-f", str(path), "--dry-run", "--json")[1])["targets"]
    assert planned["ad"]["method"] == "extract_lora" and planned["ad"]["stale"]
    first = build_json(path)
    assert first["ad"]["status"] == "built" and first["ad"]["tensors_computed"] == 2 * 8 * len(MODULES)
    adapter = workspace.root / "build" / "ad" / "adapter_model.safetensors"
    built = adapter.read_bytes()

    again = build_json(path)
    assert again["ad"]["status"] == "fresh" and again["ad"]["tensors_computed"] == 0

    changed = build_json(lora_mergefile(workspace, llama, {"ad": 12}))
    assert changed["ad"]["status"] == "built" and changed["ad"]["tensors_computed"] == 2 * 8 * len(MODULES)
    assert json.loads((adapter.parent / "adapter_config.json").read_text())["r"] == 12
    assert safetensors_torch.load_file(adapter)["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"].shape[0] == 12

    back = build_json(lora_mergefile(workspace, llama, {"ad": 8}))  # from the cache, the same bytes
    assert back["ad"]["status"] == "built" and back["ad"]["tensors_computed"] == 0
    assert adapter.read_bytes() == built


def test_factors_do_not_depend_on_jobs(workspace, llama):
    path = lora_mergefile(workspace, llama, {"ad": 8})
    build_json(path, "-j", "1")
    one = (workspace.root / "build" / "ad" / "adapter_model.safetensors").read_bytes()
    build_json(path, "-j", "2", "--force")
    assert (workspace.root / "build" / "ad" / "adapter_model.safetensors").read_bytes() == one


@pytest.mark.parametrize(
    "spec, message",
    [
        ("{model: MATH, base: BASE}", "'extract_lora' needs 'rank:'"),
        ("{model: MATH, base: BASE, rank: 0}", "'rank' must be a whole number of at least 1"),
        ("{model: MATH, base: BASE, rank: 4.5}", "'rank' must be a whole number of at least 1"),
        ("{model: MATH, base: BASE, rank: 4, alpha: 8}", "alpha"),
        ("{model: MATH, rank: 4}", "'extract_lora' needs 'base:'"),
        ("MATH", "'extract_lora' is a mapping"),
    ],
)
def test_bad_bodies_are_one_error_with_their_line(workspace, llama, spec, message):
    spec = spec.replace("MATH", str(llama["math"])).replace("BASE", str(llama["base"]))
    path = workspace.write(
        f"targets:\n  final:\n    merge_method: linear\n    models:\n      - model: {llama['base']}\n  out:\n    extract_lora: {spec}\n"
    )
    code, out, err = run_cli("-f", str(path), "--dry-run")
    assert code != 0 and message in err and "Mergefile:7" in err and "out" in err, err


def test_an_adapter_is_no_model_for_another(workspace, llama):
    path = workspace.write(
        f"targets:\n  out:\n    extract_lora: {{model: {llama['math']}, base: {llama['base']}, rank: 4}}\n"
        "  again:\n    merge_method: linear\n    models:\n      - model: out\n"
    )
    code, _, err = run_cli("-f", str(path), "--dry-run")
    assert code != 0 and "'out' is a LoRA extraction target" in err and "Mergefile:7" in err, err


def test_modules_and_exclude_choose_the_projections(workspace, llama):
    path = workspace.write(
        "targets:\n  ad:\n"
        f"    extract_lora: {{model: {llama['math']}, base: {llama['base']}, rank: 64,"
        " modules: ['self_attn'], exclude: 'layers\\.3\\.self_attn\\.k_proj'}\n"
    )
    report = build_json(path)
    assert report["ad"]["tensors_computed"] == 2 * (8 * 4 - 1)
    folder = workspace.root / "build" / "ad"
    config = json.loads((folder / "adapter_config.json").read_text())
    # k_proj is left out of one layer: named layer by layer, so PEFT adds no layer it has no tensors for.
    assert "q_proj" in config["target_modules"] and "k_proj" not in config["target_modules"]
    assert "model.layers.2.self_attn.k_proj" in config["target_modules"]
    assert "model.layers.3.self_attn.k_proj" not in config["target_modules"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = peft.PeftModel.from_pretrained(load(llama["base"]), folder)
    assert len([k for k in model.state_dict() if "lora_" in k]) == 2 * (8 * 4 - 1)
    merged = model.merge_and_unload().state_dict()
    base, tuned = load(llama["base"]).state_dict(), load(llama["math"]).state_dict()
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.2.self_attn.k_proj.weight"):
        assert torch.allclose(merged[key], tuned[key], atol=1e-5), key
    for key in ("model.layers.3.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight"):
        assert torch.equal(merged[key], base[key]), key


@pytest.mark.parametrize(
    "extra, message",
    [("modules: '('", "is not a regular expression"), ("exclude: [1]", "a regular expression or a list"),
     ("modules: nothing_matches", "that 'modules' and 'exclude' choose")],
)
def test_bad_patterns_are_refused(workspace, llama, extra, message):
    path = workspace.write(
        f"targets:\n  out:\n    extract_lora: {{model: {llama['math']}, base: {llama['base']}, rank: 4, {extra}}}\n"
    )
    code, _, err = run_cli("-f", str(path), "--dry-run")
    assert code != 0 and message in err and "Mergefile:3" in err, err

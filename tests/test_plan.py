"""The plan: graph checks against real model headers, tensor expansion, and staleness rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import build_json
from mbuild import engine, mergefile, plan, staleness
from mbuild.cache import State
from mbuild.errors import MbuildError, MergefileError

CHAIN = """
targets:
  franken:
    merge_method: passthrough
    slices:
      - sources: [{{model: {base}, layer_range: [0, 6]}}]
      - sources: [{{model: {base}, layer_range: [4, 8]}}]
  franken-math:
    merge_method: passthrough
    slices:
      - sources: [{{model: {math}, layer_range: [0, 6]}}]
      - sources: [{{model: {math}, layer_range: [4, 8]}}]
  tuned:
    merge_method: ties
    base_model: franken
    models:
      - model: franken-math
        parameters: {{weight: 1.0, density: 0.5}}
  final:
    merge_method: slerp
    base_model: franken
    models: [{{model: franken}}, {{model: tuned}}]
    parameters:
      t:
        - filter: self_attn
          value: {attn_t}
        - value: 0.5
  side:
    merge_method: linear
    models:
      - model: {base}
        parameters: {{weight: 0.5}}
      - model: {code}
        parameters: {{weight: 0.5}}
"""


def chain(family, attn_t="0.3") -> str:
    return CHAIN.format(base=family["base"], math=family["math"], code=family["code"], attn_t=attn_t)


def status(path: Path) -> dict[str, staleness.Decision]:
    parsed = mergefile.load(path)
    state = State(path.parent / "cache")
    the_plan = plan.make_plan(
        parsed,
        (),
        lambda s: state.digests(s.info, compute=False),
        output_digest=engine.output_digests(state, parsed),
        store=state.folder,
    )
    return staleness.decide_all(the_plan, state)


def test_expansion_renumbers_passthrough_layers_and_resolves_gradients(llama, tmp_path):
    path = tmp_path / "Mergefile"
    path.write_text(chain(llama, attn_t="[0.0, 1.0]"))
    the_plan = plan.make_plan(mergefile.load(path), store=path.parent / "cache")
    franken = the_plan.targets["franken"]
    assert franken.num_layers == 10
    assert franken.config["num_hidden_layers"] == 10
    # Output layer 6 is source layer 4 of the second slice.
    task = next(t for t in franken.tasks if t.name == "model.layers.6.mlp.up_proj.weight")
    assert task.inputs[0].name == "model.layers.4.mlp.up_proj.weight"
    final = the_plan.targets["final"]
    t_of = {task.name: dict(task.params)["t"] for task in final.tasks}
    # The gradient runs over the 10 layers of the single slice: layer 0 -> 0, layer 9 -> 1.
    assert t_of["model.layers.0.self_attn.q_proj.weight"] == 0.0
    assert t_of["model.layers.9.self_attn.q_proj.weight"] == 1.0
    assert t_of["model.layers.3.self_attn.q_proj.weight"] == pytest.approx(3 / 9)
    assert t_of["model.layers.3.mlp.up_proj.weight"] == 0.5
    # Tensors outside the layer stack take the gradient's first value (t = 0).
    assert t_of["model.embed_tokens.weight"] == 0.5  # not self_attn: the fallback rule
    assert [n for n in the_plan.order] == ["franken", "franken-math", "tuned", "final", "side"]


def test_a_frankenmerge_config_lists_each_indexed_layer_where_its_source_layer_went():
    """Lists of layer indices (Qwen-MoE's dense layers, Mllama's cross-attention ones) follow the layers."""
    from types import SimpleNamespace

    from mbuild.plan.companions import output_config

    first = {"num_hidden_layers": 3, "mlp_only_layers": [0], "layer_types": ["a", "b", "c"]}
    second = {"num_hidden_layers": 3, "mlp_only_layers": [2], "layer_types": ["a", "b", "c"]}
    infos = {"first": SimpleNamespace(config=first), "second": SimpleNamespace(config=second)}
    origin = [("first", 0), ("first", 1), ("second", 1), ("second", 2)]
    config = output_config(first, infos, origin, [])
    assert (config["num_hidden_layers"], config["mlp_only_layers"]) == (4, [0, 3])
    assert config["layer_types"] == ["a", "b", "b", "c"]  # one entry per layer, as before
    assert output_config(first, infos, origin[:3], [])["mlp_only_layers"] == [0]
    nested = {"text_config": {"num_hidden_layers": 3, "cross_attention_layers": [1]}}
    infos = {"first": SimpleNamespace(config=nested), "second": SimpleNamespace(config=nested)}
    assert output_config(nested, infos, origin, [])["text_config"]["cross_attention_layers"] == [1, 2]


def test_selecting_a_target_pulls_in_only_its_ancestors(llama, tmp_path):
    path = tmp_path / "Mergefile"
    path.write_text(chain(llama))
    the_plan = plan.make_plan(mergefile.load(path), ["tuned"], store=path.parent / "cache")
    assert the_plan.order == ("franken", "franken-math", "tuned")


def test_each_target_is_taken_by_the_kind_registered_for_it(llama, tmp_path):
    from mbuild.plan import kinds

    path = tmp_path / "Mergefile"
    path.write_text(
        chain(llama)
        + f"  moe:\n    base_model: {llama['base']}\n    experts:\n"
        + f"      - {{source_model: {llama['math']}, positive_prompts: [maths]}}\n"
        + f"      - {{source_model: {llama['code']}, positive_prompts: [code]}}\n"
    )
    targets = mergefile.load(path).targets
    assert {name: kinds.kind_of(target).name for name, target in targets.items()} == {
        "franken": "merge", "franken-math": "merge", "tuned": "merge", "final": "merge", "side": "merge", "moe": "moe",
    }
    assert plan.recipe_method(targets["tuned"])[0] == "ties"
    assert plan.recipe_method(targets["moe"]) == ("moe", 2, "https://arxiv.org/abs/2401.04088")
    with pytest.raises(ValueError, match="already registered"):
        kinds.register(kinds.kind_of(targets["moe"]))


@pytest.mark.parametrize(
    "recipe, fragment, line",
    [
        (
            "targets:\n  a:\n    merge_method: passthrough\n    slices:\n      - sources: [{{model: {base}, layer_range: [0, 9]}}]\n",
            "out of range: '{base}' has 8 layers",
            5,
        ),
        (
            "targets:\n  a:\n    merge_method: linear\n    models:\n      - model: {base}\n        parameters: {{weight: 1}}\n      - model: b\n        parameters: {{weight: 1}}\n  b:\n    merge_method: passthrough\n    slices:\n      - sources: [{{model: {base}, layer_range: [0, 4]}}]\n",
            "different layer counts",
            4,
        ),
        (
            "targets:\n  a:\n    merge_method: slerp\n    base_model: b\n    models: [{{model: b}}, {{model: {base}}}]\n    parameters: {{t: 0.5}}\n  b:\n    merge_method: slerp\n    base_model: a\n    models: [{{model: a}}, {{model: {base}}}]\n    parameters: {{t: 0.5}}\n",
            "dependency cycle",
            None,
        ),
    ],
)
def test_model_level_mistakes_are_caught_before_work(llama, tmp_path, recipe, fragment, line):
    path = tmp_path / "Mergefile"
    path.write_text(recipe.format(base=llama["base"]))
    with pytest.raises(MergefileError) as caught:
        plan.make_plan(mergefile.load(path), store=path.parent / "cache")
    assert fragment.format(base=llama["base"]) in caught.value.message
    assert caught.value.location.file == path
    if line:
        assert caught.value.location.line == line
    assert caught.value.location.target in ("a", "b")


def test_shape_mismatch_names_the_tensor_and_models(llama, tmp_path):
    import make_models

    wide = make_models.make_model(tmp_path / "wide", "llama", overrides={"intermediate_size": 96})
    path = tmp_path / "Mergefile"
    path.write_text(
        f"targets:\n  x:\n    merge_method: slerp\n    base_model: {llama['base']}\n"
        f"    models: [{{model: {llama['base']}}}, {{model: wide}}]\n    parameters: {{t: 0.5}}\n"
    )
    with pytest.raises(MbuildError) as caught:
        plan.make_plan(mergefile.load(path), store=path.parent / "cache")
    message = caught.value.message
    assert "shape mismatch for tensor 'model.layers.0.mlp.down_proj.weight'" in message
    assert "[64, 128]" in message and "'wide' [64, 96]" in message
    assert caught.value.location.target == "x"


def test_pickled_checkpoints_are_refused_unless_allowed(llama, tmp_path):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((llama["base"] / "config.json").read_text())
    state = load_file(llama["base"] / "model.safetensors")
    torch.save(state, pickled / "pytorch_model.bin")
    path = tmp_path / "Mergefile"
    path.write_text(f"targets:\n  x:\n    merge_method: passthrough\n    models: [{{model: pickled}}]\n")
    with pytest.raises(MbuildError) as caught:
        plan.make_plan(mergefile.load(path), store=path.parent / "cache")
    assert "pickled" in caught.value.message and "--allow-pickle" in caught.value.message
    assert caught.value.location.line == 4
    from mbuild.pickles import Conversions

    allowed = plan.make_plan(
        mergefile.load(path), pickles=Conversions(tmp_path / "converted", None, write=True), store=path.parent / "cache"
    )
    assert len(allowed.targets["x"].tasks) == len(state)


def test_each_target_is_expanded_once_per_change_not_once_per_target(llama, tmp_path, monkeypatch):
    from mbuild.plan import planner

    names = [f"t{i}" for i in range(6)]
    path = tmp_path / "Mergefile"
    path.write_text("targets:\n" + "".join(
        f"  {name}:\n    merge_method: linear\n    models:\n"
        f"      - {{model: {llama['base']}, parameters: {{weight: {i + 1}}}}}\n"
        f"      - {{model: {llama['math']}, parameters: {{weight: 1}}}}\n"
        for i, name in enumerate(names)
    ))
    build_json(path, "-j", "1")  # sources hashed: the plan over remembered digests is then the build's plan
    path.write_text(path.read_text().replace("weight: 1}}", "weight: 0.5}}"))
    calls = []
    real = planner.expand
    monkeypatch.setattr(planner, "expand", lambda target, *a, **k: calls.append(target.name) or real(target, *a, **k))
    report = build_json(path, "-j", "1")
    assert all(report[n]["status"] == "built" for n in names)
    assert sorted(calls) == sorted(names)  # independent targets: nothing to re-expand after each build


class TestStaleness:
    def test_fresh_after_build_then_one_edit_makes_exactly_it_and_dependents_stale(self, llama, tmp_path):
        path = tmp_path / "Mergefile"
        path.write_text(chain(llama))
        assert all(d.stale for d in status(path).values())
        build_json(path)
        assert not any(d.stale for d in status(path).values())
        path.write_text(chain(llama, attn_t="0.7"))
        decisions = status(path)
        assert {n for n, d in decisions.items() if d.stale} == {"final"}
        assert "parameters.t[0].value: 0.3 → 0.7" in decisions["final"].reasons

    def test_an_upstream_edit_cascades_with_the_reason(self, llama, tmp_path):
        path = tmp_path / "Mergefile"
        path.write_text(chain(llama))
        build_json(path)
        path.write_text(chain(llama).replace("density: 0.5", "density: 0.6"))
        decisions = status(path)
        assert {n for n, d in decisions.items() if d.stale} == {"tuned", "final"}
        assert "models[0].parameters.density: 0.5 → 0.6" in decisions["tuned"].reasons
        assert "input tuned: rebuilt" in decisions["final"].reasons

    def test_changed_source_bytes_make_its_dependents_stale(self, families, tmp_path):
        import shutil

        family = {k: tmp_path / k for k in ("base", "math", "code")}
        for name, folder in family.items():
            shutil.copytree(families("llama")[name], folder)
        path = tmp_path / "Mergefile"
        path.write_text(chain(family))
        build_json(path)
        weights = family["code"] / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-2] ^= 0x40  # flip a bit of the last tensor
        weights.write_bytes(bytes(data))
        decisions = status(path)
        assert {n for n, d in decisions.items() if d.stale} == {"side"}
        assert any("source code: changed on disk" in r for r in decisions["side"].reasons)
        report = build_json(path)
        assert report["side"]["status"] == "built"
        assert not any(d.stale for d in status(path).values())

    def test_modified_or_missing_output_is_stale(self, llama, tmp_path):
        import shutil

        path = tmp_path / "Mergefile"
        path.write_text(chain(llama))
        build_json(path)
        weights = tmp_path / "build" / "side" / "model.safetensors"
        os.utime(weights, ns=(1, 1))
        shutil.rmtree(tmp_path / "build" / "franken-math")
        decisions = status(path)
        assert decisions["side"].reasons == ("output modified: model.safetensors changed",)
        assert decisions["franken-math"].reasons == ("output missing",)
        # Rebuilding franken-math gives the same bytes, so its dependents stay fresh.
        assert not decisions["tuned"].stale

    def test_an_edit_recomputes_only_the_tensors_it_touches(self, llama, tmp_path):
        path = tmp_path / "Mergefile"
        path.write_text(chain(llama))
        build_json(path)
        path.write_text(chain(llama, attn_t="0.9"))
        report = build_json(path, "final")
        final = report["final"]
        assert final["reasons"] == ["parameters.t[0].value: 0.3 → 0.9"]
        # Only the self_attn tensors change: 4 per layer x 10 layers, of which output
        # layers 6-7 repeat layers 4-5 (same task, computed once).
        assert final["tensors_computed"] == 32
        assert final["tensors_reused"] == len(_names(tmp_path / "build/final")) - 32
        path.write_text(chain(llama))
        undone = build_json(path, "final")["final"]
        assert undone["status"] == "built"
        assert undone["tensors_computed"] == 0  # undoing an edit: everything comes from the cache

    def test_noop_reads_no_tensor_and_imports_no_torch(self, llama, tmp_path):
        path = tmp_path / "Mergefile"
        path.write_text(chain(llama))
        build_json(path)
        script = (
            "import sys, json; from mbuild.cli import main; "
            f"code = main(['all', '-f', {str(path)!r}, '--json']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(code)"
        )
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)["targets"]
        assert {r["status"] for r in report.values()} == {"fresh"}
        assert all(r["tensors_computed"] == 0 for r in report.values())
        dry = script.replace("'--json']", "'--json', '--dry-run']")
        result = subprocess.run([sys.executable, "-c", dry], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert not any(r["stale"] for r in json.loads(result.stdout)["targets"].values())


def _names(folder: Path) -> list[str]:
    from mbuild import io

    return list(io.read_model(folder).tensors)

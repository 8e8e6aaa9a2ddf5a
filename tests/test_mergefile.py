"""Mergefile parsing and validation: every mistake names the file, the line and the target."""

from __future__ import annotations

from pathlib import Path

import pytest

from mbuild import mergefile, parameters
from mbuild.errors import MergefileError
from mbuild import methods


def parse(text: str, folder: Path) -> mergefile.Mergefile:
    return mergefile.parse(text, folder / "Mergefile")


def error_of(text: str, folder: Path) -> MergefileError:
    with pytest.raises(MergefileError) as caught:
        parse(text, folder)
    return caught.value


@pytest.fixture
def models(tmp_path):
    """Two empty model folders are enough for text-level validation."""
    for name in ("a", "b", "base"):
        (tmp_path / name).mkdir()
    return tmp_path


def test_parses_a_family_with_target_references(models):
    parsed = parse(
        """
defaults:
  dtype: bf16
targets:
  franken:
    merge_method: passthrough
    slices:
      - sources: [{model: a, layer_range: [0, 2]}]
      - sources: [{model: a, layer_range: [1, 3]}]
  tuned:
    merge_method: ties
    base_model: franken
    models:
      - model: b
        parameters: {weight: 0.5, density: 0.7}
    seed: 7
""",
        models,
    )
    assert list(parsed.targets) == ["franken", "tuned"]
    tuned = parsed.targets["tuned"]
    assert tuned.base_model.kind == "target" and tuned.base_model.location == "franken"
    assert tuned.models[0].model.kind == "local"
    assert tuned.models[0].model.location == str(models / "b")
    assert tuned.dtype == "bfloat16"  # alias normalised, taken from defaults
    assert tuned.seed == 7
    assert tuned.output == models / "build" / "tuned"
    assert parsed.targets["franken"].slices[1].sources[0].layer_range == (1, 3)
    assert [r.text for r in tuned.references()] == ["b", "franken"]


def test_target_names_are_resolved_only_where_models_stand(models):
    # A filter that happens to equal a target name stays a plain string.
    parsed = parse(
        """
targets:
  mlp:
    merge_method: linear
    models: [{model: a, parameters: {weight: 1.0}}, {model: b, parameters: {weight: 1.0}}]
  other:
    merge_method: slerp
    base_model: mlp
    models: [{model: mlp}, {model: a}]
    parameters:
      t: [{filter: mlp, value: 0.2}, {value: 0.5}]
""",
        models,
    )
    assert parsed.targets["other"].parameters["t"][0]["filter"] == "mlp"


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("targets:\n  x:\n    merge_method: linear\n    modles: []\n", 4, "unknown key 'modles' (did you mean 'models'?)"),
        ("targets:\n  x:\n    merge_method: tie\n    models: [{model: a}]\n", 3, "unknown merge_method 'tie' (did you mean 'ties'?)"),
        ("targets:\n  x:\n    merge_method: linear\n    models:\n      - model: nowhere/../../zz\n", 5, "not found"),
        (
            "targets:\n  x:\n    merge_method: slerp\n    base_model: a\n    models: [{model: a}, {model: b}]\n    parameters:\n      t: 1.5\n",
            7,
            "bad value for 't'",
        ),
        (
            "targets:\n  x:\n    merge_method: passthrough\n    slices:\n      - sources:\n          - model: a\n            layer_range: [4, 4]\n",
            7,
            "empty",
        ),
        (
            "targets:\n  x:\n    merge_method: linear\n    models:\n      - model: a\n      - model: ./a\n",
            6,
            "listed twice",
        ),
        ("targets:\n  x:\n    merge_method: ties\n    models: [{model: a, parameters: {weight: 1}}]\n", 4, "needs a 'base_model'"),
        ("targets:\n  x:\n    merge_method: linear\n    models: [{model: a, parameters: {wieght: 1}}]\n", 4, "unknown parameter 'wieght'"),
        ("targets:\n  x:\n    merge_method: linear\n    dtype: float8\n    models: [{model: a}]\n", 4, "unknown dtype"),
        ("targets:\n  x: [1, 2\n", 3, "invalid YAML"),
        ("targets:\n  x:\n    merge_method: linear\n    models: [{model: a}]\n  x:\n    merge_method: linear\n", 5, "duplicate key 'x'"),
        ("targets:\n  x:\n    merge_method: linear\n    models: [{model: a}]\n    seed: -1\n", 5, "'seed' must be"),
        ("targetz: {}\n", 1, "unknown key 'targetz'"),
    ],
)
def test_each_mistake_names_file_line_and_target(models, text, line, fragment):
    error = error_of(text, models)
    assert fragment in error.message
    assert error.location.file == models / "Mergefile"
    assert error.location.line == line
    rendered = str(error)
    assert rendered.startswith(f"{models / 'Mergefile'}:{line}")
    if "targets:\n  x:" in text and "YAML" not in fragment and "duplicate" not in fragment:
        assert error.location.target == "x"


def test_unknown_target_reference_suggests_the_close_name(models):
    error = error_of(
        """targets:
  franken:
    merge_method: passthrough
    slices: [{sources: [{model: a, layer_range: [0, 1]}]}]
  tuned:
    merge_method: slerp
    base_model: frankn
    models: [{model: frankn}, {model: a}]
    parameters: {t: 0.5}
""",
        models,
    )
    assert "did you mean 'franken'" in error.message
    assert error.location.line == 7 and error.location.target == "tuned"


def test_hub_ids_are_accepted_as_hub_references(models):
    parsed = parse(
        "targets:\n  x:\n    merge_method: linear\n    models:\n      - model: org/model@abc123\n        parameters: {weight: 1}\n",
        models,
    )
    ref = parsed.targets["x"].models[0].model
    assert (ref.kind, ref.location, ref.revision) == ("hub", "org/model", "abc123")


def test_defaults_fill_parameters_key_by_key(models):
    parsed = parse(
        """defaults:
  parameters: {normalize: false, weight: 0.3}
targets:
  x:
    merge_method: linear
    models: [{model: a}, {model: b}]
    parameters: {weight: 0.9}
""",
        models,
    )
    assert parsed.targets["x"].parameters == {"normalize": False, "weight": 0.9}


class TestParameterResolution:
    """Filters, gradients and precedence, with mergekit's semantics."""

    t = methods.get("slerp").parameter("t")
    weight = methods.get("linear").parameter("weight")
    normalize = methods.get("linear").parameter("normalize")

    def test_gradient_interpolates_between_neighbours(self):
        # 5 anchors over t in [0, 1]: t = 0.3 sits 20% of the way from anchor 1 to anchor 2.
        value = parameters.evaluate([0.0, 0.5, 0.3, 0.7, 1.0], "x", 0.3, self.t)
        assert value == pytest.approx(0.8 * 0.5 + 0.2 * 0.3)
        assert parameters.evaluate([0.0, 1.0], "x", 1.0, self.t) == 1.0

    def test_first_matching_filter_wins_and_unmatched_falls_through(self):
        setting = [{"filter": "self_attn", "value": 0.1}, {"filter": "attn", "value": 0.9}]
        assert parameters.evaluate(setting, "model.layers.0.self_attn.q_proj.weight", 0, self.t) == 0.1
        assert parameters.evaluate(setting, "model.layers.0.mlp.up_proj.weight", 0, self.t) is parameters.UNSET

    def test_precedence_model_then_slice_then_target_then_default(self):
        resolve = parameters.resolve
        assert resolve(self.weight, ({"weight": 2.0}, {"weight": 3.0}), "w", 0) == 2.0
        assert resolve(self.weight, ({}, {"weight": [{"filter": "mlp", "value": 1.0}]}, {"weight": 4.0}), "attn", 0) == 4.0
        assert resolve(self.normalize, ({},), "w", 0) is True
        with pytest.raises(KeyError):
            resolve(self.weight, ({},), "w", 0)

    def test_boolean_gradients_pick_discrete_values(self):
        assert parameters.evaluate([True, False], "x", 0.4, self.normalize) is True
        assert parameters.evaluate([True, False], "x", 1.0, self.normalize) is False


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parent.parent / "recipes").glob("*.Mergefile")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(recipe):
    parsed = mergefile.load(recipe)
    assert parsed.targets
    for target in parsed.targets.values():
        assert all(ref.kind in ("hub", "target") for ref in target.references())


def test_example_mergefile_builds_then_is_a_noop(llama, tmp_path):
    """Mergefile.example, on the same small models the README's first command makes."""
    import json

    from mbuild.cli import main

    example = tmp_path / "Mergefile.example"
    example.write_text((Path(__file__).parent.parent / "Mergefile.example").read_text())
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "models").symlink_to(llama["base"].parent)
    parsed = mergefile.load(example)
    assert list(parsed.targets) == ["base-deep", "math-deep", "code-deep", "deep-ties", "final", "moe"]
    assert main(["all", "-f", str(example), "-q"]) == 0
    assert all((tmp_path / "build" / name / "mbuild.json").exists() for name in parsed.targets)
    lock = json.loads((tmp_path / "Mergefile.example.lock").read_text())
    assert set(lock["targets"]) == set(parsed.targets)
    assert "local:examples/models/base" in lock["sources"]


def test_yaml_merge_keys_share_settings(models):
    parsed = parse(
        """
common: &common
  merge_method: linear
  parameters: {normalize: false}
targets:
  x:
    <<: *common
    models: [{model: a, parameters: {weight: 1}}]
""".replace("common: &common", "defaults: &common"),
        models,
    )
    assert parsed.targets["x"].method == "linear" and parsed.targets["x"].parameters == {"normalize": False}


def test_parent_relative_model_paths_resolve_from_the_mergefile(tmp_path):
    (tmp_path / "models" / "a").mkdir(parents=True)
    (tmp_path / "project").mkdir()
    parsed = mergefile.parse(
        "targets:\n  x:\n    merge_method: passthrough\n    models: [{model: ../models/a}]\n", tmp_path / "project" / "Mergefile"
    )
    ref = parsed.targets["x"].models[0].model
    assert ref.location == str(tmp_path / "models" / "a") and ref.node == "local:" + str(tmp_path / "models" / "a")


def test_two_targets_cannot_share_an_output_folder(models):
    error = error_of(
        "targets:\n  x:\n    merge_method: passthrough\n    models: [{model: a}]\n    output: out\n"
        "  y:\n    merge_method: passthrough\n    models: [{model: b}]\n    output: ./out\n",
        models,
    )
    assert "is also target 'x''s" in error.message
    assert error.location.line == 9 and error.location.target == "y"

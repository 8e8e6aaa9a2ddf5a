"""What mergekit ignores, mbuild ignores with a warning; what mergekit refuses, mbuild refuses.

A per-model ``weight`` on a method that takes none (mergekit's own test configs carry one) is
ignored and named in a warning, and changes no key; a name no method has is still a typo.
DELLA's ``density ± epsilon`` outside (0, 1), which mergekit refuses per tensor, is refused at
plan time with the Mergefile line and target, not mid-build.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from mbuild import mergefile, plan
from mbuild.cache import State
from mbuild.cli import main
from mbuild.errors import MergefileError
from mbuild.mergefile import importer
from mbuild.methods import task_arithmetic

# The methods that take no per-model parameter, each with a recipe it accepts, and the line of
# the per-model `weight: 0.3` the recipe carries (line 8 of the text `mergefile_text` makes).
NO_PER_MODEL = {
    "slerp": "parameters: {t: 0.5}",
    "model_stock": "",
    "sce": "",
    "ram": "",
    "karcher": "",
    "arcee_fusion": "",
    "nearswap": "parameters: {t: 0.5}",
}


def mergefile_text(method: str, extra: str, weight: str = "\n        parameters: {weight: 0.3}") -> str:
    models = ["base", "math", "code"] if method == "model_stock" else ["base", "math"]
    lines = ["targets:", "  x:", f"    merge_method: {method}", "    base_model: base", "    models:"]
    for index, model in enumerate(models):
        lines.append(f"      - model: {model}" + (weight if index == 1 else ""))
    if extra:
        lines.append(f"    {extra}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def folders(tmp_path):
    """Empty model folders: enough for checks made from the text alone."""
    for name in ("base", "math", "code"):
        (tmp_path / name).mkdir()
    return tmp_path


def parse(text: str, folder: Path) -> mergefile.Mergefile:
    return mergefile.parse(text, folder / "Mergefile")


@pytest.mark.parametrize("method", sorted(NO_PER_MODEL))
def test_a_weight_on_a_method_that_takes_none_is_ignored_with_a_warning(folders, method):
    parsed = parse(mergefile_text(method, NO_PER_MODEL[method]), folders)
    target = parsed.targets["x"]
    assert [model.parameters for model in target.models] == [{}] * len(target.models)
    (warning,) = parsed.warnings
    assert (warning.location.file, warning.location.line, warning.location.target) == (folders / "Mergefile", 8, "x")
    assert "does not take 'weight'" in warning.message
    assert warning.message.endswith("ignored, as mergekit ignores it")
    assert str(warning).startswith(f"{folders / 'Mergefile'}:8: target 'x': {method} does not take 'weight'")
    # Ignored is as if never written: the recorded recipe is the one without it.
    without = parse(mergefile_text(method, NO_PER_MODEL[method], weight=""), folders)
    assert target.recipe == without.targets["x"].recipe
    assert without.warnings == ()


def test_a_per_tensor_parameter_under_a_model_is_ignored_there(folders):
    # mergekit reads slerp's t only from the target's or a slice's parameters.
    text = mergefile_text("slerp", "parameters: {t: 0.5}", weight="\n        parameters: {t: 0.9}")
    parsed = parse(text, folders)
    (warning,) = parsed.warnings
    assert warning.location.line == 8
    assert warning.message == (
        "'t' is one value per tensor for slerp, read from the target's or a slice's parameters, "
        "not a model's: ignored here, as mergekit ignores it"
    )
    assert parsed.targets["x"].models[1].parameters == {}
    assert parsed.targets["x"].parameters == {"t": 0.5}


def test_a_parameter_of_another_method_at_target_or_default_level_is_ignored(folders):
    text = (
        "defaults:\n  parameters: {t: 0.5, density: 0.4}\n"
        "targets:\n  x:\n    merge_method: linear\n    models:\n"
        "      - model: base\n        parameters: {weight: 1}\n      - math\n"
        "    parameters: {weight: 0.5, filter_wise: true}\n"
    )
    parsed = parse(text, folders)
    assert [(w.location.line, w.message.split(" (")[0]) for w in parsed.warnings] == [
        (2, "linear does not take 't'"),
        (2, "linear does not take 'density'"),
        (10, "linear does not take 'filter_wise'"),
    ]
    target = parsed.targets["x"]
    assert target.parameters == {"weight": 0.5}
    assert target.recipe["parameters"] == {"weight": 0.5}


@pytest.mark.parametrize(
    "method, setting, message",
    [
        ("linear", "{wieght: 0.3}", "unknown parameter 'wieght' for linear (did you mean 'weight'?)"),
        ("slerp", "{wieght: 0.3}", "unknown parameter 'wieght' for slerp (slerp takes: t)"),
        (
            "arcee_fusion",
            "{weight: 0.3, wieght: 1}",
            "unknown parameter 'wieght' for arcee_fusion (arcee_fusion takes no parameters)",
        ),
        (
            "model_stock",
            "{filterwise: true}",
            "unknown parameter 'filterwise' for model_stock (did you mean 'filter_wise'?)",
        ),
    ],
)
def test_a_name_no_method_has_is_still_a_typo(folders, method, setting, message):
    with pytest.raises(MergefileError) as caught:
        parse(mergefile_text(method, "parameters: {t: 0.5}" if method == "slerp" else "",
                             weight=f"\n        parameters: {setting}"), folders)
    assert caught.value.message == message
    assert (caught.value.location.line, caught.value.location.target) == (8, "x")


@pytest.mark.parametrize(
    "setting, message",
    [
        ("null", "bad value for 'weight': expected a number, a string or true/false, got None"),
        ("[[0.3]]", "mixed list for 'weight'"),
        ("{filter: mlp}", "filter rule for 'weight' needs 'value:'"),
    ],
)
def test_an_ignored_setting_must_still_be_well_formed(folders, setting, message):
    # mergekit parses every setting (its pydantic config) before ignoring it: these it refuses.
    with pytest.raises(MergefileError) as caught:
        weight = f"\n        parameters: {{weight: {setting}}}"
        parse(mergefile_text("slerp", "parameters: {t: 0.5}", weight=weight), folders)
    assert message in caught.value.message
    assert caught.value.location.line == 8


SLERP = """targets:
  blend:
    merge_method: slerp
    base_model: {base}
    models:
      - model: {base}{weight}
      - model: {math}
    parameters: {{t: 0.3}}
"""


def slerp_mergefile(folder: Path, llama, weight: bool) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / "Mergefile"
    path.write_text(SLERP.format(weight="\n        parameters: {weight: 0.7}" if weight else "", **llama))
    return path


def hashed_plan(path: Path) -> plan.TargetPlan:
    state = State(path.parent / "cache")
    the_plan = plan.make_plan(
        mergefile.load(path), (), lambda source: state.digests(source.info, compute=True), store=state.folder
    )
    return the_plan.targets["blend"]


def test_an_ignored_weight_changes_no_key(llama, tmp_path):
    with_weight = hashed_plan(slerp_mergefile(tmp_path / "with", llama, weight=True))
    without = hashed_plan(slerp_mergefile(tmp_path / "without", llama, weight=False))
    assert [(t.name, t.key) for t in with_weight.tasks] == [(t.name, t.key) for t in without.tasks]
    assert all(t.key for t in with_weight.tasks)
    assert with_weight.card == without.card
    assert with_weight.key == without.key is not None


def test_the_cli_warns_on_builds_dry_runs_and_status_and_the_output_stays_fresh(llama, tmp_path, capsys):
    path = slerp_mergefile(tmp_path, llama, weight=True)
    warning = (
        f"mbuild: warning: {path}:7: target 'blend': "
        "slerp does not take 'weight' (it takes: t): ignored, as mergekit ignores it"
    )
    options = ["-f", str(path), "--cache-dir", str(tmp_path / "cache")]
    for command in (["-n", *options], ["--json", "-q", *options], ["status", *options]):
        assert main(command) == 0, command
        assert capsys.readouterr().err.splitlines() == [warning], command
    # Built with the ignored weight, the output is the one the recipe without it makes.
    slerp_mergefile(tmp_path, llama, weight=False)
    assert main(["status", "--json", *options]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert json.loads(captured.out)["targets"]["blend"]["stale"] is False


def tensors_of(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {name: tensor for file in sorted(folder.glob("*.safetensors")) for name, tensor in load_file(file).items()}


@pytest.mark.parametrize(
    "method, extra",
    [("slerp", {"parameters": {"t": 0.3}}), ("model_stock", {}), ("karcher", {}), ("nearswap", {"parameters": {"t": 0.5}})],
)
def test_the_bytes_are_mergekits_for_the_config_with_the_ignored_weight(llama, tmp_path, method, extra):
    import torch
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mbuild.engine import torch_single_threaded

    names = ["base", "math", "code"] if method == "model_stock" else ["base", "math"]
    body = {
        "merge_method": method,
        "base_model": str(llama["base"]),
        "models": [{"model": str(llama[name]), "parameters": {"weight": 0.25 + index}} for index, name in enumerate(names)],
        "dtype": "float32",
        **extra,
    }
    with torch_single_threaded():
        run_merge(MergeConfiguration.model_validate(body), str(tmp_path / "mergekit"), MergeOptions(quiet=True))
    path = tmp_path / "Mergefile"
    path.write_text(json.dumps({"targets": {"m": body}}))  # JSON is YAML
    assert main(["-f", str(path), "-q", "-j", "1"]) == 0
    mine, theirs = tensors_of(tmp_path / "build" / "m"), tensors_of(tmp_path / "mergekit")
    assert mine.keys() == theirs.keys()
    for name, tensor in theirs.items():
        # Compared as the bits they are (float32 throughout: dtype above).
        assert mine[name].dtype == tensor.dtype and mine[name].view(torch.int32).equal(tensor.view(torch.int32)), name


MERGEKIT_CONFIG = """\
merge_method: slerp
base_model: ../models/base
models:
  - model: ../models/base
    parameters:
      weight: 0.5
  - model: ../models/math
    parameters:
      weight: 0.5
parameters:
  t: 0.5
"""


def test_mbuild_import_takes_a_mergekit_config_with_an_ignored_weight(llama, tmp_path, capsys):
    (tmp_path / "models").mkdir()
    for name, folder in llama.items():
        (tmp_path / "models" / name).symlink_to(folder, target_is_directory=True)
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "config.yml"
    config.write_text(MERGEKIT_CONFIG)
    imported = importer.import_config(config, tmp_path / "Mergefile", working_dir=tmp_path / "configs")
    assert [(w.location.file, w.location.line, w.location.target) for w in imported.warnings] == [
        (config, 6, "config"),
        (config, 9, "config"),
    ]
    output = tmp_path / "Mergefile"
    assert main(["import", str(config), "-o", str(output)]) == 0
    err = capsys.readouterr().err
    assert f"mbuild: warning: {config}:6: target 'config': slerp does not take 'weight'" in err
    assert "weight: 0.5" in output.read_text()  # the user's text is kept; it is ignored when read
    assert len(mergefile.load(output).warnings) == 2


# DELLA: mergekit's della_magprune refuses a density strictly inside (0, 1) unless
# density - epsilon > 0 and density + epsilon < 1.

DELLA = """targets:
  d:
    merge_method: {method}
    base_model: {base}
    models:
      - model: {base}
      - model: {math}
        parameters:
          weight: 0.5
          density: {density}
          epsilon: {epsilon}
"""


def della_plan(llama, tmp_path, density, epsilon, method="della"):
    path = tmp_path / "Mergefile"
    path.write_text(DELLA.format(method=method, density=density, epsilon=epsilon, **llama))
    return plan.make_plan(mergefile.load(path), store=tmp_path / "cache")


@pytest.mark.parametrize(
    "method, density, epsilon",
    [
        ("della", 0.9, 0.15),
        ("della_linear", 0.1, 0.15),
        ("della", 0.85, 0.15),  # density + epsilon is exactly 1
        ("della", "[0.5, 0.9]", 0.15),  # a gradient: inside (0, 1) at the first layers only
        ("della", 0.5, "[0.1, 0.5]"),
    ],
)
def test_della_density_and_epsilon_outside_0_1_are_refused_at_plan_time(llama, tmp_path, method, density, epsilon):
    with pytest.raises(MergefileError) as caught:
        della_plan(llama, tmp_path, density, epsilon, method)
    error = caught.value
    assert error.message.startswith(
        "DELLA needs density - epsilon > 0 and density + epsilon < 1 (mergekit: 'density +/- epsilon is in (0, 1)')"
    )
    assert f", for model '{llama['math']}' (tensor '" in error.message
    assert (error.location.file, error.location.line, error.location.target) == (tmp_path / "Mergefile", 7, "d")


@pytest.mark.parametrize("density, epsilon", [(0.5, 0.15), (1.0, 0.15), (0.0, 0.3), ("[0.2, 0.8]", 0.15), (0.5, 0.0)])
def test_della_values_mergekit_takes_are_planned(llama, tmp_path, density, epsilon):
    the_plan = della_plan(llama, tmp_path, density, epsilon)
    assert the_plan.targets["d"].tasks


def test_della_values_set_apart_are_checked_together(llama, tmp_path):
    # density on the model, epsilon for the whole target: known together only per tensor.
    path = tmp_path / "Mergefile"
    path.write_text(
        DELLA.format(method="della", density=0.7, epsilon=0.1, **llama).replace("          epsilon: 0.1\n", "")
        + "    parameters: {epsilon: 0.35}\n"
    )
    with pytest.raises(MergefileError) as caught:
        plan.make_plan(mergefile.load(path), store=tmp_path / "cache")
    assert "got density 0.7, epsilon 0.35" in caught.value.message
    assert caught.value.location.line == 7


def test_della_refusal_reaches_the_cli_as_one_error_before_any_build(llama, tmp_path, capsys):
    della_plan(llama, tmp_path, 0.5, 0.1)  # writes a Mergefile mergekit takes
    path = tmp_path / "Mergefile"
    path.write_text(path.read_text().replace("density: 0.5", "density: 0.95"))
    assert main(["-f", str(path), "--cache-dir", str(tmp_path / "cache")]) != 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    (line,) = [line for line in captured.err.splitlines() if "DELLA" in line]
    assert line.startswith(f"mbuild: error: {path}:7: target 'd': DELLA needs density - epsilon > 0")
    assert not (tmp_path / "build" / "d").exists()


def test_della_rule_is_mergekits_exactly():
    import torch
    from mergekit.sparsify import della_magprune

    values = [0.0, 0.05, 0.1, 0.15, 0.3, 0.5, 0.7, 0.85, 0.9, 0.95, 1.0]
    for density, epsilon in itertools.product(values, values):
        try:
            della_magprune(torch.ones(2, 3), density=density, epsilon=epsilon)
            refused = False
        except ValueError:
            refused = True
        problem = task_arithmetic.della_problem({"density": density, "epsilon": epsilon})
        assert (problem is not None) == refused, (density, epsilon)

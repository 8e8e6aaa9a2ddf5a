"""Sweeps (`matrix:`): one ordinary target per combination, named after the values as written,
built, keyed and locked like any target, and refused clearly when the matrix is wrong.

The family's matrices are all past torch's grain, so the byte comparisons mean something.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import build_json, grain_family, load_tensors, run_cli
from mbuild import mergefile
from mbuild.errors import MergefileError

SIX = ["density=0.3,weight=0.5", "density=0.3,weight=1.0", "density=0.50,weight=0.5",
       "density=0.50,weight=1.0", "density=0.7,weight=0.5", "density=0.7,weight=1.0"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return grain_family(tmp_path_factory.mktemp("matrix-family"), layers=2, hidden=256, intermediate=512, rows=128)


def ties_mergefile(family, name="final", parameters="weight: 0.8, density: 0.9", matrix="", extra="") -> str:
    """A TIES target of math and code over base (weights not normalized), ``matrix`` lines, ``extra`` targets."""
    text = textwrap.dedent(f"""\
        targets:
          {name}:
            merge_method: ties
            base_model: {family['base']}
            models: [{{model: {family['math']}}}, {{model: {family['code']}}}]
            parameters: {{{parameters}, normalize: false}}
        """)
    return text + textwrap.indent(textwrap.dedent(matrix), "    ") + textwrap.indent(textwrap.dedent(extra), "  ")


def ties_sweep(family, densities="[0.3, 0.50, 0.7]", extra="") -> str:
    """The TIES target swept over density (3 values) and weight (2 values), and ``extra`` targets."""
    return ties_mergefile(family, matrix=f"matrix:\n  density: {densities}\n  weight: [0.5, 1.0]\n", extra=extra)


def plain_ties(family, density: str, weight: str) -> str:
    return ties_mergefile(family, name="plain", parameters=f"weight: {weight}, density: {density}")


def write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "Mergefile"
    path.write_text(text)
    return path


def same_bytes(left: Path, right: Path) -> bool:
    a, b = load_tensors(left), load_tensors(right)
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def test_six_points_make_six_targets_with_exact_names(family, tmp_path):
    path = write(tmp_path, ties_sweep(family))
    parsed = mergefile.load(path)
    assert list(parsed.targets) == [f"final[{point}]" for point in SIX]
    assert parsed.sweeps["final"].parameters == ("density", "weight")
    assert parsed.sweeps["final"].points["final[density=0.50,weight=1.0]"] == ("0.50", "1.0")
    point = parsed.targets["final[density=0.7,weight=0.5]"]
    assert dict(point.parameters) == {"weight": 0.5, "density": 0.7, "normalize": False}
    assert point.output == tmp_path / "build" / "final" / "density=0.7,weight=0.5"
    code, out, _ = run_cli("-f", str(path), "--dry-run", "--json")
    assert code == 0
    assert list(json.loads(out)["targets"]) == [f"final[{point}]" for point in SIX]
    code, out, _ = run_cli("-f", str(path), "--dry-run")
    assert code == 0 and all(f"final[{point}]" in out for point in SIX)  # the table shows brackets


def test_points_build_to_the_bytes_of_plain_targets_and_are_locked(family, tmp_path):
    path = write(tmp_path / "sweep", ties_sweep(family))
    report = build_json(path)
    assert [name for name, row in report.items() if row["status"] == "built"] == [f"final[{p}]" for p in SIX]
    lock = json.loads((tmp_path / "sweep" / "Mergefile.lock").read_text())
    assert set(lock["targets"]) == {f"final[{p}]" for p in SIX}
    outputs = {}
    for point in SIX:
        density, weight = (part.split("=")[1] for part in point.split(","))
        # Built alone, in another folder with another cache: computed afresh, not taken from the sweep's.
        plain = write(tmp_path / point, plain_ties(family, density, weight))
        build_json(plain)
        assert same_bytes(tmp_path / "sweep" / "build" / "final" / point, tmp_path / point / "build" / "plain"), point
        outputs[point] = load_tensors(tmp_path / point / "build" / "plain")["model.layers.0.mlp.up_proj.weight"]
    # The points are different models (the comparison above is not between equal things).
    assert len({tuple(tensor.flatten()[:64].tolist()) for tensor in outputs.values()}) == len(SIX)


def test_a_point_is_a_model_for_other_targets_and_builds_alone(family, tmp_path):
    extra = f"""\
      pick:
        merge_method: linear
        models:
          - model: final[density=0.50,weight=1.0]
            parameters: {{weight: 0.5}}
          - model: {family['code']}
            parameters: {{weight: 0.5}}
    """
    path = write(tmp_path, ties_sweep(family, extra=extra))
    report = build_json(path, "pick")
    assert {name: row["status"] for name, row in report.items()} == {
        "final[density=0.50,weight=1.0]": "built", "pick": "built"}
    assert not (tmp_path / "build" / "final" / "density=0.3,weight=0.5").exists()
    report = build_json(path, "final[density=0.3,weight=0.5]")
    assert {name: row["status"] for name, row in report.items()} == {"final[density=0.3,weight=0.5]": "built"}


def soup_of_final(family, more: str = "") -> str:
    """A linear target 'soup' reading the sweep 'final' by its bare name (so swept with it)."""
    return f"""\
      soup:
        merge_method: linear
        models:
          - model: final
            parameters: {{weight: 0.5}}
          - model: {family['code']}
            parameters: {{weight: 0.5}}
    """ + more


def test_changing_one_value_list_builds_only_the_new_points(family, tmp_path):
    extra = soup_of_final(family)
    path = write(tmp_path, ties_sweep(family, extra=extra))
    first = build_json(path)
    assert sum(row["status"] == "built" for row in first.values()) == 12  # 6 points, and soup over each
    path.write_text(ties_sweep(family, densities="[0.3, 0.50, 0.9]", extra=extra))
    second = build_json(path)
    built = sorted(name for name, row in second.items() if row["status"] == "built")
    assert built == sorted(f"{name}[density=0.9,weight={w}]" for name in ("final", "soup") for w in ("0.5", "1.0"))
    assert all(row["status"] == "fresh" for name, row in second.items() if name not in built)


def test_a_sweep_taken_off_leaves_its_points_and_says_so(family, tmp_path):
    # The points' folders are inside the target's own: the plain target may not replace them.
    path = write(tmp_path, ties_mergefile(family, matrix="matrix:\n  density: [0.3, 0.7]\n"))
    assert {row["status"] for row in build_json(path).values()} == {"built"}
    points = sorted(p.name for p in (tmp_path / "build" / "final").iterdir() if p.is_dir())
    before = {p: (tmp_path / "build" / "final" / p / "mbuild.json").read_bytes() for p in points}
    path.write_text(ties_mergefile(family))
    code, _, err = run_cli("-f", str(path))
    assert code == 2
    assert f"{path}:2: target 'final'" in err and "holds the outputs of an earlier sweep (density=0.3, density=0.7)" in err
    assert {p: (tmp_path / "build" / "final" / p / "mbuild.json").read_bytes() for p in points} == before


def test_a_target_reading_a_sweep_by_its_bare_name_is_swept_with_it(family, tmp_path):
    extra = soup_of_final(family, more="    matrix: {normalize: [true, false]}\n")
    parsed = mergefile.load(write(tmp_path, ties_sweep(family, extra=extra)))
    soups = [name for name in parsed.targets if name.startswith("soup")]
    assert len(soups) == 12
    point = parsed.targets["soup[normalize=false,density=0.7,weight=1.0]"]
    assert [ref.location for ref in point.references()][0] == "final[density=0.7,weight=1.0]"
    assert parsed.sweeps["soup"].parameters == ("normalize", "density", "weight")
    assert parsed.expand_names(["soup"]) == soups
    # `mbuild final` brings every point of the sweep (and only those) up to date.
    code, out, _ = run_cli("-f", str(tmp_path / "Mergefile"), "--dry-run", "--json", "final")
    assert code == 0 and list(json.loads(out)["targets"]) == [f"final[{p}]" for p in SIX]


def test_a_per_model_parameter_is_swept_with_param_at_model(family, tmp_path):
    text = textwrap.dedent(f"""\
        targets:
          code:
            merge_method: passthrough
            models: [{family['code']}]
          soup:
            merge_method: linear
            models:
              - model: {family['math']}
                parameters: {{weight: 0.5}}
              - model: code
                parameters: {{weight: 0.5}}
            matrix: {{weight@code: [0.25, 2]}}
        """)
    parsed = mergefile.load(write(tmp_path, text))
    point = parsed.targets["soup[weight@code=2]"]
    assert [dict(model.parameters) for model in point.models] == [{"weight": 0.5}, {"weight": 2}]
    assert point.output == tmp_path / "build" / "soup" / "weight@code=2"


BAD = {
    "empty list": ("matrix: {density: []}", "non-empty list"),
    "not a list": ("matrix: {density: 0.5}", "non-empty list"),
    "not a mapping": ("matrix: [density]", "maps parameter names"),
    "unknown parameter": ("matrix: {densty: [0.5]}", "unknown parameter 'densty'"),
    "parameter the method does not read": ("matrix: {t: [0.5, 0.7]}", "does not read 't'"),
    "a list as a value": ("matrix: {density: [[0.1, 0.2]]}", "single number or word"),
    "a value that cannot name a folder": ("matrix: {density: ['a/b']}", "only letters"),
    "a value listed twice": ("matrix: {density: [0.5, 0.5]}", "listed twice"),
    "one value spelled twice": ("matrix: {weight: [1, 1.0]}", "listed twice"),
    "too many combinations": ("matrix: {density: [" + ", ".join(f"0.{i:02d}" for i in range(1, 30))
                              + "], weight: [" + ", ".join(str(i) for i in range(1, 11)) + "]}", "more than 256"),
    "an unknown model": ("matrix: {weight@nobody: [1, 2]}", "no entry of 'models:'"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_matrix_is_one_error_with_file_line_and_target(family, tmp_path, name):
    matrix, fragment = BAD[name]
    text = ties_mergefile(family, matrix=matrix + "\n")
    path = write(tmp_path, text)
    with pytest.raises(MergefileError) as caught:
        mergefile.load(path)
    message = str(caught.value)
    assert fragment in message
    assert message.startswith(f"{path}:7: ") and "final" in message


def test_two_sweeps_varying_one_parameter_cannot_be_read_together(family, tmp_path):
    text = ties_sweep(family, extra=f"""\
      other:
        merge_method: ties
        base_model: {family['base']}
        models: [{{model: {family['math']}}}, {{model: {family['code']}}}]
        matrix: {{weight: [0.5, 0.6]}}
      both:
        merge_method: linear
        models: [final, other]
        parameters: {{weight: 0.5}}
    """)
    path = write(tmp_path, text)
    with pytest.raises(MergefileError) as caught:
        mergefile.load(path)
    assert "both vary 'weight'" in str(caught.value) and str(caught.value).startswith(f"{path}:15: target 'both'")


def test_matrix_on_a_target_that_is_not_a_merge_is_refused(family, tmp_path):
    text = ties_sweep(family, extra="""\
      q8:
        gguf: {model: final, type: q8_0}
        matrix: {type: [q8_0, q4_0]}
    """)
    path = write(tmp_path, text)
    with pytest.raises(MergefileError) as caught:
        mergefile.load(path)
    assert "a 'gguf' target has none" in str(caught.value) and str(caught.value).startswith(f"{path}:12: ")


def test_a_cycle_through_a_sweep_is_reported_at_the_closing_reference(family, tmp_path):
    text = ties_sweep(family, extra=f"""\
      soup:
        merge_method: linear
        models: [{{model: final}}, {{model: {family['code']}}}]
        parameters: {{weight: 0.5}}
    """).replace(f"models: [{{model: {family['math']}}}, ", "models: [{model: soup}, ")
    path = write(tmp_path, text)
    with pytest.raises(MergefileError) as caught:
        mergefile.load(path)
    assert str(caught.value) == f"{path}:12: target 'soup': dependency cycle: final -> soup -> final"

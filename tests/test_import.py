"""mbuild import: mergekit configs (yaml, moe, multi) into Mergefiles, and the errors on the way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mbuild import mergefile
from mbuild.cli import main
from mbuild.mergefile import importer
from mbuild.errors import MbuildError, MergefileError


@pytest.fixture
def layout(llama, tmp_path):
    """tmp/models/{base,math,code} (links to the llama family) and an empty tmp/configs."""
    models = tmp_path / "models"
    models.mkdir()
    for name, folder in llama.items():
        (models / name).symlink_to(folder, target_is_directory=True)
    (tmp_path / "configs").mkdir()
    return tmp_path


def write_config(layout: Path, text: str, name: str = "config.yml") -> Path:
    path = layout / "configs" / name
    path.write_text(text)
    return path


ONE_DOCUMENT = """\
# blend math into base
merge_method: linear
models:
  - model: ../models/base
    parameters: {weight: 0.6}   # mostly base
  - model: '../models/math'
    parameters:
      weight: 0.4
dtype: float32
"""


def test_one_document_becomes_one_target_with_paths_from_the_mergefile(layout):
    config = write_config(layout, ONE_DOCUMENT, "Blend v2 (final).yml")
    output = layout / "project" / "nested" / "Mergefile"
    output.parent.mkdir(parents=True)  # `mbuild import` makes it; relative paths start there
    imported = importer.import_config(config, output, working_dir=layout / "configs")

    assert imported.targets == ("Blend-v2-final",)
    # The body as written: comments, flow mappings and quoting kept; only the paths move.
    assert imported.text == (
        "targets:\n"
        "  Blend-v2-final:\n"
        "    # blend math into base\n"
        "    merge_method: linear\n"
        "    models:\n"
        "      - model: ../../models/base\n"
        "        parameters: {weight: 0.6}   # mostly base\n"
        "      - model: '../../models/math'\n"
        "        parameters:\n"
        "          weight: 0.4\n"
        "    dtype: float32\n"
    )
    target = imported.mergefile.targets["Blend-v2-final"]
    assert [(ref.kind, ref.location) for ref in target.references()] == [
        ("local", str(layout / "models" / "base")),
        ("local", str(layout / "models" / "math")),
    ]
    assert target.recipe["models"][0]["parameters"] == {"weight": 0.6}


def test_relative_paths_follow_the_working_directory_first(layout, monkeypatch):
    # mergekit reads relative paths from where it runs; a folder there wins over one beside the config.
    (layout / "configs" / "models").mkdir()
    (layout / "configs" / "models" / "base").symlink_to(layout / "models" / "math", target_is_directory=True)
    config = write_config(layout, "merge_method: passthrough\nslices:\n  - sources: [{model: models/base, layer_range: [0, 2]}]\n")
    monkeypatch.chdir(layout)
    imported = importer.import_config(config, layout / "configs" / "Mergefile")
    assert "{model: ../models/base, layer_range: [0, 2]}" in imported.text
    monkeypatch.chdir(layout / "configs")
    imported = importer.import_config(config, layout / "Mergefile")
    assert "{model: configs/models/base, layer_range: [0, 2]}" in imported.text


def test_cli_writes_the_mergefile_and_refuses_to_overwrite(layout, monkeypatch, capsys):
    config = write_config(layout, ONE_DOCUMENT)
    monkeypatch.chdir(layout / "configs")
    output = layout / "Mergefile"

    assert main(["import", str(config), "-o", str(output), "--name", "blend", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"mergefile": str(output), "targets": ["blend"]}
    written = output.read_text()
    assert "  blend:\n" in written and "- model: models/base\n" in written
    assert list(mergefile.load(output).targets) == ["blend"]

    output.write_text("targets: {}\n")
    assert main(["import", str(config), "-o", str(output)]) == 2
    assert f"{output} exists; use --force to overwrite it" in capsys.readouterr().err
    assert output.read_text() == "targets: {}\n"
    assert main(["import", str(config), "-o", str(output), "--force"]) == 0
    assert "mbuild import: wrote" in capsys.readouterr().out
    assert list(mergefile.load(output).targets) == ["config"]  # the file's stem


def test_moe_config_becomes_an_moe_target(layout):
    config = write_config(
        layout,
        "base_model: ../models/base\n"
        "gate_mode: random\n"
        "experts:\n"
        "  - source_model: ../models/math\n"
        "  - source_model: ../models/code\n",
        "moe.yaml",
    )
    imported = importer.import_config(config, layout / "Mergefile", working_dir=layout / "configs")
    target = imported.mergefile.targets["moe"]
    assert target.moe is not None and target.moe.gate_mode == "random"
    assert [expert.model.location for expert in target.moe.experts] == [
        str(layout / "models" / "math"),
        str(layout / "models" / "code"),
    ]
    assert "  - source_model: models/math\n" in imported.text


MULTI = """\
%YAML 1.1
---
# stage one: its name is also a filter string
name: mlp
merge_method: linear
models:
  - model: ../models/base
    parameters: {weight: 0.5}
  - model: ../models/math
    parameters:
      weight: [{filter: mlp, value: 0.2}, {value: 0.8}]
dtype: float32
---
{name: tuned, merge_method: task_arithmetic, base_model: ../models/base,
 models: [{model: mlp@main, parameters: {weight: 0.5}}, {model: ../models/code, parameters: {weight: 0.3}}]}
--- # the final merge has no name
merge_method: slerp
base_model: "mlp"
models: [{model: mlp}, {model: tuned}]
parameters:
  t: [{filter: mlp, value: 0.3}, {value: 0.6}]
tokenizer_source: tuned
...
"""


def test_multi_stage_references_become_targets_and_filters_stay_strings(layout):
    config = write_config(layout, MULTI)
    imported = importer.import_config(config, layout / "Mergefile", name="final", working_dir=layout / "configs")

    assert imported.targets == ("mlp", "tuned", "final")
    assert imported.text == (
        "targets:\n"
        "  mlp:\n"
        "    # stage one: its name is also a filter string\n"
        "    merge_method: linear\n"
        "    models:\n"
        "      - model: models/base\n"
        "        parameters: {weight: 0.5}\n"
        "      - model: models/math\n"
        "        parameters:\n"
        "          weight: [{filter: mlp, value: 0.2}, {value: 0.8}]\n"
        "    dtype: float32\n"
        "  tuned:\n"
        "    {merge_method: task_arithmetic, base_model: models/base,\n"
        "     models: [{model: mlp, parameters: {weight: 0.5}}, {model: models/code, parameters: {weight: 0.3}}]}\n"
        "  final:\n"
        "    # the final merge has no name\n"
        "    merge_method: slerp\n"
        '    base_model: "mlp"\n'
        "    models: [{model: mlp}, {model: tuned}]\n"
        "    parameters:\n"
        "      t: [{filter: mlp, value: 0.3}, {value: 0.6}]\n"
        "    tokenizer_source: tuned\n"
    )
    targets = imported.mergefile.targets
    assert [(m.model.kind, m.model.text) for m in targets["tuned"].models] == [("target", "mlp"), ("local", "models/code")]
    assert targets["final"].base_model.kind == "target"
    assert [(m.model.kind, m.model.text) for m in targets["final"].models] == [("target", "mlp"), ("target", "tuned")]
    assert targets["final"].tokenizer_source.kind == "target"
    # Filters equal to a stage name are still filters (mergekit-multi would rewrite them into paths).
    assert targets["mlp"].recipe["models"][1]["parameters"]["weight"][0] == {"filter": "mlp", "value": 0.2}
    assert targets["final"].parameters["t"][0] == {"filter": "mlp", "value": 0.3}


def test_a_rewritten_folder_never_reads_as_a_stage(layout):
    (layout / "configs" / "deep").mkdir()
    config = write_config(
        layout,
        "name: base\nmerge_method: linear\nmodels: [{model: ../../models/math}, {model: ../../models/code}]\n"
        "---\nname: top\nmerge_method: linear\nmodels: [{model: base}, {model: ../../models/base}]\n",
        "deep/config.yml",
    )
    imported = importer.import_config(config, layout / "models" / "Mergefile", working_dir=layout / "configs" / "deep")
    assert "models: [{model: math}, {model: code}]" in imported.text
    assert "models: [{model: base}, {model: ./base}]" in imported.text
    top = imported.mergefile.targets["top"]
    assert [(m.model.kind, m.model.location) for m in top.models] == [
        ("target", "base"),
        ("local", str(layout / "models" / "base")),
    ]


def test_tokenizer_sources_are_model_references_too(layout):
    config = write_config(
        layout,
        "name: blend\nmerge_method: linear\nmodels: [{model: ../models/base}, {model: ../models/math}]\n"
        "---\nmerge_method: linear\nmodels: [{model: blend}, {model: ../models/code}]\n"
        "tokenizer:\n"
        "  source: blend@main\n"
        "  tokens:\n"
        '    "<|user|>": {source: ../models/math}\n'
        '    "<s>": {source: {kind: model_token, model: blend, token_id: 0}}\n'
        '    "</s>": {source: {kind: zero}}\n',
    )
    imported = importer.import_config(config, layout / "Mergefile", working_dir=layout / "configs")
    assert imported.text.endswith(
        "    tokenizer:\n"
        "      source: blend\n"
        "      tokens:\n"
        '        "<|user|>": {source: models/math}\n'
        '        "<s>": {source: {kind: model_token, model: blend, token_id: 0}}\n'
        '        "</s>": {source: {kind: zero}}\n'
    )
    tokenizer = imported.mergefile.targets["config"].tokenizer
    assert (tokenizer.source.kind, tokenizer.source.text) == ("target", "blend")
    assert [(token, rule.model.kind) for token, rule in tokenizer.tokens if rule.model] == [("<|user|>", "local"), ("<s>", "target")]


def test_a_folder_or_stage_revision_is_dropped_and_a_hub_revision_kept(layout):
    # mergekit reads 'path@revision'; a folder or a stage has no revisions (mbuild would take the
    # folder for a hub ID), a hub ID keeps its own.
    config = write_config(
        layout,
        "name: blend\nmerge_method: linear\nmodels: [{model: ../models/base@main}, {model: '../models/math@v1'}]\n"
        "---\nname: top\nmerge_method: linear\nmodels: [{model: blend@main}, {model: org/model@v2}]\n",
    )
    imported = importer.import_config(config, layout / "Mergefile", working_dir=layout / "configs")
    assert "    models: [{model: models/base}, {model: 'models/math'}]\n" in imported.text
    assert "    models: [{model: blend}, {model: org/model@v2}]\n" in imported.text
    top = imported.mergefile.targets["top"]
    assert [(m.model.kind, m.model.location, m.model.revision) for m in top.models] == [
        ("target", "blend", None),
        ("hub", "org/model", "v2"),
    ]


# --- errors: one message naming the config, its line (and the stage) -------------------------


def import_error(layout: Path, text: str, **options) -> MergefileError:
    config = write_config(layout, text)
    with pytest.raises(MergefileError) as caught:
        importer.import_config(config, layout / "Mergefile", working_dir=layout / "configs", **options)
    assert caught.value.location.file == config
    return caught.value


LINEAR = "merge_method: linear\nmodels: [{model: ../models/base}, {model: ../models/math}]\n"


@pytest.mark.parametrize(
    "text, message, line",
    [
        ("merge_method: linear\nmodels: {model: [a, b}\n", "invalid YAML: expected ',' or ']', but got '}'", 2),
        (LINEAR + "dtype: float32\ndtype: bfloat16\n", "duplicate key 'dtype'", 4),
        (
            "name: a\n" + LINEAR + "---\n\n# no method\nname: b\nmodels: [{model: a}]\n",
            "document 2 has neither 'merge_method' nor 'experts': not a mergekit merge or MoE config",
            7,
        ),
        ("- merge_method: linear\n", "document 1 is not a mapping: not a mergekit merge or MoE config", 1),
        ("name: a\n" + LINEAR + "---\nname: a\n" + LINEAR, "duplicate stage name 'a' (first at line 1)", 5),
        (
            "name: all\n" + LINEAR,
            "stage name 'all' cannot be a target name: use letters, digits, '_', '-', '.' (and not 'all')",
            1,
        ),
        (
            "name: my merge\n" + LINEAR,
            "stage name 'my merge' cannot be a target name: use letters, digits, '_', '-', '.' (and not 'all')",
            1,
        ),
        ("name: 1.5\n" + LINEAR, "stage name 1.5 is not a string: quote it (name: \"1.5\")", 1),
        (
            LINEAR + "---\n" + LINEAR,
            "documents at lines 1, 4 have no 'name:': only one (mergekit-multi's final merge) may go without",
            4,
        ),
        (
            "name: config\n" + LINEAR + "---\n" + LINEAR,
            "the document without 'name:' would be target 'config', which a stage at line 1 already is: give it another with --name",
            5,
        ),
        (
            "name: a\nmerge_method: linear\nmodels: [{model: b}, {model: ../models/base}]\n---\n"
            "name: b\nmerge_method: linear\nmodels: [{model: ../models/base}, {model: a}]\n",
            "dependency cycle: a -> b -> a",
            3,
        ),
    ],
)
def test_config_mistakes_name_the_config_and_line(layout, text, message, line):
    error = import_error(layout, text)
    assert error.message == message
    assert error.location.line == line


def test_what_mbuild_would_reject_is_reported_at_the_configs_line(layout):
    # Validated as a Mergefile before writing, but reported where the user wrote it.
    error = import_error(layout, "name: a\n" + LINEAR + "---\n# the last stage\nname: b\nmerge_method: lineer\nmodels: [{model: a}]\n")
    assert error.message == "unknown merge_method 'lineer' (did you mean 'linear'?)"
    assert (error.location.line, error.location.target) == (7, "b")

    error = import_error(layout, LINEAR + "parameters: {weight: 2, normalise: true}\n")
    assert error.message == "unknown parameter 'normalise' for linear (did you mean 'normalize'?)"
    assert (error.location.line, error.location.target) == (3, "config")

    error = import_error(layout, "merge_method: linear\nmodels:\n  - model: ../models/base\n  - model: ./missing\n")
    assert error.message == (
        f"model './missing' not found: no folder {layout / 'configs' / 'missing'} and no stage of that name"
    )
    assert (error.location.line, error.location.target) == (4, "config")

    error = import_error(layout, "merge_method: linear\nmodels:\n  - model: ../models/base\n  - model: ../models/math+adapter\n")
    assert error.message == (
        f"'../models/math+adapter': model 'adapter' not found: no folder {layout / 'configs' / 'adapter'} and no stage of that name"
    )
    assert (error.location.line, error.location.target) == (4, "config")


def test_bad_name_option_and_nothing_written_on_error(layout, capsys):
    config = write_config(layout, "name: a\n" + LINEAR)
    with pytest.raises(MbuildError, match="--name b: every document of .* already has a 'name:'"):
        importer.import_config(config, layout / "Mergefile", name="b", working_dir=layout / "configs")
    config = write_config(layout, LINEAR)
    with pytest.raises(MbuildError, match="--name 'all' cannot be a target name"):
        importer.import_config(config, layout / "Mergefile", name="all", working_dir=layout / "configs")

    bad = write_config(layout, LINEAR + "merge_method: slerp\n", "bad.yml")
    assert main(["import", str(bad), "-o", str(layout / "Mergefile")]) == 2
    assert f"{bad}:3: duplicate key 'merge_method'" in capsys.readouterr().err
    assert not (layout / "Mergefile").exists()


# --- round trip: the imported Mergefile builds mergekit-multi's bytes ------------------------

ROUND_TRIP = """\
name: blend
merge_method: linear
models:
  - model: ../models/base
    parameters: {weight: 0.5}
  - model: ../models/math
    parameters:
      weight: [{filter: mlp, value: 0.2}, {value: 0.8}]
dtype: float32
---
name: tuned
merge_method: task_arithmetic
base_model: ../models/base
models:
  - model: blend
    parameters: {weight: 0.5}
  - model: ../models/code
    parameters: {weight: 0.3}
dtype: float32
---
merge_method: slerp
base_model: blend
models: [{model: blend}, {model: tuned}]
parameters:
  t: [{filter: self_attn, value: [0, 0.5, 1]}, {value: 0.6}]
dtype: float32
"""


def test_round_trip_matches_mergekit_multi_bytes(layout, monkeypatch, capsys):
    pytest.importorskip("mergekit")
    import torch
    from conftest import load_tensors

    monkeypatch.delenv("MBUILD_CACHE", raising=False)
    configs = layout / "configs"
    config = write_config(layout, ROUND_TRIP)
    # mergekit-multi runs in the config's folder (its relative paths start there) meanwhile.
    reference = subprocess.Popen(
        [sys.executable, "-m", "mergekit.scripts.multimerge", str(config),
         "-I", str(layout / "mergekit"), "--out-path", str(layout / "mergekit" / "final")],
        cwd=configs,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        monkeypatch.chdir(configs)
        output = layout / "project" / "Mergefile"
        assert main(["import", str(config), "-o", str(output), "--name", "final"]) == 0
        capsys.readouterr()
        assert main(["-f", str(output), "-q"]) == 0
    finally:
        log, _ = reference.communicate(timeout=120)
    assert reference.returncode == 0, log

    for stage in ("blend", "tuned", "final"):
        mine = load_tensors(layout / "project" / "build" / stage)
        theirs = load_tensors(layout / "mergekit" / stage)
        assert sorted(mine) == sorted(theirs), stage
        assert len(mine) > 50
        unequal = [name for name in mine if mine[name].dtype != theirs[name].dtype or not torch.equal(mine[name], theirs[name])]
        assert not unequal, f"{stage}: {unequal[:5]}"

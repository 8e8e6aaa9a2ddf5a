"""Malformed and hostile inputs: each is one clear error (exit 2, no traceback), never a hang or a flood.

A Mergefile whose aliases multiply or nest without end, one that is not UTF-8 or too large;
a model folder whose config.json, index or safetensors header lies about what is there, or
whose files are FIFOs or links to devices; a hub cache ref or a Mergefile.lock gone wrong.
Each error names the file, and the Mergefile line and target where an entry led to it.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, load_tensors, run_cli
from mbuild import mergefile as mergefile_module
from mbuild.errors import MergefileError


def run_bounded(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in a child with a time and a memory bound: a hang or an endless read fails the test, not the machine."""

    def bound_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    environment = dict(os.environ if env is None else env, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "mbuild.cli", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=bound_memory,
    )


def assert_one_error(code: int, err: str, *expected: str) -> None:
    """Exit code 2 and a single `mbuild: error:` line holding every expected piece."""
    assert code == 2, err
    assert err.startswith("mbuild: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for piece in expected:
        assert piece in err, err


def one_target(folder: Path, model: Path | str, name: str = "x") -> Path:
    """A Mergefile whose target ``name`` (line 2) copies ``model`` (named on line 5)."""
    path = folder / "Mergefile"
    path.write_text(f"targets:\n  {name}:\n    merge_method: passthrough\n    models:\n      - model: {model}\n")
    return path


def model_copy(llama: dict[str, Path], folder: Path) -> Path:
    """A private copy of the tiny Llama base model, to spoil."""
    return Path(shutil.copytree(llama["base"], folder))


def rewrite_header(file: Path, change) -> None:
    """Replace a safetensors file's header by ``change(header)`` (JSON text or a value), keeping its data."""
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = change(json.loads(raw[8 : 8 + length]))
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])


# ---------------------------------------------------------------------------------------------
# The Mergefile: bounded in size, nodes after aliases, and depth; UTF-8; plain YAML only


def billion_laughs(levels: int) -> str:
    """Lines whose aliases of aliases expand to 9**levels strings."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, levels):
        name, previous = chr(ord("a") + level), chr(ord("a") + level - 1)
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_aliases_of_aliases_are_refused_at_once(tmp_path):
    path = tmp_path / "Mergefile"
    path.write_text(billion_laughs(6))  # 531441 strings; nine levels are the classic attack
    started = time.monotonic()
    code, _, err = run_cli("-f", str(path), "-n")
    assert time.monotonic() - started < 5
    assert_one_error(code, err, f"{path}:", "expands to more than 100000 YAML values")


@pytest.mark.parametrize(
    "text",
    ["targets: &loop\n  x: *loop\n", "targets:\n  x: &loop [1, *loop]\n", "targets:\n  x: &loop {a: 1, <<: *loop}\n"],
    ids=["mapping", "list", "merge-key"],
)
def test_an_alias_used_inside_itself_is_one_error(tmp_path, text):
    path = tmp_path / "Mergefile"
    path.write_text(text)
    code, _, err = run_cli("-f", str(path), "-n")
    assert_one_error(code, err, f"{path}:", "nests deeper than 64 levels")


@pytest.mark.parametrize("opening", ["[", "{a: "], ids=["lists", "mappings"])
def test_deep_nesting_is_one_error_naming_the_line(tmp_path, opening):
    closing = "]" if opening == "[" else "}"
    path = tmp_path / "Mergefile"
    path.write_text("targets:\n  x:\n    parameters: " + opening * 5000 + "1" + closing * 5000 + "\n")
    code, _, err = run_cli("-f", str(path), "-n")
    assert_one_error(code, err, f"{path}:3:", "nests deeper than 64 levels")


def test_a_mergefile_over_one_mebibyte_is_refused(llama, tmp_path):
    path = one_target(tmp_path, llama["base"])
    path.write_text(path.read_text() + ("# padding\n" * 110_000))
    code, _, err = run_cli("-f", str(path), "-n")
    assert_one_error(code, err, str(path), "larger than 1 MiB")


def test_a_mergefile_that_is_not_utf8_names_the_line(llama, tmp_path):
    path = one_target(tmp_path, llama["base"])
    path.write_bytes(path.read_bytes().replace(b"passthrough", b"pass\xfethrough"))
    code, _, err = run_cli("-f", str(path), "-n")
    assert_one_error(code, err, f"{path}:3:", "not UTF-8")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("targets:\n  x:\n    !!python/name:os.system key: 1\n", "could not determine a constructor"),
        ("targets:\n  x:\n    seed: !!python/name:os.system\n", "could not determine a constructor"),
        ("targets:\n  x: !!python/object/apply:os.system [ls]\n", "unsupported YAML tag"),
        ("targets:\n  x:\n    {a: 1}: 2\n", "a key must be a plain value"),
        ("targets:\n  x:\n    [[1]]: 2\n", "a key must be a plain value"),
        ("targets:\n  x:\n    seed: " + "1" * 5000 + "\n", "invalid YAML value"),
    ],
    ids=["python-tag-key", "python-tag-value", "python-tag-list", "mapping-key", "nested-list-key", "huge-integer"],
)
def test_python_tags_and_odd_keys_are_one_error_naming_the_line(tmp_path, text, expected):
    path = tmp_path / "Mergefile"
    path.write_text(text)
    code, _, err = run_cli("-f", str(path), "-n")
    line = 2 if "apply" in text else 3
    assert_one_error(code, err, f"{path}:{line}:", expected)


def test_an_overlong_target_name_is_refused_when_the_mergefile_is_checked(llama, tmp_path):
    name = "t" * 250  # its lock file, `.NAME.mbuild-lock`, would be over the filesystem's 255 bytes
    path = one_target(tmp_path, llama["base"], name)
    code, _, err = run_cli("-f", str(path), "-n")
    assert_one_error(code, err, f"{path}:2:", "at most 200")


def test_an_overlong_output_name_is_refused_when_the_mergefile_is_checked(llama, tmp_path):
    path = one_target(tmp_path, llama["base"])
    path.write_text(path.read_text() + "    output: build/" + "o" * 250 + "\n")
    code, _, err = run_cli("-f", str(path), "-n")
    assert_one_error(code, err, f"{path}:6: target 'x'", "at most 200")


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"merge_method: linear\nmodels: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nests deeper than 64 levels"),
     (b"# pad\n" * 200_000, "larger than 1 MiB")],
    ids=["deep", "large"],
)
def test_a_mergekit_config_too_deep_or_large_to_import_is_one_error(tmp_path, content, expected):
    config = tmp_path / "merge.yml"
    config.write_bytes(content)
    code, _, err = run_cli("import", str(config), "-o", str(tmp_path / "Mergefile"))
    assert_one_error(code, err, str(config), expected)
    assert not (tmp_path / "Mergefile").exists()


@pytest.mark.parametrize("revision", ["../../../x", "main//x", "./main"])
def test_a_hub_revision_that_is_a_path_is_refused(tmp_path, revision):
    text = f"targets:\n  x:\n    merge_method: passthrough\n    models:\n      - model: acme/tiny@{revision}\n"
    with pytest.raises(MergefileError, match="never a path") as caught:
        mergefile_module.parse(text, tmp_path / "Mergefile")
    assert caught.value.location.line == 5


# ---------------------------------------------------------------------------------------------
# config.json: a JSON object in a regular file


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"[1, 2]", "JSON list, not an object"), (b'"llama"', "JSON str, not an object"),
     (b'{"a": "\xff"}', "not UTF-8"), (None, "is a folder")],
    ids=["list", "string", "not-utf8", "folder"],
)
def test_a_config_that_is_not_a_json_object_is_one_error(llama, tmp_path, content, expected):
    model = model_copy(llama, tmp_path / "model")
    (model / "config.json").unlink()
    if content is None:
        (model / "config.json").mkdir()
    else:
        (model / "config.json").write_bytes(content)
    path = one_target(tmp_path, model)
    code, _, err = run_cli("-f", str(path), "-n")
    assert_one_error(code, err, f"{path}:5: target 'x'", str(model / "config.json"), expected)


def test_a_text_config_that_is_not_a_mapping_is_ignored(llama, tmp_path):
    model = model_copy(llama, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    del config["vocab_size"]  # so it is looked for in text_config
    (model / "config.json").write_text(json.dumps({**config, "text_config": [1]}))
    path = one_target(tmp_path, model)
    path.write_text(path.read_text() + f"    tokenizer_source: {model}\n")  # reads each vocab_size
    code, _, err = run_cli("-f", str(path), "-n", "-q", "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, err


# ---------------------------------------------------------------------------------------------
# safetensors headers: every entry checked against the others and against the file


def _set(name: str, key: str, value):
    def change(header):
        header[name][key] = value
        return header

    return change


def _drop_offsets(header):
    del header["model.norm.weight"]["data_offsets"]
    return header


def _reverse_offsets(header):
    header["model.norm.weight"]["data_offsets"].reverse()
    return header


def _overlap(header):
    header["model.layers.1.input_layernorm.weight"]["data_offsets"] = header["model.layers.0.input_layernorm.weight"]["data_offsets"]
    return header


def _past_the_end(header):
    end = max(entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__")
    header["model.norm.weight"]["data_offsets"] = [end, end + 128]
    return header


def _repeat_a_tensor(header):
    text = json.dumps(header)
    entry = json.dumps(header["model.norm.weight"])
    return text[:-1] + f', "model.norm.weight": {entry}}}'


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda header: [header], "header is a JSON list"),
        (_set("model.norm.weight", "dtype", ["BF16"]), "unsupported dtype"),
        (lambda header: {**header, "model.norm.weight": "BF16"}, "header entry is not a mapping"),
        (_drop_offsets, "data_offsets None"),
        (_set("model.norm.weight", "data_offsets", ["0", "128"]), "data_offsets ['0', '128']"),
        (_reverse_offsets, "0 <= begin <= end"),
        (_set("model.norm.weight", "shape", [-64]), "non-negative integers"),
        (_set("model.norm.weight", "shape", "64"), "non-negative integers"),
        (_set("lm_head.weight", "shape", [384, 32]), "but its data_offsets span 49152"),
        (_overlap, "overlap in the file"),
        (_past_the_end, "is truncated: tensor model.norm.weight ends at byte"),
        (_repeat_a_tensor, "names 'model.norm.weight' twice"),
    ],
    ids=["list", "dtype-list", "entry-string", "offsets-missing", "offsets-strings", "offsets-reversed",
         "shape-negative", "shape-string", "bytes-mismatch", "overlap", "past-the-end", "repeated-name"],
)
def test_a_lying_safetensors_header_is_one_error_naming_file_line_and_target(llama, tmp_path, change, expected):
    model = model_copy(llama, tmp_path / "model")
    rewrite_header(model / "model.safetensors", change)
    path = one_target(tmp_path, model)
    code, _, err = run_cli("-f", str(path), "-n")
    assert_one_error(code, err, f"{path}:5: target 'x'", str(model / "model.safetensors"), expected)


def test_a_truncated_weight_file_names_the_mergefile_line_before_any_hashing(llama, tmp_path):
    model = model_copy(llama, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    path = one_target(tmp_path, model)
    code, _, err = run_cli("-f", str(path), "-q", "--cache-dir", str(tmp_path / "cache"))
    assert_one_error(code, err, f"{path}:5: target 'x'", f"{weights} is truncated")
    assert not (tmp_path / "build").exists()


def test_the_same_tensor_in_two_files_is_one_error(llama, tmp_path):
    model = model_copy(llama, tmp_path / "model")
    shutil.copyfile(model / "model.safetensors", model / "model-extra.safetensors")
    path = one_target(tmp_path, model)
    code, _, err = run_cli("-f", str(path), "-n")
    assert_one_error(code, err, f"{path}:5: target 'x'", "is in two files, model-extra.safetensors and model.safetensors")


@pytest.mark.parametrize(
    ("index", "expected"),
    [
        (b'{"weight_map": ["model.safetensors"]}', "'weight_map' must map tensor names to file names"),
        (b'{"weight_map": {"lm_head.weight": 5}}', "'weight_map' must map tensor names to file names"),
        (b'{"weight_map": {"lm_head.weight": "../other/model.safetensors"}}', "a shard must be a file in the model's own folder"),
        (b'{"weight_map": {"lm_head.weight": "sub/model.safetensors"}}', "a shard must be a file in the model's own folder"),
        (b'{"weight_map": {"lm_head.weight": ".."}}', "a shard must be a file in the model's own folder"),
        (b'[{"weight_map": {}}]', "JSON list, not an object"),
        (b'{"weight_map": {"lm_head.weight": "\xff"}}', "not UTF-8"),
    ],
    ids=["map-list", "map-int", "parent", "subfolder", "dot-dot", "index-list", "not-utf8"],
)
def test_a_bad_index_is_one_error(llama, tmp_path, index, expected):
    other = model_copy(llama, tmp_path / "other")
    model = model_copy(llama, tmp_path / "model")
    (model / "sub").mkdir()
    shutil.move(model / "model.safetensors", model / "sub" / "model.safetensors")
    (model / "model.safetensors.index.json").write_bytes(index)
    path = one_target(tmp_path, model)
    code, _, err = run_cli("-f", str(path), "-n")
    assert_one_error(code, err, f"{path}:5: target 'x'", str(model / "model.safetensors.index.json"), expected)
    assert other.exists()


# ---------------------------------------------------------------------------------------------
# Special files: refused without waiting on a FIFO or reading a device; links to files still work


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "model.safetensors.index.json"])
def test_a_fifo_in_a_model_folder_is_refused_not_waited_on(llama, tmp_path, name):
    model = model_copy(llama, tmp_path / "model")
    (model / name).unlink(missing_ok=True)
    os.mkfifo(model / name)
    path = one_target(tmp_path, model)
    result = run_bounded(tmp_path, "-f", str(path), "-n")
    assert_one_error(result.returncode, result.stderr, f"{path}:5: target 'x'", f"{model / name} is not a regular file")


def test_a_config_linked_to_dev_zero_is_refused_not_read(llama, tmp_path):
    model = model_copy(llama, tmp_path / "model")
    (model / "config.json").unlink()
    (model / "config.json").symlink_to("/dev/zero")
    path = one_target(tmp_path, model)
    result = run_bounded(tmp_path, "-f", str(path), "-n")
    assert_one_error(result.returncode, result.stderr, f"{path}:5: target 'x'", "is not a regular file")


def test_a_model_of_links_to_files_builds_as_a_hub_snapshot_does(llama, tmp_path):
    blobs = model_copy(llama, tmp_path / "blobs")
    model = tmp_path / "snapshot"
    model.mkdir()
    for blob in blobs.iterdir():
        (model / blob.name).symlink_to(blob)
    path = one_target(tmp_path, model)
    code, _, err = run_cli("-f", str(path), "-q", "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, err
    built, source = load_tensors(tmp_path / "build" / "x"), load_tensors(blobs)
    assert built.keys() == source.keys() and all(torch.equal(built[name], source[name]) for name in source)


@pytest.mark.parametrize("content", [b"\xff\xfe", b"[1]"], ids=["jinja-not-utf8", "tokenizer-config-list"])
def test_an_unreadable_chat_template_is_one_error(llama, tmp_path, content):
    model = model_copy(llama, tmp_path / "model")
    if content == b"[1]":
        (model / "chat_template.jinja").unlink()
        spoiled = model / "tokenizer_config.json"
    else:
        spoiled = model / "chat_template.jinja"
    spoiled.write_bytes(content)
    path = one_target(tmp_path, model)
    path.write_text(path.read_text() + "    chat_template: auto\n")
    code, _, err = run_cli("-f", str(path), "-n")
    assert_one_error(code, err, f"{path}:6: target 'x'", str(spoiled))


# ---------------------------------------------------------------------------------------------
# The hub cache and Mergefile.lock


def hub_cache(cache: Path, llama: dict[str, Path], commit: str = "a" * 40) -> Path:
    """A Hugging Face cache holding acme/tiny at ``commit``; returns the repository's folder."""
    folder = cache / "models--acme--tiny"
    shutil.copytree(llama["base"], folder / "snapshots" / commit)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return folder


def offline(cache: Path) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))


def test_a_hub_ref_that_is_a_fifo_is_refused_not_waited_on(llama, tmp_path):
    folder = hub_cache(tmp_path / "hub", llama)
    (folder / "refs" / "main").unlink()
    os.mkfifo(folder / "refs" / "main")
    path = one_target(tmp_path, "acme/tiny")
    result = run_bounded(tmp_path, "-f", str(path), "-n", env=offline(tmp_path / "hub"))
    assert_one_error(result.returncode, result.stderr, f"{path}:5: target 'x'", "refs/main is not a regular file")


def test_a_hub_ref_naming_a_folder_outside_the_snapshots_is_refused(llama, tmp_path):
    folder = hub_cache(tmp_path / "hub", llama)
    shutil.copytree(llama["math"], tmp_path / "elsewhere")
    (folder / "refs" / "main").write_text("../../../elsewhere")
    path = one_target(tmp_path, "acme/tiny")
    result = run_bounded(tmp_path, "-f", str(path), "-n", env=offline(tmp_path / "hub"))
    assert_one_error(result.returncode, result.stderr, f"{path}:5: target 'x'", "does not name a commit")


def test_a_lock_pinning_a_path_is_refused_not_followed(llama, tmp_path):
    hub_cache(tmp_path / "hub", llama)
    path = one_target(tmp_path, "acme/tiny")
    pin = {"revision": "../../../../../../../../../dev/zero"}
    (tmp_path / "Mergefile.lock").write_text(json.dumps({"version": 3, "sources": {"hub:acme/tiny@main": pin}, "targets": {}}))
    result = run_bounded(tmp_path, "-f", str(path), "-n", env=offline(tmp_path / "hub"))
    assert_one_error(result.returncode, result.stderr, f"{tmp_path / 'Mergefile.lock'}: it pins hub:acme/tiny@main", "not a commit")


@pytest.mark.parametrize("content", [b"[1]", b'{"sources": [], "targets": {}}', b'{"version": 3, "sources": {"\xff": 1}}'],
                         ids=["list", "sources-list", "not-utf8"])
def test_a_malformed_lock_is_read_as_empty(llama, tmp_path, content):
    path = one_target(tmp_path, llama["base"])
    (tmp_path / "Mergefile.lock").write_bytes(content)
    code, _, err = run_cli("-f", str(path), "-q", "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, err
    assert "x" in json.loads((tmp_path / "Mergefile.lock").read_text())["targets"]


def test_a_stored_vocabulary_cut_short_is_built_again(llama, tmp_path):
    path = one_target(tmp_path, llama["base"])
    path.write_text(path.read_text() + "    tokenizer_source: union\n")
    cache = tmp_path / "cache"
    assert run_cli("-f", str(path), "-n", "--cache-dir", str(cache))[0] == 0
    (stored,) = cache.glob("vocabularies/*/vocabulary.json")
    stored.write_text(stored.read_text()[:100])  # as if mbuild was killed while writing it
    code, _, err = run_cli("-f", str(path), "-n", "--cache-dir", str(cache))
    assert code == 0, err
    assert json.loads(stored.read_text())["size"] == 384


@pytest.mark.parametrize("jobs", ["0", "-3", "two"])
def test_a_job_count_below_one_is_refused(llama, tmp_path, jobs, capsys):
    from mbuild.cli import main

    path = tmp_path / "Mergefile"
    path.write_text(f"targets:\n  m:\n    merge_method: linear\n    parameters: {{weight: 1}}\n    models: [{llama['math']}]\n")
    with pytest.raises(SystemExit) as exited:
        main(["-f", str(path), "-j", jobs])
    assert exited.value.code == 2 and "-j" in capsys.readouterr().err
    assert not (tmp_path / "build").exists()


def test_an_output_under_the_home_folder_is_expanded(llama, tmp_path, monkeypatch):
    from mbuild import mergefile

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = tmp_path / "Mergefile"
    path.write_text(
        f"targets:\n  m:\n    merge_method: linear\n    parameters: {{weight: 1}}\n    models: [{llama['math']}]\n"
        "    output: ~/merged\n"
    )
    assert mergefile.load(path).targets["m"].output == tmp_path / "home" / "merged"


def test_a_reader_that_closes_the_pipe_early_gets_no_traceback():
    """`mbuild methods | head -1`: the closed pipe ends the command quietly."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        writer = subprocess.run(
            [sys.executable, "-m", "mbuild", "methods"], stdout=write_end, stderr=subprocess.PIPE, text=True, env=env
        )
    finally:
        os.close(write_end)
    assert writer.returncode == 141
    assert "Traceback" not in writer.stderr and "BrokenPipeError" not in writer.stderr, writer.stderr

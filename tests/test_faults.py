"""Hostile inputs and faults: nothing of the user's is ever replaced or deleted, every fault is one message.

Each test sets up what a careless or malicious user could (an output naming their file, a folder
with an `mbuild.json` of their own, outputs that alias or nest, a planted link, a crashed build's
leftovers) and checks both the message and that every byte of theirs is still there.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import linear_mergefile, load_tensors, run_cli, snapshot


# ---------------------------------------------------------------------------------------------
# Outputs that would replace what is not theirs


@pytest.mark.parametrize("output", ["notes.txt", "Mergefile", "MODEL_CONFIG"])
def test_an_output_naming_an_existing_file_is_refused_and_the_file_kept(llama, tmp_path, output):
    (tmp_path / "notes.txt").write_text("my notes")
    if output == "MODEL_CONFIG":
        output = str(llama["base"] / "config.json")
    path = linear_mergefile(tmp_path, llama, {"merged": output})
    before_config = (llama["base"] / "config.json").read_bytes()
    before_notes = (tmp_path / "notes.txt").read_bytes()
    code, _, err = run_cli("-f", str(path), "-q")
    assert code == 2
    assert "is not a folder" in err or "would hold the Mergefile" in err or "overlaps the source model" in err, err
    assert f"{path}:" in err and "target 'merged'" in err
    assert (tmp_path / "notes.txt").read_bytes() == before_notes
    assert (llama["base"] / "config.json").read_bytes() == before_config
    assert "merged" in path.read_text()  # the Mergefile itself is untouched
    assert not list(tmp_path.glob(".*mbuild-old*"))


def test_an_output_that_is_a_link_is_refused(llama, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "mine.txt").write_text("keep")
    (tmp_path / "linked").symlink_to(real)
    path = linear_mergefile(tmp_path, llama, {"merged": "linked"})
    code, _, err = run_cli("-f", str(path), "-q")
    assert code == 2 and "symbolic link" in err
    assert (real / "mine.txt").read_text() == "keep" and (tmp_path / "linked").is_symlink()


@pytest.mark.parametrize(
    ("outputs", "expected"),
    [
        ({"x": "out/x", "y": "out/y/../x"}, "is also target 'x''s"),
        ({"x": "out/x", "y": "out/x/inner"}, "lies inside the output of target 'x'"),
        ({"x": "out/x/inner", "y": "out/x"}, "lies inside the output of target 'y'"),
        ({"x": "."}, "would hold the Mergefile"),
        ({"x": "/"}, "would hold the Mergefile"),
        ({"x": ".."}, "would hold the Mergefile"),
    ],
)
def test_outputs_that_alias_nest_or_hold_the_mergefile_are_refused_before_any_write(llama, tmp_path, outputs, expected):
    (tmp_path / "out" / "y").mkdir(parents=True)
    path = linear_mergefile(tmp_path, llama, outputs)
    before = snapshot(tmp_path)
    code, _, err = run_cli("-f", str(path), "-q")
    assert code == 2 and expected in err, err
    assert f"{path}:" in err
    assert snapshot(tmp_path) == before  # no lock file, no cache, nothing
    assert not Path("/.mbuild-lock").exists() and not list(Path("/").glob(".*.mbuild-lock"))


def test_an_output_inside_or_around_a_source_model_is_refused(llama, tmp_path):
    inside = linear_mergefile(tmp_path, llama, {"merged": str(llama["code"] / "merged")})
    code, _, err = run_cli("-f", str(inside), "-q")
    assert code == 2 and "overlaps the source model" in err
    assert not (llama["code"] / "merged").exists()
    around = linear_mergefile(tmp_path, llama, {"merged": str(llama["code"].parent)})
    code, _, err = run_cli("-f", str(around), "-q", "--dry-run")
    assert code == 2 and "overlaps the source model" in err


# ---------------------------------------------------------------------------------------------
# Ownership of output folders


def test_a_folder_with_a_users_mbuild_json_is_never_taken_for_mbuilds(llama, tmp_path):
    folder = tmp_path / "build" / "merged"
    folder.mkdir(parents=True)
    (folder / "mbuild.json").write_text(json.dumps({"theme": "dark"}))
    (folder / "mine.txt").write_text("keep")
    path = linear_mergefile(tmp_path, llama, {"merged": None})
    before = snapshot(folder)
    code, _, err = run_cli("-f", str(path), "-q")
    assert code == 2 and "was not made by mbuild" in err
    code, _, err = run_cli("clean", "-f", str(path))
    assert code == 2 and "not removing it" in err
    assert snapshot(folder) == before


def test_a_users_file_dropped_into_a_built_output_stops_rebuild_and_clean(llama, tmp_path):
    path = linear_mergefile(tmp_path, llama, {"merged": None})
    assert run_cli("-f", str(path), "-q")[0] == 0
    folder = tmp_path / "build" / "merged"
    (folder / "notes.txt").write_text("my notes on this merge")
    (folder / "extra.safetensors").write_bytes(b"not mbuild's")
    linear_mergefile(tmp_path, llama, {"merged": None}, weight=0.7)  # a change: the target is stale
    code, _, err = run_cli("-f", str(path), "-q")
    assert code == 2 and "holds what mbuild did not write there (extra.safetensors, notes.txt)" in err
    code, _, err = run_cli("clean", "-f", str(path))
    assert code == 2
    assert (folder / "notes.txt").read_text() == "my notes on this merge"
    assert (folder / "extra.safetensors").read_bytes() == b"not mbuild's"
    # Once the user moves their files away, the build goes on.
    (folder / "notes.txt").unlink()
    (folder / "extra.safetensors").unlink()
    assert run_cli("-f", str(path), "-q")[0] == 0
    assert load_tensors(folder)


# ---------------------------------------------------------------------------------------------
# Lock files and crashed builds


def test_a_lock_file_planted_as_a_link_is_refused_and_its_target_untouched(llama, tmp_path):
    path = linear_mergefile(tmp_path, llama, {"merged": None})
    (tmp_path / "build").mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "build" / ".merged.mbuild-lock").symlink_to(victim)
    code, _, err = run_cli("-f", str(path), "-q")
    assert code == 2 and "lock file" in err, err
    assert victim.read_text() == "precious"
    # A hard link to a user's file is refused too.
    (tmp_path / "build" / ".merged.mbuild-lock").unlink()
    os.link(victim, tmp_path / "build" / ".merged.mbuild-lock")
    code, _, err = run_cli("-f", str(path), "-q")
    assert code == 2 and "not a plain file of mbuild's" in err
    assert victim.read_text() == "precious"


def dead_pid() -> int:
    """The id of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_status_shows_and_gc_removes_a_crashed_builds_temporary(llama, tmp_path):
    path = linear_mergefile(tmp_path, llama, {"merged": None, "other": None})
    assert run_cli("-f", str(path), "-q")[0] == 0
    crashed = tmp_path / "build" / f".merged.mbuild-tmp-{dead_pid()}"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"\0" * 4096)
    builder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    alive = tmp_path / "build" / f".other.mbuild-tmp-{builder.pid}"  # a live builder's: never touched
    alive.mkdir()
    try:
        check_status_and_gc(path, crashed, alive)
    finally:
        builder.kill()
        builder.wait()
    assert load_tensors(tmp_path / "build" / "merged")


def check_status_and_gc(path: Path, crashed: Path, alive: Path) -> None:
    code, out, _ = run_cli("status", "-f", str(path), "--json")
    report = json.loads(out)["targets"]
    assert report["merged"]["crashed_temporaries"] == [str(crashed)]
    assert report["other"]["crashed_temporaries"] == []
    code, out, _ = run_cli("gc", "-f", str(path), "--json")
    assert code == 0 and json.loads(out)["removed_temporaries"] == [str(crashed)]
    assert not crashed.exists() and alive.exists()


# ---------------------------------------------------------------------------------------------
# Mistakes that headers show are found before any source is read or anything is written


@pytest.mark.parametrize(
    ("second", "expected"),
    [
        ("    merge_method: passthrough\n    slices:\n      - sources:\n          - {model: MATH, layer_range: [0, 9]}\n",
         "is out of range"),
        ("    merge_method: slerp\n    base_model: MATH\n    models:\n      - model: MATH\n      - model: CODE\n", "'t'"),
        ("    merge_method: linear\n    parameters: {weight: 1}\n    models:\n      - model: MATH\n      - model: half\n",
         "different layer counts"),
        ("    merge_method: linear\n    parameters: {weight: 1}\n    models:\n      - model: MATH\n      - model: CODE\n"
         "    output: theirs\n", "not made by mbuild"),
    ],
    ids=["layer-range", "missing-t", "shapes", "foreign-output"],
)
def test_plan_mistakes_are_reported_before_hashing_or_writing(families, tmp_path, second, expected):
    llama = families("llama")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "mine.txt").write_text("keep")
    text = (
        "targets:\n  first:\n    merge_method: linear\n    models:\n"
        f"      - model: {llama['math']}\n        parameters: {{weight: 0.5}}\n"
        f"      - model: {llama['code']}\n        parameters: {{weight: 0.5}}\n"
        "  half:\n    merge_method: passthrough\n    slices:\n"
        f"      - sources:\n          - {{model: {llama['code']}, layer_range: [0, 1]}}\n"
        "  second:\n" + second.replace("MATH", str(llama["math"])).replace("CODE", str(llama["code"]))
    )
    path = tmp_path / "Mergefile"
    path.write_text(text)
    before = snapshot(tmp_path)
    code, _, err = run_cli("-f", str(path), "--cache-dir", str(tmp_path / "cache"))
    assert code == 2 and expected in err, err
    assert f"{path}:" in err and "target 'second'" in err
    assert "hashing" not in err  # no source byte was read
    assert snapshot(tmp_path) == before and not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------
# Publishing


class Crash(BaseException):
    """A process dying at a chosen point."""


def test_a_crash_while_publishing_never_leaves_the_output_path_missing(llama, tmp_path, monkeypatch):
    if not sys.platform.startswith("linux"):
        pytest.skip("no renameat2 here: the two-rename fallback and its recovery are tested in test_engine")
    path = linear_mergefile(tmp_path, llama, {"merged": None})
    assert run_cli("-f", str(path), "-q")[0] == 0
    output = tmp_path / "build" / "merged"
    before = load_tensors(output)
    linear_mergefile(tmp_path, llama, {"merged": None}, weight=0.7)
    renames = []

    def rename_then_die(source, destination):
        renames.append(source)
        if len(renames) == 2:  # between moving the old output away and the new one in
            raise Crash()
        os.replace(source, destination)

    monkeypatch.setattr(os, "rename", rename_then_die)
    with contextlib.suppress(Crash):
        run_cli("-f", str(path), "-q")
    assert (output / "mbuild.json").is_file()  # the path held a whole output at every moment
    after = load_tensors(output)
    assert after.keys() == before.keys() and any(not after[n].equal(before[n]) for n in after)
    monkeypatch.undo()
    assert run_cli("-f", str(path), "-q")[0] == 0
    assert not list(output.parent.glob(".merged.mbuild-*")) or all(
        p.name.endswith("-lock") for p in output.parent.glob(".merged.mbuild-*")
    )


# ---------------------------------------------------------------------------------------------
# Mergefile.lock follows the built outputs


def locked_target(path: Path, name: str) -> dict:
    return json.loads(path.with_name(path.name + ".lock").read_text())["targets"][name]


def test_a_lock_left_behind_by_a_kill_after_publishing_is_repaired(llama, tmp_path):
    path = linear_mergefile(tmp_path, llama, {"merged": None})
    assert run_cli("-f", str(path), "-q")[0] == 0
    lock_path = path.with_name("Mergefile.lock")
    old_lock = lock_path.read_text()
    linear_mergefile(tmp_path, llama, {"merged": None}, weight=0.7)
    assert run_cli("-f", str(path), "-q")[0] == 0
    lock_path.write_text(old_lock)  # as if killed between publishing the output and recording it
    code, out, err = run_cli("-f", str(path))
    assert code == 0 and "nothing to do" in out and "repaired" in err
    manifest = json.loads((tmp_path / "build" / "merged" / "mbuild.json").read_text())
    entry = locked_target(path, "merged")
    assert entry["key"] == manifest["key"] and entry["recipe"]["models"][0]["parameters"]["weight"] == 0.7
    before = lock_path.read_bytes()
    assert run_cli("-f", str(path), "-q")[0] == 0 and lock_path.read_bytes() == before  # no rewrite when it agrees


def test_a_second_mergefile_over_fresh_outputs_writes_its_own_lock(llama, tmp_path):
    path = linear_mergefile(tmp_path, llama, {"merged": None})
    assert run_cli("-f", str(path), "-q")[0] == 0
    second = tmp_path / "Mergefile.copy"
    second.write_text(path.read_text())
    code, out, _ = run_cli("-f", str(second))
    assert code == 0 and "nothing to do" in out
    assert locked_target(second, "merged") == locked_target(path, "merged")
    assert json.loads(second.with_name("Mergefile.copy.lock").read_text())["sources"]


# ---------------------------------------------------------------------------------------------
# Inputs of another architecture, and input tensors no output takes


def linear_text(first: Path, second: Path, extra: str = "") -> str:
    return (
        "targets:\n  merged:\n    merge_method: linear\n    parameters: {weight: 0.5}\n"
        f"    models:\n      - model: {first}\n      - model: {second}\n" + extra
    )


def test_two_architectures_are_refused_unless_the_target_says_so(families, tmp_path):
    llama, qwen = families("llama"), families("qwen2")
    path = tmp_path / "Mergefile"
    path.write_text(linear_text(llama["math"], qwen["math"]))
    code, _, err = run_cli("-f", str(path), "-q")
    assert code == 2 and "different architectures" in err and "LlamaForCausalLM" in err and "Qwen2ForCausalLM" in err
    assert f"{path}:2: target 'merged'" in err
    assert not (tmp_path / "build").exists()
    # Allowed: it builds, and every Qwen tensor the Llama layout has no place for is named.
    path.write_text(linear_text(llama["math"], qwen["math"], "    allow_mixed_architectures: true\n"))
    code, _, err = run_cli("-f", str(path))
    assert code == 0, err
    assert "warning: target 'merged' takes no output tensor from" in err and "self_attn.q_proj.bias" in err
    code, out, _ = run_cli("-f", str(path), "--dry-run", "--json")
    dropped = json.loads(out)["targets"]["merged"]["dropped_inputs"]
    qwen_names = set(load_tensors(qwen["math"]))
    built = set(load_tensors(tmp_path / "build" / "merged"))
    assert {d.split(": ", 1)[1] for d in dropped} == qwen_names - built  # all of them, and only them
    code, out, _ = run_cli("explain", "merged", "-f", str(path), "--json")
    assert json.loads(out)["targets"]["merged"]["dropped_inputs"] == dropped
    code, out, _ = run_cli("explain", "merged", "-f", str(path))
    assert out.count("left out (allow_mixed_architectures):") == len(dropped) > 0


def test_an_input_tensor_no_output_takes_is_an_error(llama, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    extra = tmp_path / "extra"
    shutil.copytree(llama["code"], extra)
    tensors = load_file(extra / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = tensors["model.norm.weight"][:4].clone()
    save_file(tensors, extra / "model.safetensors", metadata={"format": "pt"})
    path = tmp_path / "Mergefile"
    path.write_text(linear_text(llama["math"], extra))
    code, _, err = run_cli("-f", str(path), "-q")
    assert code == 2 and "rotary_emb.inv_freq" in err and "never drops an input tensor silently" in err, err
    # As the first model, its extra tensor has no partner in the second: also one message.
    path.write_text(linear_text(extra, llama["math"]))
    code, _, err = run_cli("-f", str(path), "-q")
    assert code == 2 and "has no 'self_attn.rotary_emb.inv_freq' in layer 0" in err, err


def test_a_link_planted_where_the_lock_is_written_is_not_followed(llama, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    path = linear_mergefile(tmp_path, llama, {"merged": None})
    (tmp_path / "Mergefile.lock.tmp").symlink_to(victim)
    assert run_cli("-f", str(path), "-q")[0] == 0
    assert victim.read_text() == "precious"
    assert json.loads(path.with_name("Mergefile.lock").read_text())["targets"]["merged"]


# ---------------------------------------------------------------------------------------------
# Pickled checkpoints: converted in the cache, by digest; never in the user's folder


def pickled_model(folder: Path, source: Path) -> Path:
    """A model folder holding `source`'s config and its weights as pytorch_model.bin."""
    import torch
    from safetensors.torch import load_file

    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text((source / "config.json").read_text())
    torch.save(load_file(source / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


def test_a_replaced_pickle_is_noticed_and_nothing_is_written_beside_it(llama, tmp_path):
    pickled = pickled_model(tmp_path / "pickled", llama["math"])
    path = tmp_path / "Mergefile"
    path.write_text(linear_text(pickled, llama["code"]))
    before = snapshot(pickled)
    code, _, err = run_cli("-f", str(path), "--dry-run", "--allow-pickle")
    assert code == 0, err
    assert snapshot(pickled) == before and not (tmp_path / "cache").exists()  # a dry run writes nothing
    assert run_cli("-f", str(path), "-q", "--allow-pickle")[0] == 0
    first = load_tensors(tmp_path / "build" / "merged")
    assert snapshot(pickled) == before  # the conversion lives in the cache
    assert list((tmp_path / "cache" / "converted").iterdir())
    pickled_model(pickled, llama["base"])  # the user replaces the checkpoint
    code, out, _ = run_cli("-f", str(path), "--allow-pickle", "--json")
    assert code == 0 and json.loads(out)["targets"]["merged"]["status"] == "built"
    second = load_tensors(tmp_path / "build" / "merged")
    base, code_model = load_tensors(llama["base"]), load_tensors(llama["code"])
    name = "model.layers.0.mlp.up_proj.weight"
    assert not second[name].equal(first[name])
    assert second[name].float().sub(base[name].float() * 0.5 + code_model[name].float() * 0.5).abs().max() < 1e-2
    code, out, _ = run_cli("gc", "-f", str(path), "--allow-pickle", "--json")
    assert json.loads(out)["removed_conversions"] == 1  # the first checkpoint's conversion


class Exploit:
    """An object whose unpickling would run a command."""

    def __reduce__(self):
        return (os.system, ("touch EXPLOITED",))


def test_a_malicious_pickle_is_one_error_and_leaves_nothing_behind(llama, tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((llama["math"] / "config.json").read_text())
    torch.save({"model.embed_tokens.weight": Exploit()}, pickled / "pytorch_model.bin")
    before = snapshot(pickled)
    path = tmp_path / "Mergefile"
    path.write_text(linear_text(pickled, llama["code"]))
    for extra in (["--dry-run"], []):
        code, _, err = run_cli("-f", str(path), "-q", "--allow-pickle", *extra)
        assert code == 2 and "weights_only=True" in err and "refused" in err, err
        assert f"{path}:" in err and "target 'merged'" in err
    assert not (tmp_path / "EXPLOITED").exists()
    assert snapshot(pickled) == before
    assert not (tmp_path / "cache" / "converted").exists() or not list((tmp_path / "cache" / "converted").iterdir())

"""The hub workflow's far end: model cards with the true lineage, `mbuild lock --update`, and
`mbuild push`, through huggingface_hub's real client against `fake_hub_upload.FakeHub`.

Hub models come from a pre-filled local Hugging Face cache (builds run with HF_HUB_OFFLINE=1);
pushes go to the fake hub (HF_ENDPOINT), with xet disabled so the plain LFS protocol is used.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from fake_hub_upload import TOKEN, FakeHub

FIRST, SECOND, THIRD = "1" * 40, "2" * 40, "3" * 40

MERGEFILE = """\
targets:
  mid:
    merge_method: linear
    models:
      - {{model: acme/base, parameters: {{weight: 0.5}}}}
      - {{model: acme/math, parameters: {{weight: 0.5}}}}
  top:
    merge_method: linear
    models:
      - {{model: mid, parameters: {{weight: 0.7}}}}
      - {{model: local-code, parameters: {{weight: 0.3}}}}
  side:
    merge_method: linear
    models:
      - {{model: acme/code@{code}, parameters: {{weight: 0.5}}}}
      - {{model: acme/base, parameters: {{weight: 0.5}}}}
  lone:
    merge_method: linear
    models:
      - {{model: local-code, parameters: {{weight: 1.0}}}}
"""


def snapshot(cache: Path, repo: str, commit: str, source: Path, license: str | None, main: bool = True) -> None:
    """One snapshot laid out as huggingface_hub's cache keeps it, with a model card declaring ``license``."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(source, folder / "snapshots" / commit)
    if license:
        (folder / "snapshots" / commit / "README.md").write_text(f"---\nlicense: {license}\n---\n# {repo}\n")
    if main:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(commit)


@pytest.fixture
def family(llama, tmp_path):
    """A Mergefile over three cached hub models and a local folder, every target built offline."""
    cache = tmp_path / "hub-cache"
    snapshot(cache, "acme/base", FIRST, llama["base"], "apache-2.0")
    snapshot(cache, "acme/math", FIRST, llama["math"], "apache-2.0")
    snapshot(cache, "acme/code", FIRST, llama["code"], "apache-2.0")
    shutil.copytree(llama["code"], tmp_path / "local-code")
    (tmp_path / "local-code" / "README.md").write_text("---\nlicense: mit\n---\n")
    (tmp_path / "Mergefile").write_text(MERGEFILE.format(code=FIRST))
    result = mbuild(tmp_path, "all", "--json")
    assert result.returncode == 0, result.stderr
    return tmp_path


def environment(folder: Path, offline: bool, endpoint: str = "http://127.0.0.1:9") -> dict:
    return dict(
        os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1" if offline else "0", HF_HUB_CACHE=str(folder / "hub-cache"),
        HF_HOME=str(folder / "hf-home"), HF_ENDPOINT=endpoint, HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1", MBUILD_CACHE=str(folder / "cache"),
    )


def mbuild(folder: Path, *args: str, offline: bool = True, endpoint: str = "http://127.0.0.1:9") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mbuild.cli", *args], cwd=folder, env=environment(folder, offline, endpoint),
                          capture_output=True, text=True, timeout=300)


def card(text: str) -> tuple[dict, str]:
    """A README's parsed YAML front matter and its body; fails if it does not start with front matter."""
    assert text.startswith("---\n")
    end = text.index("\n---\n", 3)
    return yaml.safe_load(text[4:end]), text[end + 5 :]


def lock_of(folder: Path) -> dict:
    return json.loads((folder / "Mergefile.lock").read_text())


def status(folder: Path) -> dict[str, bool]:
    result = mbuild(folder, "status", "--json")
    assert result.returncode == 0, result.stderr
    return {name: row["stale"] for name, row in json.loads(result.stdout)["targets"].items()}


def test_every_built_card_lists_its_hub_lineage_license_and_pins(family):
    mid, mid_body = card((family / "build" / "mid" / "README.md").read_text())
    top, top_body = card((family / "build" / "top" / "README.md").read_text())
    side, _ = card((family / "build" / "side" / "README.md").read_text())
    lone, lone_body = card((family / "build" / "lone" / "README.md").read_text())
    assert mid["base_model"] == ["acme/base", "acme/math"]
    # Through the target in between; the local folder is named in the body, not in base_model.
    assert top["base_model"] == ["acme/base", "acme/math"]
    assert side["base_model"] == ["acme/code", "acme/base"]
    assert lone["base_model"] == []
    assert mid["tags"] == top["tags"] == ["merge", "mbuild"] and mid["library_name"] == "transformers"
    # Every input declares apache-2.0 for mid; top adds a local folder under MIT: no license claimed.
    assert mid["license"] == side["license"] == "apache-2.0"
    assert "license" not in top and lone["license"] == "mit"
    assert f"`acme/base@main` at commit `{FIRST}`" in top_body and f"`acme/math@main` at commit `{FIRST}`" in top_body
    assert "`local-code`" in top_body and "`local-code`" in lone_body and "local-code" not in mid_body
    # Ancestors' recipes are not in a built card (they would undo the early cutoff): a push adds them.
    assert "Ancestors" not in top_body and "weight: 0.5" not in top_body
    # The card is part of the key: the no-op build that follows stays a no-op.
    result = mbuild(family, "all", "--json")
    assert {row["status"] for row in json.loads(result.stdout)["targets"].values()} == {"fresh"}


def test_a_push_uploads_the_output_with_its_lineage_and_the_lock_records_the_commit(family, tmp_path):
    with FakeHub(tmp_path / "fake-hub") as hub:
        result = mbuild(family, "push", "top", "--repo", "me/top-merge", "--json", offline=False, endpoint=hub.url)
        assert result.returncode == 0, result.stderr
        pushed = json.loads(result.stdout)
        uploaded = hub.files("me/top-merge")
        commit = hub.head("me/top-merge")
        branch = mbuild(family, "push", "top", "--repo", "me/top-merge", "--revision", "v1", "--private", offline=False, endpoint=hub.url)
        assert branch.returncode == 0, branch.stderr
        requests = list(hub.requests)
    output = family / "build" / "top"
    assert set(uploaded) == {p.name for p in output.iterdir()} - {"mbuild.json"}
    assert all(uploaded[name] == (output / name).read_bytes() for name in uploaded if name != "README.md")
    built = (output / "README.md").read_text()
    assert uploaded["README.md"].decode().startswith(built.rstrip("\n"))
    front, body = card(uploaded["README.md"].decode())
    assert front["base_model"] == ["acme/base", "acme/math"] and front["tags"] == ["merge", "mbuild"]
    ancestors = body[body.index("## Ancestors") :]
    assert "### `mid`" in ancestors and "model: acme/math" in ancestors and "weight: 0.5" in ancestors
    # The weights went through LFS, each checked against its sha256 by the server.
    assert any(method == "PUT" and path.startswith("/lfs-store/") for method, path in requests)
    assert pushed["commit"] == commit and pushed["repo"] == "me/top-merge"
    recorded = lock_of(family)["targets"]["top"]["pushed"]
    assert recorded[0] == {"repo": "me/top-merge", "revision": "main", "commit": commit, "key": pushed["key"]}
    assert recorded[1]["revision"] == "v1" and hub.head("me/top-merge", "v1") == recorded[1]["commit"] != commit
    # A later no-op build leaves the lock as it is; a rebuild keeps what was pushed, of another key.
    text = (family / "Mergefile.lock").read_text()
    noop = mbuild(family, "all")
    assert noop.returncode == 0 and "repaired" not in noop.stderr
    assert (family / "Mergefile.lock").read_text() == text
    (family / "Mergefile").write_text((family / "Mergefile").read_text().replace("weight: 0.7", "weight: 0.6"))
    assert mbuild(family, "top").returncode == 0
    entry = lock_of(family)["targets"]["top"]
    assert entry["pushed"] == recorded and entry["key"] != pushed["key"]


def test_a_stale_or_unbuilt_target_is_refused_with_nothing_uploaded(family, tmp_path):
    text = (family / "Mergefile").read_text().replace("weight: 0.7", "weight: 0.6")
    (family / "Mergefile").write_text(text + "  never:\n    merge_method: linear\n    models: [{model: local-code, parameters: {weight: 1.0}}]\n")
    with FakeHub(tmp_path / "fake-hub") as hub:
        stale = mbuild(family, "push", "top", "--repo", "me/top", offline=False, endpoint=hub.url)
        unbuilt = mbuild(family, "push", "never", "--repo", "me/never", offline=False, endpoint=hub.url)
        offline = mbuild(family, "push", "mid", "--repo", "me/mid", offline=True, endpoint=hub.url)
        assert hub.requests == []
    assert stale.returncode == 2 and "target 'top' is not up to date (models[0].parameters.weight: 0.7 → 0.6)" in stale.stderr
    assert unbuilt.returncode == 2 and "target 'never' is not up to date (never built)" in unbuilt.stderr
    assert offline.returncode == 2 and "HF_HUB_OFFLINE=1" in offline.stderr
    for result in (stale, unbuilt, offline):
        assert "Traceback" not in result.stderr
    assert "pushed" not in json.dumps(lock_of(family))


def test_lock_update_moves_one_pin_and_makes_exactly_its_dependents_stale(family, llama):
    cache = family / "hub-cache"
    before = lock_of(family)
    # main moves on for two models; without --update nothing moves and nothing goes stale.
    snapshot(cache, "acme/math", SECOND, llama["math"], "apache-2.0")
    snapshot(cache, "acme/code", SECOND, llama["math"], "apache-2.0")
    snapshot(cache, "acme/base", SECOND, llama["base"], "apache-2.0")
    assert mbuild(family, "all").returncode == 0
    assert lock_of(family) == before
    assert not any(status(family).values())
    shown = mbuild(family, "lock")
    assert f"acme/math@main{' ' * 26} {FIRST}" in shown.stdout
    assert lock_of(family) == before

    result = mbuild(family, "lock", "--update", "acme/math", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["models"] == {"acme/math": {"old": FIRST, "new": SECOND, "moved": True, "targets": ["mid", "top"]}}
    assert report["stale"] == ["mid", "top"]
    after = lock_of(family)
    assert after["sources"]["hub:acme/math@main"]["revision"] == SECOND
    assert after["sources"]["hub:acme/base@main"] == before["sources"]["hub:acme/base@main"]
    # What status says now is what the update said: the same bytes at a new commit still rebuild.
    assert status(family) == {"mid": True, "top": True, "side": False, "lone": False}

    # 'acme/code@FIRST' is the Mergefile's own pin: never moved, and naming it is an error.
    refused = mbuild(family, "lock", "--update", "acme/code")
    assert refused.returncode == 2 and "pinned by the Mergefile itself" in refused.stderr
    everything = json.loads(mbuild(family, "lock", "--update", "--json").stdout)
    assert everything["kept"] == [f"acme/code@{FIRST}"]
    assert everything["models"]["acme/base"]["new"] == SECOND and everything["stale"] == ["mid", "top", "side"]
    assert status(family)["side"] is True and status(family)["lone"] is False
    rebuilt = mbuild(family, "all", "--json")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert f"at commit `{SECOND}`" in (family / "build" / "top" / "README.md").read_text()


def test_lock_update_online_asks_the_hub_for_the_branch(family, llama, tmp_path):
    snapshot(family / "hub-cache", "acme/math", THIRD, llama["math"], "apache-2.0", main=False)
    with FakeHub(tmp_path / "fake-hub") as hub:
        hub.set_branch("acme/math", "main", THIRD)
        result = mbuild(family, "lock", "--update", "acme/math", "--json", offline=False, endpoint=hub.url)
        absent = mbuild(family, "lock", "--update", "acme/base", offline=False, endpoint=hub.url)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["models"]["acme/math"]["new"] == THIRD
    assert lock_of(family)["sources"]["hub:acme/math@main"]["revision"] == THIRD
    assert absent.returncode == 2 and "hub model 'acme/base'" in absent.stderr and "Traceback" not in absent.stderr


def test_moving_a_pin_moves_it_on_the_lora_side_too_and_keeps_other_pins(tmp_path):
    from mbuild import lock
    from mbuild.cache import State

    path = tmp_path / "Mergefile"
    adapter, base = "lora:hub:acme/base@main+hub:acme/adapter@main", "lora:local:models/base+hub:acme/adapter@main"
    lock.write(lock.lock_path(path), {"sources": {
        "hub:acme/math@main": {"model": "acme/math", "revision": FIRST, "fingerprint": "f"},
        adapter: {"model": "acme/base+acme/adapter", "revision": f"{FIRST}+{FIRST}"},
        base: {"model": "models/base+acme/adapter", "revision": f"+{FIRST}"},
    }, "targets": {}})
    lock.move_pins(path, State(tmp_path / "cache"), {"hub:acme/adapter@main": SECOND})
    sources = lock.read(lock.lock_path(path))["sources"]
    assert sources[adapter]["revision"] == f"{FIRST}+{SECOND}" and sources[base]["revision"] == f"+{SECOND}"
    assert sources["hub:acme/math@main"] == {"model": "acme/math", "revision": FIRST, "fingerprint": "f"}
    assert sources["hub:acme/adapter@main"] == {"model": "acme/adapter", "revision": SECOND}
    assert lock.pinned_revisions(path) == {"hub:acme/math@main": FIRST, "hub:acme/adapter@main": SECOND, "hub:acme/base@main": FIRST}

"""Mergefile.lock: what was built from what (DVC's dvc.lock, ninja's build log).

The Mergefile says what the user wants; the lock records, per built target, the
recipe as written, the method version, each input's content fingerprint and the
output's key and file hashes. Staleness reasons are diffs against it.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from mbuild import io, keys
from mbuild.errors import BuildError, Location, MbuildError, MergefileError
from mbuild.nodes import LORA, Node
from mbuild.plan import Plan, plain_recipe, recipe_method, source_fingerprint

if TYPE_CHECKING:
    from mbuild.cache import State

# The lock's format. A lock of an earlier format is read, and each of its targets is rebuilt
# once with an "earlier" note that says why, rather than "content changed":
# 1: sources fingerprinted from sha256 digests of their tensors, which cannot be compared with
#    the BLAKE3 digests tensor bytes are known by (`keys.tensor_hasher`), so they are dropped.
#    Keys of that time (`keys.KEY_SCHEMA` below 2) are never found again, and digests the
#    cache remembered of them (`cache.databases.DIGESTS` 1) are forgotten when it opens.
# 2: keys named bytes that depended on torch's thread count; in version 3 each target also
#    records the compute platform its bytes were made on (`compute_platform`).
LOCK_VERSION = 3
EARLIER_DIGESTS = "recorded by an earlier mbuild, with sha256 digests (now BLAKE3): rebuilt once"
EARLIER_THREADS = (
    "recorded by an earlier mbuild, whose bytes depended on torch's thread count "
    "(now the same on any machine): rebuilt once"
)


def lock_path(mergefile_path: Path) -> Path:
    """Mergefile.lock sits beside the Mergefile."""
    return mergefile_path.with_name(mergefile_path.name + ".lock")


def read(path: Path) -> dict[str, Any]:
    """The lock's content, or an empty lock when there is none (or it is unreadable: see `damage`)."""
    try:
        data = _parse(path)
    except MbuildError:
        data = None
    if data is None:
        return {"version": LOCK_VERSION, "sources": {}, "targets": {}}
    data.setdefault("sources", {})
    data.setdefault("targets", {})
    if data.get("version", 1) < 2:
        # Version 1 fingerprints cannot be compared (see LOCK_VERSION): say why the targets
        # rebuild instead of "content changed".
        for entry in data["targets"].values():
            entry.pop("inputs", None)
            entry["earlier"] = EARLIER_DIGESTS
    elif data.get("version", 1) < 3:
        for entry in data["targets"].values():
            entry["earlier"] = EARLIER_THREADS
    return data


def damage(path: Path) -> str | None:
    """Why an existing lock cannot be read (it is then taken as empty and rewritten by the next build), or None."""
    try:
        _parse(path)
    except MbuildError as error:
        return str(error)
    return None


def _parse(path: Path) -> dict[str, Any] | None:
    """The lock's JSON, checked for the shape mbuild writes; None when there is none.

    Raises MbuildError saying what is wrong with a lock that is there but cannot be used: a
    merge conflict, a truncated write, a file of some other tool.
    """
    try:
        data = io.read_small_json(path, error=MbuildError)
    except FileNotFoundError:
        return None
    if not _well_formed(data):
        raise MbuildError(f"{path} does not have the shape of a lock mbuild writes")
    return data


def _well_formed(data: Any) -> bool:
    """Whether parsed JSON has the shape `read`'s callers rely on."""
    if not isinstance(data, dict) or not isinstance(data.get("version", 1), int):
        return False
    sources, targets = data.get("sources", {}), data.get("targets", {})
    if not isinstance(sources, dict) or not isinstance(targets, dict):
        return False
    if not all(isinstance(entry, dict) for entry in (*sources.values(), *targets.values())):
        return False
    return all(isinstance(entry.get("inputs", {}), dict) for entry in targets.values())


def write(path: Path, data: dict[str, Any]) -> None:
    """Write the lock atomically, keys sorted so diffs in git stay small."""
    data["version"] = LOCK_VERSION
    data["sources"] = dict(sorted(data["sources"].items()))
    data["targets"] = dict(sorted(data["targets"].items()))
    try:
        io.write_json(path, data)
    except OSError as error:
        raise BuildError(f"cannot write {path}: {error.strerror}") from None


def pinned_revisions(mergefile_path: Path) -> dict[str, str]:
    """Hub revisions Mergefile.lock recorded: a hub model without '@revision' resolves to them."""
    path = lock_path(mergefile_path)
    pinned = {}
    for node, entry in read(path)["sources"].items():
        revision = entry.get("revision")
        if Node(node).kind == "hub" and revision:
            pinned[node] = revision
        elif Node(node).kind == LORA and isinstance(revision, str):
            # 'BASE_COMMIT+ADAPTER_COMMIT' (empty for a local side), in the order of the node's sides.
            for side, commit in zip(Node(node).label.split("+"), revision.split("+")):
                if commit and Node(side).kind == "hub":
                    pinned.setdefault(side, commit)
    for node, revision in pinned.items():
        # mbuild records commits only; anything else would be looked up as a path in the hub cache.
        if not isinstance(revision, str) or not io.HUB_COMMIT.match(revision):
            raise MergefileError(f"it pins {node} to {revision!r}, not a commit: correct or delete that entry", Location(path))
    return pinned


def record_in_lock(plan: Plan, state: State, names: list[str], only_if_different: bool = False) -> list[str]:
    """Write what each named target was built from into Mergefile.lock; returns the names written.

    With ``only_if_different``, a target whose lock entry already says what its output's
    manifest and the plan say is left alone: the lock is repaired from the built outputs
    (after a kill between publishing and recording, or for a second Mergefile over the same
    outputs) without a write on every no-op.
    """
    path = lock_path(plan.mergefile.path)
    if only_if_different:
        data = read(path)
        names = [n for n in names if _held_entries(data, n, wanted := _lock_entries(plan, state, n)) != wanted]
        if not names:
            return []
    with _lock_of_lock(state, path):
        data = read(path)
        for name in names:
            entries = _lock_entries(plan, state, name)
            pushed = data["targets"].get(name, {}).get(PUSHED)
            data["targets"][name] = entries.pop(Node.target(name))
            if pushed:
                data["targets"][name][PUSHED] = pushed  # each names the key it pushed: kept across rebuilds
            data["sources"].update(entries)
        write(path, data)
    return names


def move_pins(mergefile_path: Path, state: State, moves: Mapping[str, str]) -> None:
    """Pin each hub node of ``moves`` to its new commit (`mbuild lock --update`).

    A LoRA entry naming the model as one of its sides moves with it. The old content
    fingerprint goes: it was of the old commit, and the next build records the new one.
    """
    path = lock_path(mergefile_path)
    with _lock_of_lock(state, path):
        data = read(path)
        for node, commit in moves.items():
            entry = data["sources"].setdefault(node, {"model": Node(node).label.split("@", 1)[0]})
            entry["revision"] = commit
            entry.pop("fingerprint", None)
        for node, entry in data["sources"].items():
            if Node(node).kind == LORA and isinstance(entry.get("revision"), str):
                sides = Node(node).label.split("+")
                commits = entry["revision"].split("+")
                entry["revision"] = "+".join(moves.get(side, commit) if commit else commit for side, commit in zip(sides, commits))
        write(path, data)


# Under a target's lock entry: what `mbuild push` uploaded (repo, revision, commit, the key pushed).
PUSHED = "pushed"


def record_push(mergefile_path: Path, state: State, name: str, pushed: Mapping[str, Any]) -> None:
    """Record that target ``name`` was pushed, replacing an earlier push to the same repo and revision."""
    path = lock_path(mergefile_path)
    with _lock_of_lock(state, path):
        data = read(path)
        entry = data["targets"].setdefault(name, {})
        earlier = entry.get(PUSHED) if isinstance(entry.get(PUSHED), list) else []
        earlier = [p for p in earlier if isinstance(p, dict) and (p.get("repo"), p.get("revision")) != (pushed["repo"], pushed["revision"])]
        entry[PUSHED] = [*earlier, dict(pushed)]
        write(path, data)


@contextlib.contextmanager
def _lock_of_lock(state: State, path: Path):
    """Hold the lock two builds take to update Mergefile.lock ``path`` one at a time.

    Its file lives in the cache folder; where that cannot hold it (a read-only or full disk:
    the cache is then skipped, not the build), in the system's temporary folder.
    """
    name = keys.text_name(str(path), 16) + ".lock"
    try:
        held = io.FileLock(state.folder / "locks" / name).__enter__()
    except BuildError:
        held = io.FileLock(Path(tempfile.gettempdir()) / "mbuild-locks" / name).__enter__()
    try:
        yield
    finally:
        held.__exit__()


def repair_lock(plan: Plan, state: State, names: list[str], note: Callable[[str], None]) -> None:
    """Bring the lock's entries of fresh targets in line with their outputs; a lock that
    cannot be written costs only the record (said in a note), never the build."""
    try:
        repaired = record_in_lock(plan, state, names, only_if_different=True)
    except (MbuildError, OSError) as error:
        note(f"warning: Mergefile.lock not repaired: {error}")
        return
    if repaired:
        note(f"Mergefile.lock did not match the built output of {', '.join(repaired)}: repaired")


def _held_entries(data: Mapping[str, Any], name: str, wanted: Mapping[str, Any]) -> dict[str, Any]:
    """What the lock holds now for a target and its sources, in the shape `_lock_entries` gives."""
    held = {node: data["sources"].get(node) for node in wanted if not Node(node).is_target}
    entry = data["targets"].get(name)
    # What was pushed is no part of what was built.
    held[Node.target(name)] = {k: v for k, v in entry.items() if k != PUSHED} if isinstance(entry, dict) else entry
    return held


def _lock_entries(plan: Plan, state: State, name: str) -> dict[str, Any]:
    """The lock entries of a built target (under "target:NAME") and of each source it reads."""
    target_plan = plan.targets[name]
    entries: dict[str, Any] = {}
    inputs = {}
    for node in target_plan.input_nodes:
        if Node(node).is_target:
            inputs[node] = plan.targets[Node(node).label].key
        else:
            source = plan.sources[node]
            fingerprint = source_fingerprint(source, state.digests(source.info, compute=False))
            inputs[node] = fingerprint
            entries[node] = {"model": source.ref.text, "revision": source.revision, "fingerprint": fingerprint}
    target = target_plan.target
    manifest = io.read_manifest(target.output) or {}
    method_name, method_version, _ = recipe_method(target)
    try:
        relative = str(target.output.relative_to(plan.mergefile.folder))
    except ValueError:
        relative = str(target.output)
    entries[Node.target(name)] = {
        "key": target_plan.key,
        "method": method_name,
        "method_version": method_version,
        "recipe": plain_recipe(target.recipe),
        "platform": plan.platform,
        "inputs": inputs,
        "output": {
            "path": relative,
            # Shards by their digest (of their tensors' digests), other files by sha256.
            "files": {file: entry.get("digest", entry.get("sha256")) for file, entry in manifest.get("files", {}).items()},
        },
    }
    return entries

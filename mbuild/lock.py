"""Mergefile.lock: what was built from what (DVC's dvc.lock, ninja's build log).

The Mergefile says what the user wants; the lock records, per built target, the
recipe as written, the method version, each input's content fingerprint and the
output's key and file hashes. Staleness reasons are diffs against it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mbuild import io
from mbuild.errors import BuildError, MbuildError

# 2: fingerprints made of BLAKE3 tensor digests (1: of sha256 ones).
# 3: each target records the compute platform its bytes were made on; keys of version 2
#    named bytes that depended on torch's thread count.
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
        # Version 1 fingerprints are of sha256 digests and cannot be compared with today's:
        # say why the targets rebuild instead of "content changed".
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

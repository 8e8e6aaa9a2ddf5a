"""Mergefile.lock: what was built from what (DVC's dvc.lock, ninja's build log).

The Mergefile says what the user wants; the lock records, per built target, the
recipe as written, the method version, each input's content fingerprint and the
output's key and file hashes. Staleness reasons are diffs against it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mbuild import io

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
    """The lock's content, or an empty lock when there is none (or it is unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
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


def write(path: Path, data: dict[str, Any]) -> None:
    """Write the lock atomically, keys sorted so diffs in git stay small."""
    data["version"] = LOCK_VERSION
    data["sources"] = dict(sorted(data["sources"].items()))
    data["targets"] = dict(sorted(data["targets"].items()))
    io.write_json(path, data)

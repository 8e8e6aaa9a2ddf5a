"""On-disk memory of work already done: the file-hash state database.

Source files are hashed once per version: their per-tensor digests are remembered
by path, size, mtime and inode (like DVC's state), so unchanged files are never
re-read to plan. SQLite makes it safe for two mbuild processes at once.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Mapping

from mbuild import io


class FileState:
    """Per-tensor digests of safetensors files, keyed by the file's identity."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.folder / "state.db", timeout=60, check_same_thread=False)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER,"
                " inode INTEGER, digests TEXT)"
            )
        return self._db

    def lookup(self, path: str) -> dict[str, str] | None:
        """The remembered digests of a file, if it has not changed since."""
        if not (self.folder / "state.db").exists():
            return None
        try:
            identity = io.file_identity(path)
        except OSError:
            return None
        row = self._connect().execute(
            "SELECT size, mtime_ns, inode, digests FROM files WHERE path = ?", (str(path),)
        ).fetchone()
        if row is None or tuple(row[:3]) != identity:
            return None
        return json.loads(row[3])

    def remember(self, path: str, identity: tuple[int, int, int], digests: Mapping[str, str]) -> None:
        """Store a file's digests under the identity it had when it was read."""
        db = self._connect()
        with db:
            db.execute(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)",
                (str(path), *identity, json.dumps(dict(digests))),
            )

    def digests(self, model: io.ModelInfo, compute: bool) -> dict[str, str] | None:
        """Per-tensor digests of a model; hashes changed files only when ``compute``."""
        result: dict[str, str] = {}
        for file in model.weight_files:
            found = self.lookup(file)
            if found is None:
                if not compute:
                    return None
                identity = io.file_identity(file)
                found = io.hash_tensor_bytes(t for t in model.tensors.values() if t.file == file)
                if io.file_identity(file) == identity:
                    self.remember(file, identity, found)
            result.update(found)
        return result

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def default_cache_dir(mergefile_folder: Path) -> Path:
    """``cache/`` beside the Mergefile unless MBUILD_CACHE says otherwise."""
    configured = os.environ.get("MBUILD_CACHE")
    return Path(configured).expanduser().absolute() if configured else mergefile_folder / "cache"

"""On-disk memory of work already done.

- ``State`` (SQLite, ``state.db``): per-tensor digests of source files, remembered by
  path, size, mtime and inode like DVC's state, so unchanged files are never re-read;
  and the content digest of every tensor task ever computed, by task key, so a
  downstream key can use the bytes an upstream task produced (early cutoff).
- ``TensorCache`` (diskcache, ``tensors/``): the computed tensors themselves, content
  addressed by task key, bounded with least-recently-used eviction, each entry checked
  against its digest before reuse.

Both are safe for two mbuild processes at once (SQLite locking; diskcache writes each
value under a unique file name before committing its row).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable, Mapping

from mbuild import io

GIB = 1024**3


class State:
    """Remembered digests: of source files' tensors, and of computed tensor tasks."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.folder / "state.db", timeout=60, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER,"
                " inode INTEGER, digests TEXT)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS outputs (key TEXT PRIMARY KEY, sha256 TEXT, used REAL)")
        return self._db

    def _exists(self) -> bool:
        return self._db is not None or (self.folder / "state.db").exists()

    def lookup(self, path: str) -> dict[str, str] | None:
        """The remembered digests of a file, if it has not changed since."""
        if not self._exists():
            return None
        try:
            identity = io.file_identity(path)
        except OSError:
            return None
        with self._lock:
            row = self._connect().execute(
                "SELECT size, mtime_ns, inode, digests FROM files WHERE path = ?", (str(path),)
            ).fetchone()
        if row is None or tuple(row[:3]) != identity:
            return None
        return json.loads(row[3])

    def remember(self, path: str, identity: tuple[int, int, int], digests: Mapping[str, str]) -> None:
        """Store a file's digests under the identity it had when it was read."""
        with self._lock:
            db = self._connect()
            with db:
                db.execute(
                    "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)",
                    (str(path), *identity, json.dumps(dict(digests))),
                )

    def digests(self, model: io.ModelInfo, compute: bool, progress=None) -> dict[str, str] | None:
        """Per-tensor digests of a model; hashes changed files only when ``compute``.

        ``progress(bytes)`` is told of each hashed chunk.
        """
        result: dict[str, str] = {}
        for file in model.weight_files:
            found = self.lookup(file)
            if found is None:
                if not compute:
                    return None
                identity = io.file_identity(file)
                found = io.hash_tensor_bytes((t for t in model.tensors.values() if t.file == file), progress=progress)
                if io.file_identity(file) == identity:
                    self.remember(file, identity, found)
            result.update(found)
        return result

    def output_digest(self, key: str) -> str | None:
        """The digest of the bytes task ``key`` produced, if it was ever computed."""
        if not self._exists():
            return None
        with self._lock:
            row = self._connect().execute("SELECT sha256 FROM outputs WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def remember_outputs(self, digests: Mapping[str, str]) -> None:
        """Record task key -> output digest pairs (kept even when the bytes are evicted)."""
        if not digests:
            return
        now = time.time()
        with self._lock:
            db = self._connect()
            with db:
                db.executemany(
                    "INSERT OR REPLACE INTO outputs VALUES (?, ?, ?)", [(k, v, now) for k, v in digests.items()]
                )

    def last_used(self, key: str) -> float | None:
        """When task ``key``'s bytes were last produced or reused."""
        if not self._exists():
            return None
        with self._lock:
            row = self._connect().execute("SELECT used FROM outputs WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def forget_outputs(self, keep: Iterable[str], older_than: float | None) -> int:
        """Drop digests of tasks not in ``keep`` (or not used since ``older_than``); returns the count."""
        if not self._exists():
            return 0
        keep = set(keep)
        with self._lock:
            db = self._connect()
            rows = db.execute("SELECT key, used FROM outputs").fetchall()
            doomed = [k for k, used in rows if k not in keep or (older_than is not None and used < older_than)]
            with db:
                db.executemany("DELETE FROM outputs WHERE key = ?", [(k,) for k in doomed])
        return len(doomed)

    def close(self) -> None:
        """Close the database connection."""
        if self._db is not None:
            self._db.close()
            self._db = None


class TensorCache:
    """Computed tensors by task key, as raw bytes with their sha256 as the entry's tag."""

    def __init__(self, folder: Path, size_limit: int | None = None, read_only: bool = False):
        import diskcache

        folder.mkdir(parents=True, exist_ok=True)
        if read_only:
            # Looking only: keep the settings the last build stored, compute nothing.
            self.store = diskcache.Cache(str(folder))
            return
        if size_limit is None:
            size_limit = default_size_limit(folder)
        # diskcache's own default silently caps at 1 GiB and evicts by store time;
        # set both explicitly. Values from 32 KiB up live as files, not in SQLite.
        self.store = diskcache.Cache(
            str(folder),
            size_limit=size_limit,
            eviction_policy="least-recently-used",
            disk_min_file_size=32 * 1024,
            sqlite_mmap_size=0,
        )

    def get(self, key: str) -> tuple[bytes, str] | None:
        """A computed tensor's bytes and digest, or None; a corrupt entry is dropped, never returned."""
        value, digest = self.store.get(key, default=None, tag=True, retry=True)
        if value is None:
            return None
        if hashlib.sha256(value).hexdigest() != digest:
            self.store.delete(key, retry=True)
            return None
        return value, digest

    def put(self, key: str, data: bytes | memoryview, digest: str) -> None:
        """Commit one computed tensor (atomically: a reader sees all of it or nothing).

        Streamed from the buffer in pieces, so the tensor is never copied whole.
        """
        self.store.set(key, _Pieces(memoryview(data).cast("B")), read=True, tag=digest, retry=True)

    def contains(self, key: str) -> bool:
        """Whether an entry exists (not verified: reading it does that)."""
        return key in self.store

    def size_of(self, key: str) -> int:
        """Bytes an entry holds (0 if absent)."""
        handle = self.store.get(key, default=None, read=True, retry=True)
        if handle is None:
            return 0
        try:
            if isinstance(handle, (bytes, bytearray)):
                return len(handle)
            handle.seek(0, 2)
            return handle.tell()
        finally:
            if hasattr(handle, "close"):
                handle.close()

    def keys(self) -> list[str]:
        """Every task key held."""
        return list(self.store.iterkeys())

    def delete(self, key: str) -> None:
        """Drop one entry."""
        self.store.delete(key, retry=True)

    def volume(self) -> int:
        """Bytes the cache holds on disk."""
        return self.store.volume()

    def close(self) -> None:
        """Close the cache."""
        self.store.close()


class _Pieces:
    """A read()-able view of a buffer, handing out slices without copying."""

    def __init__(self, view: memoryview):
        self.view = view
        self.position = 0

    def read(self, size: int = -1) -> memoryview:
        end = len(self.view) if size is None or size < 0 else min(len(self.view), self.position + size)
        piece = self.view[self.position : end]
        self.position = end
        return piece if len(piece) else b""


def default_size_limit(folder: Path) -> int:
    """Half of the disk still free where the cache lives, plus what it already holds; at least 1 GiB."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return 8 * GIB
    held = sum(p.stat().st_size for p in folder.rglob("*.val")) if folder.exists() else 0
    return max(GIB, held + free // 2)


def default_cache_dir(mergefile_folder: Path) -> Path:
    """``cache/`` beside the Mergefile unless MBUILD_CACHE says otherwise."""
    configured = os.environ.get("MBUILD_CACHE")
    return Path(configured).expanduser().absolute() if configured else mergefile_folder / "cache"

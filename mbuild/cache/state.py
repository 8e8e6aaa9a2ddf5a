"""Remembered digests (``state.db``): of source files' tensors, and of computed tensor tasks."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from mbuild import io
from mbuild.cache import databases


class State:
    """Remembered digests: of source files' tensors, and of computed tensor tasks.

    Everything here can be computed again, so a fault in ``state.db`` costs only memory: a
    damaged file is deleted and started afresh, and one that cannot be written (a read-only
    or full disk) gives way to an empty database in memory for the rest of the run. Either
    way ``warn`` is told, once.
    """

    def __init__(self, folder: Path, warn: Callable[[str], None] = lambda text: None):
        self.folder = folder
        self.warn = warn
        self._db: sqlite3.Connection | None = None
        self._in_memory = False
        self._started_afresh = False
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        """The database file."""
        return self.folder / "state.db"

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            if self._in_memory:
                self._db = sqlite3.connect(":memory:", check_same_thread=False)
            else:
                self.folder.mkdir(parents=True, exist_ok=True)
                self._db = databases.connect_wal(self.path)
                databases.forget_old_digests(self._db, ("files", "outputs"))
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER,"
                " inode INTEGER, digests TEXT)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS outputs (key TEXT PRIMARY KEY, digest TEXT, used REAL)")
        return self._db

    def _run(self, operation: Callable[[sqlite3.Connection], Any]) -> Any:
        """``operation(connection)``'s result; a fault in the file is survived (see the class)."""
        with self._lock:
            while True:
                try:
                    return operation(self._connect())
                except (sqlite3.DatabaseError, OSError) as error:
                    if self._in_memory:
                        raise
                    self._survive(error)

    def _survive(self, error: Exception) -> None:
        """Start afresh from a damaged file (once), else carry on in memory."""
        self.close()
        if databases.damaged(error) and not self._started_afresh:
            self._started_afresh = True
            if databases.delete_database(self.path):
                self.warn(f"{self.path} was damaged ({error}); deleted it and started afresh")
                return
        self._in_memory = True
        self.warn(f"cannot use {self.path} ({databases.reason(error)}): hashes and digests are kept in memory this run")

    def _exists(self) -> bool:
        return self._db is not None or self.path.exists()

    def lookup(self, path: str) -> dict[str, str] | None:
        """The remembered digests of a file, if it has not changed since."""
        if not self._exists():
            return None
        try:
            identity = io.file_identity(path)
        except OSError:
            return None
        row = self._run(
            lambda db: db.execute(
                "SELECT size, mtime_ns, inode, digests FROM files WHERE path = ?", (str(path),)
            ).fetchone()
        )
        if row is None or tuple(row[:3]) != identity:
            return None
        return json.loads(row[3])

    def known(self, path: str) -> bool:
        """Whether digests were ever remembered for a file at this path (whatever its content now)."""
        if not self._exists():
            return False
        row = self._run(lambda db: db.execute("SELECT 1 FROM files WHERE path = ?", (str(path),)).fetchone())
        return row is not None

    def remember(self, path: str, identity: tuple[int, int, int], digests: Mapping[str, str]) -> None:
        """Store a file's digests under the identity it had when it was read."""
        row = (str(path), *identity, json.dumps(dict(digests)))
        self._run(lambda db: databases.commit(db, "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", [row]))

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
        row = self._run(lambda db: db.execute("SELECT digest FROM outputs WHERE key = ?", (key,)).fetchone())
        return row[0] if row else None

    def remember_outputs(self, digests: Mapping[str, str]) -> None:
        """Record task key -> output digest pairs (kept even when the bytes are evicted)."""
        if not digests:
            return
        now = time.time()
        rows = [(k, v, now) for k, v in digests.items()]
        self._run(lambda db: databases.commit(db, "INSERT OR REPLACE INTO outputs VALUES (?, ?, ?)", rows))

    def last_used(self, key: str) -> float | None:
        """When task ``key``'s bytes were last produced or reused."""
        if not self._exists():
            return None
        row = self._run(lambda db: db.execute("SELECT used FROM outputs WHERE key = ?", (key,)).fetchone())
        return row[0] if row else None

    def forget_outputs(self, keep: Iterable[str], older_than: float | None) -> int:
        """Drop digests of tasks not in ``keep`` (or not used since ``older_than``); returns the count."""
        if not self._exists():
            return 0
        keep = set(keep)

        def forget(db: sqlite3.Connection) -> int:
            rows = db.execute("SELECT key, used FROM outputs").fetchall()
            doomed = [(k,) for k, used in rows if k not in keep or (older_than is not None and used < older_than)]
            databases.commit(db, "DELETE FROM outputs WHERE key = ?", doomed)
            return len(doomed)

        return self._run(forget)

    def close(self) -> None:
        """Close the database connection."""
        if self._db is not None:
            self._db.close()
            self._db = None



def default_cache_dir(mergefile_folder: Path) -> Path:
    """``cache/`` beside the Mergefile unless MBUILD_CACHE says otherwise."""
    configured = os.environ.get("MBUILD_CACHE")
    return Path(configured).expanduser().absolute() if configured else mergefile_folder / "cache"

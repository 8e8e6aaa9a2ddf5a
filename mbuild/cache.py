"""On-disk memory of work already done.

- ``State`` (SQLite, ``state.db``): per-tensor digests of source files, remembered by
  path, size, mtime and inode like DVC's state, so unchanged files are never re-read;
  and the content digest of every tensor task ever computed, by task key, so a
  downstream key can use the bytes an upstream task produced (early cutoff).
- ``TensorCache`` (``tensors/``): the computed tensors themselves, content addressed by
  task key, bounded with least-recently-used eviction, each entry checked against its
  digest before reuse. Their bytes are shared with the output shards (hard links), or
  copied into diskcache where they cannot be.

Both are safe for two mbuild processes at once (SQLite locking; diskcache writes each
value under a unique file name before committing its row).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from mbuild import io


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
                self._db = _connect_wal(self.path)
                _forget_old_digests(self._db, ("files", "outputs"))
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
        if _damaged(error) and not self._started_afresh:
            self._started_afresh = True
            if _delete_database(self.path):
                self.warn(f"{self.path} was damaged ({error}); deleted it and started afresh")
                return
        self._in_memory = True
        self.warn(f"cannot use {self.path} ({_reason(error)}): hashes and digests are kept in memory this run")

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

    def remember(self, path: str, identity: tuple[int, int, int], digests: Mapping[str, str]) -> None:
        """Store a file's digests under the identity it had when it was read."""
        row = (str(path), *identity, json.dumps(dict(digests)))
        self._run(lambda db: _commit(db, "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", [row]))

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
        self._run(lambda db: _commit(db, "INSERT OR REPLACE INTO outputs VALUES (?, ?, ?)", rows))

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
            _commit(db, "DELETE FROM outputs WHERE key = ?", doomed)
            return len(doomed)

        return self._run(forget)

    def close(self) -> None:
        """Close the database connection."""
        if self._db is not None:
            self._db.close()
            self._db = None


def _guarded(fallback):
    """A TensorCache method that a fault in the cache's files cannot fail: caching stops instead.

    Damaged indexes are caught when the cache opens; whatever goes wrong later (a full or
    read-only disk, an I/O error) costs only caching: the method answers ``fallback``, the
    cache answers nothing from then on, and ``warn`` is told once. The build goes on.
    """

    def decorate(method):
        @functools.wraps(method)
        def guarded(self, *args, **kwargs):
            if self.stopped:
                return fallback
            try:
                return method(self, *args, **kwargs)
            except (sqlite3.DatabaseError, OSError) as error:
                self._stop(error)
                return fallback

        return guarded

    return decorate


class TensorCache:
    """Computed tensors by task key, each checked against its digest before reuse.

    An entry is one of two kinds:
    - a *place* in a blob: output shards are hard-linked into ``blobs/`` while they are
      written, and ``links.db`` maps a task key to the blob, offset, length and digest of
      its bytes. The bytes then exist on disk once, shared by the output and the cache;
      a published output is never written again (a rebuild writes new files), so the
      shared bytes stay put even when the output is replaced or removed.
    - a *copy* (diskcache), where a shard cannot be linked: the cache on another
      filesystem, or one without hard links.

    Blobs are bounded by ``size_limit`` (whole blobs, least recently used first; a blob
    counts its full size even while the output still shares it), copies by diskcache.
    A blob no entry points into any more is deleted once no build is writing it.
    """

    def __init__(
        self,
        folder: Path,
        size_limit: int | None = None,
        read_only: bool = False,
        warn: Callable[[str], None] = lambda text: None,
    ):
        import diskcache

        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.blob_folder = folder / "blobs"
        self.read_only = read_only
        self.warn = warn
        self.stopped = False  # a fault in the cache's files ended caching for this run
        self._linkable = not read_only
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._delete_damaged_indexes()
        if read_only:
            # Looking only: keep the settings the last build stored, compute nothing.
            self.store = diskcache.Cache(str(folder))
            return
        # diskcache's own default silently caps at 1 GiB and evicts by store time;
        # set both explicitly. Values from 32 KiB up live as files, not in SQLite.
        self.store = diskcache.Cache(
            str(folder),
            size_limit=default_size_limit(folder) if size_limit is None else size_limit,
            eviction_policy="least-recently-used",
            disk_min_file_size=32 * 1024,
            sqlite_mmap_size=0,
        )
        self._evict_to_bound()

    def _delete_damaged_indexes(self) -> None:
        """Delete an index SQLite finds damaged (diskcache's with the copies it indexed), to start afresh.

        Checked when the cache opens, before either is used: a damaged page can hide deep in a
        file that opens fine. A fault found later only ends caching for the run (`_guarded`).
        """
        for name, delete in (("links.db", _delete_database), ("cache.db", _delete_copies)):
            path = self.folder / name
            problem = _damage(path)
            if problem and delete(path):
                self.warn(f"{path} was damaged ({problem}); deleted it and started afresh")

    def _stop(self, error: Exception) -> None:
        """End caching for this run, telling ``warn`` once (several workers may meet one fault)."""
        with self._lock:
            told, self.stopped = self.stopped, True
        if not told:
            self.warn(f"caching skipped for the rest of this run: cannot use {self.folder} ({_reason(error)})")

    @property
    def size_limit(self) -> int:
        """The bound, in bytes, on blobs (and separately on copies)."""
        return self.store.size_limit

    def _links(self) -> sqlite3.Connection | None:
        if self._db is None:
            path = self.folder / "links.db"
            if self.read_only and not path.exists():
                return None
            self._db = _connect_wal(path)
            # A lost commit only costs a recomputation; no fsync per tensor.
            self._db.execute("PRAGMA synchronous=NORMAL")
            _forget_old_digests(self._db, ("places",))
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS blobs (id TEXT PRIMARY KEY, size INTEGER, used REAL, writer INTEGER)"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS places (key TEXT PRIMARY KEY, blob TEXT, offset INTEGER,"
                " length INTEGER, digest TEXT)"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS places_by_blob ON places (blob)")
        return self._db

    def _query(self, sql: str, parameters: tuple = ()) -> list[tuple]:
        with self._lock:
            db = self._links()
            return [] if db is None else db.execute(sql, parameters).fetchall()

    def _change(self, statements: list[tuple[str, tuple]]) -> None:
        with self._lock:
            db = self._links()
            if db is None:
                return  # looking only, and nothing was ever linked
            with db:
                for sql, parameters in statements:
                    db.execute(sql, parameters)

    def _place(self, key: str) -> tuple[str, int, int, str] | None:
        rows = self._query("SELECT blob, offset, length, digest FROM places WHERE key = ?", (key,))
        return rows[0] if rows else None

    @_guarded(None)
    def link(self, shard: Path) -> str | None:
        """Share a shard this process is writing: hard-link it in; the blob's id, or None.

        None means this shard's tensors must be cached as copies (``put``).
        """
        if not self._linkable:
            return None
        size = os.stat(shard).st_size
        if not self._make_room(size):
            return None
        blob = uuid.uuid4().hex
        self.blob_folder.mkdir(exist_ok=True)
        # The row first: a file in blobs/ without a row is always garbage.
        self._change([("INSERT INTO blobs VALUES (?, ?, ?, ?)", (blob, size, time.time(), os.getpid()))])
        try:
            os.link(shard, self.blob_folder / blob)
        except OSError:
            # Another filesystem, or none of hard links: copies from now on.
            self._linkable = False
            self._change([("DELETE FROM blobs WHERE id = ?", (blob,))])
            return None
        return blob

    @_guarded(None)
    def put_at(self, key: str, blob: str, offset: int, length: int, digest: str) -> None:
        """Record where task ``key``'s bytes lie in a linked shard (committed at once)."""
        self._change([("INSERT OR REPLACE INTO places VALUES (?, ?, ?, ?, ?)", (key, blob, offset, length, digest))])
        if key in self.store:
            self.store.delete(key, retry=True)

    @_guarded(None)
    def done_with(self, blobs: Iterable[str]) -> None:
        """Mark blobs as no longer being written by this process."""
        self._change([("UPDATE blobs SET writer = NULL WHERE id = ?", (blob,)) for blob in blobs])

    @_guarded(None)
    def get(self, key: str) -> tuple[bytes, str] | None:
        """A computed tensor's bytes and digest, or None; a corrupt entry is dropped, never returned."""
        place = self._place(key)
        if place is not None:
            blob, offset, length, digest = place
            data = self._read(blob, offset, length)
            if data is None or io.bytes_digest(data) != digest:
                self._change([("DELETE FROM places WHERE key = ?", (key,))])
                return None
            self._change([("UPDATE blobs SET used = ? WHERE id = ?", (time.time(), blob))])
            return data, digest
        value, digest = self.store.get(key, default=None, tag=True, retry=True)
        if value is None:
            return None
        if io.bytes_digest(value) != digest:
            self.store.delete(key, retry=True)
            return None
        return value, digest

    def _read(self, blob: str, offset: int, length: int) -> bytearray | None:
        try:
            fd = os.open(self.blob_folder / blob, os.O_RDONLY)
        except FileNotFoundError:
            self._remove_blob(blob)
            return None
        try:
            data = bytearray(length)
            # A blob shorter than the place says is as bad as a wrong digest.
            return data if io.read_into(fd, memoryview(data), offset) == length else None
        finally:
            os.close(fd)

    @_guarded(None)
    def put(self, key: str, data: bytes | memoryview, digest: str) -> None:
        """Commit a copy of one computed tensor (atomically: a reader sees all of it or nothing).

        Streamed from the buffer in pieces, so the tensor is never copied whole. One larger
        than the bound is not written only to be evicted.
        """
        if len(data) > self.size_limit:
            return
        self.store.set(key, _Pieces(memoryview(data).cast("B")), read=True, tag=digest, retry=True)

    @_guarded(False)
    def contains(self, key: str) -> bool:
        """Whether an entry exists (not verified: reading it does that)."""
        return self._place(key) is not None or key in self.store

    @_guarded(0)
    def size_of(self, key: str) -> int:
        """Bytes an entry holds (0 if absent)."""
        place = self._place(key)
        if place is not None:
            return place[2]
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

    @_guarded(())
    def keys(self) -> Sequence[str]:
        """Every task key held."""
        placed = [row[0] for row in self._query("SELECT key FROM places")]
        known = set(placed)
        return placed + [key for key in self.store.iterkeys() if key not in known]

    @_guarded(None)
    def delete(self, key: str) -> None:
        """Drop one entry (its blob goes with ``prune`` once nothing points into it)."""
        self._change([("DELETE FROM places WHERE key = ?", (key,))])
        self.store.delete(key, retry=True)

    @_guarded(0)
    def volume(self) -> int:
        """Bytes the cache holds on disk (a blob counted whole, even while an output shares it)."""
        blobs = self._query("SELECT COALESCE(SUM(size), 0) FROM blobs")
        return self.store.volume() + (blobs[0][0] if blobs else 0)

    @_guarded(0)
    def prune(self) -> int:
        """Delete blobs nothing points into and no live build writes, and stray files; returns the count."""
        rows = self._query(
            "SELECT id, writer FROM blobs WHERE NOT EXISTS (SELECT 1 FROM places WHERE places.blob = blobs.id)"
        )
        doomed = [blob for blob, writer in rows if _unwritten(writer)]
        for blob in doomed:
            self._remove_blob(blob)
        known = {row[0] for row in self._query("SELECT id FROM blobs")}
        strays = [p for p in self.blob_folder.iterdir() if p.name not in known] if self.blob_folder.exists() else []
        for path in strays:
            path.unlink(missing_ok=True)
        return len(doomed) + len(strays)

    @_guarded(None)
    def _evict_to_bound(self) -> None:
        """Bring what the cache holds within its bound now, before a build needs the space."""
        self._make_room(0)
        self.store.cull(retry=True)

    def _make_room(self, size: int) -> bool:
        """Evict least recently used blobs until ``size`` more bytes fit the bound; whether they do."""
        if size > self.size_limit:
            return False  # would not fit even alone: evict nothing for it
        while True:
            rows = self._query("SELECT id, size, writer FROM blobs ORDER BY used")
            if sum(row[1] for row in rows) + size <= self.size_limit:
                return True
            evictable = [blob for blob, _, writer in rows if _unwritten(writer)]
            if not evictable:
                return False
            self._remove_blob(evictable[0])

    def _remove_blob(self, blob: str) -> None:
        self._change([("DELETE FROM places WHERE blob = ?", (blob,)), ("DELETE FROM blobs WHERE id = ?", (blob,))])
        (self.blob_folder / blob).unlink(missing_ok=True)

    def close(self) -> None:
        """Close the cache."""
        self.store.close()
        if self._db is not None:
            self._db.close()
            self._db = None


def open_tensor_cache(
    folder: Path,
    size_limit: int | None = None,
    read_only: bool = False,
    warn: Callable[[str], None] = lambda text: None,
) -> TensorCache | None:
    """The tensor cache in ``folder``; None, with a warning, where the folder cannot hold one
    (a read-only or full disk): a build then goes on without caching."""
    try:
        return TensorCache(folder, size_limit, read_only, warn)
    except (sqlite3.DatabaseError, OSError) as error:
        warn(f"caching skipped: cannot use the tensor cache {folder} ({_reason(error)})")
        return None


# What the digests in state.db and links.db are: 2 is BLAKE3 (`io.bytes_hasher`), 1 was sha256.
DIGESTS = 2


def _forget_old_digests(db: sqlite3.Connection, tables: tuple[str, ...]) -> None:
    """Drop ``tables`` if their digests are of an older kind (recreated empty by the caller).

    They only remember what can be computed again: file hashes, task outputs, cache places
    (whose blobs `prune` then deletes). Task keys changed with the digests (`keys.KEY_SCHEMA`),
    so no old entry could be found anyway. Checked again inside the write lock, so two
    processes opening an old file at once drop the tables once.
    """
    if db.execute("PRAGMA user_version").fetchone()[0] >= DIGESTS:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        if db.execute("PRAGMA user_version").fetchone()[0] < DIGESTS:
            for table in tables:
                db.execute(f"DROP TABLE IF EXISTS {table}")
            db.execute(f"PRAGMA user_version = {DIGESTS}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _connect_wal(path: Path, wait: float = 60.0) -> sqlite3.Connection:
    """A connection to an SQLite file in WAL mode, shared safely with other processes.

    Two processes opening a new file at once both ask for WAL; while one switches the file
    over, SQLite can answer the other "database is locked" at once, without its busy timeout
    (seen in about 1 of 5 runs of two builds started together). So that step is retried.
    """
    db = sqlite3.connect(path, timeout=wait, check_same_thread=False)
    deadline = time.monotonic() + wait
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return db
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                db.close()
                raise
            time.sleep(0.01)


def _commit(db: sqlite3.Connection, sql: str, rows: list[tuple]) -> None:
    """Run one statement for each row, in one transaction."""
    with db:
        db.executemany(sql, rows)


def _damaged(error: Exception) -> bool:
    """Whether an error says a file is not a sound SQLite database (rather than one that cannot be written)."""
    return isinstance(error, sqlite3.DatabaseError) and any(
        words in str(error) for words in ("malformed", "not a database")
    )


def _damage(path: Path) -> str | None:
    """What is wrong with an SQLite file, if SQLite's quick check finds it damaged (60 ms for 60 MB)."""
    if not path.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(path)) as db:
            found = db.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as error:
        return str(error) if _damaged(error) else None  # unreadable here: opening it will say why
    return None if found == "ok" else "its quick check failed"


def _delete_database(path: Path) -> bool:
    """Delete an SQLite file with its journals; whether that could be done."""
    try:
        for name in (path.name, path.name + "-wal", path.name + "-shm"):
            path.with_name(name).unlink(missing_ok=True)
    except OSError:
        return False
    return True


def _delete_copies(index: Path) -> bool:
    """Delete diskcache's index and the copies it indexed (files under two-hex-digit folders)."""
    if not _delete_database(index):
        return False
    for folder in index.parent.glob("[0-9a-f][0-9a-f]"):
        shutil.rmtree(folder, ignore_errors=True)
    return True


def _reason(error: Exception) -> str:
    """An error in a few words: the system's message without its number, or SQLite's."""
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)


def _unwritten(writer: int | None) -> bool:
    """Whether a blob is no longer being written: its writer finished (None) or died."""
    return writer is None or not io.process_alive(writer)


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
    """Half the disk space free where the cache lives, now (the cache opens at a build's start).

    No floor: on a small disk a floor would let the cache take space a build needs. What the
    cache holds is not added back: the bound then shrinks as the cache grows, so the cache
    never leaves less free than it holds.
    """
    return shutil.disk_usage(folder).free // 2


def default_cache_dir(mergefile_folder: Path) -> Path:
    """``cache/`` beside the Mergefile unless MBUILD_CACHE says otherwise."""
    configured = os.environ.get("MBUILD_CACHE")
    return Path(configured).expanduser().absolute() if configured else mergefile_folder / "cache"

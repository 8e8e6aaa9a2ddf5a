"""The tensor cache (``tensors/``): computed tensors by task key, bounded, verified on reuse."""

from __future__ import annotations

import functools
import os
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Sequence

from mbuild import io, keys
from mbuild.cache import databases


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
        for name, delete in (("links.db", databases.delete_database), ("cache.db", _delete_copies)):
            path = self.folder / name
            problem = databases.damage(path)
            if problem and delete(path):
                self.warn(f"{path} was damaged ({problem}); deleted it and started afresh")

    def _stop(self, error: Exception) -> None:
        """End caching for this run, telling ``warn`` once (several workers may meet one fault)."""
        with self._lock:
            told, self.stopped = self.stopped, True
        if not told:
            self.warn(f"caching skipped for the rest of this run: cannot use {self.folder} ({databases.reason(error)})")

    @property
    def size_limit(self) -> int:
        """The bound, in bytes, on blobs (and separately on copies)."""
        return self.store.size_limit

    def _links(self) -> sqlite3.Connection | None:
        if self._db is None:
            path = self.folder / "links.db"
            if self.read_only and not path.exists():
                return None
            self._db = databases.connect_wal(path)
            # A lost commit only costs a recomputation; no fsync per tensor.
            self._db.execute("PRAGMA synchronous=NORMAL")
            databases.forget_old_digests(self._db, ("places",))
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
    def rename(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Move entries from old keys to new ones, in one transaction (a missing old key moves nothing)."""
        statements = []
        for old, new in pairs:
            statements.append(
                ("INSERT OR REPLACE INTO places SELECT ?, blob, offset, length, digest FROM places WHERE key = ?",
                 (new, old))
            )
            statements.append(("DELETE FROM places WHERE key = ?", (old,)))
        if statements:
            self._change(statements)

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
            if data is None or keys.tensor_digest(data) != digest:
                self._change([("DELETE FROM places WHERE key = ?", (key,))])
                return None
            self._change([("UPDATE blobs SET used = ? WHERE id = ?", (time.time(), blob))])
            return data, digest
        value, digest = self.store.get(key, default=None, tag=True, retry=True)
        if value is None:
            return None
        if keys.tensor_digest(value) != digest:
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
        warn(f"caching skipped: cannot use the tensor cache {folder} ({databases.reason(error)})")
        return None


def _delete_copies(index: Path) -> bool:
    """Delete diskcache's index and the copies it indexed (files under two-hex-digit folders)."""
    if not databases.delete_database(index):
        return False
    for folder in index.parent.glob("[0-9a-f][0-9a-f]"):
        shutil.rmtree(folder, ignore_errors=True)
    return True


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

"""SQLite as the cache uses it: WAL connections, commits, and damage told from contention."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

# The kind of digest state.db and links.db hold, kept as SQLite's user_version: 2 is BLAKE3 of
# tensor bytes (`keys.tensor_hasher`). Tables of an older kind are dropped (see `lock.LOCK_VERSION`).
DIGESTS = 2


def forget_old_digests(db: sqlite3.Connection, tables: tuple[str, ...]) -> None:
    """Drop ``tables`` if their digests are of an older kind (recreated empty by the caller).

    They only remember what can be computed again: file hashes, task outputs, cache places
    (whose blobs `prune` then deletes). Their entries are under keys of an older
    `keys.KEY_SCHEMA`, so none could be found anyway. Checked again inside the write lock,
    so two processes opening an old file at once drop the tables once.
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


def connect_wal(path: Path, wait: float = 60.0) -> sqlite3.Connection:
    """A connection to an SQLite file in WAL mode, shared safely with other processes.

    Two processes opening a new file at once both ask for WAL; while one switches the file
    over, SQLite can answer the other "database is locked" at once, without its busy timeout,
    as it does when two builds start together. So that step is retried.
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


def commit(db: sqlite3.Connection, sql: str, rows: list[tuple]) -> None:
    """Run one statement for each row, in one transaction."""
    with db:
        db.executemany(sql, rows)


def damaged(error: Exception) -> bool:
    """Whether an error says a file is not a sound SQLite database (rather than one that cannot be written)."""
    return isinstance(error, sqlite3.DatabaseError) and any(
        words in str(error) for words in ("malformed", "not a database")
    )


def damage(path: Path) -> str | None:
    """What is wrong with an SQLite file, if SQLite's quick check (cheap enough for every open) finds it damaged."""
    if not path.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(path)) as db:
            found = db.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as error:
        return str(error) if damaged(error) else None  # unreadable here: opening it will say why
    return None if found == "ok" else "its quick check failed"


def delete_database(path: Path) -> bool:
    """Delete an SQLite file with its journals; whether that could be done."""
    try:
        for name in (path.name, path.name + "-wal", path.name + "-shm"):
            path.with_name(name).unlink(missing_ok=True)
    except OSError:
        return False
    return True


def reason(error: Exception) -> str:
    """An error in a few words: the system's message without its number, or SQLite's."""
    if isinstance(error, (FileExistsError, NotADirectoryError)):
        return "a file stands where the cache needs a folder"
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)

"""Storage every machine of a cluster sees: where remote tasks leave the bytes they computed.

A remote task never sends a tensor back through the cluster's own channels; it writes the
bytes here under the task's key and returns their digest, and the driver reads them into
the output. `Storage` is the interface; `SharedDirectory` (a folder on storage every node
mounts at the same path: NFS, Lustre, CephFS, or one machine's own disk) is the first
implementation. An object store (fsspec: S3, GCS) fits the same five methods.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Protocol

from mbuild import keys


class Storage(Protocol):
    """Computed tensors by task key, written whole or not at all, verified on reading."""

    def put(self, key: str, data) -> str:
        """Store ``data`` (a bytes-like object) under ``key``; returns its digest."""

    def find(self, key: str) -> str | None:
        """The digest of the bytes stored under ``key``, or None (nothing read)."""

    def read(self, key: str, digest: str) -> memoryview | None:
        """The bytes under ``key`` if they still hash to ``digest``; damaged or missing: None."""

    def delete(self, key: str) -> None:
        """Forget ``key`` (missing is fine)."""

    def keys(self) -> list[str]:
        """Every key stored."""


class SharedDirectory:
    """One file per result, ``AB/KEY.DIGEST``, written to a temporary name and renamed.

    The rename is atomic on every POSIX filesystem and on NFS, so a reader sees a whole file
    or none; the digest in the name lets a reader on another machine verify what it got
    (a node that died between writing and syncing leaves bytes that fail the check, and the
    task is computed again). Two writers of one key write the same bytes: the later rename wins.
    """

    def __init__(self, folder: Path | str):
        self.folder = Path(folder).absolute()

    def __repr__(self) -> str:
        return f"SharedDirectory({str(self.folder)!r})"

    def _bucket(self, key: str) -> Path:
        return self.folder / key[:2]

    def put(self, key: str, data) -> str:
        digest = keys.tensor_digest(data)
        bucket = self._bucket(key)
        bucket.mkdir(parents=True, exist_ok=True)
        temporary = bucket / f".{key}.{uuid.uuid4().hex}.partial"
        try:
            with open(temporary, "wb") as file:
                file.write(data)
            os.replace(temporary, bucket / f"{key}.{digest}")
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return digest

    def _entries(self, key: str) -> list[Path]:
        try:
            return [path for path in self._bucket(key).iterdir() if path.name.startswith(key + ".")
                    and not path.name.endswith(".partial")]
        except FileNotFoundError:
            return []

    def find(self, key: str) -> str | None:
        entries = self._entries(key)
        return entries[0].name[len(key) + 1 :] if entries else None

    def read(self, key: str, digest: str) -> memoryview | None:
        path = self._bucket(key) / f"{key}.{digest}"
        try:
            data = memoryview(path.read_bytes())
        except OSError:
            return None
        if keys.tensor_digest(data) != digest:
            path.unlink(missing_ok=True)  # damaged: the task runs again
            return None
        return data

    def delete(self, key: str) -> None:
        for path in self._entries(key):
            path.unlink(missing_ok=True)

    def remove_partials(self, older_than: float) -> int:
        """Remove what writers killed mid-write left (temporaries older than ``older_than`` seconds)."""
        import time

        removed = 0
        for path in self.folder.glob("*/.*.partial") if self.folder.is_dir() else ():
            try:
                if path.stat().st_mtime < time.time() - older_than:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

    def keys(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return [
            path.name.split(".", 1)[0]
            for bucket in self.folder.iterdir()
            if bucket.is_dir()
            for path in bucket.iterdir()
            if not path.name.startswith(".")
        ]

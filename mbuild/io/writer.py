"""Writing a model's tensors: the shard layout planned from names, shapes and dtypes alone,
then each tensor written at its offset as it is computed, in any order.

Apart from `outputs` because it knows the safetensors format; publishing the folder it
fills is `outputs`' part.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mbuild import keys
from mbuild.errors import BuildError
from mbuild.io.files import advise, read_into, write_at
from mbuild.io.models import DTYPE_CODES, TensorInfo
from mbuild.io.outputs import write_json


@dataclass(frozen=True)
class ShardSlot:
    """Where one output tensor goes: its shard file and byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    start: int
    end: int


def plan_shards(
    tensors: Sequence[tuple[str, str, tuple[int, ...]]], max_shard_bytes: int, single: str = "model.safetensors"
) -> dict[str, list[ShardSlot]]:
    """Assign tensors, in order, to shard files of at most ``max_shard_bytes`` of data each.

    ``single``: the file's name when all fit in one (a PEFT adapter's is adapter_model.safetensors).
    """
    groups: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dtype, shape in tensors:
        nbytes = TensorInfo(name, dtype, shape, None).nbytes
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, dtype, shape))
        size += nbytes
    if len(groups) == 1:
        names = [single]
    else:
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    shards: dict[str, list[ShardSlot]] = {}
    for file, group in zip(names, groups):
        header_length = len(_header_bytes(group))
        offset = 8 + header_length
        slots = []
        for name, dtype, shape in group:
            nbytes = TensorInfo(name, dtype, shape, None).nbytes
            slots.append(ShardSlot(name, dtype, shape, file, offset, offset + nbytes))
            offset += nbytes
        shards[file] = slots
    return shards


def _header_bytes(group: Sequence[tuple[str, str, tuple[int, ...]]]) -> bytes:
    """The safetensors header for tensors laid out in order, padded to 8 bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in group:
        nbytes = TensorInfo(name, dtype, shape, None).nbytes
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


class ShardedWriter:
    """Writes a model's tensors into pre-laid-out safetensors shards, in any order.

    Every name, shape and dtype is known up front, so each shard's header is written
    first and its space reserved (a full disk fails here, before any math); tensors
    are then written at their offsets as they are computed, never buffered.
    """

    def __init__(
        self,
        folder: Path,
        tensors: Sequence[tuple[str, str, tuple[int, ...]]],
        max_shard_bytes: int,
        streaming: bool = False,
        single: str = "model.safetensors",
    ):
        self.folder = folder
        # Larger than memory: each tensor's pages are written back and dropped once it is
        # complete, so written output does not crowd out inputs still to be read.
        self.streaming = streaming
        self.shards = plan_shards(tensors, max_shard_bytes, single)
        self.slots = {slot.name: slot for slots in self.shards.values() for slot in slots}
        self.digests: dict[str, str] = {}
        self._handles: dict[str, int] = {}
        self._lock = threading.Lock()
        for file, slots in self.shards.items():
            path = folder / file
            # A new file, never a truncated old one: the cache may share an old file's bytes.
            path.unlink(missing_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            self._handles[file] = fd
            header = _header_bytes([(s.name, s.dtype, s.shape) for s in slots])
            total = 8 + len(header) + sum(s.end - s.start for s in slots)
            try:
                _reserve(fd, total)
                os.pwrite(fd, struct.pack("<Q", len(header)) + header, 0)
            except OSError as error:
                raise BuildError(f"cannot write {path}: {error.strerror}") from None

    def write(self, name: str, data: memoryview | bytes, digest: str | None = None) -> str:
        """Write one tensor's raw bytes into its slot; returns their digest (computed unless given)."""
        slot = self.slots[name]
        if len(data) != slot.end - slot.start:
            raise BuildError(f"tensor {name}: {len(data)} bytes computed, {slot.end - slot.start} expected")
        if digest is None:
            digest = keys.tensor_digest(data)
        self.write_part(name, 0, data)
        return self.finish(name, digest)

    def write_part(self, name: str, offset: int, data: memoryview | bytes) -> None:
        """Write part of a tensor's bytes at ``offset`` within its slot (for streamed tensors)."""
        slot = self.slots[name]
        if offset + len(data) > slot.end - slot.start:
            raise BuildError(f"tensor {name}: part beyond its {slot.end - slot.start} bytes")
        try:
            write_at(self._handles[slot.file], data, slot.start + offset)
        except OSError as error:
            raise BuildError(f"cannot write {self.folder / slot.file}: {error.strerror}") from None

    def read_back(self, name: str) -> memoryview:
        """The bytes written for a complete tensor (a twin's, written again under another name)."""
        slot = self.slots[name]
        data = memoryview(bytearray(slot.end - slot.start))
        if read_into(self._handles[slot.file], data, slot.start) < len(data):
            raise BuildError(f"{self.folder / slot.file}: tensor {name} could not be read back")
        return data

    def finish(self, name: str, digest: str) -> str:
        """Mark a tensor complete, with the digest of all its bytes."""
        with self._lock:
            self.digests[name] = digest
        if self.streaming:
            slot = self.slots[name]
            advise(self._handles[slot.file], slot.start, slot.end - slot.start, "POSIX_FADV_DONTNEED")
        return digest

    def close(self) -> None:
        """Flush shards to disk and write the index when there are several."""
        missing = [name for name in self.slots if name not in self.digests]
        for fd in self._handles.values():
            os.fsync(fd)
            os.close(fd)
        self._handles.clear()
        if missing:
            raise BuildError(f"{len(missing)} tensor(s) never written, e.g. {missing[0]}")
        if len(self.shards) > 1:
            total = sum(slot.end - slot.start for slot in self.slots.values())
            index = {
                "metadata": {"total_size": total},
                "weight_map": {slot.name: slot.file for slot in self.slots.values()},
            }
            write_json(self.folder / "model.safetensors.index.json", index)

    def abort(self) -> None:
        """Close the shard files of a failed build (the caller removes the folder)."""
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()


def _reserve(fd: int, size: int) -> None:
    """Reserve disk space for a file so a full disk fails now rather than mid-build."""
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as error:
            if error.errno not in (95, 22):  # EOPNOTSUPP / EINVAL: filesystem lacks fallocate
                raise
    os.ftruncate(fd, size)

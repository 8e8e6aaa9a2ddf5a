"""Tensor bytes read from source files: to compute with, and to hash into the digests keys
are made of (the hashes are `keys.tensor_hasher` and `keys.file_hasher`; here they are fed).

Apart from `models` because these read data, not headers; torch and blake3 are imported
only when a tensor is first read or hashed.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterable

from mbuild import keys
from mbuild.errors import BuildError, ModelError
from mbuild.io.files import advise, read_into
from mbuild.io.models import TensorInfo

READ_CHUNK = 64 * 1024 * 1024


def file_identity(path: str | Path) -> tuple[int, int, int]:
    """(size, mtime_ns, inode): what tells us a file may have changed without reading it."""
    stat = os.stat(path)
    return (stat.st_size, stat.st_mtime_ns, stat.st_ino)


def hash_tensor_bytes(tensors: Iterable[TensorInfo], workers: int = 2, progress=None) -> dict[str, str]:
    """The digest of each tensor's bytes (`keys.tensor_hasher`), read in chunks straight from its file.

    Tensors are split between ``workers`` threads (hashing and pread release the GIL).
    """
    import concurrent.futures

    tensors = sorted(tensors, key=lambda t: -(t.end - t.start))
    shares: list[list[TensorInfo]] = [[] for _ in range(max(1, workers))]
    sizes = [0] * len(shares)
    for info in tensors:
        smallest = sizes.index(min(sizes))
        shares[smallest].append(info)
        sizes[smallest] += info.end - info.start
    with concurrent.futures.ThreadPoolExecutor(len(shares)) as pool:
        parts = list(pool.map(lambda share: _hash_share(share, progress), shares))
    digests = {}
    for part in parts:
        digests.update(part)
    return digests


def _hash_share(tensors: list[TensorInfo], progress=None) -> dict[str, str]:
    digests = {}
    handles: dict[str, int] = {}
    # One buffer, read into again and again: fresh memory per chunk costs page faults.
    buffer = memoryview(bytearray(min(READ_CHUNK, max((t.end - t.start for t in tensors), default=0))))
    try:
        for info in tensors:
            fd = handles.get(info.file)
            if fd is None:
                fd = handles[info.file] = os.open(info.file, os.O_RDONLY)
            digest = keys.tensor_hasher()
            for chunk in _pieces(fd, info, buffer, ModelError):
                digest.update(chunk)
                if progress is not None:
                    progress(len(chunk))
            digests[info.name] = digest.hexdigest()
    finally:
        for fd in handles.values():
            os.close(fd)
    return digests


def _pieces(fd: int, info: TensorInfo, buffer: memoryview, error: type[Exception]):
    """A tensor's bytes read from ``fd`` into ``buffer`` piece by piece; a short file raises ``error``.

    Each piece is a view of ``buffer``, valid until the next one is read.
    """
    position = info.start
    while position < info.end:
        got = os.preadv(fd, [buffer[: min(len(buffer), info.end - position)]], position)
        if not got:
            raise error(f"{info.file} is truncated (tensor {info.name})")
        yield buffer[:got]
        position += got


def hash_file(path: str | Path) -> str:
    """The digest of a whole (small) file (`keys.file_hasher`)."""
    digest = keys.file_hasher()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(READ_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class TensorReader:
    """Reads tensors by positioned reads into fresh buffers.

    pread rather than mmap: pages of a mapping stay resident (and count in RSS)
    after a tensor is used, pread'd buffers are freed with the tensor.

    ``hashing``: files whose tensors are hashed as they are read (a source read for the first
    time is hashed by the read that computes with it); `digests` holds what was found, by file
    and tensor name. ``streaming``: the build is larger than memory, so the kernel is told to
    drop each tensor's pages once read (`drop`) and to read ahead what is asked for (`will_need`).
    """

    def __init__(self, hashing: frozenset[str] = frozenset(), streaming: bool = False):
        self._handles: dict[str, int] = {}
        self._lock = threading.Lock()
        self.hashing = hashing
        self.streaming = streaming
        self.digests: dict[str, dict[str, str]] = {}

    def _hashed(self, info: TensorInfo, digest: str) -> None:
        with self._lock:
            self.digests.setdefault(info.file, {})[info.name] = digest

    def will_need(self, info: TensorInfo) -> None:
        """Ask the kernel to start reading a tensor that a coming task needs (no memory of ours)."""
        if self.streaming and info.file is not None:
            advise(self._fd(info.file), info.start, info.end - info.start, "POSIX_FADV_WILLNEED")

    def drop(self, info: TensorInfo) -> None:
        """Let the kernel forget a tensor's pages (streaming only): they would crowd out what is still needed."""
        if self.streaming and info.file is not None:
            advise(self._fd(info.file), info.start, info.end - info.start, "POSIX_FADV_DONTNEED")

    def _fd(self, file: str) -> int:
        with self._lock:
            fd = self._handles.get(file)
            if fd is None:
                fd = self._handles[file] = os.open(file, os.O_RDONLY)
            return fd

    def read(self, info: TensorInfo):
        """Load one tensor into CPU memory in its stored dtype."""
        import torch

        if info.file is None:
            raise BuildError(f"tensor {info.name} has no file to read from")
        buffer = torch.empty(info.end - info.start, dtype=torch.uint8)
        view = memoryview(buffer.numpy()).cast("B")
        if read_into(self._fd(info.file), view, info.start) < len(view):
            raise BuildError(f"{info.file} is truncated (tensor {info.name})")
        if info.file in self.hashing:
            self._hashed(info, keys.tensor_digest(view))
        self.drop(info)
        return buffer.view(torch_dtype(info.dtype)).reshape(info.shape)

    def chunks(self, info: TensorInfo, size: int = READ_CHUNK):
        """A tensor's raw bytes in pieces of at most ``size``, each valid until the next is read."""
        buffer = memoryview(bytearray(min(size, info.end - info.start)))
        hasher = keys.tensor_hasher() if info.file in self.hashing else None
        for piece in _pieces(self._fd(info.file), info, buffer, BuildError):
            if hasher is not None:
                hasher.update(piece)
            yield piece
        if hasher is not None:
            self._hashed(info, hasher.hexdigest())
        self.drop(info)

    def close(self) -> None:
        """Close every file opened for reading."""
        with self._lock:
            for fd in self._handles.values():
                os.close(fd)
            self._handles.clear()


def torch_dtype(name: str):
    """The torch dtype for a canonical name ('bfloat16' -> torch.bfloat16)."""
    import torch

    return getattr(torch, name)


def raw_bytes(tensor) -> memoryview:
    """A tensor's bytes as stored (contiguous, native order), without a copy where it can."""
    import torch

    flat = tensor.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")

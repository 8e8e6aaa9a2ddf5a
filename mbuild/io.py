"""Everything that touches model files: safetensors headers, lazy tensor reads,
the sharded writer, Hugging Face folders and hub resolution.

Header and folder functions do not import torch, so planning stays fast; the
tensor functions import it when first called.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mbuild.errors import BuildError, ModelError

# safetensors dtype codes <-> canonical torch dtype names, with element sizes.
SAFETENSORS_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "BF16": ("bfloat16", 2),
    "F16": ("float16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
DTYPE_CODES = {name: code for code, (name, _) in SAFETENSORS_DTYPES.items()}
DTYPE_SIZES = {name: size for name, size in SAFETENSORS_DTYPES.values()}
FLOAT_DTYPES = ("float64", "float32", "bfloat16", "float16")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
MANIFEST_NAME = "mbuild.json"
READ_CHUNK = 64 * 1024 * 1024
# What mbuild reads whole from a model folder (config.json, an index, tokenizer_config.json)
# is a few MB at most: the index of a 400B model is about 2 MB.
SMALL_FILE_LIMIT = 64 * 1024 * 1024
# A safetensors header is about 150 bytes a tensor: 100 MiB is far beyond any model's.
HEADER_LIMIT = 100 * 1024 * 1024
# A hub cache's ref file holds one commit hash; the snapshot folder is named by it.
HUB_REF_LIMIT = 1024
HUB_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from a safetensors header alone."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str | None  # absolute path; None for a target not built yet
    start: int = 0  # absolute byte offset of the data in the file
    end: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        count = 1
        for size in self.shape:
            count *= size
        return count * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class ModelInfo:
    """A model folder's config and tensor table, read without touching tensor data."""

    folder: Path | None
    config: Mapping[str, Any]
    tensors: Mapping[str, TensorInfo]
    weight_files: tuple[str, ...] = ()

    @property
    def num_layers(self) -> int | None:
        """The decoder layer count its config declares."""
        return layer_count(self.config)

    @property
    def nbytes(self) -> int:
        """Bytes of all its tensors' data."""
        return sum(t.nbytes for t in self.tensors.values())


def layer_count(config: Mapping[str, Any]) -> int | None:
    """The decoder layer count a config declares (text_config for multimodal ones)."""
    return config_int(config, ("num_hidden_layers", "n_layer", "num_layers"))


def config_int(config: Mapping[str, Any], keys: Sequence[str]) -> int | None:
    """The first integer a config holds under one of ``keys``, at top level or in text_config."""
    for holder in (config, config.get("text_config") or {}):
        if not isinstance(holder, Mapping):
            continue  # a malformed text_config declares nothing
        for key in keys:
            if isinstance(holder.get(key), int):
                return holder[key]
    return None


def open_regular(path: str | Path, error: type[Exception] = ModelError) -> tuple[int, int]:
    """Open a file for reading; returns its descriptor and size, or raises ``error`` if it is not a regular file.

    Links are followed (a hub snapshot's files are links to blobs). The open does not block,
    so a FIFO with no writer is refused here instead of waited on forever, and a device such
    as /dev/zero is never read without end. OSError (a missing file) passes through.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    details = os.fstat(fd)
    if not stat.S_ISREG(details.st_mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(details.st_mode) else "not a regular file (a FIFO, socket or device)"
        raise error(f"{path} is {kind}, where mbuild expects a file")
    return fd, details.st_size


def read_small_file(path: str | Path, limit: int = SMALL_FILE_LIMIT, error: type[Exception] = ModelError) -> bytes:
    """The bytes of a file mbuild reads whole (a config, an index), refused past ``limit`` bytes.

    FileNotFoundError passes through, for callers that have their own words for a missing file.
    """
    try:
        fd, _ = open_regular(path, error)
    except FileNotFoundError:
        raise
    except OSError as problem:
        raise error(f"cannot read {path}: {problem.strerror}") from None
    try:
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    except OSError as problem:
        raise error(f"cannot read {path}: {problem.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise error(f"{path} is larger than {limit // (1024 * 1024)} MiB: too large for a file mbuild reads whole")
    return data


def read_small_json(path: str | Path, limit: int = SMALL_FILE_LIMIT, error: type[Exception] = ModelError) -> dict:
    """A JSON object read as ``read_small_file`` reads (every such file mbuild reads holds an object)."""
    data = read_small_file(path, limit, error)
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise error(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as problem:
        raise error(f"{path} is not valid JSON: {problem}") from None
    except RecursionError:
        raise error(f"{path} is not valid JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise error(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def read_header(path: str | Path) -> tuple[dict[str, Any], int, int]:
    """A safetensors file's JSON header, the offset its data starts at, and the file's size."""
    path = Path(path)
    try:
        fd, size = open_regular(path)
        try:
            prefix = os.pread(fd, 8, 0)
            if len(prefix) != 8:
                raise ModelError(f"{path} is not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", prefix)
            if length > HEADER_LIMIT:
                raise ModelError(f"{path} is not a safetensors file (header length {length})")
            raw = bytearray(length)
            if read_into(fd, memoryview(raw), 8) < length:
                raise ModelError(f"{path} is truncated (its header runs past the end of the file)")
        finally:
            os.close(fd)
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=lambda pairs: _unique_keys(path, pairs))
    except OSError as error:
        raise ModelError(f"cannot read {path}: {error.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ModelError(f"{path} is not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path} is not a safetensors file (its header is a JSON {type(header).__name__}, not an object)")
    return header, 8 + length, size


def _unique_keys(path: Path, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object of a header, refused if a key repeats (JSON would keep the last silently)."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ModelError(f"{path}: the header names {key!r} twice")
        seen.add(key)
    return dict(pairs)


def read_tensors(path: str | Path) -> list[TensorInfo]:
    """The tensors of one safetensors file, each entry checked against the file: a header can lie."""
    header, data_start, size = read_header(path)
    header.pop("__metadata__", None)
    tensors = [_tensor_info(Path(path), name, entry, data_start) for name, entry in header.items()]
    _check_layout(Path(path), tensors, size)
    return tensors


def _tensor_info(path: Path, name: str, entry: Any, data_start: int) -> TensorInfo:
    """One header entry, refused unless its dtype, shape and byte range agree with each other."""
    if not isinstance(entry, dict):
        raise ModelError(f"{path}: tensor {name}'s header entry is not a mapping")
    code = entry.get("dtype")
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        raise ModelError(f"{path}: tensor {name} has unsupported dtype {code}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_count(size) for size in shape):
        raise ModelError(f"{path}: tensor {name} has shape {shape!r}: a list of non-negative integers expected")
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets)) and offsets[0] <= offsets[1]):
        raise ModelError(f"{path}: tensor {name} has data_offsets {offsets!r}: [begin, end] with 0 <= begin <= end expected")
    begin, end = offsets
    info = TensorInfo(name, SAFETENSORS_DTYPES[code][0], tuple(shape), str(path), data_start + begin, data_start + end)
    if info.nbytes != end - begin:
        raise ModelError(
            f"{path}: tensor {name} ({code} {shape}) has {info.nbytes} bytes of data, but its data_offsets span {end - begin}"
        )
    return info


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(path: Path, tensors: Sequence[TensorInfo], size: int) -> None:
    """Refuse tensors past the end of the file, or sharing bytes (a write to one would change the other)."""
    furthest: TensorInfo | None = None
    for info in sorted(tensors, key=lambda t: (t.start, t.end)):
        if info.end > size:
            raise ModelError(f"{path} is truncated: tensor {info.name} ends at byte {info.end}, the file has {size}")
        if info.start == info.end:
            continue  # no bytes to share
        if furthest is not None and info.start < furthest.end:
            raise ModelError(f"{path}: tensors {furthest.name} and {info.name} overlap in the file")
        if furthest is None or info.end > furthest.end:
            furthest = info


def read_model(folder: str | Path, pickles=None) -> ModelInfo:
    """Read config.json and every safetensors header of a model folder.

    A folder with only pickled weights is read through ``pickles`` (a `pickles.Conversions`),
    and refused when there is none (no --allow-pickle).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"model folder not found: {folder}")
    try:
        config = read_small_json(folder / "config.json")
    except FileNotFoundError:
        raise ModelError(f"{folder} has no config.json: not a Hugging Face model folder") from None
    files = weight_files(folder)
    if files:
        return model_from_files(folder, config, files)
    found = pickle_files(folder)
    if not found:
        raise ModelError(f"{folder} has no weights (*.safetensors)")
    if pickles is None:
        raise ModelError(
            f"{folder} has only pickled weights ({found[0].name}); unpickling can run code, "
            "so mbuild refuses it. Convert it to safetensors, or pass --allow-pickle to load it "
            "with torch.load(weights_only=True)"
        )
    return pickles.model(folder, config, found)


def model_from_files(folder: Path, config: Mapping[str, Any], files: Sequence[Path]) -> ModelInfo:
    """A model whose tensors are in these safetensors files; a tensor in two of them is refused."""
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for info in read_tensors(file):
            if info.name in tensors:
                first = Path(tensors[info.name].file).name
                raise ModelError(f"{folder}: tensor {info.name} is in two files, {first} and {Path(file).name}")
            tensors[info.name] = info
    return ModelInfo(folder=folder, config=config, tensors=tensors, weight_files=tuple(str(f) for f in files))


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model (via its index when sharded); none when it has only pickles."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted({folder / name for name in index_shards(index)})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ModelError(f"{folder}: the index lists missing shard(s): {', '.join(missing)}")
        return files
    return sorted(folder.glob("*.safetensors"))


# Files Hugging Face's Trainer and others leave beside the weights that are not weights.
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt")


def pickle_files(folder: Path) -> list[Path]:
    """A folder's pickled weight files: those its index names, else every *.bin and *.pt that is not training state."""
    index = folder / "pytorch_model.bin.index.json"
    if index.is_file():
        return [folder / name for name in index_shards(index)]
    found = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
    return [path for path in found if path.name not in NOT_WEIGHTS]


def index_shards(index: Path) -> list[str]:
    """The shard names a safetensors index maps tensors to: plain names of files in the model's own folder."""
    weight_map = read_small_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise ModelError(f"{index} is not a valid safetensors index: 'weight_map' must map tensor names to file names")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if shard in ("", ".", "..") or any(mark in shard for mark in ("/", "\\", "\0")):
            raise ModelError(f"{index} names the shard {shard!r}: a shard must be a file in the model's own folder")
    return shards


def file_identity(path: str | Path) -> tuple[int, int, int]:
    """(size, mtime_ns, inode): what tells us a file may have changed without reading it."""
    stat = os.stat(path)
    return (stat.st_size, stat.st_mtime_ns, stat.st_ino)


def bytes_hasher(data: bytes | memoryview = b""):
    """An incremental hasher of tensor bytes (``update``, ``hexdigest``), started on ``data``.

    Tensor bytes are known by their BLAKE3 digest: a cryptographic hash that runs about
    2.5 times as fast per core as sha256 (4.6 against 1.8 GB/s on a Zen CPU that has the
    SHA extensions), and that, like pread, releases the GIL, so threads hash in parallel.
    Every tensor's bytes are hashed once (sources when first seen, outputs as written),
    and verified again on each reuse from the cache: on a 70B merge, tens of seconds.
    """
    import blake3

    return blake3.blake3(data)


def bytes_digest(data: bytes | memoryview) -> str:
    """The digest of some tensor bytes (hex), as ``bytes_hasher`` gives it."""
    return bytes_hasher(data).hexdigest()


def hash_tensor_bytes(tensors: Iterable[TensorInfo], workers: int = 2, progress=None) -> dict[str, str]:
    """The digest of each tensor's bytes (`bytes_hasher`), read in chunks straight from its file.

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
            digest = bytes_hasher()
            for chunk in _pieces(fd, info, buffer, ModelError):
                digest.update(chunk)
                if progress is not None:
                    progress(len(chunk))
            digests[info.name] = digest.hexdigest()
    finally:
        for fd in handles.values():
            os.close(fd)
    return digests


def read_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``fd`` at ``offset``; returns the bytes read (fewer only at end of file)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done


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
    """sha256 of a whole (small) file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(READ_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class TensorReader:
    """Reads tensors by positioned reads into fresh buffers.

    pread rather than mmap: pages of a mapping stay resident (and count in RSS)
    after a tensor is used, pread'd buffers are freed with the tensor.
    """

    def __init__(self):
        self._handles: dict[str, int] = {}
        self._lock = threading.Lock()

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
        return buffer.view(torch_dtype(info.dtype)).reshape(info.shape)

    def chunks(self, info: TensorInfo, size: int = READ_CHUNK):
        """A tensor's raw bytes in pieces of at most ``size``, each valid until the next is read."""
        buffer = memoryview(bytearray(min(size, info.end - info.start)))
        yield from _pieces(self._fd(info.file), info, buffer, BuildError)

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
    tensors: Sequence[tuple[str, str, tuple[int, ...]]], max_shard_bytes: int
) -> dict[str, list[ShardSlot]]:
    """Assign tensors, in order, to shard files of at most ``max_shard_bytes`` of data each."""
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
        names = ["model.safetensors"]
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

    def __init__(self, folder: Path, tensors: Sequence[tuple[str, str, tuple[int, ...]]], max_shard_bytes: int):
        self.folder = folder
        self.shards = plan_shards(tensors, max_shard_bytes)
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
            digest = bytes_digest(data)
        self.write_part(name, 0, data)
        return self.finish(name, digest)

    def write_part(self, name: str, offset: int, data: memoryview | bytes) -> None:
        """Write part of a tensor's bytes at ``offset`` within its slot (for streamed tensors)."""
        slot = self.slots[name]
        if offset + len(data) > slot.end - slot.start:
            raise BuildError(f"tensor {name}: part beyond its {slot.end - slot.start} bytes")
        fd = self._handles[slot.file]
        done = 0
        try:
            while done < len(data):
                done += os.pwrite(fd, data[done:], slot.start + offset + done)
        except OSError as error:
            raise BuildError(f"cannot write {self.folder / slot.file}: {error.strerror}") from None

    def finish(self, name: str, digest: str) -> str:
        """Mark a streamed tensor complete, with the digest of all its bytes."""
        with self._lock:
            self.digests[name] = digest
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


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """An output folder's mbuild manifest, or None if absent, unreadable or not mbuild's.

    Only a manifest of the shape mbuild writes counts (its version, key, tensors and files):
    any `mbuild.json` of the user's own (`{"theme": "dark"}`) does not make a folder mbuild's.
    """
    path = Path(folder) / MANIFEST_NAME
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MANIFEST_LIMIT:
            return None
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    shape = {"mbuild": str, "target": str, "key": (str, type(None)), "tensors": dict, "files": dict}
    if not isinstance(data, dict) or any(not isinstance(data.get(k), kinds) for k, kinds in shape.items()):
        return None
    if not all(isinstance(entry, dict) for entry in (*data["tensors"].values(), *data["files"].values())):
        return None
    return data


# A manifest lists every tensor of a model: 64 MiB holds hundreds of thousands of entries.
MANIFEST_LIMIT = 64 * 1024 * 1024


def unlisted_entries(folder: Path, manifest: Mapping[str, Any]) -> list[str]:
    """What is in an output folder that its manifest does not list: what mbuild did not write there."""
    listed = set(manifest.get("files", {})) | {MANIFEST_NAME}
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [name for name in names if name not in listed or not os.path.isfile(os.path.join(folder, name))]


def write_json(path: Path, data: Any) -> None:
    """Write JSON with a trailing newline, via a temporary file and rename."""
    replace_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def replace_text(path: Path, text: str) -> None:
    """Put ``text`` at ``path`` in one step: written to a new file of this process's, then renamed.

    The temporary is created, never opened if it exists, and never through a link: a file or
    link planted under its name (`Mergefile.lock.tmp` -> a user's file) is not written into.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        if os.path.islink(temporary) or temporary.is_file():
            temporary.unlink()  # a dead process's leftover under our name, or a planted link
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


class FileLock:
    """An exclusive flock on a lock file holding the holder's pid and host.

    The kernel releases it when the holder dies (even by kill -9), so a dead holder
    never blocks anyone; a live one is waited for, with ``on_wait`` told who it is.
    """

    def __init__(self, path: Path, on_wait=None):
        self.path = Path(path)
        self.on_wait = on_wait
        self.fd: int | None = None
        self.waited = False

    def __enter__(self) -> "FileLock":
        import fcntl
        import socket
        import stat

        # Never through a link: the holder's line is written into the file, and a link planted
        # here would have it truncate whatever it points at.
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as error:
            advice = "remove it if it is not mbuild's" if os.path.lexists(self.path) else "its folder must be writable"
            raise BuildError(f"cannot use the lock file {self.path}: {error.strerror}; {advice}") from None
        details = os.fstat(self.fd)
        if not stat.S_ISREG(details.st_mode) or details.st_nlink > 1:
            os.close(self.fd)
            self.fd = None
            raise BuildError(f"the lock file {self.path} is not a plain file of mbuild's (a link?); remove it")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.waited = True
            if self.on_wait is not None:
                holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
                self.on_wait(f"waiting for {holder} (lock {self.path.name})")
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        except OSError:
            pass  # a full disk: the line only tells a waiting process who holds the lock
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def target_lock(output: Path, on_wait=None) -> FileLock:
    """The lock a process holds while it decides and builds one target's output."""
    return FileLock(output.parent / f".{output.name}.mbuild-lock", on_wait)


def companion_files(folder: Path) -> list[Path]:
    """The top-level non-weight files of a model folder (config, tokenizer, custom code)."""
    skip = {"README.md", MANIFEST_NAME, *INDEX_NAMES, ".gitattributes"}
    files = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.name in skip:
            continue
        if path.name.endswith(WEIGHT_SUFFIXES):
            continue
        files.append(path)
    return files


def copy_files(files: Iterable[Path], destination: Path) -> None:
    """Copy files into a folder, keeping names."""
    for path in files:
        shutil.copyfile(path, destination / path.name)


def resolve_hub_model(repo_id: str, revision: str | None) -> tuple[Path, str]:
    """Find (or fetch, when online) a hub model's snapshot; returns its folder and commit."""
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.file_download import repo_folder_name

        storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
        ref = storage / "refs" / (revision or "main")
        _check_hub_ref(ref)
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=storage.parent,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"],
        )
    except ModelError:
        raise
    except Exception as error:  # huggingface_hub raises many kinds; all mean "not available"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE=1)" if offline else "on the hub or in the local cache"
        raise ModelError(f"hub model '{repo_id}' not found {where}: {type(error).__name__}") from None
    folder = Path(folder)
    # The snapshot folder is named by the commit read from the ref: anything else is a ref gone wrong.
    if folder.parent != storage / "snapshots" or not HUB_COMMIT.match(folder.name):
        raise ModelError(f"hub model '{repo_id}': the cache's ref {ref} does not name a commit")
    return folder, folder.name


def _check_hub_ref(ref: Path) -> None:
    """Refuse a ref of the hub cache that huggingface_hub would block on (a FIFO) or read without end."""
    try:
        read_small_file(ref, HUB_REF_LIMIT)
    except FileNotFoundError:
        pass  # not cached yet: fetched when online


def fsync_folder(folder: Path) -> None:
    """Flush every file of a folder, and the folder itself, to disk."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(temporary: Path, output: Path) -> None:
    """Move a finished folder into place; the old output survives until the new one is there.

    Where the kernel can swap two paths in one step (Linux renameat2 RENAME_EXCHANGE), the
    output path is never missing; elsewhere it is missing between two renames, and a crash
    there is undone by `recover` on the next run.
    """
    if output.exists() and _exchange(temporary, output):
        shutil.rmtree(temporary, ignore_errors=True)  # now the old output
        return
    retired = output.parent / f".{output.name}.mbuild-old-{os.getpid()}"
    if output.exists():
        os.rename(output, retired)
    os.rename(temporary, output)
    shutil.rmtree(retired, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically; False where the platform or filesystem cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), exchange) == 0:
        return True
    import ctypes

    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not here; fall back to two renames
        return False
    raise OSError(errno, os.strerror(errno), str(second))


def _renameat2():
    """libc's renameat2 (glibc 2.28 and later), or None."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def leftovers(output: Path) -> list[Path]:
    """Temporaries and retired outputs beside ``output`` whose process is gone (a crashed build's)."""
    found = []
    for leftover in sorted(output.parent.glob(f".{output.name}.mbuild-*")):
        pid = leftover.name.rsplit("-", 1)[-1]
        if leftover.name.endswith("-lock") or not pid.isdigit():
            continue
        if process_alive(int(pid)) and int(pid) != os.getpid():
            continue
        found.append(leftover)
    return found


def recover(output: Path) -> list[Path]:
    """Undo a publish interrupted between its two renames, and drop dead temporaries; returns those dropped."""
    dropped = []
    for leftover in leftovers(output):
        if ".mbuild-old-" in leftover.name and not output.exists() and read_manifest(leftover):
            os.rename(leftover, output)
        else:
            shutil.rmtree(leftover, ignore_errors=True)
            dropped.append(leftover)
    return dropped


def process_alive(pid: int) -> bool:
    """Whether a process with this id is running (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

def fresh_temporary(output: Path) -> Path:
    """An empty hidden folder beside ``output`` for this process to build into."""
    temporary = output.parent / f".{output.name}.mbuild-tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    return temporary


def discard(folder: Path) -> None:
    """Remove a folder (a failed build's temporary) if it is there."""
    shutil.rmtree(folder, ignore_errors=True)


def write_companions(folder: Path, files, config, card: str) -> None:
    """Everything of an output folder but the weights: copied files, config.json, the model card."""
    for name, origin in files.items():
        shutil.copyfile(origin, folder / name)
    write_json(folder / "config.json", config)
    (folder / "README.md").write_text(card)


def store_text(folder: Path, text: str, suffix: str) -> Path:
    """Keep a text once under ``folder``, named by its digest; returns its path.

    ``folder`` is in the cache: where that cannot be written (a read-only or full disk), the
    text is kept in the system's temporary folder instead, so a build never fails for it.
    """
    name = hashlib.sha256(text.encode()).hexdigest()[:32] + suffix
    try:
        return _keep_text(Path(folder) / name, text)
    except OSError:
        return _keep_text(Path(tempfile.gettempdir()) / "mbuild-texts" / name, text)


def _keep_text(path: Path, text: str) -> Path:
    """``path``, written with ``text`` unless it holds it already (a damaged copy is written again)."""
    try:
        if read_small_file(path, error=OSError) == text.encode():
            return path
    except OSError:
        pass  # absent, or not a file of ours: written below
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_text(path, text)
    return path

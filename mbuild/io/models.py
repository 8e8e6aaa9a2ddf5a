"""What a model is before any tensor is read: a folder's config and its tensor table, taken
from the safetensors headers and checked against the files (a header can lie).

Apart from `reading` because planning needs only this: nothing here reads tensor data or
imports torch, so a no-op build stays fast.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from mbuild.errors import ModelError
from mbuild.io.files import open_regular, read_into, read_small_json
from mbuild.io.outputs import MANIFEST_NAME

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
# A safetensors header is about 150 bytes a tensor: 100 MiB is far beyond any model's.
HEADER_LIMIT = 100 * 1024 * 1024


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


def read_header(path: str | Path) -> tuple[dict[str, Any], int, int]:
    """A safetensors file's JSON header, the offset its data starts at, and the file's size."""
    path = Path(path)
    try:
        fd, size = open_regular(path)
        try:
            length = header_length(path, os.pread(fd, 8, 0))
            raw = bytearray(length)
            if read_into(fd, memoryview(raw), 8) < length:
                raise ModelError(f"{path} is truncated (its header runs past the end of the file)")
        finally:
            os.close(fd)
    except OSError as error:
        raise ModelError(f"cannot read {path}: {error.strerror}") from None
    return parse_header(path, raw), 8 + length, size


def header_length(path: str | Path, prefix: bytes) -> int:
    """The header length a safetensors file's first 8 bytes declare, refused past `HEADER_LIMIT`."""
    if len(prefix) != 8:
        raise ModelError(f"{path} is not a safetensors file (too short)")
    (length,) = struct.unpack("<Q", prefix)
    if length > HEADER_LIMIT:
        raise ModelError(f"{path} is not a safetensors file (header length {length})")
    return length


def parse_header(path: str | Path, raw: bytes | bytearray) -> dict[str, Any]:
    """A safetensors header's JSON: one object whose keys do not repeat."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=lambda pairs: _unique_keys(Path(path), pairs))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ModelError(f"{path} is not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path} is not a safetensors file (its header is a JSON {type(header).__name__}, not an object)")
    return header


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
    return header_tensors(path, header, data_start, size)


def header_tensors(path: str | Path, header: dict[str, Any], data_start: int, size: int) -> list[TensorInfo]:
    """The tensors a header lists, each checked against the others and against the file's ``size``."""
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


def model_from_files(folder: Path, config: Mapping[str, Any], files: Sequence[Path], read=read_tensors) -> ModelInfo:
    """A model whose tensors are in these safetensors files; a tensor in two of them is refused.

    ``read``: a file's tensor table (`read_tensors`; the hub's range reads for files not downloaded yet).
    """
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for info in read(file):
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

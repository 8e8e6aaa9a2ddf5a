"""GGUF files (llama.cpp's format), through the gguf package: the writer of a GGUF target's
one file, its tensors read back for reuse, and one tensor's encoding (the tokenizer metadata is
`mbuild.io.gguf_tokenizer`'s).

The header (metadata and tensor table) is made by `gguf.GGUFWriter` before any tensor is
computed, since every name, type and size is planned; each tensor's encoded bytes are then
written at their aligned offset as they come, in any order, as `ShardedWriter` does for
safetensors shards (whose methods this writer shares). Encoding is `gguf.quants.quantize`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

from mbuild.errors import BuildError
from mbuild.io.gguf_tokenizer import add_tokenizer
from mbuild.io.models import ModelInfo, TensorInfo
from mbuild.io.writer import ShardedWriter, ShardSlot, _reserve


# Rows are encoded this many elements at a time: every GGML type encodes a row on its own, so
# the bytes are the whole tensor's, and memory holds the tensor as stored, its encoding and this.
ENCODE_CHUNK = 16 * 1024 * 1024
F16_MAX = 65504.0


def encode(tensor, type: str, shape: Sequence[int], permute: int | None = None):
    """One tensor (torch, as stored) as GGUF bytes of GGML type ``type`` (a flat uint8 numpy array).

    ``permute``: the head count whose rows llama.cpp's rope wants interleaved (Llama's q and
    k): within each head, row i of the first half and row i of the second half become rows
    2i and 2i+1, the layout llama.cpp's converter writes and transformers' GGUF loader undoes.
    """
    import gguf
    import numpy as np
    import torch

    kind = gguf.GGMLQuantizationType[type]
    tensor = tensor.reshape(tuple(shape))
    order = None
    if permute:
        count = tensor.shape[0]
        order = torch.arange(count).reshape(permute, 2, count // permute // 2).transpose(1, 2).reshape(-1)
    if tensor.dim() == 1:  # a norm or a bias: one row, its elements reordered if permuted
        rows = (tensor if order is None else tensor[order]).reshape(1, -1)
        order = None
    else:
        rows = tensor.reshape(tensor.shape[0], -1)
    width = tensor.shape[-1]
    block, size = gguf.GGML_QUANT_SIZES[kind]
    row_bytes = rows.shape[1] // block * size
    out = np.empty(rows.shape[0] * row_bytes, dtype=np.uint8)
    step = max(1, ENCODE_CHUNK // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        stop = min(start + step, rows.shape[0])
        chunk = rows[start:stop] if order is None else rows[order[start:stop]]
        values = chunk.to(torch.float32).numpy().reshape(-1, width)
        if kind == gguf.GGMLQuantizationType.F16 and values.size and np.abs(values).max() > F16_MAX:
            raise ValueError("values beyond float16's range: choose bf16 or f32")
        encoded = gguf.quants.quantize(np.ascontiguousarray(values), kind)
        out[start * row_bytes : stop * row_bytes] = np.ascontiguousarray(encoded).view(np.uint8).reshape(-1)
    return out


class GGUFFileWriter(ShardedWriter):
    """Writes a GGUF target's one file: the header first, then each tensor at its offset.

    ``tensors``: (name, GGML type name, shape, encoded bytes) in file order; ``metadata``: the
    target plan's config (`mbuild.plan.kinds.gguf`); ``tokenizer_files``: name -> path.
    """

    def __init__(
        self,
        folder: Path,
        metadata: Mapping[str, Any],
        tensors: Sequence[tuple[str, str, Sequence[int], int]],
        tokenizer_files: Mapping[str, str],
        streaming: bool = False,
    ):
        import gguf
        import numpy as np

        self.folder = folder
        self.streaming = streaming
        self.digests: dict[str, str] = {}
        self._handles: dict[str, int] = {}
        self._lock = threading.Lock()
        file = metadata["file"]
        path = folder / file
        writer = gguf.GGUFWriter(None, metadata["architecture"])
        for key, value_type, value in metadata["values"]:
            writer.add_key_value(key, value, gguf.GGUFValueType[value_type])
        file_type = gguf.LlamaFileType[metadata["file_type"]]
        writer.add_file_type(int(file_type))
        if file_type not in (gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16, gguf.LlamaFileType.MOSTLY_BF16):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, tokenizer_files, _vocab_size(metadata), metadata.get("tokenizer", {}).get("config_ids", {}))
        for name, type_name, shape, nbytes in tensors:
            writer.add_tensor_info(name, tuple(shape), np.dtype(np.float32), nbytes, raw_dtype=gguf.GGMLQuantizationType[type_name])
        path.unlink(missing_ok=True)
        try:
            writer.write_header_to_file(path)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
        finally:
            writer.close()
        alignment = writer.data_alignment
        offset = writer.ggml_pad(path.stat().st_size, alignment)
        slots = []
        for name, type_name, shape, nbytes in tensors:
            slots.append(ShardSlot(name, "uint8", (nbytes,), file, offset, offset + nbytes))
            offset += writer.ggml_pad(nbytes, alignment)
        self.shards = {file: slots}
        self.slots = {slot.name: slot for slot in slots}
        fd = os.open(path, os.O_RDWR)
        self._handles[file] = fd
        try:
            _reserve(fd, offset)
        except OSError as error:
            raise BuildError(f"cannot write {path}: {error.strerror}") from None


def writer_for(folder: Path, target_plan, streaming: bool = False) -> GGUFFileWriter:
    """The writer of a GGUF target plan's file (`mbuild.plan.kinds.gguf`)."""
    tensors = [(t.name, dict(t.params)["type"], dict(t.params)["shape"], t.shape[0]) for t in target_plan.tasks]
    return GGUFFileWriter(folder, target_plan.config, tensors, target_plan.files, streaming)


def read_output(folder: Path) -> ModelInfo:
    """A built GGUF target's tensors as byte ranges of its file (for reuse by a rebuild)."""
    import gguf

    found = sorted(Path(folder).glob("*.gguf"))
    if len(found) != 1:
        raise BuildError(f"{folder} should hold one .gguf file, not {len(found)}")
    try:
        reader = gguf.GGUFReader(found[0])
    except (ValueError, OSError) as error:
        raise BuildError(f"{found[0]} is not a readable GGUF file: {error}") from None
    tensors = {
        t.name: TensorInfo(t.name, "uint8", (int(t.n_bytes),), str(found[0]), int(t.data_offset), int(t.data_offset + t.n_bytes))
        for t in reader.tensors
    }
    return ModelInfo(folder=Path(folder), config={}, tensors=tensors)


def _vocab_size(metadata: Mapping[str, Any]) -> int | None:
    for key, _, value in metadata["values"]:
        if key.endswith(".vocab_size"):
            return value
    return None

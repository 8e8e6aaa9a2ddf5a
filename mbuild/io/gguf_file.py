"""GGUF files (llama.cpp's format), through the gguf package: the writer of a GGUF target's
one file, its tensors read back for reuse, one tensor's encoding, and the tokenizer metadata.

The header (metadata and tensor table) is made by `gguf.GGUFWriter` before any tensor is
computed, since every name, type and size is planned; each tensor's encoded bytes are then
written at their aligned offset as they come, in any order, as `ShardedWriter` does for
safetensors shards (whose methods this writer shares). Encoding is `gguf.quants.quantize`.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

from mbuild.errors import BuildError
from mbuild.io.files import read_small_file
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
        add_tokenizer(writer, tokenizer_files, _vocab_size(metadata))
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


# Pre-tokenizer regexes (tokenizer.json's Split pattern) -> llama.cpp's name for them.
PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


def _pre_tokenizer(spec: Any) -> str | None:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, or None when not one it knows."""
    if not isinstance(spec, dict):
        return None
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt-2"
    if spec.get("type") == "Sequence":
        parts = spec.get("pretokenizers") or []
        splits = [p for p in parts if p.get("type") == "Split"]
        levels = [p for p in parts if p.get("type") == "ByteLevel"]
        if len(splits) == 1 and len(levels) == 1 and len(parts) == 2 and not levels[0].get("use_regex", True):
            return PRE_TOKENIZERS.get((splits[0].get("pattern") or {}).get("Regex"))
    return None


def add_tokenizer(writer, files: Mapping[str, str], vocab_size: int | None) -> None:
    """The vocabulary, merges, special tokens and chat template, from tokenizer.json and its config.

    A byte-level BPE tokenizer (GPT-2's, Llama 3's, Qwen2's) is written as llama.cpp's
    ``gpt2`` model; others are refused.
    """
    import gguf

    data = _json(files["tokenizer.json"])
    model = data.get("model") or {}
    pre = _pre_tokenizer(data.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pre is None:
        raise BuildError(
            f"{files['tokenizer.json']}: mbuild writes byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2) to GGUF, "
            "not this one"
        )
    config = _json(files["tokenizer_config.json"]) if "tokenizer_config.json" in files else {}
    by_id: dict[int, str] = {int(i): t for t, i in model.get("vocab", {}).items()}
    types: dict[int, int] = {}
    for added in data.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        types[int(added["id"])] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    size = max(vocab_size or 0, max(by_id) + 1 if by_id else 0)
    tokens, token_types = [], []
    for index in range(size):
        if index in by_id:
            tokens.append(by_id[index])
            token_types.append(types.get(index, gguf.TokenType.NORMAL))
        else:  # the embedding has rows past the tokenizer's: named as the converter names them
            tokens.append(f"[PAD{index}]")
            token_types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    if merges:
        writer.add_token_merges(merges)
    ids = {token: index for index, token in enumerate(tokens)}
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token = config.get(f"{name}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and token in ids:
            add(ids[token])
    writer.add_add_bos_token(bool(config.get("add_bos_token", _template_adds(data, config.get("bos_token"), "first"))))
    writer.add_add_eos_token(bool(config.get("add_eos_token", _template_adds(data, config.get("eos_token"), "last"))))
    template = None
    if "chat_template.jinja" in files:
        template = read_small_file(files["chat_template.jinja"]).decode("utf-8")
    elif config.get("chat_template"):
        template = config["chat_template"]
    if template:
        writer.add_chat_template(template)


def _template_adds(data: Mapping[str, Any], token: Any, where: str) -> bool:
    """Whether tokenizer.json's post-processor puts ``token`` first (or last) in a single sequence."""
    token = token.get("content") if isinstance(token, dict) else token
    processor = data.get("post_processor") or {}
    processors = processor.get("processors", [processor]) if processor.get("type") == "Sequence" else [processor]
    for item in processors:
        single = item.get("single") if item.get("type") == "TemplateProcessing" else None
        if single:
            end = single[0] if where == "first" else single[-1]
            if (end.get("SpecialToken") or {}).get("id") == token:
                return True
    return False


def _json(path: str) -> dict:
    try:
        return json.loads(read_small_file(path))
    except (OSError, ValueError) as error:
        raise BuildError(f"cannot read {path}: {error}") from None

"""The tokenizer inside a GGUF file: llama.cpp's vocabulary metadata from a model's tokenizer files.

llama.cpp tokenizes with one of a few built-in algorithms, named by `tokenizer.ggml.model`, over
the vocabulary stored in the file. Two are written here, as llama.cpp's `convert_hf_to_gguf.py`
writes them for Llama, Mistral and Qwen2:

- ``llama``: a sentencepiece BPE vocabulary with byte fallback (Llama 2, Mistral 7B v0.1,
  TinyLlama). Each piece with its score (llama.cpp merges the adjacent pair whose piece scores
  highest) and its type. Read from `tokenizer.model` with the sentencepiece package, as the
  converter does, when the model has one. A model with only tokenizer.json (what transformers 5
  saves) has its pieces read from there, each scored by the rank of the first merge that makes
  it: the converter scores every piece alike in that case, so llama.cpp would merge left to right
  and tokenize unlike the source; ranks keep sentencepiece's order.
- ``gpt2``: a byte-level BPE (GPT-2, Llama 3, Qwen2): tokens and merges from tokenizer.json,
  and llama.cpp's name for its pre-tokenizer.

A Unigram vocabulary is refused: llama.cpp's ``llama`` tokenizer merges pairs by score, which is
not Unigram's segmentation, so the file would tokenize differently from the source.

Tokens past the sentencepiece vocabulary (added tokens) come from added_tokens.json and
tokenizer_config.json's `added_tokens_decoder` (or tokenizer.json's `added_tokens` where the
config does not list them, as transformers 5 saves it); rows of the embedding no token names are
written `[PAD<id>]`, unused. Special token ids, the BOS/EOS flags, the chat template and the
merges are read by the gguf package's `SpecialVocab`, from a folder holding the files by name.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from mbuild.errors import BuildError
from mbuild.io.files import read_small_file, read_small_json

# Scores the converter gives: an added token, and an embedding row no token names.
ADDED_SCORE = -1000.0
PAD_SCORE = -10000.0
SENTENCEPIECE_SPACE = "\u2581"
BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
# Added tokens the converter makes control tokens although their files do not mark them special.
LOOKS_SPECIAL = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
# Pre-tokenizers (tokenizer.json's Split pattern) -> llama.cpp's name for them.
PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


def needs_sentencepiece(files: Mapping[str, str]) -> bool:
    """Whether these tokenizer files are read with the sentencepiece package (a tokenizer.model)."""
    return "tokenizer.model" in files


def missing_packages(files: Mapping[str, str]) -> list[str]:
    """The packages reading these tokenizer files needs that are not installed."""
    if not needs_sentencepiece(files):
        return []
    # Looked up, not imported: the plan stays fast. protobuf parses the model file (its type).
    packages = (("sentencepiece", "sentencepiece"), ("protobuf", "google.protobuf"))
    return [name for name, module in packages if not _installed(module)]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def add_tokenizer(writer, files: Mapping[str, str], vocab_size: int | None, config_ids: Mapping[str, Any]) -> None:
    """Write the vocabulary, its scores and types, merges, special tokens and chat template.

    ``files``: the tokenizer files by name; ``vocab_size``: the embedding's rows (the config's
    `vocab_size`); ``config_ids``: the config's `*_token_id` entries, which `SpecialVocab`
    falls back on as the converter's reading of config.json does.
    """
    import gguf

    data = _json(files["tokenizer.json"]) if "tokenizer.json" in files else {}
    model = data.get("model") or {}
    if needs_sentencepiece(files):
        tokens, scores, types = sentencepiece_vocabulary(files, data, vocab_size)
    elif model.get("type") == "BPE" and model.get("byte_fallback"):
        tokens, scores, types = byte_fallback_vocabulary(files, data, vocab_size)
    elif model.get("type") == "BPE" and _pre_tokenizer(data.get("pre_tokenizer")) is not None:
        tokens, types = byte_level_vocabulary(files, data, vocab_size)
        scores = None
    else:
        kind = "a Unigram vocabulary" if model.get("type") == "Unigram" else "this tokenizer"
        name = files.get("tokenizer.json", "the model")
        raise BuildError(
            f"{name}: mbuild writes sentencepiece BPE (Llama 2, Mistral) and byte-level BPE (GPT-2, Llama 3, Qwen2) "
            f"tokenizers to GGUF, not {kind}"
        )
    if scores is None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer(data.get("pre_tokenizer")))
    else:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    with _staged(files, config_ids) as folder, _quiet(logging.getLogger("gguf")):
        special = gguf.SpecialVocab(folder, load_merges=scores is None, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)


def sentencepiece_vocabulary(files, data, vocab_size: int | None) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types from tokenizer.model, then the added tokens, padded to ``vocab_size``."""
    import gguf
    from google.protobuf.message import DecodeError
    from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2

    path = files["tokenizer.model"]
    try:
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(read_small_file(path, error=BuildError))
        if not proto.pieces:  # protobuf reads an empty file as an empty model
            raise ValueError("it has no pieces")
        processor = SentencePieceProcessor(model_proto=proto.SerializeToString())
    except (DecodeError, RuntimeError, ValueError) as error:  # protobuf's or sentencepiece's: not a model
        raise BuildError(f"{path} is not a sentencepiece model: {error}") from None
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        kind = proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type)
        raise BuildError(
            f"{path} is a sentencepiece {kind} model: llama.cpp's tokenizer merges pairs by score, as BPE does, "
            "so mbuild writes sentencepiece BPE models to GGUF only"
        )
    count = processor.vocab_size()
    size = _fits(path, count, vocab_size)
    tokens, scores, types = _padded(size)
    kind = gguf.TokenType
    for index in range(count):
        tokens[index] = processor.IdToPiece(index)
        scores[index] = processor.GetScore(index)
        if processor.IsUnknown(index):
            types[index] = kind.UNKNOWN
        elif processor.IsControl(index):
            types[index] = kind.CONTROL
        elif processor.IsUnused(index):
            types[index] = kind.UNUSED
        elif processor.IsByte(index):
            types[index] = kind.BYTE
        else:
            types[index] = kind.NORMAL
    _add_tokens(files, data, tokens, scores, types)
    return tokens, scores, types


def byte_fallback_vocabulary(files, data, vocab_size: int | None) -> tuple[list[str], list[float], list[int]]:
    """Pieces and types from tokenizer.json's BPE model, scored by merge rank (see the module's note)."""
    import gguf

    model = data["model"]
    vocab: dict[str, int] = model.get("vocab") or {}
    size = _fits(files["tokenizer.json"], max(vocab.values(), default=-1) + 1, vocab_size)
    tokens, scores, types = _padded(size)
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges") or []]
    rank: dict[str, int] = {}
    for index, (left, right) in enumerate(merges):
        rank.setdefault(left + right, index)
    unmerged = -float(len(merges))  # pieces no merge makes (characters, bytes): after every merge
    for piece, index in vocab.items():
        tokens[index] = piece
        scores[index] = -float(rank[piece]) if piece in rank else unmerged
        if piece == model.get("unk_token"):
            types[index] = gguf.TokenType.UNKNOWN
        elif BYTE_PIECE.match(piece):
            types[index] = gguf.TokenType.BYTE
            scores[index] = 0.0
        else:
            types[index] = gguf.TokenType.NORMAL
    _add_tokens(files, data, tokens, scores, types)
    return tokens, scores, types


def byte_level_vocabulary(files, data, vocab_size: int | None) -> tuple[list[str], list[int]]:
    """Tokens and types of a byte-level BPE from tokenizer.json, padded to ``vocab_size``."""
    import gguf

    vocab: dict[str, int] = (data.get("model") or {}).get("vocab") or {}
    ids = [int(i) for i in vocab.values()] + [int(a["id"]) for a in data.get("added_tokens") or []]
    # Added tokens past the embedding are kept here (the vocabulary says how many there are).
    tokens, scores, types = _padded(max(vocab_size or 0, max(ids, default=-1) + 1))
    for piece, index in vocab.items():
        tokens[index] = piece
        types[index] = gguf.TokenType.NORMAL
    _add_tokens(files, data, tokens, scores, types)
    return tokens, types


def looks_special(token: str) -> bool:
    """Whether the converter takes an added token for a control token whatever its flag says."""
    return (
        token in LOOKS_SPECIAL
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _add_tokens(files, data, tokens: list[str], scores: list[float], types: list[int]) -> None:
    """Put the added tokens in their places: control if special, else user-defined (spaces as spaces)."""
    import gguf

    for where, index, entry in _added_tokens(files, data):
        content = entry["content"]
        if index >= len(tokens):
            raise BuildError(
                f"{where}: the added token {content!r} has id {index}, past the model's {len(tokens)} embedding rows"
            )
        if entry.get("user_defined"):
            kind = gguf.TokenType.USER_DEFINED
        elif entry.get("special") or looks_special(content):
            kind = gguf.TokenType.CONTROL
        else:
            kind = gguf.TokenType.USER_DEFINED
            content = content.replace(SENTENCEPIECE_SPACE, " ")  # llama.cpp matches user-defined tokens in raw text
        tokens[index], scores[index], types[index] = content, ADDED_SCORE, kind


def _added_tokens(files, data) -> list[tuple[str, int, dict]]:
    """(file, id, entry) of each added token, in the converter's order: added_tokens.json first,
    then tokenizer_config.json's `added_tokens_decoder` (or tokenizer.json's `added_tokens`)."""
    found: list[tuple[str, Any, Any]] = []
    if "added_tokens.json" in files:
        listed = _json(files["added_tokens.json"])
        where = files["added_tokens.json"]
        found += [(where, index, {"content": content, "user_defined": True}) for content, index in listed.items()]
    config = _json(files["tokenizer_config.json"]) if "tokenizer_config.json" in files else {}
    if config.get("added_tokens_decoder"):
        where, listed = files["tokenizer_config.json"], config["added_tokens_decoder"]
    else:
        where, listed = files.get("tokenizer.json", ""), {}
        for entry in data.get("added_tokens") or []:
            listed[entry.get("id") if isinstance(entry, dict) else None] = entry
    found += [(where, index, entry) for index, entry in listed.items()]
    checked = []
    for where, raw, entry in found:
        index = int(raw) if isinstance(raw, int) or (isinstance(raw, str) and raw.isdigit()) else -1
        if index < 0 or not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise BuildError(f"{where}: the added token {raw!r} is not an id with a text ({entry!r:.100})")
        checked.append((where, index, entry))
    return checked


def _padded(size: int) -> tuple[list[str], list[float], list[int]]:
    """``size`` placeholder rows as the converter names them: `[PAD<id>]`, unused."""
    import gguf

    return [f"[PAD{i}]" for i in range(size)], [PAD_SCORE] * size, [int(gguf.TokenType.UNUSED)] * size


def _fits(path: str, count: int, vocab_size: int | None) -> int:
    """The vocabulary's size in the file: the embedding's rows, which must hold every piece."""
    if vocab_size is not None and count > vocab_size:
        raise BuildError(f"{path} has {count} pieces, more than the model's {vocab_size} embedding rows")
    return vocab_size if vocab_size is not None else count


@contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """The gguf package's warnings about templates it only half parses kept off the terminal."""
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def _staged(files: Mapping[str, str], config_ids: Mapping[str, Any]) -> Iterator[Path]:
    """A temporary folder holding the tokenizer files by name, and a config.json of ``config_ids``.

    What `gguf.SpecialVocab` reads, laid out as the converter finds it in a model's folder,
    wherever mbuild's files are (a source's folder, a hub cache, a vocabulary built by mbuild).
    """
    with tempfile.TemporaryDirectory(prefix="mbuild-gguf-tokenizer-") as folder:
        for name, path in files.items():
            try:
                os.symlink(os.path.abspath(path), os.path.join(folder, name))
            except OSError:  # no symbolic links here: a copy (tokenizer files are small)
                shutil.copyfile(path, os.path.join(folder, name))
        Path(folder, "config.json").write_text(json.dumps(dict(config_ids)))
        yield Path(folder)


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


def _json(path: str) -> dict:
    return read_small_json(path, error=BuildError)

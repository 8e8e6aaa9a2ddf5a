"""Vocabularies: the output tokenizer, and which row of each input's embedding becomes
each output token's row, so models whose vocabularies differ merge token by token.

Follows mergekit's semantics for ``tokenizer_source: base | union | <model>`` and the
``tokenizer:`` block (per-token sources, ``force``, ``pad_to_multiple_of``):

- the output vocabulary is the base's (tokens past its config's vocab_size dropped),
  a model's, or the union (the base's tokens, then every other model's, then added
  tokens), plus any token named under ``tokens:``;
- a token a model lacks gets a row by rule: its ``tokens:`` source if given; else the
  one model that has it; else the base's row if the base has it; else the average of
  the models that have it (zero if none);
- padding rows past the tokenizer's length are the mean of the real rows.

Building the tokenizer needs transformers; the result (row maps and tokenizer files)
is stored under the cache by a digest of its inputs, so later plans read JSON only.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from mbuild import keys
from mbuild.errors import ModelError

VOCABULARY_VERSION = 1


@dataclass(frozen=True)
class Vocabulary:
    """An output vocabulary and, per input node, its row map (output token id -> input row or -1)."""

    digest: str
    tokens: Mapping[str, int]  # token -> output id
    size: int  # rows, padding included
    maps: Mapping[str, tuple[int, ...]]
    base: str  # the node whose rows win for tokens several models share
    rules: Mapping[str, Mapping[str, Any]]  # token -> {"kind", "node", "row", "force"} from `tokens:`
    folder: str  # the saved output tokenizer

    def files(self) -> dict[str, str]:
        """The output tokenizer's files, by name."""
        return {p.name: str(p) for p in sorted(Path(self.folder).iterdir()) if p.is_file()}


def resolve(
    spec,
    base: str,
    nodes: Sequence[str],
    tokenizer_files: Mapping[str, Mapping[str, str]],
    vocab_sizes: Mapping[str, int | None],
    node_names: Mapping[str, str],
    store: Path,
) -> Vocabulary:
    """The vocabulary for a target, from the store when its inputs are unchanged."""
    from mbuild.io import hash_file

    source = spec.source if isinstance(spec.source, str) else spec.source.node
    rules = {}
    for token, rule in spec.tokens:
        rules[token] = {
            "kind": rule.kind,
            "node": rule.model.node if rule.model is not None else None,
            "token_id": rule.token_id,
            "token": rule.token,
            "force": rule.force,
        }
    material = {
        "version": VOCABULARY_VERSION,
        "source": source,
        "base": base,
        "nodes": list(nodes),
        "pad": spec.pad_to_multiple_of,
        "rules": rules,
        "vocab_sizes": {n: vocab_sizes.get(n) for n in nodes},
        "files": {n: {name: hash_file(path) for name, path in sorted(tokenizer_files[n].items())} for n in nodes},
    }
    digest = keys.digest(material)
    folder = store / digest
    saved = folder / "vocabulary.json"
    data = _stored(saved)
    if data is None:
        data = _build(spec, source, base, nodes, tokenizer_files, vocab_sizes, node_names, rules, folder)
        temporary = saved.with_name(f"{saved.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(data))
        os.replace(temporary, saved)  # whole or absent, even if mbuild is killed while writing
    return Vocabulary(
        digest=digest,
        tokens=data["tokens"],
        size=data["size"],
        maps={node: tuple(row) for node, row in data["maps"].items()},
        base=base,
        rules=data["rules"],
        folder=str(folder / "tokenizer"),
    )


def _stored(path: Path) -> dict | None:
    """A vocabulary stored earlier, or None when absent or unreadable (then it is built again)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not {"tokens", "size", "maps", "rules"} <= data.keys():
        return None
    return data


def _materialise(files: Mapping[str, str], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in files.items():
        shutil.copyfile(path, folder / name)
    return folder


def _build(spec, source, base, nodes, tokenizer_files, vocab_sizes, node_names, rules, folder: Path) -> dict:
    """Build the output tokenizer and row maps (transformers), mergekit's algorithm."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder / "inputs"

    def load(node: str):
        path = _materialise(tokenizer_files[node], scratch / keys.digest(node)[:12])
        try:
            return transformers.AutoTokenizer.from_pretrained(path, use_fast=True)
        except Exception as error:  # a broken tokenizer is the user's to fix: say which
            raise ModelError(f"cannot load the tokenizer of '{node_names[node]}': {error}") from None

    tokenizers = {node: load(node) for node in dict.fromkeys([base, *nodes])}
    size_of = {node: vocab_sizes.get(node) or len(tok.get_vocab()) for node, tok in tokenizers.items()}
    _check_base(tokenizers[base], size_of[base], node_names[base])
    if source == "base":
        output = tokenizers[base]
    elif source == "union":
        output = _union(tokenizers, base, size_of, scratch)
    else:
        output = tokenizers.get(source) or load(source)
    existing = set(output.get_vocab())
    for token in rules:
        if token not in existing:
            output.add_tokens(token)
            existing.add(token)
    vocab = output.get_vocab()
    maps = {}
    for node in nodes:
        own = tokenizers[node].get_vocab()
        row = [-1] * len(vocab)
        for token, new_id in vocab.items():
            old_id = own.get(token)
            if old_id is not None and old_id < size_of[node]:
                row[new_id] = old_id
        maps[node] = row
    size = len(vocab)
    if spec.pad_to_multiple_of and size % spec.pad_to_multiple_of:
        size += spec.pad_to_multiple_of - size % spec.pad_to_multiple_of
    resolved_rules = {}
    for token, rule in rules.items():
        entry = dict(rule)
        if rule["kind"] == "model_token" and rule["token_id"] is None:
            own = tokenizers[rule["node"]].get_vocab() if rule["node"] in tokenizers else load(rule["node"]).get_vocab()
            if rule["token"] not in own:
                raise ModelError(f"token {rule['token']!r} is not in the tokenizer of '{node_names[rule['node']]}'")
            entry["token_id"] = own[rule["token"]]
        resolved_rules[token] = entry
    out_folder = folder / "tokenizer"
    output.save_pretrained(out_folder)
    shutil.rmtree(scratch, ignore_errors=True)
    return {"tokens": vocab, "size": size, "maps": maps, "rules": resolved_rules}


def _check_base(tokenizer, vocab_size: int, name: str) -> None:
    unused = [tok for tok, idx in tokenizer.get_vocab().items() if idx >= vocab_size]
    if unused:
        raise ModelError(
            f"the tokenizer of '{name}' has {len(unused)} token(s) past its vocab_size ({vocab_size}); "
            "trimming such tokenizers is not supported yet"
        )


def _union(tokenizers, base: str, size_of, scratch: Path):
    """The base tokenizer plus every other model's tokens (ordinary first, then added)."""
    import transformers

    ordinary: dict[str, None] = {}
    added: dict[str, Any] = {}
    for node, tokenizer in tokenizers.items():
        special = tokenizer.added_tokens_decoder
        special_names = {info.content for info in special.values()}
        for token, index in tokenizer.get_vocab().items():
            if index < size_of[node] and token not in special_names:
                ordinary.setdefault(token, None)
        for index, info in special.items():
            if index < size_of[node]:
                added.setdefault(info.content, info)
    # Reload the base so the union never mutates it.
    copy = scratch / "union-base"
    tokenizers[base].save_pretrained(copy)
    result = transformers.AutoTokenizer.from_pretrained(copy, use_fast=True)
    base_vocab = tokenizers[base].get_vocab()
    for token in ordinary:
        if token not in added and token not in base_vocab:
            result.add_tokens(token)
    for info in added.values():
        result.add_tokens(info)
    return result


def align(tensors: list, nodes: Sequence[str], vocabulary: Vocabulary) -> list:
    """Re-index each input's vocabulary rows into the output vocabulary (mergekit's rules)."""
    import torch

    token_shape = tensors[0].shape[1:]
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    device = tensors[0].device
    by_node = dict(zip(nodes, tensors))
    maps = {node: vocabulary.maps[node] for node in nodes}
    count = len(vocabulary.tokens)

    defaults: dict[int, Any] = {}
    for token, token_id in vocabulary.tokens.items():
        rule = vocabulary.rules.get(token)
        forced = bool(rule and rule.get("force"))
        present = [node for node in nodes if maps[node][token_id] >= 0]
        if not forced and len(present) == len(nodes):
            continue
        if rule is not None:
            defaults[token_id] = _rule_row(rule, by_node, maps, token_id, token_shape, dtype, device)
        elif len(present) == 1:
            defaults[token_id] = by_node[present[0]][maps[present[0]][token_id]]
        elif not present:
            defaults[token_id] = torch.zeros(token_shape, dtype=dtype, device=device)
        elif vocabulary.base in nodes and maps[vocabulary.base][token_id] >= 0:
            defaults[token_id] = by_node[vocabulary.base][maps[vocabulary.base][token_id]]
        else:
            row = torch.zeros(token_shape, dtype=dtype, device=device)
            for node in present:
                row = row + by_node[node][maps[node][token_id]]
            defaults[token_id] = row / len(present)

    forced = {vocabulary.tokens[t] for t, rule in vocabulary.rules.items() if rule.get("force") and t in vocabulary.tokens}
    aligned = []
    for node in nodes:
        source = by_node[node]
        mapping = maps[node]
        result = torch.zeros((vocabulary.size, *token_shape), dtype=dtype, device=device)
        copied = [i for i, row in enumerate(mapping) if row >= 0 and i not in forced]
        if copied:
            rows = torch.tensor([mapping[i] for i in copied], device=device)
            result[torch.tensor(copied, device=device)] = source[rows].to(dtype)
        for token_id, row in defaults.items():
            if mapping[token_id] < 0 or token_id in forced:
                result[token_id] = row
        if vocabulary.size > count:
            # Padding rows: the mean of the real ones.
            result[count:] = torch.mean(result[:count], dim=0)
        aligned.append(result)
    return aligned


def _rule_row(rule, by_node, maps, token_id, shape, dtype, device):
    import torch

    if rule["kind"] == "zero":
        return torch.zeros(shape, dtype=dtype, device=device)
    node = rule["node"]
    if node not in by_node:
        raise ModelError(f"a token's embedding source '{node.split(':', 1)[1]}' is not among this tensor's inputs")
    if rule["kind"] == "model_token":
        return by_node[node][rule["token_id"]]
    row = maps[node][token_id]
    if row < 0:
        raise ModelError(f"token id {token_id} is not in '{node.split(':', 1)[1]}'")
    return by_node[node][row]

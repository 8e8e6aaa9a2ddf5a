"""Content keys: canonical hashing of operations, parameters and inputs.

Keys compose Nix/Bazel style: a source tensor's key is the hash of its bytes, a
tensor task's key hashes its operation, resolved parameters, method version and
its inputs' keys, and a target's key hashes its tensor keys and other outputs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Sequence

# Bump when the meaning of a key changes, so old outputs are never taken as fresh.
# 2: source and computed bytes known by BLAKE3 digests (1: sha256).
# 3: computed bytes no longer depend on torch's thread count, and a task that computes names
#    its compute platform (see compute_platform); keys of schema 2 named thread-dependent bytes.
KEY_SCHEMA = 3

# Operations that only move bytes: their result is the same on every compute platform.
BYTE_MOVES = frozenset({"copy", "concat"})


def canonical(data: Any) -> str:
    """A stable JSON text for data: sorted keys, no spaces, floats as repr."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=_default)


def _default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


def digest(data: Any) -> str:
    """sha256 of data's canonical JSON."""
    return hashlib.sha256(canonical(data).encode()).hexdigest()


def content_key(content_digest: str, dtype: str, shape: Sequence[int]) -> str:
    """The key of a tensor known by its bytes: what it is (dtype, shape) and its digest.

    Source tensors and computed tensors share this form, so identical bytes are one
    input however they were made: an upstream rebuild that yields the same bytes
    leaves downstream keys unchanged (early cutoff).
    """
    return f"bytes:{dtype}:{'x'.join(map(str, shape))}:{content_digest}"


def pending_key(task_key: str) -> str:
    """The key of a tensor whose bytes are not known yet: the task that will make it."""
    return "task:" + task_key


def is_pending(key: str) -> bool:
    """Whether a key waits on upstream bytes not computed yet."""
    return key.startswith("task:")


def task_key(
    *,
    method: str,
    version: int,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    base_index: int | None,
    compute_dtype: str,
    out_dtype: str,
    shape: Sequence[int],
    seed: int | None,
    input_keys: Sequence[str],
    platform: str,
) -> str:
    """The key of one output tensor's computation.

    ``platform``: where the bytes are computed (`compute_platform.identify`); left out of the
    key of a task that only moves bytes (`BYTE_MOVES`), whose result is the same anywhere.
    """
    return digest(
        {
            "schema": KEY_SCHEMA,
            "method": method,
            "version": version,
            "params": dict(params),
            "model_params": [dict(p) for p in model_params],
            "base_index": base_index,
            "compute_dtype": compute_dtype,
            "out_dtype": out_dtype,
            "shape": list(shape),
            "seed": seed,
            "inputs": list(input_keys),
            "platform": None if method in BYTE_MOVES else platform,
        }
    )


def target_key(tensor_keys: Mapping[str, str], config: Mapping[str, Any], files: Mapping[str, str], card: str) -> str:
    """The key of a whole output folder: its tensors, config, copied files and model card."""
    return digest(
        {
            "schema": KEY_SCHEMA,
            "tensors": dict(tensor_keys),
            "config": config,
            "files": dict(files),
            "card": hashlib.sha256(card.encode()).hexdigest(),
        }
    )

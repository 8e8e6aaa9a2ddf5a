"""Content keys, and every hash mbuild makes.

Keys compose Nix/Bazel style: a source tensor's key is the hash of its bytes, a
tensor task's key hashes its operation, resolved parameters, method version and
its inputs' keys, and a target's key hashes its tensor keys and other outputs.

Two hashes, each where it fits: BLAKE3 for tensor bytes (`tensor_hasher`: gigabytes, hashed
on first sight and verified on every reuse, so its speed is build time), sha256 for the
rest (`file_hasher`, `text_digest`, `digest`: small inputs, where speed does not count and
the standard hash lets anyone check a digest with ``sha256sum``). Reading the bytes is io's
and the cache's; this module only hashes. It imports nothing of mbuild's, and blake3 only
when tensor bytes are first hashed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping, Sequence

# Bump when the meaning of a key changes, so old outputs are never taken as fresh.
# 3: tensor bytes are known by BLAKE3 digests, computed bytes do not depend on torch's thread
#    count, and a task that computes names its compute platform (see compute_platform).
#    What earlier schemas meant, and how their records are treated: `lock.LOCK_VERSION`.
KEY_SCHEMA = 3

# Operations that only move bytes: their result is the same on every compute platform.
BYTE_MOVES = frozenset({"copy", "concat"})


def tensor_hasher(data: bytes | memoryview = b""):
    """An incremental hasher of tensor bytes (``update``, ``hexdigest``), started on ``data``.

    Tensor bytes are known by their BLAKE3 digest: a cryptographic hash that runs about
    2.5 times as fast per core as sha256 and that, like pread, releases the GIL, so threads
    hash in parallel. Every tensor's bytes are hashed once (sources when first seen, outputs
    as written) and verified again on each reuse from the cache, so on a large merge the
    hash's speed is a visible part of the build.
    """
    import blake3

    return blake3.blake3(data)


def tensor_digest(data: bytes | memoryview) -> str:
    """The digest (hex) of some tensor bytes, as `tensor_hasher` gives it."""
    return tensor_hasher(data).hexdigest()


def shard_digest(tensor_digests: Iterable[str]) -> str:
    """A shard's digest: the `tensor_digest` of its tensors' digests in order.

    Made from digests known while writing, so a shard is never read back to be hashed.
    """
    return tensor_digest("".join(tensor_digests).encode())


def file_hasher():
    """An incremental sha256 hasher of a whole file beside the weights (config, tokenizer, pickle).

    sha256, not BLAKE3: these files are few and hashed once per version (remembered by their
    identity), and a manifest's ``sha256`` entry can be checked with ``sha256sum``.
    """
    return hashlib.sha256()


def text_digest(text: str) -> str:
    """sha256 (hex) of a text's UTF-8 bytes."""
    return hashlib.sha256(text.encode()).hexdigest()


def text_name(text: str, length: int = 32) -> str:
    """A file or folder name for a text: the first ``length`` hex digits of its `text_digest`.

    Long enough that two texts never meet, short enough for a path.
    """
    return text_digest(text)[:length]


def tensor_seed(seed: int, tensor_name: str) -> int:
    """A per-tensor seed from the target's seed and the tensor's name: order-independent.

    Hashed with sha256, not Python's ``hash`` (salted per process), so it is the same in
    every run and on every machine.
    """
    material = hashlib.sha256(f"{seed}\0{tensor_name}".encode()).digest()
    return int.from_bytes(material[:8], "little") & (2**63 - 1)


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
    """sha256 of data's canonical JSON: the hash every key is made with."""
    return text_digest(canonical(data))


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
    fuse: Sequence[int] | None = None,
) -> str:
    """The key of one output tensor's computation.

    ``platform``: where the bytes are computed (`compute_platform.identify`); left out of the
    key of a task that only moves bytes (`BYTE_MOVES`), whose result is the same anywhere.
    ``fuse``: (experts, parts) when each model's inputs are fused into one tensor first.
    """
    extra = {} if fuse is None else {"fuse": list(fuse)}
    return digest(
        {
            **extra,
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
            "card": text_digest(card),
        }
    )

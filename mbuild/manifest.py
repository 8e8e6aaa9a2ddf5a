"""mbuild.json, the manifest of an output folder: written last, so its presence marks a
complete build, and read to decide reuse, staleness and what `mbuild explain` prints.

It records the target's key, each tensor's key, digest and recipe, and each file's size,
mtime and digest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from mbuild import __version__, io, keys
from mbuild.plan import TargetPlan, TensorTask

NAME = io.MANIFEST_NAME
# Files whose digest is made of their tensors' digests, never read again to hash them whole.
WEIGHT_FILES = (".safetensors", ".gguf")
read = io.read_manifest


def write(
    target_plan: TargetPlan, folder: Path, digests: Mapping[str, str], shard_of: Mapping[str, str]
) -> None:
    """The completion marker, written last: key, per-tensor keys and digests, file stats."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != io.MANIFEST_NAME:
            stat = path.stat()
            entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            if not path.name.endswith(WEIGHT_FILES):
                entry["sha256"] = io.hash_file(path)
            files[path.name] = entry
    for name, entry in files.items():
        if name.endswith(WEIGHT_FILES):
            in_shard = [t.name for t in target_plan.tasks if shard_of[t.name] == name]
            entry["digest"] = keys.shard_digest(digests[t] for t in in_shard)
    manifest = {
        "mbuild": __version__,
        "target": target_plan.name,
        "key": target_plan.key,
        "tensors": {t.name: tensor_record(t, digests[t.name]) for t in target_plan.tasks},
        "files": files,
    }
    io.write_json(folder / io.MANIFEST_NAME, manifest)


def tensor_record(task: TensorTask, digest: str) -> dict[str, Any]:
    """What the manifest keeps per tensor: enough for reuse, and for `mbuild explain` to diff."""
    return {
        "key": task.key,
        "digest": digest,
        "method": task.method,
        "params": dict(task.params),
        "model_params": [dict(p) for p in task.model_params],
        "inputs": [f"{i.node.split(':', 1)[1]}:{i.name}" for i in task.inputs],
        "input_keys": [i.key for i in task.inputs],
        "dtype": task.dtype,
        "compute_dtype": task.compute_dtype,
    }

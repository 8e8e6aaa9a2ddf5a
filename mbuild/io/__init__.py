"""Everything that touches model files, one module per concept, imported downward only:

- `files`: reading what a user hands mbuild (regular files only, bounded small reads);
- `outputs`: the folders mbuild writes and owns (manifest, one-step writes, locks, publish);
- `models`: a model folder's config and tensor table, from its safetensors headers;
- `reading`: tensor bytes read from source files, and their digests;
- `writer`: the sharded safetensors writer;
- `hub`: hub IDs resolved to snapshot folders, fetching only what a merge reads, or read
  from the hub's metadata and safetensors headers alone (`hub_reads`).

Header and folder functions do not import torch, so planning stays fast; the tensor
functions import it when first called. The names below are what the rest of mbuild uses
as ``io.NAME``; a test that patches a name patches the module that looks it up.
"""

from mbuild.io.files import open_regular, read_into, read_small_file, read_small_json
from mbuild.io.hub import HUB_COMMIT, HubModel, hub_reads, open_hub_model, resolve_hub_model
from mbuild.io.models import (
    DTYPE_SIZES,
    FLOAT_DTYPES,
    ModelInfo,
    TensorInfo,
    companion_files,
    config_int,
    layer_count,
    model_from_files,
    read_model,
)
from mbuild.io.outputs import (
    MANIFEST_NAME,
    FileLock,
    discard,
    fresh_temporary,
    fsync_folder,
    leftovers,
    process_alive,
    publish,
    read_manifest,
    recover,
    replace_text,
    store_text,
    target_lock,
    unlisted_entries,
    write_companions,
    write_json,
)
from mbuild.io.reading import (
    TensorReader,
    file_identity,
    hash_file,
    hash_tensor_bytes,
    raw_bytes,
    torch_dtype,
)
from mbuild.io.writer import ShardedWriter

__all__ = [
    "DTYPE_SIZES",
    "FLOAT_DTYPES",
    "HUB_COMMIT",
    "MANIFEST_NAME",
    "FileLock",
    "HubModel",
    "ModelInfo",
    "ShardedWriter",
    "TensorInfo",
    "TensorReader",
    "companion_files",
    "config_int",
    "discard",
    "file_identity",
    "fresh_temporary",
    "fsync_folder",
    "hash_file",
    "hash_tensor_bytes",
    "hub_reads",
    "raw_bytes",
    "layer_count",
    "leftovers",
    "model_from_files",
    "open_hub_model",
    "open_regular",
    "process_alive",
    "publish",
    "read_into",
    "read_manifest",
    "read_model",
    "read_small_file",
    "read_small_json",
    "recover",
    "replace_text",
    "resolve_hub_model",
    "store_text",
    "target_lock",
    "torch_dtype",
    "unlisted_entries",
    "write_companions",
    "write_json",
]

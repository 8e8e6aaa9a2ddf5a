"""On-disk memory of work already done.

- ``State`` (`state.py`, SQLite ``state.db``): per-tensor digests of source files,
  remembered by path, size, mtime and inode like DVC's state, so unchanged files are never
  re-read; and the content digest of every tensor task ever computed, by task key, so a
  downstream key can use the bytes an upstream task produced (early cutoff).
- ``TensorCache`` (`tensors.py`, ``tensors/``): the computed tensors themselves, content
  addressed by task key, bounded with least-recently-used eviction, each entry checked
  against its digest before reuse. Their bytes are shared with the output shards (hard
  links), or copied into diskcache where they cannot be.
- `databases.py`: what both do with SQLite: connecting in WAL mode, committing, and
  telling a damaged database (deleted and started afresh: all of it is derived) from a
  busy or unwritable one.

Both are safe for two mbuild processes at once (SQLite locking; diskcache writes each
value under a unique file name before committing its row).
"""

from mbuild.cache.state import State, default_cache_dir
from mbuild.cache.tensors import TensorCache, default_size_limit, open_tensor_cache

__all__ = ["State", "TensorCache", "default_cache_dir", "default_size_limit", "open_tensor_cache"]

"""Hugging Face hub models: a hub ID and revision resolved to a snapshot folder and its commit.

Apart because it is the one part that talks to huggingface_hub and its cache; what it
returns is read like any local folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mbuild.errors import ModelError
from mbuild.io.files import read_small_file

# A hub cache's ref file holds one commit hash; the snapshot folder is named by it.
HUB_REF_LIMIT = 1024
HUB_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def resolve_hub_model(repo_id: str, revision: str | None) -> tuple[Path, str]:
    """Find (or fetch, when online) a hub model's snapshot; returns its folder and commit."""
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.file_download import repo_folder_name

        storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
        ref = storage / "refs" / (revision or "main")
        _check_hub_ref(ref)
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=storage.parent,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"],
        )
    except ModelError:
        raise
    except Exception as error:  # huggingface_hub raises many kinds; all mean "not available"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE=1)" if offline else "on the hub or in the local cache"
        raise ModelError(f"hub model '{repo_id}' not found {where}: {type(error).__name__}") from None
    folder = Path(folder)
    # The snapshot folder is named by the commit read from the ref: anything else is a ref gone wrong.
    if folder.parent != storage / "snapshots" or not HUB_COMMIT.match(folder.name):
        raise ModelError(f"hub model '{repo_id}': the cache's ref {ref} does not name a commit")
    return folder, folder.name


def _check_hub_ref(ref: Path) -> None:
    """Refuse a ref of the hub cache that huggingface_hub would block on (a FIFO) or read without end."""
    try:
        read_small_file(ref, HUB_REF_LIMIT)
    except FileNotFoundError:
        pass  # not cached yet: fetched when online

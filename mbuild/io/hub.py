"""Hugging Face hub models: a hub ID and revision resolved to a snapshot folder and its commit,
fetching only the files a merge reads, or known from the hub's metadata without a download.

Apart because it is the one part that talks to huggingface_hub and its cache; what it
returns is read like any local folder. The cache answers first: a snapshot that holds its
weights is used without a request (a pinned commit never moves), and with HF_HUB_OFFLINE=1
the cache is all there is. Otherwise the hub's file listing (`HfApi.model_info` with
``files_metadata``) says which files a merge needs (top-level safetensors and their index,
config, generation config, tokenizer; never pickles beside safetensors, nor folders such as
``original/``), and `hub_reads` says what to do with them: download them through
huggingface_hub (its progress, its resume) and check each against the hub's hash, or read
only the small files and the safetensors headers, with HTTP range requests, so a plan can
be checked before one weight byte is fetched.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import glob
import hashlib
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from mbuild.errors import ModelError
from mbuild.io.files import read_small_file, read_small_json
from mbuild.io.models import (
    INDEX_NAMES,
    NOT_WEIGHTS,
    ModelInfo,
    TensorInfo,
    header_length,
    header_tensors,
    index_shards,
    model_from_files,
    parse_header,
    pickle_files,
    read_model,
    weight_files,
)
from mbuild.io.outputs import replace_text

# A hub cache's ref file holds one commit hash; the snapshot folder is named by it.
HUB_REF_LIMIT = 1024
HUB_COMMIT = re.compile(r"^[0-9a-f]{40}$")
SAFETENSORS_INDEX, PICKLE_INDEX = INDEX_NAMES
# The top-level files besides weights that a merge reads or copies: config, generation
# config, tokenizer (json, sentencepiece, tiktoken, vocab/merges), chat template, custom code.
COMPANION_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".py", ".tiktoken")
HASH_CHUNK = 8 * 1024 * 1024
# The model card: read for the license its front matter declares (`mbuild.plan.cards`).
MODEL_CARD = "README.md"


@dataclass(frozen=True)
class HubFile:
    """One file of a hub revision as the hub lists it."""

    name: str
    size: int
    sha256: str | None  # LFS files (weights)
    blob_id: str | None  # git's blob id (sha1), for the others


@dataclass(frozen=True)
class HubModel:
    """One revision of a hub model as mbuild reads it: its snapshot folder, the files it needs
    (None when the cache answered alone) and those not in the cache yet."""

    repo_id: str
    revision: str | None  # as written (None: main)
    commit: str
    folder: Path
    files: dict[str, HubFile] | None = None
    missing: tuple[str, ...] = ()

    @property
    def needed_bytes(self) -> int:
        """Bytes of every file the model needs (those in the cache measured there)."""
        if self.files is not None:
            return sum(f.size for f in self.files.values())
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())

    @property
    def missing_bytes(self) -> int:
        """Bytes of the files not in the cache now (still to download)."""
        if self.files is None:
            return 0
        return sum(f.size for name, f in self.files.items() if not (self.folder / name).is_file())


class HubUnreachable(ModelError):
    """The hub did not answer (no network, a proxy, the hub down): the cache may still."""


@dataclass
class HubReads:
    """How the hub models of one plan are opened, and what was found of each."""

    download: bool  # False: the small files and the safetensors headers only
    models: dict[tuple[str, str], HubModel] = field(default_factory=dict)  # (repo, commit) -> model
    # (repo, revision as written) -> its model: a branch names one commit throughout a plan.
    located: dict[tuple[str, str | None], HubModel] = field(default_factory=dict)
    remote: dict[tuple[str, str], ModelInfo] = field(default_factory=dict)  # tables read from headers


_READS: contextvars.ContextVar[HubReads | None] = contextvars.ContextVar("hub_reads", default=None)
# What the hub listed for a commit: a commit never changes, so it is asked once per process.
_LISTINGS: dict[tuple[str, str, str], dict[str, HubFile]] = {}


@contextlib.contextmanager
def hub_reads(download: bool) -> Iterator[HubReads]:
    """Open hub models within the block by downloading them, or (``download=False``) from metadata.

    Nested blocks of the same kind share one record (a check's plans one after another).
    """
    outer = _READS.get()
    if outer is not None and outer.download == download:
        yield outer
        return
    reads = HubReads(download)
    token = _READS.set(reads)
    try:
        yield reads
    finally:
        _READS.reset(token)


def open_hub_model(repo_id: str, revision: str | None, pickles=None) -> tuple[ModelInfo, str]:
    """A hub model's config and tensor table, and its commit (see `hub_reads` for how it is read)."""
    reads = _READS.get() or HubReads(download=True)
    if (repo_id, revision) not in reads.located:
        reads.located[(repo_id, revision)] = locate(repo_id, revision)
    model = reads.located[(repo_id, revision)]
    reads.models[(repo_id, model.commit)] = model
    if model.missing and reads.download:
        fetch(model)
    elif model.missing:
        key = (repo_id, model.commit)
        if key not in reads.remote:
            reads.remote[key] = _remote_model(model, pickles)
        return reads.remote[key], model.commit
    return read_model(model.folder, pickles), model.commit


def resolve_hub_model(repo_id: str, revision: str | None) -> tuple[Path, str]:
    """Find (or fetch, when online) a hub model's snapshot; returns its folder and commit."""
    model = locate(repo_id, revision)
    if model.missing:
        fetch(model)
    return model.folder, model.commit


def locate(repo_id: str, revision: str | None) -> HubModel:
    """Where a hub model's snapshot is, and what of it the cache lacks; asks the hub only when it must.

    A commit whose snapshot holds its weights is taken from the cache; so is anything with
    HF_HUB_OFFLINE=1. A branch or tag is otherwise resolved by the hub (it may have moved).
    """
    from huggingface_hub import constants

    storage = _storage(repo_id)
    pinned = revision if revision is not None and HUB_COMMIT.match(revision) else None
    offline = bool(constants.HF_HUB_OFFLINE)
    commit = pinned or (_read_ref(storage, revision or "main") if offline else None)
    if commit is not None and _complete(storage / "snapshots" / commit):
        return HubModel(repo_id, revision, commit, storage / "snapshots" / commit)
    if offline:
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE=1)"
        if commit is not None and (storage / "snapshots" / commit).is_dir():
            raise ModelError(f"hub model '{repo_id}' is only partly {where}: its weights were never downloaded")
        raise ModelError(f"hub model '{repo_id}' not found {where}")
    try:
        commit, listing = _listing(repo_id, revision or "main")
    except HubUnreachable:
        # The hub did not answer: a branch the cache knows is used as the cache has it.
        commit = pinned or _read_ref(storage, revision or "main")
        if commit is None or not _complete(storage / "snapshots" / commit):
            raise
        return HubModel(repo_id, revision, commit, storage / "snapshots" / commit)
    folder = storage / "snapshots" / commit
    names = needed_files(listing, lambda index: _index_shards(repo_id, commit, index))
    files = {name: listing[name] for name in names}
    missing = tuple(name for name in names if not (folder / name).is_file())
    if revision is None or not HUB_COMMIT.match(revision):
        _write_ref(storage, revision or "main", commit)
    return HubModel(repo_id, revision, commit, folder, files, missing)


def branch_commit(repo_id: str, branch: str = "main") -> str:
    """The commit a branch names now: the hub's answer, or the cache's ref with HF_HUB_OFFLINE=1."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        return _listing(repo_id, branch)[0]
    try:
        commit = _read_ref(_storage(repo_id), branch)
    except ModelError as error:
        raise ModelError(f"hub model '{repo_id}': {error.message}") from None
    if commit is None:
        raise ModelError(f"hub model '{repo_id}' not found in the local Hugging Face cache (HF_HUB_OFFLINE=1)")
    return commit


def needed_files(listing: Iterable[str], index_shards_of: Callable[[str], list[str]]) -> list[str]:
    """The files of a hub revision a merge reads: top-level weights (safetensors when there are
    any, with their index), companion files and the model card; never pickles beside
    safetensors, nor subfolders.

    ``index_shards_of(name)``: the shard names an index file lists.
    """
    top = {name for name in listing if "/" not in name}
    safetensors = sorted(name for name in top if name.endswith(".safetensors"))
    if SAFETENSORS_INDEX in top:
        weights = [SAFETENSORS_INDEX, *index_shards_of(SAFETENSORS_INDEX)]
    elif safetensors:
        weights = safetensors
    elif PICKLE_INDEX in top:
        weights = [PICKLE_INDEX, *index_shards_of(PICKLE_INDEX)]
    else:
        weights = sorted(n for n in top if n.endswith((".bin", ".pt")) and n not in NOT_WEIGHTS)
    absent = [name for name in weights if name not in top]
    if absent:
        raise ModelError(f"the index lists shard(s) the hub does not have: {', '.join(absent)}")
    companions = [name for name in top if name.endswith(COMPANION_SUFFIXES) and name not in INDEX_NAMES]
    card = [MODEL_CARD] if MODEL_CARD in top else []  # its front matter's license goes into our cards
    return sorted(set(weights) | set(companions) | set(card))


def fetch(model: HubModel, names: Iterable[str] | None = None) -> None:
    """Download the files a model lacks (or ``names`` of them) through huggingface_hub, then check
    each against the hub's hash; a file that does not match is removed and refused."""
    from huggingface_hub import snapshot_download

    wanted = [name for name in (model.missing if names is None else names) if not (model.folder / name).is_file()]
    if not wanted:
        return
    with _hub_errors(model.repo_id, model.revision, "downloaded"):
        snapshot_download(
            model.repo_id,
            revision=model.commit,
            cache_dir=model.folder.parent.parent.parent,
            allow_patterns=[glob.escape(name) for name in wanted],
        )
    missing = [name for name in wanted if not (model.folder / name).is_file()]
    if missing:
        raise ModelError(f"hub model '{model.repo_id}': the download left out {', '.join(missing)}")
    _verify(model, wanted)


def _remote_model(model: HubModel, pickles) -> ModelInfo:
    """A model's table from its safetensors headers on the hub; only its small files are downloaded."""
    assert model.files is not None
    weights = [name for name in model.files if name.endswith(".safetensors")]
    if not weights:  # pickles: their tensors are known only once read
        fetch(model)
        return read_model(model.folder, pickles)
    fetch(model, [name for name in model.missing if name not in weights])
    try:
        config = read_small_json(model.folder / "config.json")
    except FileNotFoundError:
        raise ModelError(f"{model.folder} has no config.json: not a Hugging Face model folder") from None
    files = [model.folder / name for name in sorted(weights)]
    return model_from_files(model.folder, config, files, read=lambda path: _remote_tensors(model, path.name))


def _remote_tensors(model: HubModel, name: str) -> list[TensorInfo]:
    """One file's tensors from its header on the hub, read with two range requests and nothing more.

    Each tensor's file is the path it will have in the snapshot once downloaded.
    """
    path = model.folder / name
    size = model.files[name].size
    length = header_length(path, _read_range(model, name, 0, min(8, size)))
    if 8 + length > size:
        raise ModelError(f"{path} is truncated (its header runs past the end of the file)")
    raw = _read_range(model, name, 8, 8 + length) if length else b""
    return header_tensors(path, parse_header(path, raw), 8 + length, size)


def _read_range(model: HubModel, name: str, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of a file on the hub, through huggingface_hub's HTTP session."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    if stop <= start:
        return b""
    url = hf_hub_url(model.repo_id, name, revision=model.commit)
    with _hub_errors(model.repo_id, model.revision, f"read ({name}'s header)"):
        response = get_session().get(url, headers={**build_hf_headers(), "Range": f"bytes={start}-{stop - 1}"})
        hf_raise_for_status(response)
    data = response.content if response.status_code == 206 else response.content[start:stop]
    if len(data) != stop - start:
        raise ModelError(f"hub model '{model.repo_id}': {name} ended at byte {start + len(data)}, before {stop}")
    return data


def _listing(repo_id: str, revision: str) -> tuple[str, dict[str, HubFile]]:
    """The commit a revision names on the hub, and that commit's files with sizes and hashes."""
    from huggingface_hub import HfApi, constants

    key = (constants.ENDPOINT, repo_id, revision)
    if HUB_COMMIT.match(revision) and key in _LISTINGS:
        return revision, _LISTINGS[key]
    with _hub_errors(repo_id, revision, "listed"):
        info = HfApi(endpoint=constants.ENDPOINT).model_info(repo_id, revision=revision, files_metadata=True)
    if not info.sha or not HUB_COMMIT.match(info.sha):
        raise ModelError(f"hub model '{repo_id}': the hub named no commit for revision '{revision}'")
    listing = {
        s.rfilename: HubFile(s.rfilename, s.size or 0, s.lfs.sha256 if s.lfs else None, s.blob_id)
        for s in info.siblings or ()
    }
    _LISTINGS[(constants.ENDPOINT, repo_id, info.sha)] = listing
    return info.sha, listing


def _index_shards(repo_id: str, commit: str, index: str) -> list[str]:
    """The shards an index on the hub lists (the index is downloaded: it is small and kept)."""
    from huggingface_hub import hf_hub_download

    with _hub_errors(repo_id, commit, f"read ({index})"):
        path = hf_hub_download(repo_id, index, revision=commit, cache_dir=_storage(repo_id).parent)
    return index_shards(Path(path))


def _verify(model: HubModel, names: list[str]) -> None:
    """Check downloaded files against the hub's hashes (sha256 of LFS files, git's blob id of others)."""
    assert model.files is not None
    checked = [name for name in names if model.files[name].sha256 or model.files[name].blob_id]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(4, len(checked)))) as pool:
        found = dict(zip(checked, pool.map(lambda name: _file_hash(model, name), checked)))
    for name in checked:
        expected = model.files[name].sha256 or model.files[name].blob_id
        if found[name] != expected:
            _discard(model, name)
            kind = "sha256" if model.files[name].sha256 else "git blob id"
            raise ModelError(
                f"hub model '{model.repo_id}': {name} as downloaded has {kind} {found[name]}, but the hub lists "
                f"{expected}: the file is corrupt and was removed from the cache (build again to download it anew)"
            )


def _file_hash(model: HubModel, name: str) -> str:
    """A downloaded file's sha256 (LFS files), or its git blob id (the others)."""
    path = model.folder / name
    if model.files[name].sha256:
        digest = hashlib.sha256()
    else:
        digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _discard(model: HubModel, name: str) -> None:
    """Remove a bad download: its snapshot link and the blob behind it (only one in this repository's cache)."""
    link = model.folder / name
    blob = link.resolve()
    link.unlink(missing_ok=True)
    if blob.parent == (model.folder.parent.parent / "blobs").resolve():
        blob.unlink(missing_ok=True)


def _complete(folder: Path) -> bool:
    """Whether a cached snapshot holds a model's weights (every shard its index lists)."""
    if not folder.is_dir():
        return False
    try:
        return bool(weight_files(folder) or pickle_files(folder))
    except ModelError:
        return False  # an index naming shards not downloaded yet


def _storage(repo_id: str) -> Path:
    """The folder of a repository in the hub cache."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def _read_ref(storage: Path, revision: str) -> str | None:
    """The commit a branch or tag names in the cache; None when the cache has no such ref.

    The ref is read as a regular file of bounded size (a FIFO would block) and must name a
    commit: anything else would be followed as a path out of the snapshots.
    """
    ref = storage / "refs" / revision
    try:
        text = read_small_file(ref, HUB_REF_LIMIT).decode("utf-8", "replace").strip()
    except FileNotFoundError:
        return None
    if not HUB_COMMIT.match(text):
        raise ModelError(f"the hub cache's ref {ref} does not name a commit")
    return text


def _write_ref(storage: Path, revision: str, commit: str) -> None:
    """Record in the cache which commit a branch or tag named, as huggingface_hub does."""
    ref = storage / "refs" / revision
    try:
        if read_small_file(ref, HUB_REF_LIMIT).decode("utf-8", "replace").strip() == commit:
            return
    except (OSError, ModelError):
        pass  # none yet, or not a ref: written anew
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        replace_text(ref, commit)
    except OSError:
        pass  # a read-only cache: the commit is still known for this run


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None, doing: str) -> Iterator[None]:
    """huggingface_hub's errors as one clear ModelError naming the model; ``doing``: what failed."""
    from huggingface_hub import constants
    from huggingface_hub.utils import RepositoryNotFoundError, RevisionNotFoundError

    try:
        yield
    except RevisionNotFoundError:
        raise ModelError(f"hub model '{repo_id}' has no revision '{revision}' on the hub at {constants.ENDPOINT}") from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"hub model '{repo_id}' not found on the hub at {constants.ENDPOINT} (a private or gated "
            "model needs a token: `hf auth login`)"
        ) from None
    except ModelError:
        raise
    except Exception as error:  # huggingface_hub raises many kinds
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        status = getattr(getattr(error, "response", None), "status_code", None)
        if isinstance(error, OSError) and error.errno is not None:
            raise ModelError(f"hub model '{repo_id}' could not be {doing}: {reason}") from None  # a local disk's fault
        if isinstance(status, int) and status < 500:
            raise ModelError(f"hub model '{repo_id}' could not be {doing}: the hub answered {status} ({reason})") from None
        raise HubUnreachable(
            f"hub model '{repo_id}' is not in the local Hugging Face cache and could not be {doing}: "
            f"the hub at {constants.ENDPOINT} did not answer ({reason})"
        ) from None
def free_disk(folder: Path) -> int:
    """Free bytes on the disk that holds ``folder`` (or its nearest existing parent)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def hub_cache_folder() -> Path:
    """Where huggingface_hub keeps downloads (HF_HUB_CACHE)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)

"""A small local HTTP server that stands for the Hugging Face hub in the tests.

The tests have no network, yet what mbuild does with hub models (read metadata and
safetensors headers, download only some files, check their hashes) must go through
huggingface_hub's real client. This server answers the few endpoints that client uses for
that, from repositories laid out in a folder, and records every request it receives so a
test can say exactly which bytes were fetched:

- ``GET /api/models/{repo}[/revision/{rev}]``: the model's info (``?blobs=true``: each
  file's size, blob id and LFS sha256, as ``HfApi.model_info(files_metadata=True)`` asks);
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``: the file listing ``snapshot_download`` reads;
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: a file, with the headers huggingface_hub
  checks (``X-Repo-Commit``, ``ETag``, ``X-Linked-Size``) and HTTP Range requests.

It never sends Xet headers, so huggingface_hub downloads over plain HTTP. `use` points
huggingface_hub at a server: ``HF_ENDPOINT`` is read once, when huggingface_hub is
imported, so the test sets the constants it derived from it as well.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# Files the hub keeps in LFS (and so lists with a sha256): weights, as a model's .gitattributes says.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx")


@dataclass(frozen=True)
class Request:
    """One request the server received, and how many body bytes it sent back."""

    method: str
    path: str  # without the query
    range: str | None  # the Range header as sent
    sent: int
    status: int


@dataclass(frozen=True)
class HubFile:
    """One file of one commit: where its bytes are served from, and what the hub says of them."""

    path: str
    data: Path  # the bytes served (a corrupted copy may differ from what sha256 says)
    size: int
    blob_id: str  # git's blob sha1 of the true bytes
    sha256: str | None  # LFS files only

    def listing(self) -> dict:
        """The file as the tree endpoint lists it."""
        entry = {"type": "file", "path": self.path, "size": self.size, "oid": self.blob_id}
        if self.sha256 is not None:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": 134}
        return entry

    def sibling(self) -> dict:
        """The file as model_info lists it with ``blobs=true``."""
        entry = {"rfilename": self.path, "size": self.size, "blobId": self.blob_id}
        if self.sha256 is not None:
            entry["lfs"] = {"sha256": self.sha256, "size": self.size, "pointerSize": 134}
        return entry


class FakeHub:
    """Repositories (id -> commits -> files, and branches) served on 127.0.0.1 from a thread."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.commits: dict[str, dict[str, dict[str, HubFile]]] = {}  # repo -> commit -> path -> file
        self.branches: dict[str, dict[str, str]] = {}  # repo -> branch -> commit
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add(self, repo: str, folder: Path, extra: dict[str, bytes] | None = None, branch: str = "main") -> str:
        """Publish a folder's files (and ``extra`` paths -> bytes) as a new commit of ``branch``; its hash."""
        files: dict[str, bytes | Path] = {
            str(p.relative_to(folder)): p for p in sorted(Path(folder).rglob("*")) if p.is_file()
        }
        files.update(extra or {})
        digest = hashlib.sha1(repo.encode())
        for path in sorted(files):
            content = files[path] if isinstance(files[path], bytes) else Path(files[path]).read_bytes()
            digest.update(path.encode() + b"\0" + hashlib.sha256(content).digest())
        commit = digest.hexdigest()
        stored: dict[str, HubFile] = {}
        for path, source in sorted(files.items()):
            content = source if isinstance(source, bytes) else Path(source).read_bytes()
            data = self.root / repo / commit / path
            data.parent.mkdir(parents=True, exist_ok=True)
            data.write_bytes(content)
            blob_id = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
            sha256 = hashlib.sha256(content).hexdigest() if path.endswith(LFS_SUFFIXES) else None
            stored[path] = HubFile(path, data, len(content), blob_id, sha256)
        self.commits.setdefault(repo, {})[commit] = stored
        self.branches.setdefault(repo, {})[branch] = commit
        return commit

    def corrupt(self, repo: str, path: str, branch: str = "main") -> None:
        """Serve other bytes for a file while still listing its true size and sha256 (a bad mirror)."""
        served = self.commits[repo][self.branches[repo][branch]][path].data
        raw = bytearray(served.read_bytes())
        raw[-1] ^= 0xFF
        served.write_bytes(bytes(raw))

    def headers_end(self, repo: str, path: str, branch: str = "main") -> int:
        """Where the safetensors header of a served file ends: bytes past it are tensor data."""
        data = self.commits[repo][self.branches[repo][branch]][path].data.read_bytes()
        return 8 + int.from_bytes(data[:8], "little")

    def downloads(self) -> list[str]:
        """The files whose bytes were fetched whole (a GET without Range), in order."""
        return [r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in self.requests
                if r.method == "GET" and "/resolve/" in r.path and r.range is None and r.status == 200]

    def tensor_bytes_fetched(self) -> int:
        """Bytes of tensor data sent: every byte of a .safetensors file past its header."""
        total = 0
        for request in self.requests:
            if request.method != "GET" or "/resolve/" not in request.path or not request.path.endswith(".safetensors"):
                continue
            repo, rest = request.path.lstrip("/").split("/resolve/", 1)
            revision, path = rest.split("/", 1)
            commit = self._commit(repo, revision)
            data = self.commits[repo][commit][path].data.read_bytes()
            end = 8 + int.from_bytes(data[:8], "little")
            start, stop = _byte_range(request.range, len(data)) if request.range else (0, len(data))
            total += max(0, stop - max(start, end))
        return total

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _commit(self, repo: str, revision: str) -> str | None:
        commits = self.commits.get(repo, {})
        if revision in commits:
            return revision
        return self.branches.get(repo, {}).get(revision)


def use(monkeypatch, hub: FakeHub | None, cache: Path, offline: bool = False) -> None:
    """Point huggingface_hub (already imported) at ``hub`` and at the cache folder ``cache``.

    The environment is set for processes the test starts; the constants huggingface_hub
    computed from it at import are set for this one. Nothing is ever sent to the real hub:
    without a server the endpoint is a closed port.
    """
    from huggingface_hub import constants

    endpoint = hub.url if hub is not None else "http://127.0.0.1:9"
    settings = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": offline,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in settings.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def _byte_range(header: str, size: int) -> tuple[int, int]:
    """The [start, stop) a ``bytes=a-b``, ``bytes=a-`` or ``bytes=-n`` Range names in a file of ``size``."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not match or match.groups() == ("", ""):
        raise ValueError(header)
    first, last = match.groups()
    if first == "":
        return max(0, size - int(last)), size
    return int(first), min(size, int(last) + 1) if last else size


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects

        def do_GET(self):  # noqa: N802 (the name http.server calls)
            self._answer(send_body=True)

        def do_HEAD(self):  # noqa: N802
            self._answer(send_body=False)

        def log_message(self, *args):  # quiet
            pass

        def _answer(self, send_body: bool) -> None:
            url = urlsplit(self.path)
            path = unquote(url.path)
            query = parse_qs(url.query)
            status, headers, body = self._route(path, query)
            range_header = self.headers.get("Range")
            if status == 200 and range_header and "/resolve/" in path:
                start, stop = _byte_range(range_header, len(body))
                headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(body)}"
                status, body = 206, body[start:stop]
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)
            hub._record(Request(self.command, path, range_header, len(body) if send_body else 0, status))

        def _route(self, path: str, query: dict) -> tuple[int, dict, bytes]:
            api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
            if api:
                return self._model_info(api.group(1), api.group(2) or "main", "blobs" in query)
            tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
            if tree:
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                return self._tree(tree.group(1), tree.group(2), tree.group(3) or "", recursive)
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if resolve:
                return self._file(*resolve.groups())
            return _not_found("EntryNotFound", path)

        def _files(self, repo: str, revision: str):
            if repo not in hub.commits:
                return None, _not_found("RepoNotFound", repo)
            commit = hub._commit(repo, revision)
            if commit is None:
                return None, _not_found("RevisionNotFound", f"{repo}@{revision}")
            return commit, hub.commits[repo][commit]

        def _model_info(self, repo: str, revision: str, blobs: bool):
            commit, files = self._files(repo, revision)
            if commit is None:
                return files
            siblings = [f.sibling() if blobs else {"rfilename": f.path} for f in files.values()]
            return _json({"id": repo, "modelId": repo, "sha": commit, "private": False, "siblings": siblings})

        def _tree(self, repo: str, revision: str, folder: str, recursive: bool):
            commit, files = self._files(repo, revision)
            if commit is None:
                return files
            prefix = folder.rstrip("/") + "/" if folder else ""
            entries, folders = [], set()
            for file in files.values():
                if not file.path.startswith(prefix):
                    continue
                rest = file.path[len(prefix):]
                if "/" in rest and not recursive:
                    folders.add(prefix + rest.split("/", 1)[0])
                    continue
                if recursive:
                    parts = rest.split("/")[:-1]
                    folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
                entries.append(file.listing())
            entries += [{"type": "directory", "path": name, "oid": "0" * 40} for name in sorted(folders)]
            return _json(entries, {"X-Repo-Commit": commit})

        def _file(self, repo: str, revision: str, path: str):
            commit, files = self._files(repo, revision)
            if commit is None:
                return files
            if path not in files:
                status, headers, body = _not_found("EntryNotFound", path)
                headers["X-Repo-Commit"] = commit
                return status, headers, body
            file = files[path]
            etag = f'"{file.sha256 or file.blob_id}"'
            headers = {"X-Repo-Commit": commit, "ETag": etag, "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            if file.sha256 is not None:
                headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(file.size)})
            return 200, headers, file.data.read_bytes()

    return Handler


def _json(data, headers: dict | None = None) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "application/json", **(headers or {})}, json.dumps(data).encode()


def _not_found(code: str, what: str) -> tuple[int, dict, bytes]:
    body = json.dumps({"error": f"{what} not found"}).encode()
    return 404, {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": f"{what} not found"}, body

"""A small local HTTP server that stands for the Hugging Face hub's upload API in the tests.

It answers what huggingface_hub's own client sends for `create_repo`, `create_branch`,
`upload_folder` without hf_xet (README validation, preupload, the LFS batch and its
uploads, the commit) and `model_info`, and nothing else. It checks each request (the token,
that the repo and branch exist, every LFS object's sha256), records every one in
`requests`, and keeps each commit's whole tree in a folder, so a test reads back exactly
the bytes that were pushed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

TOKEN = "hf_fake_token_for_tests"
# The hub stores these through LFS whatever their size; anything larger than this too.
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")
LFS_THRESHOLD = 10 * 1024 * 1024


class FakeHub:
    """The server, its repos (branches -> commits) and the trees of their commits under ``folder``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.requests: list[tuple[str, str]] = []  # (method, path) in the order received
        self.repos: dict[str, dict] = {}  # repo -> {"private": bool, "branches": {name: commit}}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def tree(self, commit: str) -> Path:
        return self.folder / "commits" / commit

    def head(self, repo: str, branch: str = "main") -> str:
        return self.repos[repo]["branches"][branch]

    def files(self, repo: str, branch: str = "main") -> dict[str, bytes]:
        """The files of a branch's head commit, by path."""
        root = self.tree(self.head(repo, branch))
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    def set_branch(self, repo: str, branch: str, commit: str) -> None:
        """Make ``repo`` exist with ``branch`` at ``commit`` (what `model_info` then reports)."""
        self.repos.setdefault(repo, {"private": False, "branches": {}})["branches"][branch] = commit
        self.tree(commit).mkdir(parents=True, exist_ok=True)

    def commit(self, repo: str, branch: str, lines: list[dict]) -> str:
        """Apply one commit's ndjson operations on top of the branch's head; returns the new commit."""
        parent = self.head(repo, branch)
        files = {}
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                stored = self.folder / "lfs" / value["oid"]
                if not stored.is_file() or stored.stat().st_size != value["size"]:
                    raise LookupError(f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = stored.read_bytes()
            else:
                raise LookupError(f"operation {line['key']} is not supported here")
        digest = hashlib.sha1(parent.encode() + json.dumps(sorted((p, hashlib.sha256(b).hexdigest()) for p, b in files.items())).encode())
        commit = digest.hexdigest()
        shutil.copytree(self.tree(parent), self.tree(commit), dirs_exist_ok=True)
        for path, data in files.items():
            target = self.tree(commit) / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        self.repos[repo]["branches"][branch] = commit
        return commit


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            self._answer("GET")

        def do_POST(self):
            self._answer("POST")

        def do_PUT(self):
            self._answer("PUT")

        def _answer(self, method: str) -> None:
            path = urlsplit(self.path).path
            with hub.lock:
                hub.requests.append((method, unquote(path)))
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            parts = [unquote(p) for p in path.strip("/").split("/")]
            # LFS uploads go to the storage URL the batch answer gave (signed there, not by the token).
            if parts[0] != "lfs-store" and self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._send(401, {"error": "Invalid credentials"})
            try:
                with hub.lock:
                    self._route(method, parts, body)
            except LookupError as error:
                self._send(404, {"error": str(error)}, {"X-Error-Code": error.args[1] if len(error.args) > 1 else "EntryNotFound"})

        def _route(self, method: str, parts: list[str], body: bytes) -> None:
            if method == "POST" and parts == ["api", "repos", "create"]:
                return self._create_repo(json.loads(body))
            if method == "POST" and parts == ["api", "validate-yaml"]:
                return self._validate_yaml(json.loads(body)["content"])
            if method == "PUT" and parts[0] == "lfs-store":
                return self._store_lfs(parts[1], body)
            if method == "POST" and parts[-4:] == ["info", "lfs", "objects", "batch"]:
                if f"{parts[0]}/{parts[1].removesuffix('.git')}" not in hub.repos:
                    raise LookupError("repository not found", "RepoNotFound")
                return self._lfs_batch(json.loads(body))
            if parts[:2] != ["api", "models"] or len(parts) < 6:
                raise LookupError("no such endpoint")
            repo, action, revision = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
            if repo not in hub.repos:
                raise LookupError(f"repository {repo} not found", "RepoNotFound")
            if method == "POST" and action == "branch":
                return self._create_branch(repo, revision)
            if revision not in hub.repos[repo]["branches"]:
                raise LookupError(f"revision {revision} not found", "RevisionNotFound")
            if method == "GET" and action == "revision":
                return self._send(200, {"id": repo, "sha": hub.head(repo, revision), "private": hub.repos[repo]["private"], "siblings": []})
            if method == "POST" and action == "preupload":
                return self._preupload(json.loads(body))
            if method == "POST" and action == "commit":
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                commit = hub.commit(repo, revision, lines)
                return self._send(200, {"commitUrl": f"{hub.url}/{repo}/commit/{commit}", "commitOid": commit, "pullRequestUrl": None})
            raise LookupError("no such endpoint")

        def _create_repo(self, payload: dict) -> None:
            repo = f"{payload['organization']}/{payload['name']}"
            if repo in hub.repos:
                return self._send(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo}"})
            initial = hashlib.sha1(repo.encode()).hexdigest()
            hub.set_branch(repo, "main", initial)
            hub.repos[repo]["private"] = payload.get("visibility") == "private"
            self._send(200, {"url": f"{hub.url}/{repo}", "name": repo})

        def _create_branch(self, repo: str, branch: str) -> None:
            if branch in hub.repos[repo]["branches"]:
                return self._send(409, {"error": f"branch {branch} already exists"})
            hub.repos[repo]["branches"][branch] = hub.head(repo)
            self._send(200, {})

        def _validate_yaml(self, content: str) -> None:
            if content.startswith("---\n"):
                try:
                    yaml.safe_load(content[4 : content.index("\n---\n", 3)])
                except (ValueError, yaml.YAMLError) as error:
                    return self._send(400, {"errors": [{"message": str(error)}], "warnings": []})
            self._send(200, {"errors": [], "warnings": []})

        def _preupload(self, payload: dict) -> None:
            files = []
            for entry in payload["files"]:
                lfs = entry["path"].endswith(LFS_SUFFIXES) or entry["size"] > LFS_THRESHOLD
                files.append({"path": entry["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
            self._send(200, {"files": files})

        def _lfs_batch(self, payload: dict) -> None:
            objects = []
            for item in payload["objects"]:
                entry = {"oid": item["oid"], "size": item["size"], "authenticated": True}
                if not (hub.folder / "lfs" / item["oid"]).is_file():
                    entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-store/{item['oid']}"}}
                objects.append(entry)
            self._send(200, {"transfer": "basic", "objects": objects})

        def _store_lfs(self, oid: str, body: bytes) -> None:
            if hashlib.sha256(body).hexdigest() != oid:
                return self._send(400, {"error": "the bytes do not have the announced sha256"})
            (hub.folder / "lfs").mkdir(parents=True, exist_ok=True)
            (hub.folder / "lfs" / oid).write_bytes(body)
            self._send(200, {})

        def _send(self, status: int, data: dict, headers: dict | None = None) -> None:
            payload = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

    return Handler

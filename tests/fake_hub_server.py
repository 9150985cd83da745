"""The fake Hub server: an in-memory Hugging Face Hub for tests, a real HTTP server on 127.0.0.1, no mocks.

It implements the subset of the Hub HTTP API that ``huggingface_hub`` (2.x, with ``HF_HUB_DISABLE_XET=1``)
uses to create repos, upload folders (regular files inline in the commit, large/binary files through the
git-LFS "basic" batch API), read repo info, list trees, resolve and download files, and validate model
card metadata. Point a client at it by setting ``HF_ENDPOINT`` to :attr:`FakeHub.endpoint` *before*
``huggingface_hub`` is imported (the tests do this in a fresh subprocess).

Routes (``{type}`` is ``model`` / ``dataset`` / ``space``, a repo id is ``namespace/name``)::

    POST /api/repos/create                              create_repo
    POST /api/repos/delete | DELETE /api/repos/delete   delete_repo
    GET  /api/whoami-v2                                 whoami
    POST /api/validate-yaml                             README metadata check
    GET  /api/{type}s/{id}[/revision/{rev}]             model_info / repo_info
    GET  /api/{type}s/{id}/tree/{rev}[/{path}]          list_repo_tree (recursive=, expand=)
    POST /api/{type}s/{id}/paths-info/{rev}             get_paths_info (form: paths=..., expand=)
    POST /api/{type}s/{id}/preupload/{rev}              upload modes ("regular" / "lfs") + remote oids
    POST /api/{type}s/{id}/commit/{rev}                 create_commit (NDJSON: header, file, lfsFile, deleted*)
    POST /{prefix}{id}.git/info/lfs/objects/batch       LFS batch (basic transfer)
    PUT  /__lfs__/{sha256}   POST /__lfs__/{sha256}/verify   LFS upload + verify
    HEAD|GET /{prefix}{id}/resolve/{rev}/{path}         download with X-Repo-Commit, ETag, X-Linked-*

Errors carry the ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) that
``huggingface_hub`` turns into its own exception classes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

REPO_TYPES = ("model", "dataset", "space")
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".npz", ".npy", ".gguf", ".zip", ".msgpack")
LFS_MIN_SIZE = 10 * 1024 * 1024
DEFAULT_NAMESPACE = "double-user"
LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob: ``sha1(b"blob <size>\\0" + content)``."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass(frozen=True)
class StoredFile:
    """One file of a commit. LFS files keep only their sha256; the bytes live in the LFS store."""

    size: int
    git_oid: str
    content: bytes | None = None
    lfs_sha256: str | None = None

    @property
    def is_lfs(self) -> bool:
        return self.lfs_sha256 is not None

    @property
    def etag(self) -> str:
        """What the Hub sends as ETag: the sha256 for LFS files, the git blob id otherwise."""
        return self.lfs_sha256 if self.is_lfs else self.git_oid

    def tree_entry(self, path: str) -> dict:
        entry: dict = {"type": "file", "oid": self.git_oid, "size": self.size, "path": path}
        if self.is_lfs:
            pointer = LFS_POINTER.format(oid=self.lfs_sha256, size=self.size).encode()
            entry["lfs"] = {"oid": self.lfs_sha256, "size": self.size, "pointerSize": len(pointer)}
        return entry


@dataclass(frozen=True)
class Commit:
    oid: str
    summary: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def commit_at(self, revision: str) -> Commit | None:
        """The commit a revision names: ``main`` (the head) or a full or abbreviated commit oid."""
        if revision == "main":
            return self.head
        for commit in reversed(self.commits):
            if len(revision) >= 7 and commit.oid.startswith(revision):
                return commit
        return None


class HubError(Exception):
    """An HTTP error answer: status, ``X-Error-Code`` and message."""

    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.headers = headers or {}


@dataclass
class HubState:
    """Everything the fake Hub stores, behind one lock."""

    repos: dict[tuple[str, str], Repo] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)
    request_log: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)
    commit_counter: int = 0

    def new_commit_oid(self, repo: Repo, summary: str) -> str:
        self.commit_counter += 1
        return hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}#{self.commit_counter}:{summary}".encode()).hexdigest()

    def repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.commit_at(unquote(revision))
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit


def _split_front_matter(readme: str) -> dict:
    """The YAML metadata block of a model card (``---`` ... ``---`` at the top), or ``{}``."""
    match = re.match(r"^\s*---\s*\n(.*?)\n---\s*(\n|$)", readme, flags=re.DOTALL)
    if match is None:
        return {}
    data = yaml.safe_load(match.group(1))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("The YAML metadata must be a mapping")
    return data


def _validate_metadata(metadata: dict) -> list[str]:
    """Errors the Hub would report for the metadata fields we care about."""
    errors = []
    for key in ("tags", "datasets", "language"):
        if key in metadata and not isinstance(metadata[key], (list, str)):
            errors.append(f'"{key}" must be a string or a list of strings')
    if "library_name" in metadata and not isinstance(metadata["library_name"], str):
        errors.append('"library_name" must be a string')
    model_index = metadata.get("model-index")
    if model_index is not None:
        if not isinstance(model_index, list):
            errors.append('"model-index" must be an array')
        else:
            for i, model in enumerate(model_index):
                if not isinstance(model, dict) or "name" not in model or not isinstance(model.get("results"), list):
                    errors.append(f'"model-index[{i}]" must have "name" and a "results" array')
                    continue
                for j, result in enumerate(model["results"]):
                    task = result.get("task") if isinstance(result, dict) else None
                    metrics = result.get("metrics") if isinstance(result, dict) else None
                    if not isinstance(task, dict) or "type" not in task:
                        errors.append(f'"model-index[{i}].results[{j}].task.type" is required')
                    if not isinstance(metrics, list) or not all(
                        isinstance(m, dict) and "type" in m and "value" in m for m in metrics
                    ):
                        errors.append(f'"model-index[{i}].results[{j}].metrics" must list {{type, value}}')
    return errors


class FakeHub:
    """The server. Use as a context manager, or ``start()`` / ``stop()``.

    >>> with FakeHub() as hub:  # doctest: +SKIP
    ...     env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", ...}
    """

    def __init__(self) -> None:
        self.state = HubState()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> "FakeHub":
        handler = type("BoundHubHandler", (_HubHandler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("The fake Hub is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- inspection helpers for tests ------------------------------------------------------------------
    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        """``{path: bytes}`` of a repo at a revision, LFS files resolved."""
        with self.state.lock:
            commit = self.state.commit(self.state.repo(repo_type, repo_id), revision)
            return {path: self._read(stored) for path, stored in commit.files.items()}

    def commits(self, repo_id: str, repo_type: str = "model") -> list[Commit]:
        with self.state.lock:
            return list(self.state.repo(repo_type, repo_id).commits)

    def _read(self, stored: StoredFile) -> bytes:
        return self.state.lfs_objects[stored.lfs_sha256] if stored.is_lfs else stored.content

    # -- API operations ----------------------------------------------------------------------------------
    def repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.endpoint}/{URL_PREFIXES[repo_type]}{repo_id}"

    def create_repo(self, payload: dict) -> dict:
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        name = payload.get("name")
        if not name or "/" in name:
            raise HubError(400, f"Invalid repo name {name!r}")
        repo_id = f"{payload.get('organization') or DEFAULT_NAMESPACE}/{name}"
        url = self.repo_url(repo_type, repo_id)
        with self.state.lock:
            if (repo_type, repo_id) in self.state.repos:
                raise HubError(409, "You already created this repo", headers={"_json": {"url": url}})
            repo = Repo(repo_type, repo_id, private=payload.get("visibility") == "private")
            attributes = ("*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
                          "*.bin filter=lfs diff=lfs merge=lfs -text\n")
            gitattributes = attributes.encode()
            files = {".gitattributes": StoredFile(len(gitattributes), git_blob_oid(gitattributes), gitattributes)}
            repo.commits.append(Commit(self.state.new_commit_oid(repo, "initial commit"), "initial commit", files))
            self.state.repos[(repo_type, repo_id)] = repo
        return {"url": url, "name": repo_id, "id": repo_id}

    def delete_repo(self, payload: dict) -> dict:
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or DEFAULT_NAMESPACE}/{payload.get('name')}"
        with self.state.lock:
            self.state.repo(repo_type, repo_id)
            del self.state.repos[(repo_type, repo_id)]
        return {}

    def repo_info(self, repo_type: str, repo_id: str, revision: str) -> dict:
        with self.state.lock:
            repo = self.state.repo(repo_type, repo_id)
            commit = self.state.commit(repo, revision)
            readme = commit.files.get("README.md")
            card_data = _split_front_matter(self._read(readme).decode()) if readme is not None else {}
            tags = card_data.get("tags", [])
            info = {
                "id": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit.oid,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [tags] if isinstance(tags, str) else list(tags),
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
                "cardData": card_data,
                "lastModified": "2025-01-01T00:00:00.000Z",
                "createdAt": "2025-01-01T00:00:00.000Z",
            }
            if repo_type == "model":
                info["modelId"] = repo_id
                if "library_name" in card_data:
                    info["library_name"] = card_data["library_name"]
                if "model-index" in card_data:
                    info["model-index"] = card_data["model-index"]
            return info

    def tree(self, repo_type: str, repo_id: str, revision: str, path: str, recursive: bool) -> list[dict]:
        with self.state.lock:
            commit = self.state.commit(self.state.repo(repo_type, repo_id), revision)
            prefix = f"{path.strip('/')}/" if path.strip("/") else ""
            below = {p: f for p, f in commit.files.items() if p.startswith(prefix)}
            if prefix and not below:
                raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound",
                               {"X-Repo-Commit": commit.oid})
            entries: dict[str, dict] = {}
            for file_path, stored in sorted(below.items()):
                relative_parts = file_path[len(prefix):].split("/")
                depths = range(1, len(relative_parts)) if recursive else range(1, min(2, len(relative_parts)))
                for depth in depths:
                    folder = prefix + "/".join(relative_parts[:depth])
                    entries.setdefault(folder, {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(),
                                                "size": 0, "path": folder})
                if recursive or len(relative_parts) == 1:
                    entries[file_path] = stored.tree_entry(file_path)
            return list(entries.values())

    def paths_info(self, repo_type: str, repo_id: str, revision: str, paths: list[str]) -> list[dict]:
        with self.state.lock:
            commit = self.state.commit(self.state.repo(repo_type, repo_id), revision)
            found = []
            for path in paths:
                path = path.strip("/")
                if path in commit.files:
                    found.append(commit.files[path].tree_entry(path))
                elif any(p.startswith(path + "/") for p in commit.files):
                    found.append({"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(),
                                  "size": 0, "path": path})
            return found

    def preupload(self, repo_type: str, repo_id: str, revision: str, payload: dict) -> dict:
        with self.state.lock:
            commit = self.state.commit(self.state.repo(repo_type, repo_id), revision)
            answers = []
            for item in payload.get("files", []):
                path, size = item["path"], int(item["size"])
                sample = base64.b64decode(item.get("sample", ""))
                is_lfs = path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\0" in sample
                remote = commit.files.get(path)
                remote_oid = None
                if remote is not None:
                    # the client compares this with sha256 (LFS) or the git blob id (regular)
                    remote_oid = remote.lfs_sha256 if is_lfs else (None if remote.is_lfs else remote.git_oid)
                answers.append({"path": path, "uploadMode": "lfs" if is_lfs else "regular",
                                "shouldIgnore": False, "oid": remote_oid})
            return {"files": answers, "commitOid": commit.oid}

    def lfs_batch(self, payload: dict) -> dict:
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is implemented")
        objects = []
        with self.state.lock:
            for obj in payload.get("objects", []):
                oid, size = obj["oid"], int(obj["size"])
                answer: dict = {"oid": oid, "size": size, "authenticated": True}
                if oid not in self.state.lfs_objects:
                    answer["actions"] = {
                        "upload": {"href": f"{self.endpoint}/__lfs__/{oid}"},
                        "verify": {"href": f"{self.endpoint}/__lfs__/{oid}/verify"},
                    }
                objects.append(answer)
        return {"transfer": "basic", "objects": objects}

    def lfs_put(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"LFS object content does not match its oid {oid}")
        with self.state.lock:
            self.state.lfs_objects[oid] = body

    def lfs_verify(self, oid: str, payload: dict) -> dict:
        with self.state.lock:
            stored = self.state.lfs_objects.get(oid)
        if stored is None or len(stored) != int(payload.get("size", -1)):
            raise HubError(404, f"LFS object {oid} was not uploaded")
        return {}

    def commit(self, repo_type: str, repo_id: str, revision: str, lines: list[dict]) -> dict:
        if unquote(revision) != "main":
            raise HubError(400, "The fake Hub only commits to main")
        with self.state.lock:
            repo = self.state.repo(repo_type, repo_id)
            files = dict(repo.head.files)
            summary = "commit"
            for line in lines:
                key, value = line.get("key"), line.get("value", {})
                if key == "header":
                    summary = value.get("summary") or summary
                    parent = value.get("parentCommit")
                    if parent is not None and not repo.head.oid.startswith(parent):
                        raise HubError(412, "A commit has happened since. Please refresh and try again.")
                elif key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"Unsupported encoding for {value.get('path')}")
                    content = base64.b64decode(value["content"])
                    files[value["path"]] = StoredFile(len(content), git_blob_oid(content), content)
                elif key == "lfsFile":
                    oid, size = value["oid"], int(value["size"])
                    if oid not in self.state.lfs_objects:
                        raise HubError(422, f"LFS file {value['path']} ({oid}) was not uploaded")
                    pointer = LFS_POINTER.format(oid=oid, size=size).encode()
                    files[value["path"]] = StoredFile(size, git_blob_oid(pointer), None, oid)
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    files = {p: f for p, f in files.items() if not p.startswith(folder)}
                else:
                    raise HubError(400, f"Unsupported commit operation {key!r}")
            oid = self.state.new_commit_oid(repo, summary)
            repo.commits.append(Commit(oid, summary, files))
        return {"commitUrl": f"{self.repo_url(repo_type, repo_id)}/commit/{oid}", "commitOid": oid,
                "pullRequestUrl": None, "success": True}

    def resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> tuple[StoredFile, bytes, str]:
        with self.state.lock:
            commit = self.state.commit(self.state.repo(repo_type, repo_id), revision)
            stored = commit.files.get(path)
            if stored is None:
                raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
            return stored, self._read(stored), commit.oid

    def validate_yaml(self, payload: dict) -> dict:
        try:
            metadata = _split_front_matter(payload.get("content", ""))
        except (yaml.YAMLError, ValueError) as error:
            raise HubError(400, "Invalid YAML", headers={"_json": {"errors": [{"message": str(error)}]}})
        errors = _validate_metadata(metadata)
        if errors:
            raise HubError(400, "Invalid metadata", headers={"_json": {"errors": [{"message": e} for e in errors]}})
        warnings = [] if metadata else [{"message": "Empty or missing yaml metadata in repo card"}]
        return {"errors": [], "warnings": warnings}


_TYPES = "|".join(f"{t}s" for t in REPO_TYPES)
_REPO = r"(?P<repo_id>[^/]+/[^/]+)"
_API_REPO = re.compile(rf"^/api/(?P<type>{_TYPES})/{_REPO}(?:/revision/(?P<revision>[^/]+))?$")
_API_TREE = re.compile(rf"^/api/(?P<type>{_TYPES})/{_REPO}/tree/(?P<revision>[^/]+)(?P<path>/.*)?$")
_API_ACTION = re.compile(
    rf"^/api/(?P<type>{_TYPES})/{_REPO}/(?P<action>paths-info|preupload|commit)/(?P<revision>[^/]+)$")
_RESOLVE = re.compile(rf"^/(?:(?P<type>datasets|spaces)/)?{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
_LFS_BATCH = re.compile(rf"^/(?:(?P<type>datasets|spaces)/)?{_REPO}\.git/info/lfs/objects/batch$")
_LFS_OBJECT = re.compile(r"^/__lfs__/(?P<oid>[0-9a-f]{64})(?P<verify>/verify)?$")


def _repo_type(plural: str | None) -> str:
    return plural[:-1] if plural else "model"


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub  # bound by FakeHub.start

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - silence the default stderr log
        pass

    # -- plumbing ----------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json", head_only: bool = False,
              content_length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def _send_json(self, data, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _send_error(self, error: HubError, head_only: bool) -> None:
        headers = {k: v for k, v in error.headers.items() if k != "_json"}
        headers["X-Error-Message"] = str(error)
        if error.error_code:
            headers["X-Error-Code"] = error.error_code
        body = {"error": str(error), **error.headers.get("_json", {})}
        self._send(error.status, json.dumps(body).encode(), headers, head_only=head_only)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        with self.hub.state.lock:
            self.hub.state.request_log.append((method, url.path))
        body = self._body() if method in ("POST", "PUT", "DELETE") else b""
        try:
            self._route(method, url.path, parse_qs(url.query), body)
        except HubError as error:
            self._send_error(error, head_only=method == "HEAD")
        except (KeyError, ValueError, TypeError) as error:
            self._send_error(HubError(400, f"Bad request: {error!r}"), head_only=method == "HEAD")

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    # -- routing -----------------------------------------------------------------------------------------
    def _route(self, method: str, path: str, query: dict, body: bytes) -> None:
        hub = self.hub
        if path == "/api/repos/create" and method == "POST":
            return self._send_json(hub.create_repo(json.loads(body)))
        if path == "/api/repos/delete" and method in ("POST", "DELETE"):
            return self._send_json(hub.delete_repo(json.loads(body)))
        if path == "/api/whoami-v2" and method == "GET":
            return self._send_json({"type": "user", "name": DEFAULT_NAMESPACE, "orgs": [],
                                    "auth": {"accessToken": {"role": "write"}}})
        if path == "/api/validate-yaml" and method == "POST":
            return self._send_json(hub.validate_yaml(json.loads(body)))
        if (match := _API_REPO.match(path)) and method == "GET":
            return self._send_json(hub.repo_info(_repo_type(match["type"]), unquote(match["repo_id"]),
                                                 match["revision"] or "main"))
        if (match := _API_TREE.match(path)) and method == "GET":
            recursive = query.get("recursive", ["False"])[0].lower() in ("true", "1")
            entries = hub.tree(_repo_type(match["type"]), match["repo_id"], match["revision"],
                               unquote(match["path"] or ""), recursive)
            return self._send_json(entries)
        if (match := _API_ACTION.match(path)) and method == "POST":
            repo_type, repo_id, revision = _repo_type(match["type"]), match["repo_id"], match["revision"]
            if match["action"] == "paths-info":
                form = parse_qs(body.decode())
                return self._send_json(hub.paths_info(repo_type, repo_id, revision, form.get("paths", [])))
            if match["action"] == "preupload":
                return self._send_json(hub.preupload(repo_type, repo_id, revision, json.loads(body)))
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            return self._send_json(hub.commit(repo_type, repo_id, revision, lines))
        if (match := _LFS_BATCH.match(path)) and method == "POST":
            hub.state.repo(_repo_type(match["type"]), match["repo_id"])
            return self._send(200, json.dumps(hub.lfs_batch(json.loads(body))).encode(),
                              content_type="application/vnd.git-lfs+json")
        if match := _LFS_OBJECT.match(path):
            if match["verify"] and method == "POST":
                return self._send_json(hub.lfs_verify(match["oid"], json.loads(body)))
            if not match["verify"] and method == "PUT":
                hub.lfs_put(match["oid"], body)
                return self._send(200, b"")
        if (match := _RESOLVE.match(path)) and method in ("GET", "HEAD"):
            return self._resolve(method, _repo_type(match["type"]), match["repo_id"], match["revision"],
                                 unquote(match["path"]))
        raise HubError(404, f"The fake Hub does not implement {method} {path}")

    def _resolve(self, method: str, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        stored, content, commit_oid = self.hub.resolve(repo_type, repo_id, revision, path)
        headers = {"X-Repo-Commit": commit_oid, "ETag": f'"{stored.etag}"', "Accept-Ranges": "bytes"}
        if stored.is_lfs:
            headers["X-Linked-Etag"] = f'"{stored.etag}"'
            headers["X-Linked-Size"] = str(stored.size)
        status, start, end = 200, 0, len(content)
        range_header = self.headers.get("Range")
        if range_header and method == "GET" and (m := re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())):
            start = int(m[1]) if m[1] else max(0, len(content) - int(m[2]))
            end = min(len(content), int(m[2]) + 1) if m[1] and m[2] else len(content)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(content)}"
        self._send(status, content[start:end], headers, content_type="application/octet-stream",
                   head_only=method == "HEAD")


def hub_url_path(repo_id: str, filename: str, revision: str = "main") -> str:
    """The resolve path of a file, as ``huggingface_hub.hf_hub_url`` builds it (for raw HTTP tests)."""
    return f"/{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"

"""A small, in-memory, Hub-compatible HTTP server for tests (loopback only, no network).

It implements the routes the real ``huggingface_hub`` client calls for ``create_repo``, ``create_branch``,
``upload_folder`` (preupload + NDJSON commit with base64 files), ``repo_info``, ``list_repo_tree`` and
``snapshot_download``/``hf_hub_download`` (HEAD/GET ``resolve``), with git-like revisions (every commit
gets an oid; branches map to oids) and private repos that need ``Authorization: Bearer <token>``.

Usage::

    with HubServer(tokens={"hf_secret": "user"}) as hub:
        api = HfApi(endpoint=hub.url, token="hf_secret")
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_API = re.compile(
    rf"^/api/(?P<type>models|datasets|spaces)/{_REPO}"
    r"(?:/(?P<op>revision|tree|preupload|commit|branch)/(?P<rev>[^/]+)(?:/(?P<path>.*))?)?$"
)
_REFS = re.compile(rf"^/api/(?P<type>models|datasets|spaces)/{_REPO}/refs$")
_RESOLVE = re.compile(rf"^/(?:(?P<prefix>datasets|spaces)/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(content: bytes) -> str:
    """The git blob sha1 of ``content`` (what the Hub uses as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    """One commit: its oid, parent, message and the full file tree (path -> bytes)."""

    oid: str
    parent: str | None
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    """A repository: owner, visibility, commits by oid and branches (name -> oid)."""

    repo_id: str
    repo_type: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    granted: set[str] | None = None  # gated: metadata for anyone, files for the owner and these users

    def resolve(self, revision: str) -> Commit | None:
        """The commit a branch name or (full or abbreviated, >= 7 chars) commit oid names."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.commits:
            return self.commits[revision]
        if len(revision) >= 7:
            matches = [c for oid, c in self.commits.items() if oid.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        return None


@dataclass
class Fault:
    """A failure the server plays instead of its answer: requests whose path matches ``path`` (a regex,
    searched) and, if given, ``method`` get ``status`` with ``body``, after waiting ``hang`` seconds;
    ``times`` limits how often (None: always)."""

    path: str
    method: str | None = None
    status: int = 500
    body: bytes = b""
    hang: float = 0.0
    times: int | None = None


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class _Server(ThreadingHTTPServer):
    """Tracks open connections so that :meth:`HubServer.stop` can close keep-alive ones too."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open: set[socket.socket] = set()
        self.open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.open_lock:
            self.open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.open_lock:
            self.open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self.open_lock:
            for sock in self.open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class HubServer:
    """The server: ``url`` is its endpoint, ``repos`` its state, ``requests`` a log of ``(method, path)``.

    Args:
        tokens: valid bearer tokens mapped to the user they authenticate (who owns that namespace).
    """

    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self.tokens = dict(tokens or {})
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.faults: list[Fault] = []
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._httpd: _Server | None = None
        self._url = ""
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (set by :meth:`start`)."""
        assert self._url, "server not started"
        return self._url

    def start(self) -> HubServer:
        """Listen on 127.0.0.1 (a free port) in a daemon thread."""
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self._url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket and every open connection."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.close_connections()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers for tests --------------------------------------------------------------------------

    def take_fault(self, method: str, path: str) -> Fault | None:
        """The first fault that matches this request (one of its ``times`` used up), if any."""
        with self._lock:
            for fault in self.faults:
                if (fault.method in (None, method)) and re.search(fault.path, path):
                    if fault.times is not None:
                        if fault.times <= 0:
                            continue
                        fault.times -= 1
                    return fault
        return None

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The (mutable) file tree of ``revision``: editing it tampers with what the server serves."""
        with self._lock:
            commit = self.repos[repo_id].resolve(revision)
            if commit is None:
                raise KeyError(revision)
            return commit.files

    # -- state changes ------------------------------------------------------------------------------

    def _new_commit(self, repo: Repo, parent: str | None, message: str, files: dict[str, bytes]) -> Commit:
        digest = hashlib.sha1()
        digest.update(f"{repo.repo_id}\0{parent}\0{message}\0{next(self._counter)}".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_oid(files[path])}\0".encode())
        commit = Commit(oid=digest.hexdigest(), parent=parent, message=message, files=files)
        repo.commits[commit.oid] = commit
        return commit

    def _user(self, headers: Any) -> str | None:
        auth = headers.get("Authorization") or ""
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise _HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def _repo(self, repo_id: str, user: str | None, *, write: bool = False) -> Repo:
        repo = self.repos.get(repo_id)
        owner = repo_id.split("/", 1)[0]
        if repo is None or (repo.private and user != owner):
            # like the Hub: 401 when anonymous, 404 when authenticated; never reveal private repos
            raise _HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if write and user != owner:
            raise _HubError(401 if user is None else 403, f"You don't have write access to {repo_id}")
        return repo

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: bytes) -> Any:
        """Route one request; returns ``(status, headers, body)``."""
        with self._lock:
            user = self._user(headers)
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo(user, json.loads(body or b"{}"))
            if method == "POST" and path == "/api/validate-yaml":
                return 200, {}, {"errors": [], "warnings": []}
            if method in ("GET", "HEAD") and path == "/api/whoami-v2":
                if user is None:
                    raise _HubError(401, "Invalid credentials in Authorization header")
                return 200, {}, {"type": "user", "name": user, "auth": {"accessToken": {"role": "write"}}}
            m = _REFS.match(path)
            if m and method == "GET":
                repo = self._repo(m["repo"], user)
                branches = [
                    {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
                    for name, oid in sorted(repo.branches.items())
                ]
                return 200, {}, {"branches": branches, "converts": [], "tags": [], "pullRequests": []}
            m = _API.match(path)
            if m:
                return self._api(method, m, query, user, body)
            m = _RESOLVE.match(path)
            if m and method in ("GET", "HEAD"):
                return self._resolve(m, user, headers)
            raise _HubError(404, f"no route for {method} {path}")

    def _create_repo(self, user: str | None, payload: dict[str, Any]) -> Any:
        if user is None:
            raise _HubError(401, "You must be authenticated to create a repo")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if namespace != user:
            raise _HubError(403, f"You don't have the rights to create a repo under {namespace}")
        if repo_id in self.repos:
            raise _HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = Repo(repo_id=repo_id, repo_type=payload.get("type") or "model", private=private)
        first = self._new_commit(repo, None, "initial commit", {".gitattributes": _GITATTRIBUTES})
        repo.branches["main"] = first.oid
        self.repos[repo_id] = repo
        return 200, {}, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def _api(
        self, method: str, m: re.Match[str], query: dict[str, list[str]], user: str | None, body: bytes
    ) -> Any:
        op, repo_id = m["op"], m["repo"]
        rev = unquote(m["rev"]) if m["rev"] else "main"
        write = method == "POST"
        repo = self._repo(repo_id, user, write=write)
        if op == "branch" and method == "POST":
            if rev in repo.branches:
                raise _HubError(409, f"Reference refs/heads/{rev} already exists")
            start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
            commit = repo.resolve(start)
            if commit is None:
                raise _HubError(404, f"Invalid rev id: {start}", "RevisionNotFound")
            repo.branches[rev] = commit.oid
            return 200, {}, {}
        commit = repo.resolve(rev)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        if op in (None, "revision") and method == "GET":
            return (
                200,
                {},
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": commit.oid,
                    "private": repo.private,
                    "siblings": [{"rfilename": p} for p in sorted(commit.files)],
                },
            )
        if op == "tree" and method == "GET":
            return 200, {}, self._tree(commit, m["path"] or "", "true" in query.get("recursive", []))
        if op == "preupload" and method == "POST":
            files = json.loads(body)["files"]
            out = []
            for f in files:
                existing = commit.files.get(f["path"])
                entry = {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                if existing is not None:
                    entry["oid"] = git_blob_oid(existing)
                out.append(entry)
            return 200, {}, {"files": out, "commitOid": commit.oid}
        if op == "commit" and method == "POST":
            if rev not in repo.branches:
                raise _HubError(400, f"Can only commit to a branch, not {rev!r}")
            return self._commit(repo, rev, commit, body)
        raise _HubError(404, f"no route for {method} {m.string}")

    @staticmethod
    def _tree(commit: Commit, prefix: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = prefix.strip("/")
        base = f"{prefix}/" if prefix else ""
        dirs: set[str] = set()
        files = []
        for path in sorted(commit.files):
            if not path.startswith(base):
                continue
            rest = path[len(base) :]
            parts = rest.split("/")
            for i in range(1, len(parts)):
                if recursive or i == 1:
                    dirs.add(base + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                content = commit.files[path]
                files.append(
                    {"type": "file", "oid": git_blob_oid(content), "size": len(content), "path": path}
                )
        if prefix and not files and not dirs:
            raise _HubError(404, f"{prefix} does not exist", "EntryNotFound")
        listing = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)]
        return listing + files

    def _commit(self, repo: Repo, branch: str, head: Commit, body: bytes) -> Any:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent is not None and parent != head.oid:
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _HubError(400, "only base64 file content is supported")
                files[path] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(path, None)
            elif key == "deletedFolder":
                for p in [p for p in files if p.startswith(path.rstrip("/") + "/")]:
                    del files[p]
            else:
                raise _HubError(
                    400, f"unsupported commit operation {key!r} (this server stores regular files)"
                )
        commit = self._new_commit(repo, head.oid, str(header.get("summary", "")), files)
        repo.branches[branch] = commit.oid
        return (
            200,
            {},
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.url}/{repo.repo_id}/commit/{commit.oid}",
                "commitMessage": commit.message,
                "pullRequestUrl": None,
            },
        )

    def _resolve(self, m: re.Match[str], user: str | None, headers: Any) -> Any:
        repo = self._repo(m["repo"], user)
        if repo.granted is not None and user != repo.repo_id.split("/", 1)[0] and user not in repo.granted:
            # like the Hub: a gated repository's files need access granted (its metadata does not)
            raise _HubError(
                401 if user is None else 403, f"Access to {repo.repo_id} is restricted", "GatedRepo"
            )
        commit = repo.resolve(unquote(m["rev"]))
        if commit is None:
            raise _HubError(404, "Invalid rev id", "RevisionNotFound")
        path = unquote(m["path"])
        if path not in commit.files:
            raise _HubError(404, "Entry not found", "EntryNotFound")
        content = commit.files[path]
        out = {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_oid(content)}"', "Accept-Ranges": "bytes"}
        status = 200
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", headers.get("Range") or "")
        if ranged:
            start = int(ranged[1])
            end = int(ranged[2]) if ranged[2] else len(content) - 1
            out["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content, status = content[start : end + 1], 206
        return status, out, content


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.hub.requests.append((method, parts.path))
        fault = self.hub.take_fault(method, parts.path)
        if fault is not None:
            time.sleep(fault.hang)
            self.send_response(fault.status)
            self.send_header("Content-Length", str(len(fault.body)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(fault.body)
            return
        try:
            status, headers, payload = self.hub.handle(
                method, parts.path, parse_qs(parts.query), self.headers, body
            )
        except _HubError as exc:
            status, payload = exc.status, {"error": exc.message, **exc.extra}
            headers = {"X-Error-Message": exc.message}
            if exc.code:
                headers["X-Error-Code"] = exc.code
        except Exception as exc:  # report server bugs to the client instead of hanging
            status, headers, payload = 500, {"X-Error-Message": repr(exc)}, {"error": repr(exc)}
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        if not isinstance(payload, bytes):
            self.send_header("Content-Type", "application/json")
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

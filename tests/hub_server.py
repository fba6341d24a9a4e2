"""A loopback HTTP server that speaks the Hub's endpoints as huggingface_hub (and so the job) calls them.

Point HF_ENDPOINT at `HubServer.url` (in a fresh interpreter: huggingface_hub reads it at import) and the real client
runs its real code: revision resolution (`/api/{type}s/{repo}/revision/{rev}`), the recursive tree listing
(`/api/{type}s/{repo}/tree/{commit}`), file downloads (`/{datasets/}{repo}/resolve/{commit}/{path}`, HEAD then
GET, with X-Repo-Commit and ETag) and its cache. Errors are answered as the Hub answers them: the status and an
X-Error-Code header decide which exception huggingface_hub raises.

- `Repo`: commits (each a dict path -> bytes), refs (branch or tag -> commit), and a token for a private repo
  (requests without `Authorization: Bearer <token>` get 401 RepoNotFound, as the Hub hides private repos).
- `ERRORS`: repos answered with a fixed error (tests/test_exit_codes.py: 401, 403 gated, 503, 404 revision).
- Anything else is 404 RepoNotFound.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar
from urllib.parse import unquote, urlsplit

ERRORS: dict[str, tuple[int, str | None]] = {
    "org/private": (401, "RepoNotFound"), "org/gated": (403, "GatedRepo"), "org/down": (503, None),
    "org/missing-rev": (404, "RevisionNotFound")}


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]]  # commit sha (40 hex) -> {path: content}
    refs: dict[str, str]  # branch or tag -> commit sha; "main" is the default branch
    token: str | None = None  # set: a private repo


def commit_sha(label: str) -> str:
    """A stable 40-hex commit id for a test's commit label."""
    return hashlib.sha1(label.encode()).hexdigest()


def _blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()  # git's blob id, as the Hub reports


class _Handler(http.server.BaseHTTPRequestHandler):
    repos: ClassVar[dict[str, Repo]] = {}
    seen: ClassVar[list[tuple[str, str]]] = []

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
               content_type: str = "application/json") -> None:
        self.send_response(status)
        for key, value in {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str | None) -> None:
        body = json.dumps({"error": f"loopback hub says {status}"}).encode()
        self._reply(status, body, {"X-Error-Code": code} if code else {})

    def _route(self) -> tuple[str, str, str, str] | None:
        """(kind, repo id, revision, path in repo) where kind is info, tree or resolve; None when not understood."""
        parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
        if parts[:1] == ["api"] and len(parts) >= 4:
            repo = f"{parts[2]}/{parts[3]}"
            rest = parts[4:]
            if not rest:
                return "info", repo, "main", ""
            if rest[0] in ("revision", "tree") and len(rest) >= 2:
                return ("info" if rest[0] == "revision" else "tree"), repo, rest[1], "/".join(rest[2:])
            return None
        if parts[:1] == ["datasets"]:
            parts = parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve":
            return "resolve", f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
        return None

    def do_GET(self):  # http.server's name
        self.seen.append((self.command, self.path))
        fixed = next((v for k, v in ERRORS.items() if f"/{k}/" in self.path + "/"), None)
        if fixed is not None:
            return self._error(*fixed)
        route = self._route()
        repo = self.repos.get(route[1]) if route else None
        if route is None or repo is None:
            return self._error(404, "RepoNotFound")
        kind, repo_id, revision, path = route
        if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
            return self._error(401, "RepoNotFound")
        commit = revision if revision in repo.commits else repo.refs.get(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound")
        files = repo.commits[commit]
        if kind == "info":
            info = {"id": repo_id, "sha": commit, "private": bool(repo.token),
                    "siblings": [{"rfilename": name} for name in sorted(files)]}
            return self._reply(200, json.dumps(info).encode())
        if kind == "tree":
            inside = [name for name in sorted(files) if not path or name.startswith(path.rstrip("/") + "/")]
            tree = [{"type": "file", "path": name, "size": len(files[name]), "oid": _blob_id(files[name])}
                    for name in inside]
            return self._reply(200, json.dumps(tree).encode())
        if path not in files:
            return self._error(404, "EntryNotFound")
        content = files[path]
        return self._reply(200, content, {"X-Repo-Commit": commit, "ETag": f'"{_blob_id(content)}"'},
                           content_type="application/octet-stream")

    do_HEAD = do_GET


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class HubServer:
    url: str
    repos: dict[str, Repo]
    requests: list[tuple[str, str]] = field(default_factory=list)


@contextmanager
def serve_hub(repos: dict[str, Repo] | None = None) -> Iterator[HubServer]:
    """The server on 127.0.0.1 in a thread of this process, serving `repos` (and ERRORS)."""
    seen: list[tuple[str, str]] = []
    handler = type("Handler", (_Handler,), {"repos": dict(repos or {}), "seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", _free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield HubServer(f"http://127.0.0.1:{server.server_address[1]}", handler.repos, seen)
    finally:
        server.shutdown()
        server.server_close()

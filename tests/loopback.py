"""Loopback HTTP servers for tests that need a real client to meet a real status code (no patched clients).

`serve(handler)` starts a ThreadingHTTPServer on 127.0.0.1 and returns (url, server); call server.shutdown() when
done. `HubErrorHandler` answers the Hub's API by repository: 401, 403, 503 or 404 with the X-Error-Code header
huggingface_hub reads to choose its exception. Point the client at it with HF_ENDPOINT (a subprocess) or
huggingface_hub.constants.ENDPOINT (in-process; HfApi reads it when it is constructed).

`serve_hub(repos)` adds repositories with files to it (`HubRepoHandler`): the endpoints huggingface_hub's downloads
use, so the real client runs its real code (tests/storage/test_hub_data.py). Revision resolution
(`/api/{type}s/{repo}/revision/{rev}`), the recursive tree listing (`/api/{type}s/{repo}/tree/{commit}`), file
downloads (`/{datasets/}{repo}/resolve/{commit}/{path}`, HEAD then GET, with X-Repo-Commit and ETag) and so its
cache. A `Repo` has commits (each a dict path -> bytes), refs (branch or tag -> commit) and, when private, a token:
requests without `Authorization: Bearer <token>` get 401 RepoNotFound, as the Hub hides private repos. HF_ENDPOINT
is read when huggingface_hub is imported, so its clients run in fresh interpreters.
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- loopback servers --------------------------------------------------------------------------------------------
class HubErrorHandler(http.server.BaseHTTPRequestHandler):
    """The Hub's API as huggingface_hub reads it: the status and X-Error-Code decide the exception it raises."""

    ROUTES: ClassVar[dict[str, tuple[int, str | None]]] = {
        "org/private": (401, "RepoNotFound"), "org/gated": (403, "GatedRepo"), "org/down": (503, None),
        "org/missing-rev": (404, "RevisionNotFound")}

    def _answer(self, where: str) -> None:
        status, code = next((v for k, v in self.ROUTES.items() if f"/{k}" in where), (404, "RepoNotFound"))
        body = json.dumps({"error": f"loopback hub says {status}"}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # http.server's name
        self._answer(self.path)

    do_HEAD = do_GET

    def do_POST(self):
        """create_repo posts to /api/repos/create and names the repository in its JSON body."""
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        named = f"/{body['organization']}/{body['name']}" if body.get("organization") else ""
        self._answer(self.path + named)

    def log_message(self, *args):  # quiet
        pass


def serve(handler) -> tuple[str, http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    # poll 20 times a second: shutdown() waits for the next poll (0.5 s by default, per test)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


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


class HubRepoHandler(HubErrorHandler):
    """HubErrorHandler, plus the repositories in `repos` served with their files (the module docstring)."""

    repos: ClassVar[dict[str, Repo]] = {}
    seen: ClassVar[list[tuple[str, str]]] = []

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
        route = self._route()
        repo = self.repos.get(route[1]) if route else None
        if route is None or repo is None:
            return self._answer(self.path)  # the fixed errors, else 404 RepoNotFound
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


@dataclass
class HubServer:
    url: str
    repos: dict[str, Repo]
    requests: list[tuple[str, str]] = field(default_factory=list)


@contextmanager
def serve_hub(repos: dict[str, Repo] | None = None) -> Iterator[HubServer]:
    """HubRepoHandler on 127.0.0.1 in a thread of this process, serving `repos` (and HubErrorHandler's errors)."""
    seen: list[tuple[str, str]] = []
    handler = type("Handler", (HubRepoHandler,), {"repos": dict(repos or {}), "seen": seen})
    url, server = serve(handler)
    try:
        yield HubServer(url, handler.repos, seen)
    finally:
        server.shutdown()
        server.server_close()

"""Loopback HTTP servers for tests that need a real client to meet a real status code (no patched clients).

`serve(handler)` starts a ThreadingHTTPServer on 127.0.0.1 and returns (url, server); call server.shutdown() when
done. `HubErrorHandler` answers the Hub's API by repository: 401, 403, 503 or 404 with the X-Error-Code header
huggingface_hub reads to choose its exception. Point the client at it with HF_ENDPOINT (a subprocess) or
huggingface_hub.constants.ENDPOINT (in-process; HfApi reads it when it is constructed).

`serve_hub(repos)` adds repositories with files to it (`HubRepoHandler`): the endpoints huggingface_hub's downloads
use, so the real client runs its real code (tests/storage/test_sources.py). Revision resolution
(`/api/{type}s/{repo}/revision/{rev}`), the recursive tree listing (`/api/{type}s/{repo}/tree/{commit}`), file
downloads (`/{datasets/}{repo}/resolve/{commit}/{path}`, HEAD then GET, with X-Repo-Commit and ETag) and so its
cache. A `Repo` has commits (each a dict path -> bytes), refs (branch or tag -> commit) and, when private, a token:
requests without `Authorization: Bearer <token>` get 401 RepoNotFound, as the Hub hides private repos. HF_ENDPOINT
is read when huggingface_hub is imported, so its clients run in fresh interpreters.

`serve_hub(repos, accounts=...)` also takes pushes (`HubRepoHandler`'s write side), as huggingface_hub's
create_repo and upload_folder meet them on the Hub: `/api/whoami-v2` describes the token (its role, the user's
organisations and their roles, a fine-grained token's scopes); `/api/repos/create` creates a repo in a namespace the
token may write (403 otherwise, 404 for a namespace that does not exist, 409 when it exists); `/api/validate-yaml`
(which upload_folder asks about a README.md before committing it) answers 400 with the Hub's `errors` when the card's
metadata names a `base_model` that is not a Hub model id; preupload answers "regular" for every file; and
`/api/models/{repo}/commit/{rev}` refuses a token that may not write (403), the same bad card (400) and a file listed
in `rejects` (its status, e.g. 422, and message), else records the files as a new commit. `on_commit(repo_id, files)`
runs before a commit is answered (a test's signal).
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import re
import socket
import threading
from collections.abc import Callable, Iterator
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
        if urlsplit(self.path).path == "/api/whoami-v2" and self.accounts:
            return self._whoami()
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


    def do_POST(self):
        self.seen.append((self.command, self.path))
        parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        fixed = next((k for k in self.ROUTES if f"/{k}/" in f"{self.path}/"), None)
        if parts == ["api", "validate-yaml"]:  # what upload_folder asks before it commits a README.md
            problem = card_metadata_problem(json.loads(body)["content"].encode())
            answer = {"errors": [{"message": problem}] if problem else [], "warnings": []}
            return self._reply(400 if problem else 200, json.dumps(answer).encode())
        if parts == ["api", "repos", "create"]:
            request = json.loads(body or b"{}")
            repo_id = f"{request.get('organization') or self._account_name()}/{request['name']}"
            return self._answer(f"/{repo_id}") if repo_id in self.ROUTES else self._create(repo_id)
        if fixed is not None:
            return self._answer(self.path)
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("preupload", "commit"):
            repo_id = f"{parts[2]}/{parts[3]}"
            if repo_id not in self.repos:
                return self._error(404, "RepoNotFound")
            refused = self._write_refusal(repo_id)
            if refused:
                return self._error(*refused)
            if parts[4] == "preupload":
                files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                         for f in json.loads(body)["files"]]
                return self._reply(200, json.dumps({"files": files}).encode())
            return self._commit(repo_id, body)
        return self._answer(self.path)

    # -- the write side ------------------------------------------------------------------------------------------
    accounts: ClassVar[dict[str, Account]] = {}  # token -> the account it belongs to
    namespaces: ClassVar[tuple[str, ...]] = ()  # organisations that exist (their members are in the accounts)
    rejects: ClassVar[dict[str, tuple[int, str]]] = {}  # path in a commit -> (status, the Hub's message)
    on_commit: ClassVar[Callable[[str, dict[str, bytes]], None] | None] = None

    def _account(self) -> Account | None:
        auth = self.headers.get("Authorization") or ""
        return self.accounts.get(auth.removeprefix("Bearer "))

    def _account_name(self) -> str:
        account = self._account()
        return account.name if account else "anonymous"

    def _whoami(self) -> None:
        account = self._account()
        if account is None:
            return self._reply(401, json.dumps({"error": "Invalid credentials in Authorization header"}).encode())
        token = {"displayName": account.token_name, "role": account.role}
        if account.role == "fineGrained":
            token["fineGrained"] = {"scoped": [{"entity": {"type": "user" if "/" not in e else "model", "name": e},
                                                "permissions": list(p)} for e, p in account.scoped.items()]}
        me = {"type": "user", "name": account.name, "orgs": [{"type": "org", "name": o, "roleInOrg": r}
                                                             for o, r in account.orgs.items()],
              "auth": {"type": "access_token", "accessToken": token}}
        return self._reply(200, json.dumps(me).encode())

    def _write_refusal(self, repo_id: str) -> tuple[int, str | None] | None:
        """(status, X-Error-Code) when the token may not write repo_id, as the Hub answers; None when it may."""
        account = self._account()
        if account is None:
            return 401, None
        namespace = repo_id.split("/")[0]
        if account.role == "read":
            return 403, None
        if account.role == "fineGrained" and not any(
                "repo.write" in perms and entity in (namespace, repo_id) for entity, perms in account.scoped.items()):
            return 403, None
        if namespace != account.name and account.orgs.get(namespace) not in ("contributor", "write", "admin"):
            return (403, None) if namespace in self.namespaces or namespace in account.orgs else (404, None)
        return None

    def _create(self, repo_id: str) -> None:
        refused = self._write_refusal(repo_id)
        if refused:
            return self._error(*refused)
        if repo_id in self.repos:
            return self._reply(409, json.dumps({"error": "You already created this model repo",
                                                "url": f"/{repo_id}"}).encode())
        empty = commit_sha(f"{repo_id}@init")
        self.repos[repo_id] = Repo({empty: {}}, {"main": empty})
        return self._reply(200, json.dumps({"url": f"http://{self.headers['Host']}/{repo_id}"}).encode())

    def _commit(self, repo_id: str, body: bytes) -> None:
        files = {}
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        for path in files:
            if path in self.rejects:
                status, message = self.rejects[path]
                return self._reply(status, json.dumps({"error": message}).encode())
        invalid = card_metadata_problem(files.get("README.md"))
        if invalid:
            return self._reply(400, json.dumps({"error": f"Invalid metadata in README.md.\n- {invalid}"}).encode())
        if self.on_commit is not None:
            type(self).on_commit(repo_id, files)  # type: ignore[misc]  # a plain function, not a method
        repo = self.repos[repo_id]
        sha = commit_sha(f"{repo_id}@{len(repo.commits)}")
        repo.commits[sha] = {**repo.commits[repo.refs["main"]], **files}
        repo.refs["main"] = sha
        url = f"http://{self.headers['Host']}/{repo_id}/commit/{sha}"
        return self._reply(200, json.dumps({"commitUrl": url, "commitOid": sha, "pullRequestUrl": None}).encode())


_HUB_MODEL_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def card_metadata_problem(readme: bytes | None) -> str | None:
    """What the Hub says of a model card whose `base_model` is not a Hub model id (None when the card is fine)."""
    import yaml

    text = (readme or b"").decode()
    if not text.startswith("---\n"):
        return None
    meta = yaml.safe_load(text.split("\n---\n", 1)[0].removeprefix("---\n")) or {}
    bases = meta.get("base_model")
    for base in [bases] if isinstance(bases, str) else bases or []:
        if not _HUB_MODEL_ID.match(str(base)):
            return f'"base_model" with value "{base}" is not valid. Use a model id from https://hf.co/models.'
    return None


@dataclass
class Account:
    """A Hub user as its token shows it: role "read", "write" or "fineGrained" (with `scoped`: entity -> perms)."""

    name: str
    role: str = "write"
    orgs: dict[str, str] = field(default_factory=dict)  # organisation -> role in it (read, contributor, write, admin)
    scoped: dict[str, tuple[str, ...]] = field(default_factory=dict)
    token_name: str = "loopback"


@dataclass
class HubServer:
    url: str
    repos: dict[str, Repo]
    requests: list[tuple[str, str]] = field(default_factory=list)


@contextmanager
def serve_hub(repos: dict[str, Repo] | None = None, *, accounts: dict[str, Account] | None = None,
              namespaces: tuple[str, ...] = (), rejects: dict[str, tuple[int, str]] | None = None,
              on_commit: Callable[[str, dict[str, bytes]], None] | None = None) -> Iterator[HubServer]:
    """HubRepoHandler on 127.0.0.1 in a thread of this process, serving `repos` (and HubErrorHandler's errors), and
    taking pushes from the tokens in `accounts` (the module docstring)."""
    seen: list[tuple[str, str]] = []
    handler = type("Handler", (HubRepoHandler,), {
        "repos": dict(repos or {}), "seen": seen, "accounts": dict(accounts or {}), "namespaces": namespaces,
        "rejects": dict(rejects or {}), "on_commit": staticmethod(on_commit) if on_commit else None})
    url, server = serve(handler)
    try:
        yield HubServer(url, handler.repos, seen)
    finally:
        server.shutdown()
        server.server_close()

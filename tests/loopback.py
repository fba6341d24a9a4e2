"""Loopback HTTP servers for tests that need a real client to meet a real status code (no patched clients).

`serve(handler)` starts a ThreadingHTTPServer on 127.0.0.1 and returns (url, server); call server.shutdown() when
done. `HubErrorHandler` answers the Hub's API by repository: 401, 403, 503 or 404 with the X-Error-Code header
huggingface_hub reads to choose its exception. Point the client at it with HF_ENDPOINT (a subprocess) or
huggingface_hub.constants.ENDPOINT (in-process; HfApi reads it when it is constructed).
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
from typing import ClassVar


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

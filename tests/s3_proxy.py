"""The loopback S3 server (moto) and a fault-injecting HTTP proxy in front of it, for storage tests."""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import struct
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3

from job.storage import s3 as s3io
from job.storage.checkpoints import RemoteCheckpoints

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testingsecret", "AWS_DEFAULT_REGION": "us-east-1"}
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


def s3_client(endpoint: str):
    """A client of `endpoint` that reads nothing from os.environ (tests change it while the runs go on)."""
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=AWS_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"], aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"])


@contextlib.contextmanager
def moto_server() -> Iterator[int]:
    """moto's S3 server on 127.0.0.1; yields its port."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield port
    finally:
        server.stop()


def create_bucket(moto_port: int, name: str) -> str:
    """Created directly on the server, not through a proxy."""
    import boto3

    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}", aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
                 region_name=AWS_ENV["AWS_DEFAULT_REGION"]).create_bucket(Bucket=name)
    return name


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FaultProxy:
    """An HTTP proxy in front of the S3 server. Each request fails with probability `rate`: half of the failures
    reset the connection (RST, nothing answered), half answer 503 SlowDown; the rest are forwarded unchanged.

    `hold(substring)`: requests whose path contains it wait until `release()`; `held` is set once one waits (a test
    can stop a process in the middle of an upload, chosen by what is being uploaded, not by timing).
    `requests`: (method, path without the query) of every request received, in order (a test counts the writes).
    """

    def __init__(self, upstream_port: int, rate: float = 0.0, seed: int = 0):
        self.rate, self.upstream_port = rate, upstream_port
        self.hold_path: str | None = None
        self.held, self.released = threading.Event(), threading.Event()
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"forwarded": 0, "reset": 0, "slowdown": 0, "client_gone": 0}
        self.requests: list[tuple[str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    proxy.requests.append((self.command, urllib.parse.unquote(self.path.split("?", 1)[0])))
                if proxy.hold_path and proxy.hold_path in self.path:
                    proxy.held.set()
                    proxy.released.wait()
                fault = proxy.draw()
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "slowdown":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "expect")}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                # A client that went away (its retry gave up on a connection, or its process was SIGKILLed) is
                # part of these tests: counted, not printed into whichever test's captured stderr runs meanwhile.
                if isinstance(sys.exc_info()[1], ConnectionError):
                    with proxy.lock:
                        proxy.counts["client_gone"] += 1
                    return
                super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", _free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def draw(self) -> str:
        with self.lock:
            roll = self.random.random()
            fault = "forwarded" if roll >= self.rate else ("reset" if roll < self.rate / 2 else "slowdown")
            self.counts[fault] += 1
            return fault

    def hold(self, path_part: str) -> None:
        self.hold_path = path_part
        self.held.clear()
        self.released.clear()

    def release(self) -> None:
        self.hold_path = None
        self.released.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()


def assert_store_complete(s3, remote: RemoteCheckpoints, local: dict[int, Path]) -> None:
    """Every checkpoint in the store has its marker and exactly the local files, byte for byte in size."""
    complete, incomplete = remote._steps()
    assert incomplete == [] and complete
    for step in complete:
        objects = {o["Key"].rsplit(f"checkpoint-{step}/", 1)[1]: o["Size"]
                   for o in s3io.list_objects(s3, remote.run_uri.child(f"checkpoint-{step}"))}
        expected = {p.name: p.stat().st_size for p in local[step].iterdir() if p.name != "COMPLETED"}
        assert objects.pop("COMPLETED") > 0 and objects == expected, step

"""Faults on the way to storage: the loopback S3 server (moto) behind a proxy that resets connections and answers
`503 SlowDown` to a set fraction of requests. Checkpoints still arrive whole, COMPLETED only after every object; a
store that stays down ends the run with exit 3 and the local checkpoints intact."""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from helpers import job_env, run_job
from job.errors import TransientError
from job.storage import s3 as s3io
from job.storage.checkpoints import RemoteCheckpoints

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testingsecret", "AWS_DEFAULT_REGION": "us-east-1"}
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FaultProxy:
    """An HTTP proxy in front of the S3 server. Each request fails with probability `rate`: half of the failures
    reset the connection (RST, nothing answered), half answer 503 SlowDown; the rest are forwarded unchanged."""

    def __init__(self, upstream_port: int, rate: float, seed: int = 0):
        self.rate, self.upstream_port = rate, upstream_port
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"forwarded": 0, "reset": 0, "slowdown": 0}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
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

        self.server = ThreadingHTTPServer(("127.0.0.1", _free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def draw(self) -> str:
        with self.lock:
            roll = self.random.random()
            fault = "forwarded" if roll >= self.rate else ("reset" if roll < self.rate / 2 else "slowdown")
            self.counts[fault] += 1
            return fault

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def moto_port():
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield port
    server.stop()


@pytest.fixture()
def aws(monkeypatch):
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)


def _bucket(moto_port: int, name: str) -> str:
    """Created directly on the server, not through the proxy."""
    import boto3

    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}", **_credentials()).create_bucket(Bucket=name)
    return name


def _credentials() -> dict[str, str]:
    return {"aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            "region_name": AWS_ENV["AWS_DEFAULT_REGION"]}


def _checkpoint(root: Path, step: int, files: int = 6) -> Path:
    ckpt = root / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    for i in range(files):
        (ckpt / f"part-{i}.bin").write_bytes(os.urandom(4096 * (i + 1)))
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return ckpt


def _assert_store_complete(s3, remote: RemoteCheckpoints, local: dict[int, Path]) -> None:
    """Every checkpoint in the store has its marker and exactly the local files, byte for byte in size."""
    complete, incomplete = remote._steps()
    assert incomplete == [] and complete
    for step in complete:
        objects = {o["Key"].rsplit(f"checkpoint-{step}/", 1)[1]: o["Size"]
                   for o in s3io.list_objects(s3, remote.run_uri.child(f"checkpoint-{step}"))}
        expected = {p.name: p.stat().st_size for p in local[step].iterdir() if p.name != "COMPLETED"}
        assert objects.pop("COMPLETED") > 0 and objects == expected, step


def test_uploads_and_restore_ride_out_one_failed_request_in_five(moto_port, aws, monkeypatch, tmp_path, caplog):
    proxy = FaultProxy(moto_port, rate=0.2, seed=13)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        _bucket(moto_port, "flaky")
        remote = RemoteCheckpoints("s3://flaky/ckpts", "run-f", keep=10)
        local = {step: _checkpoint(tmp_path / "local", step, files=3) for step in (2, 4)}
        with caplog.at_level("INFO", logger="job.storage.checkpoints"):
            for step, path in local.items():
                remote.upload(path, step)
        restored = remote.restore_latest(tmp_path / "restore")
        assert restored is not None and restored.name == "checkpoint-4"
        assert all((restored / p.name).read_bytes() == p.read_bytes() for p in local[4].iterdir())
    finally:
        proxy.close()
    assert proxy.counts["reset"] > 0 and proxy.counts["slowdown"] > 0, proxy.counts
    _assert_store_complete(remote.s3, remote, local)
    logged = sum(int(r.getMessage().split(" request retries")[0].rsplit(", ", 1)[1])
                 for r in caplog.records if "request retries" in r.getMessage())
    assert logged > 0  # the retries are counted and logged


def test_a_store_that_stays_down_is_transient_after_a_bounded_time(moto_port, aws, monkeypatch, tmp_path):
    proxy = FaultProxy(moto_port, rate=1.0)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setattr("job.storage.checkpoints.UPLOAD_ATTEMPTS", 2)
    try:
        remote = RemoteCheckpoints("s3://any/ckpts", "run-down", keep=10)
        started = time.monotonic()
        with pytest.raises(TransientError, match="gave up after 2 attempts of the whole upload of checkpoint-2"):
            remote.upload(_checkpoint(tmp_path, 2), 2)
        assert time.monotonic() - started < 120
    finally:
        proxy.close()
    assert (tmp_path / "checkpoint-2/trainer_state.json").is_file()  # the local checkpoint is untouched


@pytest.mark.slow
def test_run_through_a_flaky_store_exits_0_with_every_checkpoint_complete(moto_port, aws, monkeypatch, tiny_assets,
                                                                          tmp_path):
    _bucket(moto_port, "flaky-run")
    proxy = FaultProxy(moto_port, rate=0.2, seed=7)
    try:
        env = job_env(tmp_path, tiny_assets, SFT_CHECKPOINT_URI="s3://flaky-run/runs", SFT_MAX_STEPS="4",
                      SFT_SAVE_STEPS="2", SFT_SAVE_TOTAL_LIMIT="5", SFT_EVAL_SUBSET="2", SFT_WANDB_ENABLED="false",
                      AWS_ENDPOINT_URL=proxy.url, **AWS_ENV)
        proc = run_job(["run"], env)
    finally:
        proxy.close()
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert proxy.counts["reset"] + proxy.counts["slowdown"] > 0, proxy.counts
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{moto_port}")
    remote = RemoteCheckpoints("s3://flaky-run/runs", "test-run", keep=5)
    local = {s: tmp_path / f"out/checkpoints/checkpoint-{s}" for s in (2, 4)}
    _assert_store_complete(remote.s3, remote, local)
    assert remote.final_step() == 4
    assert "request retries" in log

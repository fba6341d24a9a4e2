"""Faults on the way to storage: the loopback S3 server (moto) behind a proxy that resets connections and answers
`503 SlowDown` to a set fraction of requests. Checkpoints still arrive whole, COMPLETED only after every object; a
store that stays down ends the run with exit 3 and the local checkpoints intact."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from s3_proxy import AWS_ENV, FaultProxy, assert_store_complete, create_bucket, moto_server

from job.errors import TransientError
from job.storage.checkpoints import RemoteCheckpoints


@pytest.fixture(scope="module")
def moto_port():
    with moto_server() as port:
        yield port


@pytest.fixture()
def aws(monkeypatch):
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)


def _checkpoint(root: Path, step: int, files: int = 6) -> Path:
    ckpt = root / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    for i in range(files):
        (ckpt / f"part-{i}.bin").write_bytes(os.urandom(4096 * (i + 1)))
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return ckpt


# slow tier: botocore's retry backoff sleeps (3-5 s each); make test-fast stays under a minute
@pytest.mark.slow
def test_uploads_and_restore_ride_out_one_failed_request_in_five(moto_port, aws, monkeypatch, tmp_path, caplog):
    proxy = FaultProxy(moto_port, rate=0.2, seed=13)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        create_bucket(moto_port, "flaky")
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
    assert_store_complete(remote.s3, remote, local)
    logged = sum(int(r.getMessage().split(" request retries")[0].rsplit(", ", 1)[1])
                 for r in caplog.records if "request retries" in r.getMessage())
    assert logged > 0  # the retries are counted and logged


# slow tier: botocore's retry backoff sleeps (3-5 s each); make test-fast stays under a minute
@pytest.mark.slow
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

"""Exact resume on every path (slow tier): each interrupted chain ends where its uninterrupted reference ends.

Exact means identical per-step losses and grad norms and a final adapter within 1e-6 (max abs) of the reference.
Two chains, each with its own uninterrupted reference run on the same settings (started alongside it):

- local, SFT_DATALOADER_NUM_WORKERS=2, SFT_GRAD_ACCUM=2, LoRA dropout 0.1: SIGTERM once checkpoint-2 is COMPLETED
  (a preemption save at the step reached), then SIGKILL in the middle of the step after the log line of step 5
  (resumes from the regular save checkpoint-4), then a run to the end;
- S3 (through a proxy that can hold requests), SIGTERM-free, workers 0, accumulation 1, dropout 0: SIGKILL while
  checkpoint-4 is being uploaded (held by the proxy), then a fresh pod with an empty SFT_OUTPUT_DIR that restores
  the newest COMPLETED checkpoint from the store and runs to the end.

Every stop is chosen by an event (a COMPLETED marker, a log line, a held upload request), never by a sleep.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, job_env
from s3_proxy import AWS_ENV, FaultProxy, create_bucket, moto_server
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

STEPS = 8
COMMON = dict(SFT_MAX_STEPS=str(STEPS), SFT_SAVE_STEPS="2", SFT_SAVE_TOTAL_LIMIT="10", SFT_EVAL_SUBSET="2",
              SFT_PREEMPT_GRACE_S="120", SFT_WANDB_ENABLED="false", SFT_TRAIN_SUBSET="24")
LOCAL_CHAIN = dict(SFT_DATALOADER_NUM_WORKERS="2", SFT_GRAD_ACCUM="2", SFT_LORA_DROPOUT="0.1", SFT_RUN_ID="chain-local")
S3_CHAIN = dict(SFT_DATALOADER_NUM_WORKERS="0", SFT_GRAD_ACCUM="1", SFT_LORA_DROPOUT="0", SFT_RUN_ID="chain-s3")


class Job:
    """One `python -m job run` subprocess, its log in tmp/log.txt (appended across the processes of a chain)."""

    def __init__(self, tmp: Path, env: dict[str, str]):
        tmp.mkdir(parents=True, exist_ok=True)
        self.log_path = tmp / "log.txt"
        self.offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "job", "run"], env=env, cwd=REPO, stdout=log,
                                         stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log_path.read_text()[self.offset:]

    def wait_for(self, condition, what: str, timeout: float = 400) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {what}:\n{self.text()[-3000:]}"
            time.sleep(0.05)  # failsafe: poll interval
        raise AssertionError(f"timed out waiting for {what}")

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=300)


def _completed(out: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*/COMPLETED"))


def _history(out: Path) -> dict[int, tuple[float, float]]:
    state = json.loads((out / f"checkpoints/checkpoint-{STEPS}/trainer_state.json").read_text())
    return {e["step"]: (e["loss"], e["grad_norm"]) for e in state["log_history"] if "loss" in e}


def _adapter_gap(a: Path, b: Path) -> float:
    left, right = (
        load_file(str(a / "out/adapter/adapter_model.safetensors")),
        load_file(str(b / "out/adapter/adapter_model.safetensors")),
    )
    assert set(left) == set(right)
    return max((left[k] - right[k]).abs().max().item() for k in left)


@pytest.fixture(scope="module")
def local_chain(tiny_assets, tmp_path_factory):
    ref_tmp, tmp = tmp_path_factory.mktemp("local-ref"), tmp_path_factory.mktemp("local-chain")
    settings = {**COMMON, **LOCAL_CHAIN}
    reference = Job(ref_tmp, job_env(ref_tmp, tiny_assets, **settings))
    env, out, codes = job_env(tmp, tiny_assets, **settings), tmp / "out", {}

    job = Job(tmp, env)
    job.wait_for(lambda: 2 in _completed(out), "checkpoint-2 COMPLETED")
    codes["sigterm"] = job.stop(signal.SIGTERM)
    codes["preempted_at"] = max(_completed(out))

    job = Job(tmp, env)
    job.wait_for(lambda: "step 5/" in job.text(), "the log line of step 5")
    codes["sigkill"] = job.stop(signal.SIGKILL)

    job = Job(tmp, env)
    codes["final"] = job.proc.wait(timeout=600)
    codes["reference"] = reference.proc.wait(timeout=600)
    return ref_tmp, tmp, codes


@pytest.fixture(scope="module")
def s3_chain(tiny_assets, tmp_path_factory):
    ref_tmp, tmp = tmp_path_factory.mktemp("s3-ref"), tmp_path_factory.mktemp("s3-chain")
    settings = {**COMMON, **S3_CHAIN}
    reference = Job(ref_tmp, job_env(ref_tmp, tiny_assets, **settings))
    with moto_server() as port:
        create_bucket(port, "matrix")
        proxy = FaultProxy(port)
        try:
            storage = dict(SFT_CHECKPOINT_URI="s3://matrix/runs", AWS_ENDPOINT_URL=proxy.url, **AWS_ENV)
            codes = {}
            proxy.hold("/checkpoint-4/")
            job = Job(tmp / "pod1", job_env(tmp / "pod1", tiny_assets, **settings, **storage))
            job.wait_for(proxy.held.is_set, "the upload of checkpoint-4")
            codes["killed_uploading"] = job.stop(signal.SIGKILL)
            codes["pod1_local"] = _completed(tmp / "pod1/out")
            proxy.release()

            job = Job(tmp / "pod2", job_env(tmp / "pod2", tiny_assets, **settings, **storage))
            codes["final"] = job.proc.wait(timeout=600)
            codes["log"] = job.text()
        finally:
            proxy.close()
    codes["reference"] = reference.proc.wait(timeout=600)
    return ref_tmp, tmp / "pod2", codes


def _assert_exact(ref_tmp: Path, tmp: Path) -> None:
    reference, resumed = _history(ref_tmp / "out"), _history(tmp / "out")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in reference:
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])
    assert _adapter_gap(ref_tmp, tmp) <= 1e-6


def test_preemption_save_then_sigkill_mid_step_resume_exactly(local_chain):
    ref_tmp, tmp, codes = local_chain
    log = (tmp / "log.txt").read_text()
    assert codes["reference"] == 0, (ref_tmp / "log.txt").read_text()[-3000:]
    assert codes["sigterm"] == 143 and codes["sigkill"] == -signal.SIGKILL and codes["final"] == 0, log[-3000:]
    assert codes["preempted_at"] > 2  # the preemption save is at the step reached after checkpoint-2
    assert f"resuming from {tmp / 'out/checkpoints'}/checkpoint-{codes['preempted_at']}" in log
    assert f"resuming from {tmp / 'out/checkpoints'}/checkpoint-4" in log  # the regular save before the SIGKILL
    _assert_exact(ref_tmp, tmp)


def test_sigkill_during_upload_then_fresh_pod_from_s3_resume_exactly(s3_chain):
    ref_tmp, tmp, codes = s3_chain
    assert codes["reference"] == 0, (ref_tmp / "log.txt").read_text()[-3000:]
    assert codes["killed_uploading"] == -signal.SIGKILL and 4 in codes["pod1_local"]
    assert codes["final"] == 0, codes["log"][-3000:]
    assert "ignoring s3://matrix/runs/chain-s3/checkpoint-4: no COMPLETED marker" in codes["log"]
    assert "restored checkpoint-2 from s3://matrix/runs/chain-s3" in codes["log"]
    _assert_exact(ref_tmp, tmp)

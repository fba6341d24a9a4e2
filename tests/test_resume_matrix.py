"""Exact resume on every path (slow tier): each interrupted chain ends where its uninterrupted reference ends.

Exact means identical per-step losses and grad norms and a final adapter within 1e-6 (max abs) of the reference.
Two chains, each against an uninterrupted reference run on the same settings:

- local, SFT_DATALOADER_NUM_WORKERS=2, SFT_GRAD_ACCUM=2, LoRA dropout 0.1: SIGTERM once checkpoint-2 is COMPLETED
  (a preemption save at the step reached), then SIGKILL in the middle of the step after the log line of step 5
  (resumes from the regular save checkpoint-4), then a run to the end;
- S3 (the shared `s3_resume_run` of tests/runs.py against the shared `reference_run`: workers 0, accumulation 1,
  dropout 0), through a proxy that fails one request in five and holds the upload of checkpoint-4: SIGKILL while
  that upload is held, then a fresh pod with an empty SFT_OUTPUT_DIR that restores the newest COMPLETED checkpoint
  from the store and runs to the end. The same run shows that a flaky store still ends with exit 0 and every
  checkpoint in the store complete.

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
from runs import HELD_CHECKPOINT
from s3_proxy import assert_store_complete
from safetensors.torch import load_file

from job.storage.checkpoints import RemoteCheckpoints

pytestmark = pytest.mark.slow

STEPS = 8
COMMON = dict(SFT_MAX_STEPS=str(STEPS), SFT_SAVE_STEPS="2", SFT_SAVE_TOTAL_LIMIT="10", SFT_EVAL_SUBSET="2",
              SFT_PREEMPT_GRACE_S="120", SFT_WANDB_ENABLED="false", SFT_TRAIN_SUBSET="24")
LOCAL_CHAIN = dict(SFT_DATALOADER_NUM_WORKERS="2", SFT_GRAD_ACCUM="2", SFT_LORA_DROPOUT="0.1", SFT_RUN_ID="chain-local")


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
    left = load_file(str(a / "out/adapter/adapter_model.safetensors"))
    right = load_file(str(b / "out/adapter/adapter_model.safetensors"))
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


def test_sigkill_during_upload_then_fresh_pod_from_s3_resume_exactly(s3_resume_run, reference_run):
    run, log = s3_resume_run, s3_resume_run.pod2.log
    assert reference_run.returncode == 0, reference_run.log[-3000:]
    assert run.pod1_code == -signal.SIGKILL and HELD_CHECKPOINT in run.pod1_completed
    assert run.pod2.returncode == 0, log[-3000:]
    uri = f"s3://{run.bucket}/runs/{run.run_id}"
    assert f"ignoring {uri}/checkpoint-{HELD_CHECKPOINT}: no COMPLETED marker" in log
    assert f"restored checkpoint-2 from {uri}" in log
    _assert_exact(reference_run.tmp, run.pod2.tmp)


def test_a_flaky_store_still_ends_with_every_checkpoint_complete(s3_resume_run, s3_endpoint, monkeypatch):
    """One request in five was reset or answered 503 SlowDown; the run retried, logged it, and the store is whole."""
    run = s3_resume_run
    assert run.faults["reset"] > 0 and run.faults["slowdown"] > 0, run.faults
    assert "request retries" in run.pod2.log
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    remote = RemoteCheckpoints(f"s3://{run.bucket}/runs", run.run_id, keep=10)
    local = {p.parent.name: p.parent for p in (run.pod2.out / "checkpoints").glob("checkpoint-*/COMPLETED")}
    assert_store_complete(remote.s3, remote, {int(name.split("-")[1]): path for name, path in local.items()})
    assert remote.final_step() == STEPS

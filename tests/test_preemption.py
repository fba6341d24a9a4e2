"""Preemption and exact resume: SIGTERM -> COMPLETED checkpoint + exit 143; SIGKILL/SIGTERM/budget-overrun chains
resume to the same losses, weights and metrics as an uninterrupted run (real processes, tiny Qwen3-VL, CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerControl

from helpers import REPO, job_env
from job.errors import ExitCode, Preempted
from job.train.preemption import PreemptionCallback, PreemptionGuard

STEPS = 8
CHAIN = dict(SFT_MAX_STEPS=str(STEPS), SFT_SAVE_STEPS="2", SFT_EVAL_SUBSET="4", SFT_SAVE_TOTAL_LIMIT="10",
             SFT_PREEMPT_GRACE_S="60", SFT_RUN_ID="chain-run")


# -- the guard and the callback, in process ----------------------------------------------------------------------
def test_signal_outside_training_raises_preempted():
    guard = PreemptionGuard(grace_s=60)
    try:
        with pytest.raises(Preempted, match="SIGTERM"), guard:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs in the main thread at the next bytecode
        assert guard.requested
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # on the way out, a second signal is ignored
    finally:
        guard.disarm()  # this test process must outlive the watchdog
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_signal_during_training_only_sets_the_flag():
    with PreemptionGuard(grace_s=60) as guard:
        guard.in_training = True
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert guard.requested and guard.seconds_left() <= 60
        guard.disarm()


@pytest.mark.parametrize(("save_cost_s", "should_save"), [(1.0, True), (100.0, False)])
def test_callback_saves_only_when_the_save_fits_the_budget(save_cost_s, should_save):
    guard = PreemptionGuard(grace_s=30)
    guard.signal, guard.received_at = signal.SIGTERM, time.monotonic()
    callback = PreemptionCallback(guard, lambda: save_cost_s)
    control = callback.on_step_end(SimpleNamespace(device="cpu"), SimpleNamespace(global_step=7), TrainerControl())
    assert control.should_training_stop and control.should_save is should_save
    assert callback.stopped_at == 7


def test_no_signal_leaves_control_alone():
    callback = PreemptionCallback(PreemptionGuard(grace_s=30))
    control = callback.on_step_end(SimpleNamespace(device="cpu"), SimpleNamespace(global_step=3), TrainerControl())
    assert not control.should_training_stop and not control.should_save


def test_watchdog_exits_143_when_the_budget_runs_out():
    code = ("import os, signal, time\nfrom job.train.preemption import PreemptionGuard\n"
            "with PreemptionGuard(grace_s=0.5) as g:\n    g.in_training = True\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(60)\n")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == ExitCode.PREEMPTED and time.monotonic() - started < 30
    assert "SFT_PREEMPT_GRACE_S=0.5 s elapsed" in proc.stderr


# -- real runs ---------------------------------------------------------------------------------------------------
def _start(tmp: Path, tiny_assets, **overrides) -> subprocess.Popen:
    env = job_env(tmp, tiny_assets, **{**CHAIN, **overrides})
    log = open(tmp / "log.txt", "a")
    return subprocess.Popen([sys.executable, "-m", "job", "run"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _completed_steps(out: Path) -> list[int]:
    found = (int(p.parent.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*/COMPLETED"))
    return sorted(found)


def _wait_for_checkpoint_after(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        newer = [s for s in _completed_steps(out) if s > step]
        if newer:
            return newer[0]
        assert proc.poll() is None, f"run exited early with {proc.returncode}"
        time.sleep(0.2)
    raise AssertionError(f"no COMPLETED checkpoint after step {step}")


def _interrupt(proc: subprocess.Popen, sig: int) -> tuple[int, float]:
    sent = time.monotonic()
    proc.send_signal(sig)
    return proc.wait(timeout=120), time.monotonic() - sent


def _losses(out: Path) -> dict[int, float]:
    state = json.loads((out / f"checkpoints/checkpoint-{STEPS}/trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


@pytest.fixture(scope="module")
def reference_run(tiny_assets, tmp_path_factory):
    """The uninterrupted run; it starts when the module does and overlaps the interrupted chain."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = _start(tmp, tiny_assets)
    yield tmp, proc
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def interrupted_chain(reference_run, tiny_assets, tmp_path_factory):
    """SIGTERM, then SIGKILL, then SIGTERM with a budget too small to save, then a final resume to the end."""
    tmp = tmp_path_factory.mktemp("chain")
    out, stages = tmp / "out", {}

    proc = _start(tmp, tiny_assets)
    _wait_for_checkpoint_after(out, 0, proc)
    stages["sigterm"] = (*_interrupt(proc, signal.SIGTERM), _completed_steps(out))

    proc = _start(tmp, tiny_assets)
    _wait_for_checkpoint_after(out, max(stages["sigterm"][2]), proc)
    stages["sigkill"] = (*_interrupt(proc, signal.SIGKILL), _completed_steps(out))

    proc = _start(tmp, tiny_assets, SFT_PREEMPT_GRACE_S="0.2")
    _wait_for_checkpoint_after(out, max(stages["sigkill"][2]), proc)
    time.sleep(0.3)  # mid-step
    before = _completed_steps(out)
    stages["overrun"] = (*_interrupt(proc, signal.SIGTERM), before, _completed_steps(out))

    proc = _start(tmp, tiny_assets)
    stages["final"] = (proc.wait(timeout=600),)
    return tmp, stages


def test_sigterm_saves_a_completed_checkpoint_and_exits_143(interrupted_chain):
    tmp, stages = interrupted_chain
    returncode, seconds, completed = stages["sigterm"]
    assert returncode == ExitCode.PREEMPTED and seconds < 60 + 5  # within SFT_PREEMPT_GRACE_S
    log = (tmp / "log.txt").read_text()
    stopped = int(log.split("preempted at step ")[1].split(":")[0])
    assert stopped in completed and stopped < STEPS  # the checkpoint at the step reached
    assert "preempted by SIGTERM" in log and "Traceback" not in log.split("preempted at step")[0][-2000:]


def test_a_save_that_cannot_fit_still_exits_143_and_keeps_the_previous_checkpoint(interrupted_chain):
    _, stages = interrupted_chain
    returncode, seconds, before, after = stages["overrun"]
    assert returncode == ExitCode.PREEMPTED and seconds < 30
    assert max(after) == max(before)  # no new COMPLETED checkpoint; the resume point is the previous one


def test_interrupted_chain_matches_the_uninterrupted_run(interrupted_chain, reference_run):
    tmp, stages = interrupted_chain
    ref_tmp, ref_proc = reference_run
    assert ref_proc.wait(timeout=600) == 0, (ref_tmp / "log.txt").read_text()[-3000:]
    assert stages["sigkill"][0] == -signal.SIGKILL
    assert stages["final"][0] == 0, (tmp / "log.txt").read_text()[-3000:]

    meta = json.loads((tmp / "out/training_meta.json").read_text())
    assert meta["global_step"] == STEPS and meta["resumed_from"]
    ref_losses, losses = _losses(ref_tmp / "out"), _losses(tmp / "out")
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in ref_losses.items():
        assert abs(losses[step] - loss) <= 1e-4, (step, losses[step], loss)
    ref_adapter = load_file(str(ref_tmp / "out/adapter/adapter_model.safetensors"))
    adapter = load_file(str(tmp / "out/adapter/adapter_model.safetensors"))
    assert set(adapter) == set(ref_adapter)
    assert all(adapter[k].dtype == torch.float32 for k in adapter)  # fp32 master weights (see keep_trainable_params_fp32)
    assert max((adapter[k] - ref_adapter[k]).abs().max().item() for k in adapter) <= 1e-5
    ref_metrics = json.loads((ref_tmp / "out/metrics.json").read_text())
    metrics = json.loads((tmp / "out/metrics.json").read_text())
    assert metrics["post"] == ref_metrics["post"] and metrics["pre"] == ref_metrics["pre"]


def test_preempted_runs_never_publish(interrupted_chain):
    tmp, _ = interrupted_chain
    log = (tmp / "log.txt").read_text()
    # only the final stage ran post-eval and saved the adapter
    assert log.count("post-eval:") == 1 and log.count("pre-eval:") == 1  # pre-eval reused on every resume


def test_wandb_keeps_one_run_id_across_resumes(interrupted_chain):
    tmp, _ = interrupted_chain
    runs = sorted(p.name for p in (tmp / "wandb").glob("offline-run-*"))
    assert len(runs) == 4  # one directory per process, all of them the same W&B run
    assert all(name.endswith("-chain-run") for name in runs), runs

"""Preemption and exact resume: SIGTERM -> COMPLETED checkpoint + exit 143; SIGKILL/SIGTERM/budget-overrun chains
resume to the same losses, weights and metrics as an uninterrupted run (real processes, tiny Qwen3-VL, CPU)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from runs_reference import REFERENCE, STEPS
from safetensors.torch import load_file
from transformers import TrainerControl

from job.errors import ExitCode, Preempted
from job.train.preemption import PreemptionCallback, PreemptionGuard


# -- the guard and the callback, in process ----------------------------------------------------------------------
def test_signal_outside_training_raises_preempted():
    guard = PreemptionGuard(grace_s=60)
    try:
        with pytest.raises(Preempted, match="SIGTERM"), guard:
            signal.raise_signal(signal.SIGTERM)  # the handler runs (and raises) before raise_signal returns
        assert guard.requested
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # on the way out, a second signal is ignored
    finally:
        guard.disarm()  # this test process must outlive the watchdog
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_signal_during_training_only_sets_the_flag():
    with PreemptionGuard(grace_s=60) as guard:
        guard.in_training = True
        signal.raise_signal(signal.SIGINT)  # the handler has run when raise_signal returns
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


@pytest.mark.slow
def test_watchdog_exits_143_when_the_budget_runs_out(run_forked):
    # The child prints when it signals itself (CLOCK_MONOTONIC is system-wide on Linux): the import before that
    # takes 3 s on a quiet machine and over 30 s on a busy one, and is not part of the budget.
    code = ("import os, signal, time\nfrom job.train.preemption import PreemptionGuard\n"
            "with PreemptionGuard(grace_s=0.5) as g:\n    g.in_training = True\n"
            "    print(time.monotonic(), flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(60)  # failsafe: the watchdog ends it long before\n")
    proc = run_forked(["-c", code], dict(os.environ), timeout=300)
    signalled = float(proc.stdout.split()[0])
    assert proc.returncode == ExitCode.PREEMPTED and time.monotonic() - signalled < 30
    assert "SFT_PREEMPT_GRACE_S=0.5 s elapsed" in proc.stderr


@pytest.mark.slow
def test_a_rank_that_fails_with_its_dataloader_workers_alive_still_exits(run_forked):
    # The workers ignore SIGTERM (a preemption is the rank's to handle), and multiprocessing ends daemonic children
    # at exit with SIGTERM and an unbounded join: a rank failing mid-step (its loader's iterator kept alive, here by
    # a global) hung at exit after reporting exit 2 (measured: the in-process row error of test_exit_codes held the
    # suite's zygote open). The job's loaders end them at exit instead (end_dataloader_workers).
    code = ("import sys, torch\nfrom job.train.preemption import leave_worker_signals_to_the_rank\n"
            "loader = torch.utils.data.DataLoader(list(range(64)), batch_size=2, num_workers=2)\n"
            "leave_worker_signals_to_the_rank(loader)\n"
            "batches = iter(loader)\nprint(next(batches).tolist(), flush=True)\n"
            "sys.exit(2)\n")
    proc = run_forked(["-c", code], dict(os.environ), timeout=120)
    assert (proc.returncode, proc.stdout) == (2, "[0, 1]\n"), proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr


# -- real runs (the shared reference run and interrupted chain: tests/runs.py) ----------------------------------
def _losses(out: Path) -> dict[int, float]:
    state = json.loads((out / f"checkpoints/checkpoint-{STEPS}/trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


@pytest.mark.slow
def test_sigterm_saves_a_completed_checkpoint_and_exits_143(interrupted_chain):
    returncode, _seconds, completed = interrupted_chain.stages["sigterm"]
    log = interrupted_chain.log
    # Within SFT_PREEMPT_GRACE_S by the job's own account: its watchdog (which would also exit 143) never fired. The
    # wall time from SIGTERM to exit is not asserted: on a busy machine the interpreter's shutdown alone varies.
    assert returncode == ExitCode.PREEMPTED and "elapsed before the checkpoint was" not in log.split("preempted at")[0]
    stopped = int(log.split("preempted at step ")[1].split(":")[0])
    assert stopped in completed and stopped < STEPS  # the checkpoint at the step reached
    assert "preempted by SIGTERM" in log and "Traceback" not in log.split("preempted at step")[0][-2000:]


@pytest.mark.slow
def test_a_save_that_cannot_fit_still_exits_143_and_keeps_the_previous_checkpoint(interrupted_chain):
    returncode, seconds, before, after = interrupted_chain.stages["overrun"]
    assert returncode == ExitCode.PREEMPTED and seconds < 30
    assert max(after) == max(before)  # no new COMPLETED checkpoint; the resume point is the previous one


@pytest.mark.slow
def test_interrupted_chain_matches_the_uninterrupted_run(interrupted_chain, reference_run):
    tmp, stages = interrupted_chain.tmp, interrupted_chain.stages
    ref_tmp = reference_run.tmp
    assert reference_run.returncode == 0, reference_run.log[-3000:]
    assert stages["sigkill"][0] == -signal.SIGKILL
    assert stages["final"][0] == 0, interrupted_chain.log[-3000:]

    meta = json.loads((tmp / "out/training_meta.json").read_text())
    assert meta["global_step"] == STEPS and meta["resumed_from"]
    ref_losses, losses = _losses(ref_tmp / "out"), _losses(tmp / "out")
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in ref_losses.items():
        assert abs(losses[step] - loss) <= 1e-4, (step, losses[step], loss)
    ref_adapter = load_file(str(ref_tmp / "out/adapter/adapter_model.safetensors"))
    adapter = load_file(str(tmp / "out/adapter/adapter_model.safetensors"))
    assert set(adapter) == set(ref_adapter)
    assert all(
        adapter[k].dtype == torch.float32 for k in adapter
    )  # fp32 master weights (see keep_trainable_params_fp32)
    assert max((adapter[k] - ref_adapter[k]).abs().max().item() for k in adapter) <= 1e-5
    ref_metrics = json.loads((ref_tmp / "out/metrics.json").read_text())
    metrics = json.loads((tmp / "out/metrics.json").read_text())
    assert metrics["post"] == ref_metrics["post"] and metrics["pre"] == ref_metrics["pre"]


@pytest.mark.slow
def test_preempted_runs_never_publish(interrupted_chain):
    log = interrupted_chain.log
    # only the final stage ran post-eval and saved the adapter
    assert log.count("post-eval:") == 1 and log.count("pre-eval:") == 1  # pre-eval reused on every resume


@pytest.mark.slow
def test_wandb_keeps_one_run_id_across_resumes(interrupted_chain):
    runs = sorted(p.name for p in (interrupted_chain.tmp / "wandb").glob("offline-run-*"))
    assert len(runs) == 4  # one directory per process, all of them the same W&B run
    assert all(name.endswith(f"-{REFERENCE['SFT_RUN_ID']}") for name in runs), runs

"""DDP on the CPU: `torchrun --nproc_per_node=2` (gloo) with 4-bit QLoRA on the tiny Qwen3-VL, as real processes.

The runs are shared (tests/runs.py): ddp_run, its single-process eval ddp_standalone_eval, and ddp_preempted_run.
"""

from __future__ import annotations

import json
import re

import pytest

from job.errors import ExitCode

pytestmark = pytest.mark.slow


def test_ddp_run_completes_with_one_checkpoint_set_and_one_adapter(ddp_run):
    tmp, returncode, log = ddp_run.tmp, ddp_run.returncode, ddp_run.log
    assert returncode == 0, log[-4000:]
    out = tmp / "out"
    assert "rank 0 of 2" in log and "rank 1 of 2" in log and "backend gloo" in log
    for step in (2, 4):
        ckpt = out / f"checkpoints/checkpoint-{step}"
        # one checkpoint per step, holding both ranks' RNG states: the set a resumed DDP run needs
        assert {"COMPLETED", "adapter_model.safetensors", "optimizer.pt", "rng_state_0.pth", "rng_state_1.pth"} <= {
            p.name for p in ckpt.iterdir()}
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "adapter/adapter_model.safetensors").is_file()
    meta = json.loads((out / "training_meta.json").read_text())
    assert meta["global_step"] == 4
    assert len(list((tmp / "wandb").glob("offline-run-*"))) == 1  # rank 0 only
    assert log.count("post-eval:") == 1 and log.count("pre-eval:") == 1  # eval runs on rank 0 only


def test_ddp_eval_equals_a_single_process_eval_of_the_same_adapter(ddp_run, ddp_standalone_eval):
    assert ddp_run.returncode == 0
    assert ddp_standalone_eval.returncode == 0, ddp_standalone_eval.log[-3000:]
    single = json.loads((ddp_standalone_eval.out / "eval/standalone_metrics.json").read_text())
    ddp = json.loads((ddp_run.out / "metrics.json").read_text())["post"]
    assert single == ddp


def test_sigterm_to_one_rank_stops_both_with_143(ddp_preempted_run):
    run = ddp_preempted_run
    assert len(run.ranks) == 2, run.log[-3000:]
    # torchrun itself exits 1 when any worker fails. Its summary names each failed worker's exit code, but torch 2.8
    # names only the first one to exit ({rank 1: 143}) where 2.14 names both: every code it names must be 143, and
    # each rank's own output (torchrun --log-dir) must show the CLI's exit on Preempted (ExitCode.PREEMPTED, 143).
    assert run.returncode == 1, run.log[-3000:]
    codes = {int(pid): int(code) for code, pid in re.findall(r"exitcode\s+:\s*(-?\d+) \(pid: (\d+)\)", run.log)}
    assert codes and set(codes) <= set(run.ranks) and set(codes.values()) == {ExitCode.PREEMPTED}, run.log[-3000:]
    stopped = set()
    for rank, log in run.rank_logs.items():
        steps = re.findall(r"qwen3-sft: error: preempted by SIGTERM at step (\d+)", log)
        assert len(steps) == 1, (rank, log[-3000:])
        stopped.add(int(steps[0]))
    assert len(stopped) == 1, stopped  # both ranks stopped at the same step
    step = stopped.pop()
    assert f"preempted at step {step}: checkpoint-{step} is COMPLETED" in run.log
    assert (run.tmp / f"out/checkpoints/checkpoint-{step}/COMPLETED").is_file()
    assert not (run.tmp / "out/adapter").exists()

"""DDP on the CPU: `qwen3-sft run` with SFT_NPROC_PER_NODE=2 launches 2 gloo workers (torch's elastic launcher) with
4-bit QLoRA on the tiny Qwen3-VL, as real processes, and exits with the first failing rank's code.

The runs are shared (tests/runs.py): ddp_run (its gate refuses: exit 4), its single-process eval ddp_standalone_eval,
ddp_preempted_run (SIGTERM to the launcher) and ddp_bad_row_run (exit 2 in preflight).
"""

from __future__ import annotations

import json
import re

import pytest

from job.errors import ExitCode

pytestmark = pytest.mark.slow


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("qwen3-sft: ")]


def test_ddp_run_completes_with_one_checkpoint_set_and_one_adapter(ddp_run):
    tmp, returncode, log = ddp_run.tmp, ddp_run.returncode, ddp_run.log
    # The gate refuses after the artifacts are saved: the launcher exits with the ranks' 4, not torchrun's 1.
    assert returncode == ExitCode.GATE_REFUSED, log[-4000:]
    out = tmp / "out"
    assert "launching 2 worker(s)" in log
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
    assert json.loads((out / "metrics.json").read_text())["gate"]["passed"] is False
    assert len(list((tmp / "wandb").glob("offline-run-*"))) == 1  # rank 0 only
    assert log.count("post-eval:") == 1 and log.count("pre-eval:") == 1  # eval runs on rank 0 only
    # Eval during training (SFT_EVAL_STEPS=2) on rank 0 only; the best-so-far is in rank 0's checkpoints.
    assert log.count("eval at step 2 on ") == 1 and log.count("eval at step 4 on ") == 1
    best = json.loads((out / "metrics.json").read_text())["best"]
    assert [e["step"] for e in best["history"]] == [2, 4]
    assert (out / "checkpoints/checkpoint-4/best/best.json").is_file()
    # rank 0's gate message, once: rank 1 (which exits 4 with it) and the launcher's torch elastic stay quiet
    lines = error_lines(log)
    assert len(lines) == 1 and "macro_f1" in lines[0], lines
    assert "Traceback" not in log and "ChildFailedError" not in log


def test_ddp_eval_equals_a_single_process_eval_of_the_same_adapter(ddp_run, ddp_standalone_eval):
    assert ddp_run.returncode == ExitCode.GATE_REFUSED
    assert ddp_standalone_eval.returncode == 0, ddp_standalone_eval.log[-3000:]
    single = json.loads((ddp_standalone_eval.out / "eval/standalone_metrics.json").read_text())
    ddp = json.loads((ddp_run.out / "metrics.json").read_text())["post"]
    assert single == ddp


def test_sigterm_to_the_launcher_checkpoints_on_every_rank_and_exits_143(ddp_preempted_run):
    run = ddp_preempted_run
    log = run.log
    assert run.returncode == ExitCode.PREEMPTED, log[-3000:]
    # both ranks stopped at the same step, whose checkpoint is COMPLETED; no adapter (no post-eval, no save)
    stopped = {int(s) for s in re.findall(r"preempted at step (\d+): checkpoint-\d+ is COMPLETED", log)}
    assert len(stopped) == 1, log[-3000:]
    step = stopped.pop()
    assert (run.tmp / f"out/checkpoints/checkpoint-{step}/COMPLETED").is_file()
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in (run.tmp / f"out/checkpoints/checkpoint-{step}")
                                                      .iterdir()}
    assert not (run.tmp / "out/adapter").exists()
    lines = error_lines(log)
    assert lines == [f"qwen3-sft: error: preempted by SIGTERM at step {step}; rerun with the same SFT_RUN_ID to "
                     "resume from the newest COMPLETED checkpoint"], lines


def test_a_bad_row_under_the_launcher_is_exit_2_naming_the_row_once(ddp_bad_row_run):
    log = ddp_bad_row_run.log
    assert ddp_bad_row_run.returncode == ExitCode.USER, log[-3000:]
    assert "launching 2 worker(s)" in log
    lines = error_lines(log)
    assert len(lines) == 1 and lines[0].startswith("qwen3-sft: error: preflight failed: 1 bad row(s)"), lines
    assert log.count("train.jsonl:1: field 'query' is empty") == 1, log[-3000:]
    assert "Traceback" not in log and "loading model weights" not in log

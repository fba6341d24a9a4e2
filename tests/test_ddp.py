"""DDP on the CPU: `torchrun --nproc_per_node=2` (gloo) with 4-bit QLoRA on the tiny Qwen3-VL, as real processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, job_env, run_job

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "job", "run"]
DDP = dict(SFT_MAX_STEPS="4", SFT_SAVE_STEPS="2", SFT_EVAL_SUBSET="4", OMP_NUM_THREADS="1")


def _torchrun(tmp: Path, tiny_assets, **overrides) -> subprocess.Popen:
    env = job_env(tmp, tiny_assets, **{**DDP, **overrides})
    return subprocess.Popen(TORCHRUN, env=env, cwd=REPO, stdout=open(tmp / "log.txt", "w"), stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def ddp_run(tiny_assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    proc = _torchrun(tmp, tiny_assets)
    returncode = proc.wait(timeout=600)
    return tmp, returncode, (tmp / "log.txt").read_text(errors="replace")


def test_ddp_run_completes_with_one_checkpoint_set_and_one_adapter(ddp_run):
    tmp, returncode, log = ddp_run
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


def test_ddp_eval_equals_a_single_process_eval_of_the_same_adapter(ddp_run, tiny_assets):
    tmp, returncode, _ = ddp_run
    assert returncode == 0
    env = job_env(tmp, tiny_assets, **DDP, SFT_EVAL_ADAPTER=str(tmp / "out/adapter"))
    proc = run_job(["eval"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads((tmp / "out/eval/standalone_metrics.json").read_text())
    ddp = json.loads((tmp / "out/metrics.json").read_text())["post"]
    assert single == ddp


def test_sigterm_to_one_rank_stops_both_with_143(tiny_assets, tmp_path):
    proc = _torchrun(tmp_path, tiny_assets, SFT_MAX_STEPS="40")
    done = tmp_path / "out/checkpoints/checkpoint-2/COMPLETED"
    deadline = time.monotonic() + 300
    while not done.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
        time.sleep(0.2)
    ranks = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                text=True).stdout.split()]
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGTERM)
    proc.wait(timeout=120)
    log = (tmp_path / "log.txt").read_text(errors="replace")
    # torchrun itself exits 1 when any worker fails; each worker's own exit code is in its failure report
    codes = {int(pid): int(code) for code, pid in re.findall(r"exitcode\s+:\s*(-?\d+) \(pid: (\d+)\)", log)}
    assert codes == {ranks[0]: 143, ranks[1]: 143}, log[-3000:]
    stopped = {int(s) for s in re.findall(r"preempted at step (\d+): checkpoint-\d+ is COMPLETED", log)}
    assert len(stopped) == 1, log[-3000:]  # both ranks stopped at the same step
    step = stopped.pop()
    assert (tmp_path / f"out/checkpoints/checkpoint-{step}/COMPLETED").is_file()
    assert not (tmp_path / "out/adapter").exists()

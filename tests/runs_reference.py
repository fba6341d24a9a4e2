"""The shared single-process runs on REFERENCE's settings (tests/runs.py), and the rerun chain.

reference_run (uninterrupted), interrupted_chain, pre_eval_off_run, resumed_from_an_incomplete_checkpoint,
adapter_reload, s3_resume_run and rerun_chain: what each leaves behind is in tests/runs.py's docstring.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import REPO, job_env
from runs_processes import DEADLINE_S, Run, completed_steps, log_has, wait_until, zygote_env
from runs_scheduler import Ctx
from s3_proxy import AWS_ENV, FaultProxy, s3_client

from job.storage import s3 as s3io

STEPS = 6
# PYTHONWARNINGS=default prints every warning once per location, library DeprecationWarnings included, so the logs
# show any warning at all (tests/utils/test_warnings.py reads the reference run's).
# Two dataloader workers, gradient accumulation and LoRA dropout: every resume below must restore the sampler, the
# partial accumulation window and the RNG streams of the workers and of dropout, or it does not end where this ends.
REFERENCE = dict(SFT_MAX_STEPS=str(STEPS), SFT_SAVE_STEPS="2", SFT_EVAL_SUBSET="4", SFT_SAVE_TOTAL_LIMIT="10",
                 SFT_PREEMPT_GRACE_S="60", SFT_RUN_ID="test-run", SFT_BAD_ROWS="skip", SFT_MAX_BAD_FRACTION="0.1",
                 SFT_DATALOADER_NUM_WORKERS="2", SFT_PER_DEVICE_BATCH_SIZE="1", SFT_GRAD_ACCUM="2",
                 SFT_LORA_DROPOUT="0.1", PYTHONWARNINGS="default")
# SFT_PER_DEVICE_BATCH_SIZE=auto with REFERENCE's effective batch (2 x SFT_GRAD_ACCUM=1 = 2 rows per optimizer step),
# under tests/ceiling.py's memory ceiling: one row of the tiny data (at most 116 tokens) fits, the sampler's first
# batch of two does not, so the search picks REFERENCE's hand-set batch, 1 row x 2 accumulation. The runs below that
# use it must train exactly as the reference run does (auto changes the speed, never the result).
AUTO = dict(SFT_PER_DEVICE_BATCH_SIZE="auto", SFT_GRAD_ACCUM="1", TEST_TOKEN_CEILING="150")
CEILING = [str(REPO / "tests" / "ceiling.py"), "run"]  # the job under the ceiling (`python tests/ceiling.py run`)
NO_WANDB = dict(SFT_WANDB_ENABLED="false")  # for runs whose W&B files no test reads (W&B's service costs CPU)
SECRET = "hf_TESTSECRET_do_not_leak_123"
WANDB_SECRET = "wandbkey_TESTSECRET_0123456789"
CHECKPOINT_BUCKET = "shared-runs"
BAD_ROW = {"id": "bad-empty-query", "image": "images/train-00000.png", "query": " ", "caption": None,
           "target_json": '{"label": "sarcastic"}'}


def reference_env(ctx: Ctx, tmp: Path, **overrides: str) -> dict[str, str]:
    """REFERENCE's settings, secrets and data (tests/runs.py's docstring) for a job writing under `tmp`."""
    return dict(REFERENCE, HF_TOKEN=SECRET, WANDB_API_KEY=WANDB_SECRET,
                SFT_DATASET_URI=str(ctx.launcher.result("data_with_one_bad_row")), **overrides)


def data_with_one_bad_row(ctx: Ctx) -> Path:
    """31 rows of the tiny data plus one whose query is blank (32 rows: SFT_TRAIN_SUBSET=32 keeps them all)."""
    data_dir, dest = ctx.tiny_assets[1], ctx.tmp / "data"
    dest.mkdir()
    shutil.copytree(data_dir / "images", dest / "images")
    (dest / "validation.jsonl").write_text((data_dir / "validation.jsonl").read_text())
    rows = (data_dir / "train.jsonl").read_text().splitlines(keepends=True)[:31]
    (dest / "train.jsonl").write_text(json.dumps(BAD_ROW) + "\n" + "".join(rows))
    return dest


def reference_run(ctx: Ctx) -> Run:
    # A fresh interpreter: `python -m job run` itself, and PYTHONWARNINGS applies from the first import.
    return ctx.job(ctx.tmp, fresh=True, **reference_env(ctx, ctx.tmp))


@dataclass
class Chain:
    tmp: Path
    stages: dict[str, tuple] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    @property
    def log(self) -> str:
        return (self.tmp / "log.txt").read_text(errors="replace")


def interrupted_chain(ctx: Ctx) -> Chain:
    """REFERENCE's run with AUTO's micro-batch search (under the ceiling in the first stage only), stopped three
    times, then resumed to the end (stages: (exit code, seconds to exit, ...)):
    - sigterm: SIGTERM once checkpoint-2 is COMPLETED: a preemption save at the step reached, exit 143;
    - sigkill: SIGKILL in the middle of the step after the log line of step KILL_AFTER (at least 5, after the
      resume point): it resumes from the regular save before it;
    - overrun: SIGTERM in the middle of a step with SFT_PREEMPT_GRACE_S=0.2, too short to save: exit 143 and no new
      checkpoint;
    - final: a resume to the end."""
    chain = Chain(ctx.tmp)
    out, log = chain.out, ctx.tmp / "log.txt"

    def stage(argv: list[str] | None = None, **overrides: str):
        env = job_env(ctx.tmp, ctx.tiny_assets, ctx.environ, **reference_env(ctx, ctx.tmp, **AUTO, **overrides))
        return ctx.start(ctx.tmp, env, argv)

    def newer_checkpoint(after: int, proc) -> int:
        return wait_until(lambda: [s for s in completed_steps(out) if s > after], proc,
                          f"a COMPLETED checkpoint after step {after}")[0]

    def interrupt(proc, sig: int) -> tuple[int, float]:
        sent = time.monotonic()
        proc.send_signal(sig)
        return proc.wait(timeout=120), time.monotonic() - sent

    with ctx.slots.hold(ctx.priority):
        proc = stage(CEILING)  # the search runs here, under the ceiling; the later stages take its choice from the
        newer_checkpoint(0, proc)  # checkpoint they resume (without the ceiling, a new search would pick 2 rows)
        chain.stages["sigterm"] = (*interrupt(proc, signal.SIGTERM), completed_steps(out))

    with ctx.slots.hold(ctx.priority):
        kill_after = max(5, max(chain.stages["sigterm"][2]) + 1)
        offset = log.stat().st_size
        proc = stage()
        wait_until(log_has(log, rf"step {kill_after}/{STEPS} ", offset), proc, f"the log line of step {kill_after}")
        chain.stages["sigkill"] = (*interrupt(proc, signal.SIGKILL), completed_steps(out), kill_after)

    with ctx.slots.hold(ctx.priority):
        resume_point = max(chain.stages["sigkill"][2])
        offset = log.stat().st_size
        proc = stage(SFT_PREEMPT_GRACE_S="0.2")
        # Mid-step: the line of the first step this process trains is logged when that step has ended, so the
        # signal lands in the next one (at most STEPS: the resume point is <= STEPS - 2), before its save.
        wait_until(log_has(log, rf"step {resume_point + 1}/{STEPS} ", offset), proc, f"step {resume_point + 1}")
        before = completed_steps(out)
        chain.stages["overrun"] = (*interrupt(proc, signal.SIGTERM), before, completed_steps(out))

    with ctx.slots.hold(ctx.priority):
        chain.stages["final"] = (stage().wait(timeout=DEADLINE_S),)
    return chain


def pre_eval_off_run(ctx: Ctx) -> Run:
    ctx.launcher.result("checkpoint_bucket")
    return ctx.job(ctx.tmp, CEILING, **reference_env(
        ctx, ctx.tmp, **NO_WANDB, **AUTO, SFT_EVAL_PRE="false", SFT_CHECKPOINT_URI=f"s3://{CHECKPOINT_BUCKET}/runs",
        SFT_PUSH_MIN_METRIC="macro_f1:0.99", AWS_ENDPOINT_URL=ctx.s3, **AWS_ENV))


def resumed_from_an_incomplete_checkpoint(ctx: Ctx) -> Run:
    reference = ctx.result("reference_run")
    shutil.copytree(reference.out, ctx.tmp / "out")
    (ctx.tmp / f"out/checkpoints/checkpoint-{STEPS}/COMPLETED").unlink()  # as if the pod died writing it
    return ctx.job(ctx.tmp, **reference_env(ctx, ctx.tmp, **NO_WANDB))


RELOAD = """
import sys, torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration
from job.collators.qwen3_collator import Qwen3VisionSFTCollator
from job.data.loaders import load_local_split
adapter, model_dir, data_dir = sys.argv[1:]
base = Qwen3VLForConditionalGeneration.from_pretrained(model_dir)
model = PeftModel.from_pretrained(base, adapter).eval()
saved = load_file(adapter + "/adapter_model.safetensors")
state = model.state_dict()
for key, value in saved.items():
    live = key.replace(".weight", ".default.weight")
    assert torch.equal(state[live].float(), value.float()), key
processor = AutoProcessor.from_pretrained(adapter, min_pixels=4096, max_pixels=16384)
rows = [load_local_split(data_dir, "validation")[0]]
batch = Qwen3VisionSFTCollator(processor)(rows)
with torch.no_grad():
    loss = model(**batch).loss
assert torch.isfinite(loss), loss
print("RELOAD_OK", len(saved), float(loss))
"""


def adapter_reload(ctx: Ctx) -> subprocess.CompletedProcess:
    reference = ctx.result("reference_run")
    argv = ["-c", RELOAD, str(reference.out / "adapter"), *map(str, ctx.tiny_assets)]
    with ctx.slots.hold(ctx.priority):
        return ctx.zygote.run(argv, zygote_env(ctx.environ), ctx.tmp)


@dataclass
class S3Resume:
    tmp: Path
    bucket: str
    run_id: str
    pod1_code: int
    pod1_completed: list[int]  # pod1's local COMPLETED checkpoints when it was killed
    pod2: Run
    faults: dict[str, int]  # what the proxy did: forwarded, reset, slowdown


HELD_CHECKPOINT = 4


def s3_resume_run(ctx: Ctx) -> S3Resume:
    """REFERENCE's run with its data and checkpoints in S3, reached through a proxy that fails one request in five
    (resets and 503 SlowDown) and holds the upload of checkpoint-4. pod1 is SIGKILLed while that upload is held (the
    store then has checkpoint-2 COMPLETED and checkpoint-4 incomplete); pod2 starts on an empty disk, restores
    checkpoint-2 from the store and finishes. Training is REFERENCE's, so pod2 must end exactly where the reference
    run ends."""
    bucket = "s3-resume"
    s3 = s3_client(ctx.s3)
    s3.create_bucket(Bucket=bucket)
    s3io.upload_dir(s3, ctx.result("data_with_one_bad_row"), s3io.S3Uri(bucket, "data"))
    proxy = FaultProxy(int(ctx.s3.rsplit(":", 1)[1]), rate=0.2, seed=7)

    def env(pod: Path) -> dict[str, str]:
        storage = dict(SFT_DATASET_URI=f"s3://{bucket}/data", SFT_CHECKPOINT_URI=f"s3://{bucket}/runs",
                       SFT_CACHE_DIR=str(pod / "cache"), AWS_ENDPOINT_URL=proxy.url, **AWS_ENV)
        return {**reference_env(ctx, pod, **NO_WANDB), **storage}

    try:
        proxy.hold(f"/checkpoint-{HELD_CHECKPOINT}/")
        pod1 = ctx.tmp / "pod1"
        with ctx.slots.hold(ctx.priority):
            proc = ctx.start(pod1, job_env(pod1, ctx.tiny_assets, ctx.environ, **env(pod1)))
            wait_until(proxy.held.is_set, proc, f"the upload of checkpoint-{HELD_CHECKPOINT}")
            proc.send_signal(signal.SIGKILL)
            pod1_code = proc.wait(timeout=60)
        pod1_completed = completed_steps(pod1 / "out")
        proxy.release()
        pod2 = ctx.tmp / "pod2"
        done = ctx.job(pod2, **env(pod2))
    finally:
        proxy.close()
    return S3Resume(ctx.tmp, bucket, REFERENCE["SFT_RUN_ID"], pod1_code, pod1_completed, done, dict(proxy.counts))


RERUN = dict(SFT_MAX_STEPS="2", SFT_SAVE_STEPS="2", SFT_EVAL_SUBSET="2", SFT_WANDB_ENABLED="false", SFT_RUN_ID="rerun")
GATE = dict(SFT_PUSH_MIN_METRIC="macro_f1:0.99")  # the tiny model scores 0: the gate refuses (exit 4)


def checkpoint_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "checkpoints").rglob("*")) if p.is_file()}


@dataclass
class Rerun:
    tmp: Path
    env: dict[str, str]  # the first run's (RERUN and GATE)
    stages: dict[str, Any]


def rerun_chain(ctx: Ctx) -> Rerun:
    """A 2-step run whose gate refuses (first), the same command again (again), a rerun without the gate after
    post-eval and the save were lost (lost_outputs), then once more (published). Each stage's CompletedProcess, and
    the files the later stages must leave alone (*_files, first_adapter, first_metrics). Then the A/B case in `ab/`:
    run B's first pod SIGKILLed after its checkpoint-2 (b_killed: its exit code), and its retry (b_retry)."""
    out = ctx.tmp / "out"
    env = job_env(ctx.tmp, ctx.tiny_assets, ctx.environ, **RERUN, **GATE)
    no_gate = job_env(ctx.tmp, ctx.tiny_assets, ctx.environ, **RERUN)

    def stage(name: str, env: dict[str, str]) -> None:
        with ctx.slots.hold(ctx.priority):
            stages[name] = ctx.zygote.run(["-m", "job", "run"], env, ctx.tmp / name)

    stages: dict[str, Any] = {}
    stage("first", env)
    stages["first_files"] = checkpoint_files(out)
    stages["first_adapter"] = (out / "adapter/adapter_model.safetensors").read_bytes()
    stages["first_metrics"] = json.loads((out / "metrics.json").read_text())
    stage("again", env)
    stages["again_files"] = checkpoint_files(out)
    shutil.rmtree(out / "adapter")  # the pod died after training, before post-eval and the save finished
    (out / "metrics.json").unlink()
    stage("lost_outputs", no_gate)
    stage("published", no_gate)
    # The A/B case, on a copy of the finished run ("rerun" is A): run B, another run id and learning rate with
    # SFT_RESUME=never in one launch, is SIGKILLed once its last checkpoint is COMPLETED, then retried (same launch).
    ab = ctx.tmp / "ab"
    shutil.copytree(out, ab / "out")
    b_env = job_env(ab, ctx.tiny_assets, ctx.environ, **{**RERUN, "SFT_RUN_ID": "run-b", "SFT_LEARNING_RATE": "1e-3",
                                                          "SFT_RESUME": "never", "SFT_LAUNCH_ID": "launch-b"})
    with ctx.slots.hold(ctx.priority):
        proc = ctx.start(ab / "b_killed", b_env)
        # B's own checkpoint: A's (with it, everything of A) is moved aside before B trains.
        wait_until(lambda: list((ab / "out").glob("replaced-*")) and completed_steps(ab / "out") == [2], proc,
                   "B's checkpoint-2")
        proc.send_signal(signal.SIGKILL)
        stages["b_killed"] = proc.wait(timeout=60)
    stages["b_saved_before_the_kill"] = (ab / "out/run_stamp.json").is_file()
    stage("b_retry", b_env)
    return Rerun(ctx.tmp, env, stages)


def checkpoint_bucket(ctx: Ctx) -> str:
    s3_client(ctx.s3).create_bucket(Bucket=CHECKPOINT_BUCKET)
    return CHECKPOINT_BUCKET

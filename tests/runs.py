"""Shared job runs for the slow tier: a pytest plugin (conftest.py loads it), so every test module can use them.

Each kind of job run happens at most once per session, and only when a selected test needs it. When the session
starts, every run the selected tests need is launched in the background (`_launch_needed_runs`), while the in-process
tests run first; then come the slow tests that need no shared run, then the others in the order their runs are
scheduled (`pytest_collection_modifyitems`). At most `slots` job processes run at a time (TEST_JOB_SLOTS, default:
the CPUs pytest may use), the longest chain of dependent processes first. A test then asks for the run by fixture
name and reads its outputs; many assertions share one run.

Job processes are forked by the zygote (tests/zygote.py: one interpreter that has imported the job, which saves
11-14 CPU-s of imports per process on 2 cores); each is still its own process with its own environment, signals and
exit code. A whole-suite session starts the zygote before collection (pytest_configure), so that its imports overlap
collection's. Fresh interpreters: the reference run (`python -m job run` itself, PYTHONWARNINGS from the first import),
the DDP workers (the launcher, forked, starts them as torchrun would), and the tests that need an environment read
at import time (HF_ENDPOINT). `run_forked` runs a one-off process the same way. At the end of the session, the
terminal summary says when each run finished and the CPU seconds each folder's forked processes used.

To reuse a run in a new test, request its fixture and read its files; never change them (copy the directory first,
as the `resumed_from_an_incomplete_checkpoint` run does). Every run writes its console output to `tmp/log.txt`, its
outputs to `tmp/out` and W&B's offline files to `tmp/wandb`. To add a kind: write a driver `def _name(ctx) -> result`,
register it in KINDS with its priority and the kinds it reads, and add a one-line fixture.

The runs (fixture -> what it returns):
- reference_run -> Run: the uninterrupted run: REFERENCE (STEPS=6 steps of 2 rows, one per micro-batch with gradient
  accumulation 2, two dataloader workers, LoRA dropout 0.1, a COMPLETED checkpoint every 2, pre- and post-eval,
  logging every step) on the tiny data plus one blank-query row that SFT_BAD_ROWS=skip drops, with HF_TOKEN and
  WANDB_API_KEY set to known secrets (SECRET, WANDB_SECRET). Exit 0.
- interrupted_chain -> Chain: the same configuration stopped by SIGTERM (a preemption save), then by SIGKILL in the
  middle of a step, then by a SIGTERM whose save cannot fit (SFT_PREEMPT_GRACE_S=0.2), then resumed to the end;
  `stages` holds what each stage returned (its driver's docstring).
- pre_eval_off_run -> Run: the reference run with SFT_EVAL_PRE=false, checkpoints in S3 (CHECKPOINT_BUCKET, run id
  REFERENCE's) and a gate that refuses (SFT_PUSH_MIN_METRIC=macro_f1:0.99): exit 4, training identical to the reference.
- resumed_from_an_incomplete_checkpoint -> Run: a copy of the reference run whose last checkpoint lost its COMPLETED
  marker, rerun with the same settings (it resumes from checkpoint-STEPS-2 and trains to STEPS).
- adapter_reload -> CompletedProcess: a separate Python process loads the reference adapter on the base model and
  runs one forward pass (prints RELOAD_OK).
- s3_resume_run -> S3Resume: REFERENCE with data and checkpoints in S3 behind a proxy that fails 20% of requests;
  pod1 is SIGKILLed while its checkpoint-4 upload is held, pod2 (an empty disk, the same SFT_RUN_ID) restores
  checkpoint-2 from the store and finishes exactly like the reference run.
- rerun_chain -> Rerun: a 2-step run whose gate refuses, then the same command again, a rerun after its adapter and
  metrics were lost, and once more (the re-run tests of tests/train/test_rerun.py); then, on a copy of its directory,
  another run (SFT_RESUME=never, SFT_LAUNCH_ID) SIGKILLed after its last checkpoint and retried.
- ddp_run -> Run: `qwen3-sft run` with SFT_NPROC_PER_NODE=2 (the launcher, 2 gloo workers), 4 steps, a gate that
  refuses: exit 4. ddp_standalone_eval -> Run: `qwen3-sft eval` of its adapter in a single process.
- ddp_preempted_run -> DDPPreempted: the launcher with 40 steps and 2 dataloader workers per rank, SIGTERMed once
  checkpoint-2 is COMPLETED.
- ddp_bad_row_run -> Run: the launcher on data_with_one_bad_row with SFT_BAD_ROWS=fail: exit 2 in preflight.
- two_node_run -> Nodes: two `qwen3-sft run` launchers on loopback as a PyTorchJob starts them (PET_NNODES=2,
  PET_NODE_RANK, MASTER_ADDR/MASTER_PORT, one gloo worker each, separate empty output dirs, one moto store), TWO_NODES
  (SFT_EVAL_STEPS = SFT_SAVE_STEPS = 2), uninterrupted. two_node_chain -> {stage: Nodes}: the same, both nodes killed
  while checkpoint-4 uploads (killed), two fresh nodes SIGTERMed on node 1 only (sigterm_one), two fresh nodes to the
  end (final). two_node_user_error -> Nodes: node 1's SFT_OUTPUT_DIR is a file (exit 2 before any weights load).
- colour_run -> Run: an imbalanced 5-class colour task (COLOUR_TRAIN, COLOUR_EVAL) with SFT_EVAL_STEPS=2 over
  COLOUR_STEPS steps: eval during training and the best step's adapter. colour_resumed -> Chain: the same run
  SIGTERMed in its first eval step or the one after, then resumed to the end.
- benchmark_outputs -> {name: CompletedProcess}: benchmarks/*.py in their quick/dry-run modes (BENCHMARKS).
- s3_endpoint -> str: moto's S3 server, a separate process on 127.0.0.1 (AWS_ENV credentials, also set in os.environ).
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from helpers import REPO, job_env, noise_image
from PIL import Image
from s3_proxy import AWS_ENV, FaultProxy

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
NO_WANDB = dict(SFT_WANDB_ENABLED="false")  # for runs whose W&B files no test reads (W&B's service costs CPU)
SECRET = "hf_TESTSECRET_do_not_leak_123"
WANDB_SECRET = "wandbkey_TESTSECRET_0123456789"
CHECKPOINT_BUCKET = "shared-runs"
BAD_ROW = {"id": "bad-empty-query", "image": "images/train-00000.png", "query": " ", "caption": None,
           "target_json": '{"label": "sarcastic"}'}
# `qwen3-sft run` launching 2 workers (gloo): the launcher is forked, its workers are fresh interpreters
DDP = dict(SFT_NPROC_PER_NODE="2", SFT_MAX_STEPS="4", SFT_SAVE_STEPS="2", SFT_EVAL_SUBSET="4")
DEADLINE_S = 600  # a failsafe only: every wait below ends on an event (a file, a log line, an exit)


# -- processes -----------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """A finished job process (or torchrun): its directory, environment, exit code and console output."""

    tmp: Path
    env: dict[str, str]
    returncode: int

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    @property
    def log(self) -> str:
        return (self.tmp / "log.txt").read_text(errors="replace")


class Forked:
    """A job process forked by the zygote (tests/zygote.py), with the part of subprocess.Popen's interface we use."""

    def __init__(self, pid: int, exit_code: Future):
        self.pid, self._exit = pid, exit_code

    @property
    def returncode(self) -> int | None:
        return self._exit.result() if self._exit.done() else None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        return self._exit.result(timeout=timeout)

    def send_signal(self, sig: int) -> None:
        if not self._exit.done():  # never signal a pid that may already belong to another process
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """tests/zygote.py: one interpreter that has imported the job forks every job process (its docstring says why)."""

    def __init__(self, env: dict[str, str]):
        # `python tests/zygote.py` puts tests/ first on sys.path, not the checkout: PYTHONPATH puts REPO before the
        # package the venv's editable install points at (another checkout's, when a worktree shares the venv).
        env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH"))))}
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests/zygote.py")], env=env, cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._lock, self._forked = threading.Lock(), threading.Condition()
        self._pids: list[int] = []
        self._exits: dict[int, Future] = {}
        self._where: dict[int, Path] = {}
        self.cpu_s: dict[Path, float] = {}  # the folder of each forked process's output -> its CPU seconds
        threading.Thread(target=self._read, name="zygote", daemon=True).start()

    def _exit_of(self, pid: int) -> Future:
        with self._forked:
            return self._exits.setdefault(pid, Future())

    def _read(self) -> None:
        for line in self.proc.stdout:
            message = json.loads(line)
            if "pid" in message:
                with self._forked:
                    self._pids.append(message["pid"])
                    self._forked.notify_all()
            else:
                self.cpu_s[self._where.get(message["exited"], Path("?"))] = message["cpu_s"]
                self._exit_of(message["exited"]).set_result(message["code"])
        with self._forked:  # the zygote is gone: nothing it forked will be reported any more
            self._pids.append(-1)
            self._forked.notify_all()
            for future in self._exits.values():
                if not future.done():
                    future.set_exception(RuntimeError(f"the zygote exited with {self.proc.wait()}"))

    def fork(self, argv: list[str], env: dict[str, str], stdout: Path, stderr: Path) -> Forked:
        """Start `python *argv` (argv after the interpreter's name) as a child of the zygote."""
        request = dict(argv=argv, env=env, cwd=str(REPO), stdout=str(stdout), stderr=str(stderr))
        with self._lock:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            with self._forked:
                if not self._forked.wait_for(lambda: self._pids, timeout=DEADLINE_S):
                    raise RuntimeError(f"the zygote did not fork within {DEADLINE_S} s")
                pid = self._pids.pop(0)
        if pid < 0:
            raise RuntimeError(f"the zygote exited with {self.proc.wait()}")
        self._where[pid] = stdout.parent
        return Forked(pid, self._exit_of(pid))

    def run(self, argv: list[str], env: dict[str, str], tmp: Path, timeout: float = DEADLINE_S
            ) -> subprocess.CompletedProcess:
        """subprocess.run(capture_output=True, text=True) of `python *argv`: its stdout and stderr in tmp/."""
        tmp.mkdir(parents=True, exist_ok=True)
        stdout, stderr = tmp / "stdout.txt", tmp / "stderr.txt"
        returncode = self.fork(argv, env, stdout, stderr).wait(timeout=timeout)
        return subprocess.CompletedProcess([sys.executable, *argv], returncode, stdout.read_text(errors="replace"),
                                           stderr.read_text(errors="replace"))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def zygote_env(environ: dict[str, str]) -> dict[str, str]:
    """What the zygote imports under: the environment every forked job run shares (job_env sets the same values)."""
    env = {k: v for k, v in environ.items() if not k.startswith("SFT_")}
    return {**env, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def start(tmp: Path, env: dict[str, str], argv: list[str] | None = None, zygote: Zygote | None = None):
    """Start `python -m job run` (or `python *argv`) with its output appended to tmp/log.txt: forked by `zygote`
    when one is given, else a fresh interpreter."""
    tmp.mkdir(parents=True, exist_ok=True)
    argv = argv or ["-m", "job", "run"]
    if zygote is not None:
        return zygote.fork(argv, env, tmp / "log.txt", tmp / "log.txt")
    with open(tmp / "log.txt", "a") as log:
        return subprocess.Popen([sys.executable, *argv], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def wait_until(ready: Callable[[], Any], proc: subprocess.Popen | None, what: str, timeout: float = DEADLINE_S):
    """Poll `ready()` until it returns something truthy; fail if `proc` exits first (or the failsafe deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = ready()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before {what}")
        time.sleep(0.2)  # failsafe poll interval
    raise AssertionError(f"no {what} within {timeout:.0f} s")


def completed_steps(out: Path) -> list[int]:
    """Steps of the local checkpoints that have their COMPLETED marker."""
    return sorted(int(p.parent.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*/COMPLETED"))


def log_has(path: Path, pattern: str, offset: int = 0) -> Callable[[], bool]:
    """For wait_until: whether `pattern` (a regex) is in the file after byte `offset`."""
    def found() -> bool:
        with open(path, "rb") as f:
            f.seek(offset)
            return re.search(pattern, f.read().decode(errors="replace"), re.M) is not None
    return found


# -- the scheduler -------------------------------------------------------------------------------------------------
class Slots:
    """At most `n` job processes at once; waiters are served by priority (lower first), then by arrival."""

    def __init__(self, n: int):
        self.n, self._free, self._waiting = n, n, []
        self._cv, self._order = threading.Condition(), itertools.count()

    @contextmanager
    def hold(self, priority: int, count: int = 1):
        count, ticket = min(count, self.n), (priority, next(self._order))
        with self._cv:
            heapq.heappush(self._waiting, ticket)
            self._cv.wait_for(lambda: self._waiting[0] == ticket and self._free >= count)
            heapq.heappop(self._waiting)
            self._free -= count
            self._cv.notify_all()
        try:
            yield
        finally:
            with self._cv:
                self._free += count
                self._cv.notify_all()


@dataclass
class Ctx:
    """What a driver gets: the tiny assets, its own directory, the scheduler, and the other kinds' results."""

    tiny_assets: tuple[Path, Path]
    tmp: Path
    priority: int
    slots: Slots
    launcher: Launcher
    s3: str | None
    environ: dict[str, str]  # os.environ when the session started: in-process tests change it (monkeypatch)
    zygote: Zygote

    def start(self, tmp: Path, env: dict[str, str], argv: list[str] | None = None, fresh: bool = False):
        """Start `python -m job run` (or `python *argv`), forked by the zygote unless `fresh`."""
        return start(tmp, env, argv, None if fresh else self.zygote)

    def job(self, tmp: Path, argv: list[str] | None = None, count: int = 1, fresh: bool = False,
            **overrides: str) -> Run:
        """Run one job process to its end, holding `count` slots."""
        env = job_env(tmp, self.tiny_assets, self.environ, **overrides)
        with self.slots.hold(self.priority, count):
            returncode = self.start(tmp, env, argv, fresh).wait(timeout=DEADLINE_S)
        return Run(tmp, env, returncode)

    def result(self, kind: str):
        return self.launcher.result(kind)


@dataclass
class Kind:
    driver: Callable[[Ctx], Any]
    priority: int
    reads: tuple[str, ...] = ()
    s3: bool = False


class Launcher:
    """Starts the needed kinds in background threads (they only wait on processes) and hands out their results."""

    def __init__(self, slots: Slots, zygote: Zygote):
        self.slots, self.zygote = slots, zygote
        self.futures: dict[str, Future] = {}
        self.started, self.finished_s = time.monotonic(), {}  # kind -> seconds from launch to its result
        self._pool = ThreadPoolExecutor(max_workers=len(KINDS), thread_name_prefix="job-run")

    def launch(self, kind: str, ctx: Ctx) -> None:
        def timed():
            try:
                return KINDS[kind].driver(ctx)
            finally:
                self.finished_s[kind] = time.monotonic() - self.started
        self.futures[kind] = self._pool.submit(timed)

    def result(self, kind: str):
        return self.futures[kind].result(timeout=3 * DEADLINE_S)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# -- the drivers ---------------------------------------------------------------------------------------------------
def reference_env(ctx: Ctx, tmp: Path, **overrides: str) -> dict[str, str]:
    """REFERENCE's settings, secrets and data (see the module docstring) for a job writing under `tmp`."""
    return dict(REFERENCE, HF_TOKEN=SECRET, WANDB_API_KEY=WANDB_SECRET,
                SFT_DATASET_URI=str(ctx.launcher.result("data_with_one_bad_row")), **overrides)


def _data_with_one_bad_row(ctx: Ctx) -> Path:
    """31 rows of the tiny data plus one whose query is blank (32 rows: SFT_TRAIN_SUBSET=32 keeps them all)."""
    data_dir, dest = ctx.tiny_assets[1], ctx.tmp / "data"
    dest.mkdir()
    shutil.copytree(data_dir / "images", dest / "images")
    (dest / "validation.jsonl").write_text((data_dir / "validation.jsonl").read_text())
    rows = (data_dir / "train.jsonl").read_text().splitlines(keepends=True)[:31]
    (dest / "train.jsonl").write_text(json.dumps(BAD_ROW) + "\n" + "".join(rows))
    return dest


def _reference_run(ctx: Ctx) -> Run:
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


def _interrupted_chain(ctx: Ctx) -> Chain:
    """REFERENCE's run stopped three times, then resumed to the end (stages: (exit code, seconds to exit, ...)):
    - sigterm: SIGTERM once checkpoint-2 is COMPLETED: a preemption save at the step reached, exit 143;
    - sigkill: SIGKILL in the middle of the step after the log line of step KILL_AFTER (at least 5, after the
      resume point): it resumes from the regular save before it;
    - overrun: SIGTERM in the middle of a step with SFT_PREEMPT_GRACE_S=0.2, too short to save: exit 143 and no new
      checkpoint;
    - final: a resume to the end."""
    chain = Chain(ctx.tmp)
    out, log = chain.out, ctx.tmp / "log.txt"

    def stage(**overrides: str):
        env = job_env(ctx.tmp, ctx.tiny_assets, ctx.environ, **reference_env(ctx, ctx.tmp, **overrides))
        return ctx.start(ctx.tmp, env)

    def newer_checkpoint(after: int, proc) -> int:
        return wait_until(lambda: [s for s in completed_steps(out) if s > after], proc,
                          f"a COMPLETED checkpoint after step {after}")[0]

    def interrupt(proc, sig: int) -> tuple[int, float]:
        sent = time.monotonic()
        proc.send_signal(sig)
        return proc.wait(timeout=120), time.monotonic() - sent

    with ctx.slots.hold(ctx.priority):
        proc = stage()
        newer_checkpoint(0, proc)
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


def _pre_eval_off_run(ctx: Ctx) -> Run:
    ctx.launcher.result("checkpoint_bucket")
    return ctx.job(ctx.tmp, **reference_env(
        ctx, ctx.tmp, **NO_WANDB, SFT_EVAL_PRE="false", SFT_CHECKPOINT_URI=f"s3://{CHECKPOINT_BUCKET}/runs",
        SFT_PUSH_MIN_METRIC="macro_f1:0.99", AWS_ENDPOINT_URL=ctx.s3, **AWS_ENV))


def _resumed_from_an_incomplete_checkpoint(ctx: Ctx) -> Run:
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


def _adapter_reload(ctx: Ctx) -> subprocess.CompletedProcess:
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


def s3_client(endpoint: str):
    """A client of `endpoint` that reads nothing from os.environ (tests change it while the runs go on)."""
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=AWS_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"], aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"])


HELD_CHECKPOINT = 4


def _s3_resume_run(ctx: Ctx) -> S3Resume:
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


def _rerun_chain(ctx: Ctx) -> Rerun:
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


# -- classification (#19): an imbalanced 5-class colour task, eval during training and the best step ---------------
COLOURS = {"red": (200, 30, 30), "blue": (30, 40, 200), "green": (30, 170, 50), "yellow": (220, 210, 40),
           "purple": (130, 40, 160)}
# The imbalance (red 128, blue 34, green 24, yellow 11, purple 3) scaled down; eval keeps every colour.
COLOUR_TRAIN = {"red": 32, "blue": 9, "green": 6, "yellow": 3, "purple": 1}
COLOUR_EVAL = {"red": 5, "blue": 3, "green": 2, "yellow": 1, "purple": 1}
# Enough steps that the tiny model starts writing parseable verdicts (agreement with generation is measured on them).
COLOUR_STEPS, COLOUR_EVERY = 20, 5
COLOUR = dict(SFT_MAX_STEPS=str(COLOUR_STEPS), SFT_SAVE_STEPS="5", SFT_SAVE_TOTAL_LIMIT="10",
              SFT_EVAL_STEPS=str(COLOUR_EVERY), SFT_PER_DEVICE_BATCH_SIZE="4", SFT_LEARNING_RATE="1e-2",
              SFT_EVAL_DURING_TRAIN_ROWS="8", SFT_EVAL_SUBSET="12", SFT_TRAIN_SUBSET="51", SFT_EVAL_MAX_NEW_TOKENS="12",
              SFT_LORA_DROPOUT="0.1", SFT_RUN_ID="colour", SFT_TASK_NAME="colour", SFT_PREEMPT_GRACE_S="60",
              SFT_SYSTEM_PROMPT="You name the main colour of an image. Answer with a single JSON object.",
              SFT_TASK_DESCRIPTION="Main colour of an image (5 colours): an image and a query in, a JSON label out.",
              **NO_WANDB)


def _colour_data(ctx: Ctx) -> Path:
    """COLOUR_TRAIN / COLOUR_EVAL rows of noisy solid-colour images, one JSON label each."""
    root = ctx.tmp / "data"
    (root / "images").mkdir(parents=True)
    for split, counts in (("train", COLOUR_TRAIN), ("validation", COLOUR_EVAL)):
        lines = []
        for i, label in enumerate(label for label, n in counts.items() for _ in range(n)):
            noise = noise_image((64, 64), seed=i + (1000 if split == "validation" else 0))
            image = Image.blend(Image.new("RGB", (64, 64), COLOURS[label]), noise, 0.25)
            image.save(root / "images" / f"{split}-{i}.png")
            lines.append(json.dumps({"id": f"{split}-{i}", "image": f"images/{split}-{i}.png",
                                     "query": "What is the main colour? Answer in JSON.",
                                     "target_json": json.dumps({"label": label})}))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _colour_env(ctx: Ctx, tmp: Path) -> dict[str, str]:
    return job_env(tmp, ctx.tiny_assets, ctx.environ, **COLOUR, SFT_DATASET_URI=str(ctx.result("colour_data")))


def _colour_run(ctx: Ctx) -> Run:
    """COLOUR uninterrupted: evals every COLOUR_EVERY steps; the adapter saved is the best step's."""
    env = _colour_env(ctx, ctx.tmp)
    with ctx.slots.hold(ctx.priority):
        return Run(ctx.tmp, env, ctx.start(ctx.tmp, env).wait(timeout=DEADLINE_S))


def _colour_resumed(ctx: Ctx) -> Chain:
    """COLOUR stopped by SIGTERM in the step after step 4's log line (step 5, an eval step, or step 6), then resumed
    to the end. stages: sigterm (exit code, COMPLETED steps), final (exit code,)."""
    chain = Chain(ctx.tmp)
    env = _colour_env(ctx, ctx.tmp)
    with ctx.slots.hold(ctx.priority):
        proc = ctx.start(ctx.tmp, env)
        line = log_has(ctx.tmp / "log.txt", rf"step {COLOUR_EVERY - 1}/{COLOUR_STEPS} ")
        wait_until(lambda: (ctx.tmp / "log.txt").is_file() and line(), proc, "the log line of the step before an eval")
        proc.send_signal(signal.SIGTERM)
        chain.stages["sigterm"] = (proc.wait(timeout=120), completed_steps(chain.out))
    with ctx.slots.hold(ctx.priority):
        chain.stages["final"] = (ctx.start(ctx.tmp, env).wait(timeout=DEADLINE_S),)
    return chain


def _checkpoint_bucket(ctx: Ctx) -> str:
    s3_client(ctx.s3).create_bucket(Bucket=CHECKPOINT_BUCKET)
    return CHECKPOINT_BUCKET


def _ddp_run(ctx: Ctx) -> Run:
    # The gate refuses (the tiny model scores 0): the same launch shows the artifacts of a DDP run and the exit 4.
    # SFT_EVAL_STEPS: rank 0 scores during training while rank 1 waits in the same collective.
    return ctx.job(ctx.tmp, count=2, **DDP, **GATE, SFT_EVAL_STEPS="2")


def _ddp_standalone_eval(ctx: Ctx) -> Run:
    ddp = ctx.result("ddp_run")
    return ctx.job(ctx.tmp, ["-m", "job", "eval"], **{k: v for k, v in DDP.items() if k != "SFT_NPROC_PER_NODE"},
                   SFT_EVAL_ADAPTER=str(ddp.out / "adapter"))


def _ddp_bad_row_run(ctx: Ctx) -> Run:
    # SFT_BAD_ROWS=fail (the default): rank 0's preflight names the row; no weights load on either rank.
    return ctx.job(ctx.tmp, count=2, **DDP, **NO_WANDB, SFT_DATASET_URI=str(ctx.result("data_with_one_bad_row")))


@dataclass
class DDPPreempted:
    tmp: Path
    returncode: int
    signalled_s: float  # from the SIGTERM to the launcher's exit (informative: the tests assert no timings)

    @property
    def log(self) -> str:
        return (self.tmp / "log.txt").read_text(errors="replace")


def _ddp_preempted_run(ctx: Ctx) -> DDPPreempted:
    """The launcher with 40 steps and 2 dataloader workers per rank, SIGTERMed (as Kubernetes does: the container's
    main process only; torch elastic's agent forwards it to each worker's process group, dataloader workers
    included) once checkpoint-2 is COMPLETED."""
    done = ctx.tmp / "out/checkpoints/checkpoint-2/COMPLETED"
    with ctx.slots.hold(ctx.priority, 2):
        env = job_env(ctx.tmp, ctx.tiny_assets, ctx.environ, **{
            **DDP, **NO_WANDB, "SFT_MAX_STEPS": "40", "SFT_EVAL_PRE": "false", "SFT_DATALOADER_NUM_WORKERS": "2"})
        proc = ctx.start(ctx.tmp, env)
        wait_until(done.exists, proc, "checkpoint-2/COMPLETED")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=120)
    return DDPPreempted(ctx.tmp, returncode, time.monotonic() - sent)


# -- two nodes on loopback, as k8s/multinode/pytorchjob.yaml runs them (#32) ------------------------------------------
TWO_NODE_STEPS = 6
TWO_NODES = dict(SFT_MAX_STEPS=str(TWO_NODE_STEPS), SFT_SAVE_STEPS="2", SFT_EVAL_STEPS="2",
                 SFT_EVAL_DURING_TRAIN_ROWS="4", SFT_EVAL_PRE="false", SFT_SAVE_TOTAL_LIMIT="10",
                 SFT_PREEMPT_GRACE_S="60", SFT_RUN_ID="two-nodes", OMP_NUM_THREADS="1", **NO_WANDB)


@dataclass
class Nodes:
    """One launch of two nodes: node k's folder is tmp/node<k> (log.txt, out/); codes[k] its launcher's exit code."""

    tmp: Path
    codes: list[int]
    bucket: str | None = None

    def out(self, node: int) -> Path:
        return self.tmp / f"node{node}" / "out"

    def log(self, node: int) -> str:
        return (self.tmp / f"node{node}" / "log.txt").read_text(errors="replace")


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (/proc), parents first: a node's launcher, its workers (their own
    sessions, which the launcher's agent starts) and their dataloader workers."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited while listed
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop(0))
        todo.extend(children.get(tree[-1], []))
    return tree


def signal_node(proc: Forked, sig: int) -> None:
    """Signal every process of a node, as the kubelet's SIGTERM (through an init that signals the group) or the
    node's end (SIGKILL) reaches them all."""
    for pid in process_tree(proc.pid):
        if pid == proc.pid:
            proc.send_signal(sig)
            continue
        with suppress(ProcessLookupError):  # exited in the meantime
            os.kill(pid, sig)


def start_nodes(ctx: Ctx, tmp: Path, endpoint: str | None, bucket: str | None,
                per_node: tuple[dict[str, str], dict[str, str]] = ({}, {})) -> list[Forked]:
    """Two launchers, each with its own empty output dir, meeting at 127.0.0.1 (a fresh port per launch)."""
    port, procs = free_port(), []
    for node in (0, 1):
        folder = tmp / f"node{node}"
        store = dict(SFT_CHECKPOINT_URI=f"s3://{bucket}/runs", AWS_ENDPOINT_URL=endpoint, **AWS_ENV) if bucket else {}
        env = job_env(folder, ctx.tiny_assets, ctx.environ, **TWO_NODES, **store, PET_NNODES="2",
                      PET_NODE_RANK=str(node), PET_NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      WORLD_SIZE="2", RANK=str(node), **per_node[node])
        procs.append(ctx.zygote.fork(["-m", "job", "run"], env, *(_log_file(folder),) * 2))
    return procs


def _log_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.txt").touch()
    return folder / "log.txt"


def _two_node_run(ctx: Ctx) -> Nodes:
    """TWO_NODES uninterrupted: the reference of two_node_chain."""
    bucket = "two-node-run"
    s3_client(ctx.s3).create_bucket(Bucket=bucket)
    with ctx.slots.hold(ctx.priority, 2):
        procs = start_nodes(ctx, ctx.tmp, ctx.s3, bucket)
        return Nodes(ctx.tmp, [proc.wait(timeout=DEADLINE_S) for proc in procs], bucket)


def _two_node_chain(ctx: Ctx) -> dict[str, Nodes]:
    """TWO_NODES three times on the same store, each time on two new nodes with empty output dirs:
    - killed: both nodes SIGKILLed (every process) while the upload of checkpoint-4 is held by a proxy, so the store
      has checkpoint-2 COMPLETED: the resume step is an eval step (SFT_EVAL_STEPS = SFT_SAVE_STEPS);
    - sigterm_one: resumed from checkpoint-2; SIGTERM to node 1's processes only, in the step after the first step
      line of node 0 (rank 0's log);
    - final: resumed to the end."""
    bucket = "two-node-chain"
    s3_client(ctx.s3).create_bucket(Bucket=bucket)
    stages: dict[str, Nodes] = {}
    proxy = FaultProxy(int(ctx.s3.rsplit(":", 1)[1]))
    try:
        proxy.hold("/checkpoint-4/")
        with ctx.slots.hold(ctx.priority, 2):
            procs = start_nodes(ctx, ctx.tmp / "killed", proxy.url, bucket)
            wait_until(proxy.held.is_set, procs[0], "the upload of checkpoint-4")
            for proc in procs:
                signal_node(proc, signal.SIGKILL)
            stages["killed"] = Nodes(ctx.tmp / "killed", [proc.wait(timeout=60) for proc in procs], bucket)
        proxy.release()
    finally:
        proxy.close()
    with ctx.slots.hold(ctx.priority, 2):
        tmp = ctx.tmp / "sigterm_one"
        procs = start_nodes(ctx, tmp, ctx.s3, bucket)
        wait_until(log_has(tmp / "node0/log.txt", rf"step \d+/{TWO_NODE_STEPS} "), procs[0], "node 0's first step")
        signal_node(procs[1], signal.SIGTERM)
        stages["sigterm_one"] = Nodes(tmp, [proc.wait(timeout=120) for proc in procs], bucket)
    with ctx.slots.hold(ctx.priority, 2):
        procs = start_nodes(ctx, ctx.tmp / "final", ctx.s3, bucket)
        stages["final"] = Nodes(ctx.tmp / "final", [proc.wait(timeout=DEADLINE_S) for proc in procs], bucket)
    return stages


def _two_node_user_error(ctx: Ctx) -> Nodes:
    """Node 1's SFT_OUTPUT_DIR is a file: a user error only node 1 finds, before any download or weights."""
    not_a_dir = ctx.tmp / "node1-output-is-a-file"
    not_a_dir.write_text("")
    with ctx.slots.hold(ctx.priority, 2):
        procs = start_nodes(ctx, ctx.tmp, None, None, ({}, {"SFT_OUTPUT_DIR": str(not_a_dir)}))
        return Nodes(ctx.tmp, [proc.wait(timeout=DEADLINE_S) for proc in procs])


BENCHMARKS = {
    "padding": ["-m", "benchmarks.padding", "--quick"],
    "collator": ["-m", "benchmarks.collator", "--quick"],
    "eval": ["-m", "benchmarks.eval", "--quick"],
    "gpu_step": ["-m", "benchmarks.gpu_step", "--dry-run"],
}


def _benchmark_outputs(ctx: Ctx) -> dict[str, subprocess.CompletedProcess]:
    assets = str(ctx.tiny_assets[0].parent)
    env = {**ctx.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           # glibc: keep freed memory instead of returning every large block to the OS. TRL's chunked log-prob
           # kernel allocates ~40 MB temporaries per tile; without this, page faults double gpu_step's dry run.
           "MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**32)}

    def bench(name: str) -> subprocess.CompletedProcess:
        with ctx.slots.hold(ctx.priority):
            done = ctx.zygote.run([*BENCHMARKS[name], "--assets", assets], env, ctx.tmp / name)
        return subprocess.CompletedProcess(done.args, done.returncode, done.stdout + done.stderr)

    # Four independent short processes: they fill whichever slots the longer runs leave free.
    with ThreadPoolExecutor(max_workers=len(BENCHMARKS), thread_name_prefix="benchmark") as pool:
        return dict(zip(BENCHMARKS, pool.map(bench, BENCHMARKS), strict=True))


KINDS: dict[str, Kind] = {
    # priority: the longest line of dependent processes first (the chain), then the runs other kinds or many
    # in-process assertions wait for (reference, rerun chain), the two-slot DDP runs, and the short ones last
    "interrupted_chain": Kind(_interrupted_chain, 0, ("data_with_one_bad_row",)),
    "reference_run": Kind(_reference_run, 1, ("data_with_one_bad_row",)),
    "rerun_chain": Kind(_rerun_chain, 2),
    "s3_resume_run": Kind(_s3_resume_run, 3, ("data_with_one_bad_row",), s3=True),
    "pre_eval_off_run": Kind(_pre_eval_off_run, 4, ("data_with_one_bad_row", "checkpoint_bucket"), s3=True),
    "ddp_run": Kind(_ddp_run, 5),
    "ddp_preempted_run": Kind(_ddp_preempted_run, 6),
    "resumed_from_an_incomplete_checkpoint": Kind(_resumed_from_an_incomplete_checkpoint, 7,
                                                  ("reference_run", "data_with_one_bad_row")),
    "ddp_standalone_eval": Kind(_ddp_standalone_eval, 7, ("ddp_run",)),
    "ddp_bad_row_run": Kind(_ddp_bad_row_run, 7, ("data_with_one_bad_row",)),
    "adapter_reload": Kind(_adapter_reload, 8, ("reference_run",)),
    "benchmark_outputs": Kind(_benchmark_outputs, 9),
    "two_node_chain": Kind(_two_node_chain, 2, s3=True),
    "two_node_run": Kind(_two_node_run, 5, s3=True),
    "two_node_user_error": Kind(_two_node_user_error, 7),
    "colour_run": Kind(_colour_run, 4, ("colour_data",)),
    "colour_resumed": Kind(_colour_resumed, 3, ("colour_data",)),
    "data_with_one_bad_row": Kind(_data_with_one_bad_row, -1),
    "colour_data": Kind(_colour_data, -1),
    "checkpoint_bucket": Kind(_checkpoint_bucket, -1, s3=True),
}


def _needed(kinds: set[str]) -> list[str]:
    todo, seen = list(kinds), set()
    while todo:
        kind = todo.pop()
        if kind not in seen:
            seen.add(kind)
            todo.extend(KINDS[kind].reads)
    # Launched in this order: a kind's future must exist before a kind that reads it asks for it.
    assert all(KINDS[r].priority < KINDS[k].priority for k in seen for r in KINDS[k].reads), "reads run first"
    return sorted(seen, key=lambda k: KINDS[k].priority)


# -- pytest hooks and fixtures -------------------------------------------------------------------------------------
def pytest_collection_modifyitems(config, items):
    """In-process tests first, then the slow tests that wait for no shared run, then the others in the order their
    runs are scheduled: the main process works while the background runs make progress, and waits as little as
    possible. (A stable sort: pytest's grouping by module-scoped fixtures holds within each rank.)"""
    def rank(item) -> tuple[bool, int]:
        if item.get_closest_marker("slow") is None:
            return False, 0
        return True, max((KINDS[name].priority for name in item.fixturenames if name in KINDS), default=-10)
    items.sort(key=rank)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server over real HTTP on 127.0.0.1, in its own process; AWS_ENV and AWS_ENDPOINT_URL in os.environ."""
    port, log = free_port(), tmp_path_factory.mktemp("moto") / "log.txt"
    with open(log, "w") as f:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            with urllib.request.urlopen(url + "/moto-api/", timeout=5):
                return True
        except (urllib.error.URLError, ConnectionError):
            return False

    wait_until(answers, server, "moto's server answering", timeout=120)
    saved = {k: os.environ.get(k) for k in (*AWS_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update({**AWS_ENV, "AWS_ENDPOINT_URL": url})
    yield url
    server.terminate()
    server.wait(timeout=30)
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def pytest_configure(config):
    """A whole-suite session (no paths, no -k, no marker expression that leaves out the slow tier) starts the zygote
    now: its imports (11-14 CPU-s) overlap collection, which runs on one core. Other sessions make it on first use."""
    if (config.args_source == pytest.Config.ArgsSource.TESTPATHS and not config.option.keyword
            and "slow" not in config.option.markexpr and not config.option.collectonly):
        _EARLY.append(Zygote(zygote_env(dict(os.environ))))


def pytest_unconfigure(config):
    while _EARLY:  # started early, and no test asked for it
        _EARLY.pop().close()


@pytest.fixture(scope="session")
def zygote(tmp_path_factory) -> Iterator[Zygote]:
    """The preloaded interpreter that forks the job processes (tests/zygote.py): the one pytest_configure started,
    else made on first use."""
    forks = _EARLY.pop() if _EARLY else Zygote(zygote_env(dict(os.environ)))
    _ZYGOTES.append((forks, tmp_path_factory.getbasetemp()))
    yield forks
    forks.close()


@pytest.fixture(scope="session", autouse=True)
def _launch_needed_runs(request, tmp_path_factory):
    """Launch, in the background, every kind of run that a selected test needs (none when only fast tests run)."""
    needed = _needed({name for item in request.session.items for name in item.fixturenames if name in KINDS})
    if not needed:
        yield None
        return
    forks = request.getfixturevalue("zygote")  # it imports while the fixtures below are made
    tiny_assets = request.getfixturevalue("tiny_assets")
    s3 = request.getfixturevalue("s3_endpoint") if any(KINDS[k].s3 for k in needed) else None
    environ = dict(os.environ)
    slots = Slots(int(os.environ.get("TEST_JOB_SLOTS", len(os.sched_getaffinity(0)))))
    launcher = Launcher(slots, forks)
    _LAUNCHERS.append(launcher)
    for kind in needed:  # directories made here, in the main thread: mktemp is not meant for threads
        launcher.launch(kind, Ctx(tiny_assets, tmp_path_factory.mktemp(kind), KINDS[kind].priority, slots,
                                  launcher, s3, environ, forks))
    yield launcher
    launcher.shutdown()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Where the slow tier's CPU went: each folder's forked job processes (the zygote measures them), then the
    session's own CPU and its children's (fresh interpreters, torchrun ranks, moto, the zygote and its forks)."""
    for launcher in _LAUNCHERS:
        done = ", ".join(f"{kind} {s:.0f}" for kind, s in sorted(launcher.finished_s.items(), key=lambda kv: kv[1]))
        terminalreporter.write_line(f"shared runs finished, seconds after the session started: {done}")
    if _ZYGOTES:
        by_folder: dict[str, float] = {}
        for zygote, base in _ZYGOTES:
            for folder, cpu_s in zygote.cpu_s.items():
                name = folder.relative_to(base).parts[0] if folder.is_relative_to(base) else str(folder)
                by_folder[name] = by_folder.get(name, 0.0) + cpu_s
        listed = ", ".join(f"{name} {cpu:.0f}" for name, cpu in sorted(by_folder.items(), key=lambda kv: -kv[1]))
        terminalreporter.write_line(f"forked job processes, CPU-s: {sum(by_folder.values()):.0f} ({listed})")
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    terminalreporter.write_line(f"CPU-s: pytest {own.ru_utime + own.ru_stime:.0f}, "
                                f"its child processes {children.ru_utime + children.ru_stime:.0f}")


_EARLY: list[Zygote] = []  # the zygote pytest_configure started, until the fixture takes it
_ZYGOTES: list[tuple[Zygote, Path]] = []  # each with the session's base temporary directory
_LAUNCHERS: list[Launcher] = []


def _result(request, kind: str):
    launcher = request.getfixturevalue("_launch_needed_runs")
    assert launcher is not None and kind in launcher.futures, f"{kind} was not launched"
    return launcher.result(kind)


@pytest.fixture(scope="session")
def reference_run(request) -> Run:
    return _result(request, "reference_run")


@pytest.fixture(scope="session")
def interrupted_chain(request) -> Chain:
    return _result(request, "interrupted_chain")


@pytest.fixture(scope="session")
def pre_eval_off_run(request) -> Run:
    return _result(request, "pre_eval_off_run")


@pytest.fixture(scope="session")
def resumed_from_an_incomplete_checkpoint(request) -> Run:
    return _result(request, "resumed_from_an_incomplete_checkpoint")


@pytest.fixture(scope="session")
def adapter_reload(request) -> subprocess.CompletedProcess:
    return _result(request, "adapter_reload")


@pytest.fixture(scope="session")
def s3_resume_run(request) -> S3Resume:
    return _result(request, "s3_resume_run")


@pytest.fixture(scope="session")
def colour_run(request) -> Run:
    return _result(request, "colour_run")


@pytest.fixture(scope="session")
def colour_resumed(request) -> Chain:
    return _result(request, "colour_resumed")


@pytest.fixture(scope="session")
def ddp_run(request) -> Run:
    return _result(request, "ddp_run")


@pytest.fixture(scope="session")
def ddp_standalone_eval(request) -> Run:
    return _result(request, "ddp_standalone_eval")


@pytest.fixture(scope="session")
def ddp_preempted_run(request) -> DDPPreempted:
    return _result(request, "ddp_preempted_run")


@pytest.fixture(scope="session")
def ddp_bad_row_run(request) -> Run:
    return _result(request, "ddp_bad_row_run")


@pytest.fixture(scope="session")
def two_node_run(request) -> Nodes:
    return _result(request, "two_node_run")


@pytest.fixture(scope="session")
def two_node_chain(request) -> dict[str, Nodes]:
    return _result(request, "two_node_chain")


@pytest.fixture(scope="session")
def two_node_user_error(request) -> Nodes:
    return _result(request, "two_node_user_error")


@pytest.fixture(scope="session")
def rerun_chain(request) -> Rerun:
    return _result(request, "rerun_chain")


@pytest.fixture()
def run_forked(zygote, tmp_path) -> Callable[..., subprocess.CompletedProcess]:
    """`run_forked(argv, env)`: subprocess.run(capture_output=True, text=True) of `python *argv`, forked by the
    zygote (argv: what follows the interpreter's name, e.g. ["-m", "job", "run"]); its output files in tmp_path."""
    runs = itertools.count()

    def run(argv: list[str], env: dict[str, str], timeout: float = DEADLINE_S) -> subprocess.CompletedProcess:
        return zygote.run(argv, env, tmp_path / f"process-{next(runs)}", timeout)
    return run


@pytest.fixture(scope="session")
def benchmark_outputs(request) -> dict[str, subprocess.CompletedProcess]:
    return _result(request, "benchmark_outputs")

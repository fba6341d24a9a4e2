"""Shared job runs for the slow tier: a pytest plugin (conftest.py loads it), so every test module can use them.

Each kind of job run happens at most once per session, and only when a selected test needs it. When the session
starts, every run the selected tests need is launched in the background (`_launch_needed_runs`), while the in-process
tests run first (`pytest_collection_modifyitems` puts the `slow` tests last). At most `slots` job processes run at a
time (TEST_JOB_SLOTS, default: the CPUs pytest may use), the longest chain of dependent processes first. A test then
asks for the run by fixture name and reads its outputs; many assertions share one run.

To reuse a run in a new test, request its fixture and read its files; never change them (copy the directory first,
as the `resumed_from_an_incomplete_checkpoint` run does). Every run writes its console output to `tmp/log.txt`, its
outputs to `tmp/out` and W&B's offline files to `tmp/wandb`. To add a kind: write a driver `def _name(ctx) -> result`,
register it in KINDS with its priority and the kinds it reads, and add a one-line fixture.

The runs (fixture -> what it returns):
- reference_run -> Run: the uninterrupted run: REFERENCE (8 steps, a COMPLETED checkpoint every 2, pre- and post-eval,
  logging every step) on the tiny data plus one blank-query row that SFT_BAD_ROWS=skip drops, with HF_TOKEN and
  WANDB_API_KEY set to known secrets (SECRET, WANDB_SECRET). Exit 0.
- interrupted_chain -> Chain: the same configuration interrupted by SIGTERM, then SIGKILL, then a SIGTERM whose save
  cannot fit (SFT_PREEMPT_GRACE_S=0.2), then resumed to the end; `stages` holds what each stage returned.
- pre_eval_off_run -> Run: the reference run with SFT_EVAL_PRE=false, checkpoints in S3 (CHECKPOINT_BUCKET, run id
  REFERENCE's) and a gate that refuses (SFT_PUSH_MIN_METRIC=macro_f1:0.99): exit 4, training identical to the reference.
- resumed_from_an_incomplete_checkpoint -> Run: a copy of the reference run whose last checkpoint lost its COMPLETED
  marker, rerun with the same settings (it resumes from checkpoint-STEPS-2 and trains to STEPS).
- adapter_reload -> CompletedProcess: a fresh Python process loads the reference adapter on the base model and runs
  one forward pass (prints RELOAD_OK).
- s3_resume_run -> S3Resume: REFERENCE with data and checkpoints in S3 behind a proxy that fails 20% of requests;
  pod1 is SIGKILLed while its checkpoint-4 upload is held, pod2 (an empty disk, the same SFT_RUN_ID) restores
  checkpoint-2 from the store and finishes exactly like the reference run.
- ddp_run -> Run: `torchrun --nproc_per_node=2` (gloo), 4 steps. ddp_standalone_eval -> Run: `qwen3-sft eval` of its
  adapter in a single process.
- ddp_preempted_run -> DDPPreempted: torchrun with 40 steps, one rank SIGTERMed after checkpoint-2 is COMPLETED; each
  rank's own stdout/stderr in `rank_logs` (torchrun --log-dir), the rank pids in `ranks`.
- benchmark_outputs -> {name: CompletedProcess}: benchmarks/*.py in their quick/dry-run modes (BENCHMARKS).
- s3_endpoint -> str: moto's S3 server, a separate process on 127.0.0.1 (AWS_ENV credentials, also set in os.environ).
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from helpers import REPO, job_env
from s3_proxy import AWS_ENV, FaultProxy

from job.storage import s3 as s3io

STEPS = 8
# PYTHONWARNINGS=default prints every warning once per location, library DeprecationWarnings included, so the logs
# show any warning at all (tests/test_warnings.py reads the reference run's).
REFERENCE = dict(SFT_MAX_STEPS=str(STEPS), SFT_SAVE_STEPS="2", SFT_EVAL_SUBSET="4", SFT_SAVE_TOTAL_LIMIT="10",
                 SFT_PREEMPT_GRACE_S="60", SFT_RUN_ID="test-run", SFT_BAD_ROWS="skip", SFT_MAX_BAD_FRACTION="0.1",
                 PYTHONWARNINGS="default")
SECRET = "hf_TESTSECRET_do_not_leak_123"
WANDB_SECRET = "wandbkey_TESTSECRET_0123456789"
CHECKPOINT_BUCKET = "shared-runs"
BAD_ROW = {"id": "bad-empty-query", "image": "images/train-00000.png", "query": " ", "caption": None,
           "target_json": '{"label": "sarcastic"}'}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
DDP = dict(SFT_MAX_STEPS="4", SFT_SAVE_STEPS="2", SFT_EVAL_SUBSET="4")
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


def start(tmp: Path, env: dict[str, str], argv: list[str] | None = None) -> subprocess.Popen:
    """Start `python -m job run` (or argv) in the repo with its output appended to tmp/log.txt."""
    tmp.mkdir(parents=True, exist_ok=True)
    with open(tmp / "log.txt", "a") as log:
        return subprocess.Popen(argv or [sys.executable, "-m", "job", "run"], env=env, cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT)


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

    def job(self, tmp: Path, argv: list[str] | None = None, count: int = 1, **overrides: str) -> Run:
        """Run one job process to its end, holding `count` slots."""
        env = job_env(tmp, self.tiny_assets, self.environ, **overrides)
        with self.slots.hold(self.priority, count):
            proc = start(tmp, env, argv)
            returncode = proc.wait(timeout=DEADLINE_S)
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

    def __init__(self, slots: Slots):
        self.slots = slots
        self.futures: dict[str, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=len(KINDS), thread_name_prefix="job-run")

    def launch(self, kind: str, ctx: Ctx) -> None:
        self.futures[kind] = self._pool.submit(KINDS[kind].driver, ctx)

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
    return ctx.job(ctx.tmp, **reference_env(ctx, ctx.tmp))


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
    """SIGTERM, then SIGKILL, then SIGTERM with a budget too small to save, then a final resume to the end."""
    chain = Chain(ctx.tmp)
    out, log = chain.out, ctx.tmp / "log.txt"

    def stage(**overrides: str) -> subprocess.Popen:
        env = job_env(ctx.tmp, ctx.tiny_assets, ctx.environ, **reference_env(ctx, ctx.tmp, **overrides))
        return start(ctx.tmp, env)

    def newer_checkpoint(after: int, proc) -> int:
        return wait_until(lambda: [s for s in completed_steps(out) if s > after], proc,
                          f"a COMPLETED checkpoint after step {after}")[0]

    def interrupt(proc: subprocess.Popen, sig: int) -> tuple[int, float]:
        sent = time.monotonic()
        proc.send_signal(sig)
        return proc.wait(timeout=120), time.monotonic() - sent

    with ctx.slots.hold(ctx.priority):
        proc = stage()
        newer_checkpoint(0, proc)
        chain.stages["sigterm"] = (*interrupt(proc, signal.SIGTERM), completed_steps(out))

    with ctx.slots.hold(ctx.priority):
        proc = stage()
        newer_checkpoint(max(chain.stages["sigterm"][2]), proc)
        chain.stages["sigkill"] = (*interrupt(proc, signal.SIGKILL), completed_steps(out))

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
        ctx, ctx.tmp, SFT_EVAL_PRE="false", SFT_CHECKPOINT_URI=f"s3://{CHECKPOINT_BUCKET}/runs",
        SFT_PUSH_MIN_METRIC="macro_f1:0.99", AWS_ENDPOINT_URL=ctx.s3, **AWS_ENV))


def _resumed_from_an_incomplete_checkpoint(ctx: Ctx) -> Run:
    reference = ctx.result("reference_run")
    shutil.copytree(reference.out, ctx.tmp / "out")
    (ctx.tmp / f"out/checkpoints/checkpoint-{STEPS}/COMPLETED").unlink()  # as if the pod died writing it
    return ctx.job(ctx.tmp, **reference_env(ctx, ctx.tmp))


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
    argv = [sys.executable, "-c", RELOAD, str(reference.out / "adapter"), *map(str, ctx.tiny_assets)]
    with ctx.slots.hold(ctx.priority):
        return subprocess.run(argv, cwd=REPO, env=ctx.environ, capture_output=True, text=True, timeout=DEADLINE_S)


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
        return {**reference_env(ctx, pod), **storage}

    try:
        proxy.hold(f"/checkpoint-{HELD_CHECKPOINT}/")
        pod1 = ctx.tmp / "pod1"
        with ctx.slots.hold(ctx.priority):
            proc = start(pod1, job_env(pod1, ctx.tiny_assets, ctx.environ, **env(pod1)))
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


def _checkpoint_bucket(ctx: Ctx) -> str:
    s3_client(ctx.s3).create_bucket(Bucket=CHECKPOINT_BUCKET)
    return CHECKPOINT_BUCKET


def _ddp_run(ctx: Ctx) -> Run:
    return ctx.job(ctx.tmp, [*TORCHRUN, "-m", "job", "run"], count=2, **DDP)


def _ddp_standalone_eval(ctx: Ctx) -> Run:
    ddp = ctx.result("ddp_run")
    return ctx.job(ctx.tmp, [sys.executable, "-m", "job", "eval"], **DDP, SFT_EVAL_ADAPTER=str(ddp.out / "adapter"))


@dataclass
class DDPPreempted:
    tmp: Path
    returncode: int
    ranks: list[int]
    rank_logs: dict[int, str]  # local rank -> its stdout + stderr, as torchrun --log-dir kept them

    @property
    def log(self) -> str:
        return (self.tmp / "log.txt").read_text(errors="replace")


def _ddp_preempted_run(ctx: Ctx) -> DDPPreempted:
    # --log-dir keeps each rank's own output (torch 2.8's torchrun summary names only the first rank that failed).
    argv = [*TORCHRUN, "--log-dir", str(ctx.tmp / "ranks"), "--tee", "3", "-m", "job", "run"]
    done = ctx.tmp / "out/checkpoints/checkpoint-2/COMPLETED"
    with ctx.slots.hold(ctx.priority, 2):
        env = job_env(ctx.tmp, ctx.tiny_assets, ctx.environ, **{**DDP, "SFT_MAX_STEPS": "40"})
        proc = start(ctx.tmp, env, argv)
        wait_until(done.exists, proc, "checkpoint-2/COMPLETED")
        ranks = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                    text=True).stdout.split()]
        if len(ranks) == 2:
            os.kill(ranks[1], signal.SIGTERM)
        else:
            proc.kill()
        returncode = proc.wait(timeout=120)
    rank_logs = {}
    for rank in (0, 1):
        files = sorted((ctx.tmp / "ranks").glob(f"*/attempt_0/{rank}/std*.log"))
        rank_logs[rank] = "".join(p.read_text(errors="replace") for p in files)
    return DDPPreempted(ctx.tmp, returncode, ranks, rank_logs)


BENCHMARKS = {
    "padding": ["benchmarks/padding.py", "--quick"],
    "collator": ["benchmarks/collator.py", "--quick"],
    "eval": ["benchmarks/eval.py", "--quick"],
    "gpu_step": ["benchmarks/gpu_step.py", "--dry-run"],
}


def _benchmark_outputs(ctx: Ctx) -> dict[str, subprocess.CompletedProcess]:
    assets = str(ctx.tiny_assets[0].parent)
    env = {**ctx.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           # glibc: keep freed memory instead of returning every large block to the OS. TRL's chunked log-prob
           # kernel allocates ~40 MB temporaries per tile; without this, page faults double gpu_step's dry run.
           "MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**32)}

    def bench(args: list[str]) -> subprocess.CompletedProcess:
        with ctx.slots.hold(ctx.priority):
            return subprocess.run([sys.executable, *args, "--assets", assets], cwd=REPO, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=DEADLINE_S)

    # Four independent short processes: they fill whichever slots the longer runs leave free.
    with ThreadPoolExecutor(max_workers=len(BENCHMARKS), thread_name_prefix="benchmark") as pool:
        return dict(zip(BENCHMARKS, pool.map(bench, BENCHMARKS.values()), strict=True))


KINDS: dict[str, Kind] = {
    # priority: the chain and the runs other kinds wait for first; the chain is the longest line of processes
    "interrupted_chain": Kind(_interrupted_chain, 0, ("data_with_one_bad_row",)),
    "reference_run": Kind(_reference_run, 1, ("data_with_one_bad_row",)),
    "ddp_run": Kind(_ddp_run, 2),
    "s3_resume_run": Kind(_s3_resume_run, 3, ("data_with_one_bad_row",), s3=True),
    "pre_eval_off_run": Kind(_pre_eval_off_run, 4, ("data_with_one_bad_row", "checkpoint_bucket"), s3=True),
    "ddp_preempted_run": Kind(_ddp_preempted_run, 5),
    "resumed_from_an_incomplete_checkpoint": Kind(_resumed_from_an_incomplete_checkpoint, 6,
                                                  ("reference_run", "data_with_one_bad_row")),
    "ddp_standalone_eval": Kind(_ddp_standalone_eval, 6, ("ddp_run",)),
    "adapter_reload": Kind(_adapter_reload, 7, ("reference_run",)),
    "benchmark_outputs": Kind(_benchmark_outputs, 8),
    "data_with_one_bad_row": Kind(_data_with_one_bad_row, -1),
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
    """In-process tests first: they run while the background job runs make progress."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server over real HTTP on 127.0.0.1, in its own process; AWS_ENV and AWS_ENDPOINT_URL in os.environ."""
    port, log = _free_port(), tmp_path_factory.mktemp("moto") / "log.txt"
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


@pytest.fixture(scope="session", autouse=True)
def _launch_needed_runs(request, tmp_path_factory):
    """Launch, in the background, every kind of run that a selected test needs (none when only fast tests run)."""
    wanted = {name for item in request.session.items for name in item.fixturenames if name in KINDS}
    needed = _needed(wanted)
    if not needed:
        yield None
        return
    tiny_assets = request.getfixturevalue("tiny_assets")
    s3 = request.getfixturevalue("s3_endpoint") if any(KINDS[k].s3 for k in needed) else None
    slots = Slots(int(os.environ.get("TEST_JOB_SLOTS", len(os.sched_getaffinity(0)))))
    launcher, environ = Launcher(slots), dict(os.environ)
    for kind in needed:  # directories made here, in the main thread: mktemp is not meant for threads
        launcher.launch(kind, Ctx(tiny_assets, tmp_path_factory.mktemp(kind), KINDS[kind].priority, slots,
                                  launcher, s3, environ))
    yield launcher
    launcher.shutdown()


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
def ddp_run(request) -> Run:
    return _result(request, "ddp_run")


@pytest.fixture(scope="session")
def ddp_standalone_eval(request) -> Run:
    return _result(request, "ddp_standalone_eval")


@pytest.fixture(scope="session")
def ddp_preempted_run(request) -> DDPPreempted:
    return _result(request, "ddp_preempted_run")


@pytest.fixture(scope="session")
def benchmark_outputs(request) -> dict[str, subprocess.CompletedProcess]:
    return _result(request, "benchmark_outputs")

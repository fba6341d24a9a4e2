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
outputs to `tmp/out` and W&B's offline files to `tmp/wandb`. To add a kind: write a driver `def name(ctx) -> result`
in the module of its concern, register it in KINDS with its priority and the kinds it reads, and add a one-line
fixture.

The modules, by concern: this one is the plugin (KINDS, the hooks, the fixtures); runs_processes.py holds a finished
run, the zygote's forks and the waits; runs_scheduler.py the slots, a driver's Ctx and the launcher's threads. The
drivers, with the settings the tests read: runs_reference.py (REFERENCE's single-process runs and the rerun chain),
runs_colour.py (the classification runs), runs_distributed.py (DDP and two nodes) and runs_benchmarks.py.

The runs (fixture -> what it returns):
- reference_run -> Run: the uninterrupted run: REFERENCE (STEPS=6 steps of 2 rows, one per micro-batch with gradient
  accumulation 2, two dataloader workers, LoRA dropout 0.1, a COMPLETED checkpoint every 2, pre- and post-eval,
  logging every step) on the tiny data plus one blank-query row that SFT_BAD_ROWS=skip drops, with HF_TOKEN and
  WANDB_API_KEY set to known secrets (SECRET, WANDB_SECRET). Exit 0.
- interrupted_chain -> Chain: the same configuration, with SFT_PER_DEVICE_BATCH_SIZE=auto finding REFERENCE's batch
  (runs_reference.AUTO: its first stage under tests/ceiling.py's memory ceiling, the later ones reuse the recorded
  choice), stopped by SIGTERM (a preemption save), then by SIGKILL in the
  middle of a step, then by a SIGTERM whose save cannot fit (SFT_PREEMPT_GRACE_S=0.2), then resumed to the end;
  `stages` holds what each stage returned (its driver's docstring).
- pre_eval_off_run -> Run: the reference run with SFT_EVAL_PRE=false, SFT_PER_DEVICE_BATCH_SIZE=auto under the
  memory ceiling (runs_reference.AUTO: the search picks REFERENCE's hand-set batch), checkpoints in S3
  (CHECKPOINT_BUCKET, run id REFERENCE's) and a gate that refuses (SFT_PUSH_MIN_METRIC=macro_f1:0.99): exit 4,
  training identical to the reference.
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
- colour_run -> Run: an imbalanced 5-class colour task (COLOUR_TRAIN, COLOUR_EVAL) with SFT_EVAL_STEPS=COLOUR_EVERY
  over COLOUR_STEPS steps: eval during training and the best step's adapter; its data shaped as the public
  datasets are (COLOUR_DATA: a card configuration of parquet shards, a ClassLabel target, no query column).
  colour_resumed -> Chain: the same run SIGTERMed in its first eval step or the one after, then resumed to the end.
- benchmark_outputs -> {name: CompletedProcess}: benchmarks/*.py in their quick/dry-run modes (BENCHMARKS).
- s3_endpoint -> str: moto's S3 server, a separate process on 127.0.0.1 (AWS_ENV credentials, also set in os.environ).
"""

from __future__ import annotations

import itertools
import os
import resource
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import runs_benchmarks as benchmarks
import runs_colour as colour
import runs_distributed as distributed
import runs_reference as reference
from runs_processes import DEADLINE_S, Run, Zygote, free_port, wait_until, zygote_env
from runs_scheduler import Ctx, Kind, Launcher, Slots
from s3_proxy import AWS_ENV

KINDS: dict[str, Kind] = {
    # priority: the longest line of dependent processes first (the chain), then the runs other kinds or many
    # in-process assertions wait for (reference, rerun chain), the two-slot DDP runs, and the short ones last
    "interrupted_chain": Kind(reference.interrupted_chain, 0, ("data_with_one_bad_row",)),
    "reference_run": Kind(reference.reference_run, 1, ("data_with_one_bad_row",)),
    "rerun_chain": Kind(reference.rerun_chain, 2),
    "s3_resume_run": Kind(reference.s3_resume_run, 3, ("data_with_one_bad_row",), s3=True),
    "pre_eval_off_run": Kind(reference.pre_eval_off_run, 4, ("data_with_one_bad_row", "checkpoint_bucket"), s3=True),
    "ddp_run": Kind(distributed.ddp_run, 5),
    "ddp_preempted_run": Kind(distributed.ddp_preempted_run, 6),
    "resumed_from_an_incomplete_checkpoint": Kind(reference.resumed_from_an_incomplete_checkpoint, 7,
                                                  ("reference_run", "data_with_one_bad_row")),
    "ddp_standalone_eval": Kind(distributed.ddp_standalone_eval, 7, ("ddp_run",)),
    "ddp_bad_row_run": Kind(distributed.ddp_bad_row_run, 7, ("data_with_one_bad_row",)),
    "adapter_reload": Kind(reference.adapter_reload, 8, ("reference_run",)),
    "benchmark_outputs": Kind(benchmarks.benchmark_outputs, 9),
    "two_node_chain": Kind(distributed.two_node_chain, 2, s3=True),
    "two_node_run": Kind(distributed.two_node_run, 5, s3=True),
    "two_node_user_error": Kind(distributed.two_node_user_error, 7),
    "colour_run": Kind(colour.colour_run, 4, ("colour_data",)),
    "colour_resumed": Kind(colour.colour_resumed, 3, ("colour_data",)),
    "data_with_one_bad_row": Kind(reference.data_with_one_bad_row, -1),
    "colour_data": Kind(colour.colour_data, -1),
    "checkpoint_bucket": Kind(reference.checkpoint_bucket, -1, s3=True),
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
    launcher = Launcher(slots, forks, KINDS)
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
def interrupted_chain(request) -> reference.Chain:
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
def s3_resume_run(request) -> reference.S3Resume:
    return _result(request, "s3_resume_run")


@pytest.fixture(scope="session")
def colour_run(request) -> Run:
    return _result(request, "colour_run")


@pytest.fixture(scope="session")
def colour_resumed(request) -> reference.Chain:
    return _result(request, "colour_resumed")


@pytest.fixture(scope="session")
def ddp_run(request) -> Run:
    return _result(request, "ddp_run")


@pytest.fixture(scope="session")
def ddp_standalone_eval(request) -> Run:
    return _result(request, "ddp_standalone_eval")


@pytest.fixture(scope="session")
def ddp_preempted_run(request) -> distributed.DDPPreempted:
    return _result(request, "ddp_preempted_run")


@pytest.fixture(scope="session")
def ddp_bad_row_run(request) -> Run:
    return _result(request, "ddp_bad_row_run")


@pytest.fixture(scope="session")
def two_node_run(request) -> distributed.Nodes:
    return _result(request, "two_node_run")


@pytest.fixture(scope="session")
def two_node_chain(request) -> dict[str, distributed.Nodes]:
    return _result(request, "two_node_chain")


@pytest.fixture(scope="session")
def two_node_user_error(request) -> distributed.Nodes:
    return _result(request, "two_node_user_error")


@pytest.fixture(scope="session")
def rerun_chain(request) -> reference.Rerun:
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

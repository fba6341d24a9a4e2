"""`qwen3-sft run` on every visible accelerator: torch's own elastic launcher, with the job's exit-code contract.

With more than one CUDA device visible (or SFT_NPROC_PER_NODE=N, which also works on the CPU with gloo), the
entrypoint becomes a launcher: `torch.distributed.launcher.api.elastic_launch` starts N workers (`python -m job run`,
fresh interpreters, the same command `torchrun` would start), c10d rendezvous on localhost like `torchrun
--standalone`, no restarts (a restart is Kubernetes' call, made from the exit code). Under a Kubeflow PyTorchJob
(PET_NNODES set by the operator) each node's launcher joins the operator's static rendezvous (MASTER_ADDR,
MASTER_PORT, PET_NODE_RANK), as `torchrun --nnodes --node-rank --master-addr` does.

A process started by torchrun or by this launcher (LOCAL_RANK / TORCHELASTIC_RUN_ID in its environment) is a
worker and never launches again, so `torchrun ... -m job run` works exactly as before.

The contract (job/errors.py): the launcher exits with the code of the *first* rank that failed, not with the codes of
the ranks the agent terminated because of it, and 143 when it was itself signalled (every worker gets the signal and
checkpoints). Each worker writes its exit code, the time it failed and its one message to torch elastic's error file
(TORCHELASTIC_ERROR_FILE, `write_error_record`); the launcher prints that message once. Workers started here print
no `qwen3-sft: error:` line of their own (QWEN3_SFT_LAUNCHED), so the user reads it once, not N times.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from job.config.schema import CONFIG_ENV, JobConfig
from job.errors import ExitCode, PeerFailed, TransientError

log = logging.getLogger("job.launch")

# Set by the launcher in its workers' environment: the launcher prints their error message, they do not.
LAUNCHED_ENV = "QWEN3_SFT_LAUNCHED"
# The environment a worker of torchrun (or of this launcher) gets from torch elastic's agent.
WORKER_MARKERS = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")
# The key of this job's own part of an error file (torch elastic reads "message" and ignores the rest).
RECORD_KEY = "qwen3_sft"
# Time between the workers' preemption budget and the launcher's: the agent reaps them and the launcher exits.
LAUNCHER_MARGIN_S = 2.0
# torch < 2.12's agent SIGKILLs its workers this long after forwarding a signal, and LaunchConfig cannot change it.
OLD_TORCH_SHUTDOWN_S = 30


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """How many workers on this node, and how the nodes meet (standalone: this node alone)."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    master: str | None = None  # host:port of the static rendezvous (PyTorchJob); None: c10d on localhost

    @property
    def standalone(self) -> bool:
        return self.master is None


def is_worker(env: Mapping[str, str]) -> bool:
    """A process started by torchrun or by this launcher. The Kubeflow operator also sets WORLD_SIZE and RANK on the
    pod itself (the node count and the node's rank), so WORLD_SIZE counts only outside a PyTorchJob (PET_NNODES)."""
    if any(env.get(name) for name in WORKER_MARKERS):
        return True
    return bool(env.get("WORLD_SIZE")) and not env.get("PET_NNODES")


def plan(env: Mapping[str, str], nproc_setting: int | None, cuda_devices: int) -> LaunchPlan | None:
    """The launch this process should make, or None to run the job in this process.

    nproc_setting is SFT_NPROC_PER_NODE (None: unset); cuda_devices the CUDA devices visible here."""
    if is_worker(env):
        return None  # never nest: torchrun or a launcher already started this process
    if env.get("PET_NNODES"):
        # A Kubeflow PyTorchJob pod: always through the launcher (the nodes must rendezvous), even with one GPU.
        nproc = nproc_setting or int(env.get("PET_NPROC_PER_NODE") or 0) or max(cuda_devices, 1)
        master = f"{env.get('MASTER_ADDR', 'localhost')}:{env.get('MASTER_PORT', '23456')}"
        return LaunchPlan(nproc, int(env["PET_NNODES"]), int(env.get("PET_NODE_RANK", "0")), master)
    nproc = nproc_setting if nproc_setting is not None else cuda_devices
    return LaunchPlan(nproc) if nproc > 1 else None


# -- the workers' side -----------------------------------------------------------------------------------------------
def launched_here() -> bool:
    """Whether this process is a worker of this launcher (which reports its error message)."""
    return os.environ.get(LAUNCHED_ENV) == "1"


def write_error_record(code: int, message: str, detail: str = "") -> None:
    """Leave this worker's exit code, message and failure time where torch elastic's agent looks for them.

    The format is the one `torch.distributed.elastic.multiprocessing.errors.record` writes ("message" with
    "extraInfo": its traceback and an int timestamp), so torchrun's own failure summary shows the message too;
    RECORD_KEY adds what the launcher needs to find the first failure (a float time: the int one ties)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    now = time.time()
    record = {"message": {"message": message, "extraInfo": {"py_callstack": detail, "timestamp": str(int(now))}},
              RECORD_KEY: {"exit_code": int(code), "time": now, "message": message, "detail": detail}}
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record))
    except OSError:  # the exit code still reaches the launcher; only the message is lost
        pass


# -- choosing the launcher's exit code ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RankFailure:
    """One failed worker as the launcher saw it."""

    rank: int
    code: int  # the process exit code, a signal death as 128 + signal (137 SIGKILL, 143 SIGTERM)
    time: float  # when it failed: its error record's time, else when the agent saw it exit
    message: str = ""
    detail: str = ""  # the traceback of an internal error


def exit_status(exitcode: int) -> int:
    """A process exit code as a shell and Kubernetes report it: killed by signal s (-s) -> 128 + s."""
    return 128 - exitcode if exitcode < 0 else exitcode


def first_failure(failures: list[RankFailure]) -> RankFailure | None:
    """The failure that caused the others. When the agent sees one rank fail it SIGTERMs the rest, which then exit
    143 (preempted) or fail in a collective, always later; on a tie (error records missing: times in whole seconds)
    a rank that died of a signal is taken for a terminated bystander."""
    if not failures:
        return None
    # A rank that only relays another rank's failure (PeerFailed, "rank 0 failed: ...") may record it before that
    # rank has finished unwinding: it is never the cause while the failing rank's own record is there.
    return min(failures, key=lambda f: (PeerFailed.relays(f.message), f.time, f.code >= 128, f.rank))


def failures_from(child_failures: Mapping[int, object]) -> list[RankFailure]:
    """RankFailures from ChildFailedError.failures (global rank -> ProcessFailure)."""
    found = []
    for rank, failure in child_failures.items():
        record = getattr(failure, "error_file_data", {}).get(RECORD_KEY) or {}
        exitcode = int(getattr(failure, "exitcode", 1))
        found.append(RankFailure(
            rank=int(rank), code=int(record.get("exit_code", exit_status(exitcode))),
            time=float(record.get("time", getattr(failure, "timestamp", 0))),
            message=str(record.get("message", "")), detail=str(record.get("detail", ""))))
    return found


def failures_in(log_dir: Path) -> list[RankFailure]:
    """The error records the workers left under log_dir (after a signal the agent reports no failures itself)."""
    found = []
    for path in sorted(log_dir.rglob("error.json")):
        try:
            record = json.loads(path.read_text()).get(RECORD_KEY) or {}
        except (OSError, ValueError):
            continue
        if record:
            local_rank = int(path.parent.name) if path.parent.name.isdigit() else -1
            found.append(RankFailure(local_rank, int(record["exit_code"]), float(record["time"]),
                                     str(record.get("message", "")), str(record.get("detail", ""))))
    return found


def launcher_exit_code(failures: list[RankFailure], signalled: bool) -> tuple[int, RankFailure | None]:
    """The launcher's exit code: 0 when every rank succeeded, the first failure's code, 143 when the launcher itself
    was signalled and no rank reported anything else first."""
    first = first_failure(failures)
    if first is not None:
        return first.code, first
    return (int(ExitCode.PREEMPTED), None) if signalled else (int(ExitCode.OK), None)


def _quiet_torch_elastic() -> None:
    """torch elastic logs every step of a failure (and torchrun prints a failure dump): the launcher prints the one
    message that matters itself."""
    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        quiet = logging.getLogger(name)
        quiet.addHandler(logging.NullHandler())
        quiet.propagate = False


def worker_grace_s(grace_s: float, shutdown_s: float) -> float:
    """The workers' SFT_PREEMPT_GRACE_S: inside the launcher's budget (the agent must reap them and the launcher exit
    within SFT_PREEMPT_GRACE_S) and inside the agent's shutdown timeout (after which it SIGKILLs them)."""
    budget = min(grace_s, shutdown_s)
    return max(budget - min(LAUNCHER_MARGIN_S, 0.1 * budget), 0.01)


def launch(the_plan: LaunchPlan, argv: list[str], cfg: JobConfig) -> tuple[int, tuple[str, str] | None]:
    """Start the workers with this process's config, wait for them, return the exit code by the contract and the
    first failure's (message, traceback) to print (None when every rank succeeded)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    _quiet_torch_elastic()
    grace_s = cfg.train.preempt_grace_s
    known = {f.name for f in dataclasses.fields(LaunchConfig)}
    # torch >= 2.12 takes the shutdown timeout; older agents always wait OLD_TORCH_SHUTDOWN_S before SIGKILL.
    shutdown_s = max(1, math.floor(grace_s)) if "shutdown_timeout" in known else OLD_TORCH_SHUTDOWN_S
    if grace_s > shutdown_s:
        log.warning("SFT_PREEMPT_GRACE_S=%g is longer than this torch's launcher waits for its workers (%d s): "
                    "the workers save within %d s", grace_s, shutdown_s, shutdown_s)
    log_dir = Path(tempfile.mkdtemp(prefix="qwen3-sft-launch-"))
    extra = {"shutdown_timeout": shutdown_s} if "shutdown_timeout" in known else {}
    # As torchrun: --standalone is c10d on localhost:0 (a free port chosen by the store); a PyTorchJob's
    # --master-addr/--node-rank is the static rendezvous at the operator's MASTER_ADDR:MASTER_PORT.
    rdzv: dict[str, Any] = (
        dict(rdzv_backend="c10d", rdzv_endpoint="localhost:0", rdzv_configs={"timeout": 900}) if the_plan.standalone
        else dict(rdzv_backend="static", rdzv_endpoint=the_plan.master,
                  rdzv_configs={"rank": the_plan.node_rank, "timeout": 900}))
    config = LaunchConfig(
        min_nodes=the_plan.nnodes, max_nodes=the_plan.nnodes, nproc_per_node=the_plan.nproc_per_node,
        run_id=cfg.train.run_id or "qwen3-sft", max_restarts=0, monitor_interval=0.1,
        logs_specs=DefaultLogsSpecs(log_dir=str(log_dir)), **rdzv, **extra)
    # The workers take this config as it is (job.config.process_cfg), with the preemption budget that fits inside
    # the launcher's: one serialized form, not a second parse of SFT_* that could drift.
    workers = cfg.replace(train={"preempt_grace_s": worker_grace_s(grace_s, shutdown_s)})
    os.environ.update({LAUNCHED_ENV: "1", CONFIG_ENV: workers.model_dump_json()})
    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun: N workers must not each spin one thread per core
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // the_plan.nproc_per_node))
    log.info("launching %d worker(s) on node %d of %d (%s); SIGTERM reaches every worker", the_plan.nproc_per_node,
             the_plan.node_rank, the_plan.nnodes, "standalone" if the_plan.standalone else the_plan.master)
    failures: list[RankFailure] = []
    signalled = False
    try:
        elastic_launch(config, sys.executable)("-m", "job", *argv)
    except ChildFailedError as exc:
        failures = failures_from(exc.failures)
    except SignalException as exc:
        signalled = True
        log.warning("%s received: every worker was signalled and has saved or stopped", signal.Signals(exc.sigval).name)
        failures = failures_in(log_dir)  # normally every worker's 143; the agent reports none after a signal
    except RendezvousError as exc:
        # Another node never joined (or the master is not up yet): a retry of the pods can pass.
        raise TransientError(f"rendezvous of {the_plan.nnodes} node(s) at {the_plan.master or 'localhost'} failed: "
                             f"{exc}") from exc
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)  # after the records were read: nothing else is kept there
    code, first = launcher_exit_code(failures, signalled)
    return code, None if first is None else describe(first, the_plan)


def describe(first: RankFailure, the_plan: LaunchPlan) -> tuple[str, str]:
    """(message, traceback) to print for the first failure; a rank without a record died before it could write one."""
    if first.message:
        return first.message, first.detail
    where = f"rank {first.rank} of {the_plan.nproc_per_node * the_plan.nnodes}" if first.rank >= 0 else "a worker"
    if first.code > 128 and first.code - 128 in set(signal.valid_signals()):
        name = signal.Signals(first.code - 128).name
        return f"{where} was killed by {name} (exit {first.code})" + (
            "; out of memory?" if first.code == 137 else ""), ""
    return f"{where} exited {first.code} without a message; its output is above", ""

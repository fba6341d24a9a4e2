"""DDP helpers: torchrun's standard variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) drive everything.

`torchrun --nproc_per_node=N -m job run` (single node) or a c10d rendezvous through an existing engine (multi-node)
starts one process per GPU. The process group is created once, early, through accelerate's PartialState: the same
state the Trainer uses later, with nccl on CUDA and gloo on the CPU. Without torchrun every helper is a no-op.

Every decision the ranks must agree on is made by global rank 0 and broadcast (`main_process_result`); a rank that
fails tells the others (`every_rank_ok`, `main_process_result`), and no collective waits forever:
- the training group (gradient all-reduce, the preemption vote, the RNG-state gather) times out after
  STEP_TIMEOUT_S: one optimizer step never takes that long, so a rank stuck there is stuck;
- a second group (gloo, on the CPU) carries the waits for work that one rank does alone (rank 0's preflight of
  every row, its pre- and post-eval, the save, upload and push; each node's download) with WAIT_TIMEOUT_S.
A timeout (or a peer that vanished) in one of the job's own collectives is CollectiveFailed: exit 3, naming the
collective and the ranks.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from job.errors import CollectiveFailed, PeerFailed, exit_code_for, find_job_error

log = logging.getLogger(__name__)

# The training group's timeout. A step of the 8B model with the largest batch that fits takes seconds to a minute;
# torch's own defaults (10 min for nccl, 30 min for gloo) differ by backend: one value for both.
STEP_TIMEOUT_S = 600
# The wait group's: the longest phase one rank works alone while the others wait. Rank 0's pre- and post-eval
# generate an answer per eval row (SFT_EVAL_SUBSET rows of the 8B model: tens of minutes for thousands of rows), and
# preflight decodes every image once. Two hours bound a hang of a pod's whole GPU set, not a legitimate phase.
WAIT_TIMEOUT_S = 7200
_groups: dict[str, Any] = {}  # "wait": the gloo group of the waits for one rank's work


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return world_size() > 1


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def init_process_group() -> None:
    """Create the process group now, so preflight and eval can synchronise ranks before the Trainer exists."""
    if not is_distributed():
        return
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=STEP_TIMEOUT_S))
    # gloo whatever the training backend: objects travel on the CPU, and nccl would hold a GPU stream for hours.
    with collective("creating the wait group", "every rank"):
        _groups["wait"] = dist.new_group(backend="gloo", timeout=timedelta(seconds=WAIT_TIMEOUT_S))
    log.info("distributed: rank %d of %d (local rank %d, backend %s; collectives time out after %d s, waits for "
             "one rank's work after %d s)", state.process_index, state.num_processes, state.local_process_index,
             state.backend, STEP_TIMEOUT_S, WAIT_TIMEOUT_S)


def _wait_group():
    """The group of the waits for one rank's work (None, the default group, before init_process_group)."""
    return _groups.get("wait")


def is_collective_failure(exc: BaseException) -> bool:
    """A collective that timed out or lost a peer, as torch's backends raise it (gloo: a RuntimeError "Timed out
    waiting ...ms" or "Connection closed by peer"; nccl with blocking waits: a DistBackendError)."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    markers = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer")
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in markers)


@contextlib.contextmanager
def collective(name: str, waited_for: str) -> Iterator[None]:
    """Run one of the job's collectives; a timeout or a vanished peer becomes CollectiveFailed (exit 3). Without
    torchrun there is no collective, and nothing is reinterpreted."""
    if not is_distributed():
        yield
        return
    try:
        yield
    except Exception as exc:
        if not is_collective_failure(exc):
            raise
        problem = "timed out" if "imed out" in str(exc) or "Timeout" in type(exc).__name__ else "lost a peer"
        raise CollectiveFailed(name, rank(), waited_for, f"{problem} ({one_line(exc, 200)}),") from exc


def barrier(name: str = "barrier") -> None:
    """Every rank waits for the others (on the wait group: one of them may be uploading or downloading)."""
    if is_distributed():
        import torch.distributed as dist

        with collective(name, f"all {world_size()} ranks"):
            dist.barrier(group=_wait_group())


def broadcast_from_main(value: Any, name: str = "the broadcast of rank 0's result") -> Any:
    """Rank 0's `value` on every rank (any picklable object); the others wait for rank 0 on the wait group."""
    if not is_distributed():
        return value
    import torch.distributed as dist

    box = [value if is_main_process() else None]
    with collective(name, "rank 0"):
        dist.broadcast_object_list(box, src=0, group=_wait_group())
    return box[0]


def gather_to_main(value: Any) -> list[Any] | None:
    """Every rank's `value` (picklable), in rank order, on rank 0; None on the other ranks."""
    if not is_distributed():
        return [value]
    import torch.distributed as dist

    gathered: list[Any] | None = [None] * world_size() if is_main_process() else None
    with collective("the gather to rank 0", f"all {world_size()} ranks"):
        dist.gather_object(value, gathered, dst=0)
    return gathered


def any_rank(flag: bool, device, name: str = "the vote of every rank") -> bool:
    """True on every rank when it is True on at least one (an all-reduce MAX), so all ranks act at the same step."""
    if not is_distributed():
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    with collective(name, f"all {world_size()} ranks"):
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def smallest(value: int, device, name: str = "the minimum over every rank") -> int:
    """The smallest `value` of all ranks, on every rank (an all-reduce MIN): what fits on every rank's device."""
    if not is_distributed():
        return value
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    with collective(name, f"all {world_size()} ranks"):
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The exception's whole message on one line (a ConfigError lists its problems on the lines after the first), or
    its class name when the message is empty (a bare `assert`)."""
    return (" ".join(str(exc).split()) or type(exc).__name__)[:limit]


def failure_record(exc: BaseException) -> tuple[int, str]:
    """(exit code, message) of a failure, for the other ranks: whatever the exception looks like."""
    return exit_code_for(exc), one_line(find_job_error(exc) or exc)


def _agree(error: BaseException | None, name: str) -> None:
    """Every rank says whether it failed (an all-gather); if any did, every rank raises: the failing one its own
    error, the others PeerFailed naming the first failing rank with its exit code."""
    import torch.distributed as dist

    outcomes: list[Any] = [None] * world_size()
    with collective(name, f"all {world_size()} ranks"):
        dist.all_gather_object(outcomes, None if error is None else failure_record(error), group=_wait_group())
    if error is not None:
        raise error
    first = next(((r, o) for r, o in enumerate(outcomes) if o is not None), None)
    if first is not None:
        raise PeerFailed(first[0], *first[1])


def every_rank_ok(fn, *args, **kwargs):
    """Run `fn` on every rank (checks of what each node has: its output dir, its paths); if it fails on any rank,
    every rank fails with the first failing rank's exit code instead of leaving the others in the next collective."""
    if not is_distributed():
        return fn(*args, **kwargs)
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:
        _agree(exc, "the check on every rank")
        raise  # not reached: _agree raises this rank's own error
    _agree(None, "the check on every rank")
    return result


def main_process_result(fn, *args, **kwargs):
    """Run `fn` on rank 0 only and hand its result (or the fact that it failed) to every rank.

    The other ranks wait in the broadcast instead of duplicating CPU-heavy work (preflight) or eval. If rank 0
    fails, the other ranks raise too rather than hang until the collective timeout.
    """
    if not is_distributed():
        return fn(*args, **kwargs)

    name = f"the wait for rank 0's {getattr(fn, '__name__', 'step').strip('_')}"
    if is_main_process():
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            broadcast_from_main(("error", *failure_record(exc)), name)
            raise
        broadcast_from_main(("ok", result), name)
        return result
    outcome = broadcast_from_main(None, name)
    if outcome[0] == "error":
        raise PeerFailed(0, outcome[1], outcome[2])
    return outcome[1]


@contextlib.contextmanager
def local_main_first() -> Iterator[None]:
    """Local rank 0 of each node runs the block first (downloads into the node's cache); the others then find it
    there. A failure anywhere fails every rank with its code: the other ranks of the node skip the block when their
    local rank 0 failed, and no rank of another node waits for it. Without torchrun it just runs the block."""
    if not is_distributed():
        yield
        return
    local_main = int(os.environ.get("LOCAL_RANK", "0")) == 0
    name = "the wait for each node's local rank 0"
    if not local_main:
        _agree(None, name)  # raises when a local rank 0 failed
    failure = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - told to every rank, then re-raised by _agree
        failure = exc
    if local_main:
        _agree(failure, name)
        _agree(None, name)
    else:
        _agree(failure, name)

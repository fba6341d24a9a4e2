"""DDP helpers: torchrun's standard variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) drive everything.

`torchrun --nproc_per_node=N -m job run` (single node) or a c10d rendezvous through an existing engine (multi-node)
starts one process per GPU. The process group is created once, early, through accelerate's PartialState: the same
state the Trainer uses later, with nccl on CUDA and gloo on the CPU. Without torchrun every helper is a no-op.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from job.errors import ExitCode, PeerFailed, find_job_error

log = logging.getLogger(__name__)


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
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    log.info("distributed: rank %d of %d (local rank %d, backend %s)", state.process_index, state.num_processes,
             state.local_process_index, state.backend)


def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (any picklable object)."""
    if not is_distributed():
        return value
    import torch.distributed as dist

    box = [value if is_main_process() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(value: Any) -> list[Any] | None:
    """Every rank's `value` (picklable), in rank order, on rank 0; None on the other ranks."""
    if not is_distributed():
        return [value]
    import torch.distributed as dist

    gathered: list[Any] | None = [None] * world_size() if is_main_process() else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def any_rank(flag: bool, device) -> bool:
    """True on every rank when it is True on at least one (an all-reduce MAX), so all ranks act at the same step."""
    if not is_distributed():
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def main_process_result(fn, *args, **kwargs):
    """Run `fn` on rank 0 only and hand its result (or the fact that it failed) to every rank.

    The other ranks wait in the broadcast instead of duplicating CPU-heavy work (preflight) or eval. If rank 0
    fails, the other ranks raise too rather than hang until the collective timeout.
    """
    if not is_distributed():
        return fn(*args, **kwargs)

    if is_main_process():
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            found = find_job_error(exc)
            code = int(found.exit_code) if found is not None else int(ExitCode.INTERNAL)
            broadcast_from_main(("error", code, str(found or exc).splitlines()[0][:300]))
            raise
        broadcast_from_main(("ok", result))
        return result
    outcome = broadcast_from_main(None)
    if outcome[0] == "error":
        raise PeerFailed(ExitCode(outcome[1]), f"rank 0 failed: {outcome[2]} (full message in rank 0's log)")
    return outcome[1]


@contextlib.contextmanager
def local_main_first() -> Iterator[None]:
    """Local rank 0 of each node runs the block first (downloads into the node's cache); the others then find it
    there. Without torchrun it just runs the block."""
    if not is_distributed():
        yield
        return
    from accelerate import PartialState

    with PartialState().local_main_process_first():
        yield

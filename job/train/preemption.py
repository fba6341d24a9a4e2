"""SIGTERM/SIGINT: save a COMPLETED checkpoint at the next step boundary and exit 143, within a time budget.

Kubernetes sends SIGTERM, waits terminationGracePeriodSeconds, then SIGKILLs. The handler only records the signal;
`PreemptionCallback` turns it into `should_save` + `should_training_stop` at the next step end (agreed by every DDP
rank through an all-reduce, so all ranks stop at the same step and none hangs in a collective). The flow then waits
for the checkpoint upload and raises `Preempted` (exit 143), skipping post-eval and push: exiting 0 would mark the
Job complete with half-trained weights.

The budget (SFT_PREEMPT_GRACE_S) is enforced by a watchdog thread: if the step, the save and the upload have not
finished in time, the process exits 143 anyway. Nothing is lost by that: a checkpoint counts only once its COMPLETED
marker is written (last), so a resume uses the previous COMPLETED checkpoint.

Outside the training loop (preflight, model load, eval, push) there is nothing resumable in flight: the handler
raises `Preempted` right away, and a rerun with the same SFT_RUN_ID starts again from the newest checkpoint.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from transformers import TrainerCallback

from job.errors import ExitCode, Preempted
from job.train import distributed

log = logging.getLogger("job.train")
SIGNALS = (signal.SIGTERM, signal.SIGINT)
# What signal.signal takes and returns: a handler function, SIG_DFL/SIG_IGN, or None (not installed from Python).
SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class PreemptionGuard:
    """Owns the signal handlers for one run. Use as a context manager around the whole run."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.signal: int | None = None
        self.received_at: float | None = None
        self.in_training = False
        self._pid = os.getpid()
        self._previous: dict[int, SignalHandler] = {}
        self._disarmed = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            # Once preempted, the process is on its way out with 143 (the watchdog bounds it): a second signal
            # (torchrun forwards one to every rank when the first rank exits) must not turn that into -15.
            signal.signal(sig, signal.SIG_IGN if self.requested else handler)

    # -- state -----------------------------------------------------------------------------------------------
    @property
    def requested(self) -> bool:
        return self.signal is not None

    def seconds_left(self) -> float:
        if self.received_at is None:
            return float("inf")
        return self.grace_s - (time.monotonic() - self.received_at)

    def raise_if_requested(self, step: int | None = None) -> None:
        if self.signal is not None:  # self.requested, spelled out for the type checker
            where = f" at step {step}" if step is not None else ""
            raise Preempted(f"preempted by {signal.Signals(self.signal).name}{where}; rerun with the same "
                            "SFT_RUN_ID to resume from the newest COMPLETED checkpoint")

    # -- the handler -----------------------------------------------------------------------------------------
    def _handle(self, signum: int, _frame) -> None:
        if os.getpid() != self._pid:
            # A forked child (preflight or dataloader worker) inherited this handler: die as the signal would.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.signal is None:
            self.signal, self.received_at = signum, time.monotonic()
            threading.Thread(target=self._watchdog, name="preempt-watchdog", daemon=True).start()
            log.warning("%s received: %s", signal.Signals(signum).name,
                        "saving a checkpoint at the next step boundary" if self.in_training else "stopping")
        if not self.in_training:
            self.raise_if_requested()

    def disarm(self) -> None:
        """Stop the watchdog and give the previous handlers back (for embedding the job in a longer-lived process)."""
        self._disarmed.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _watchdog(self) -> None:
        if self._disarmed.wait(timeout=max(0.0, self.seconds_left())):
            return
        # Still alive after the budget: the save or upload did not fit. The previous COMPLETED checkpoint stands.
        sys.stderr.write(f"qwen3-sft: SFT_PREEMPT_GRACE_S={self.grace_s:g} s elapsed before the checkpoint was "
                         "saved and uploaded; exiting 143 (a rerun resumes from the previous COMPLETED checkpoint)\n")
        sys.stderr.flush()
        os._exit(int(ExitCode.PREEMPTED))


def leave_signals_to_the_rank(worker_id: int, init_fn: Callable[[int], Any] | None = None) -> None:
    """A DataLoader's worker_init_fn: the worker ignores SIGTERM and SIGINT, and the rank that owns it decides.

    torch elastic's agent forwards a SIGTERM to each worker's whole process group (os.killpg), and a kubelet or
    `docker stop` with an init that signals the group does the same, so the DataLoader workers get it too. torch's
    own worker handler dies of a SIGTERM that its parent did not send, and the rank's DataLoader then raises
    "DataLoader worker (pid N) is killed by signal: Terminated" in the middle of the step, before the preemption
    callback can save (measured: exit 1, no checkpoint, with SFT_DATALOADER_NUM_WORKERS=2 under the launcher).
    Ignoring it keeps the workers serving batches until the step boundary; they end when the rank shuts its
    DataLoader down, when the rank dies (their watchdog checks the parent), or at the rank's exit
    (`end_dataloader_workers`).
    """
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if init_fn is not None:
        init_fn(worker_id)


def leave_worker_signals_to_the_rank(loader) -> None:
    """Give a torch DataLoader's workers `leave_signals_to_the_rank`, and end them at this process's exit."""
    if loader.num_workers == 0:
        return
    loader.worker_init_fn = functools.partial(leave_signals_to_the_rank, init_fn=loader.worker_init_fn)
    atexit.unregister(end_dataloader_workers)  # once, and after multiprocessing's own exit handler: atexit is LIFO
    atexit.register(end_dataloader_workers)


def end_dataloader_workers() -> None:
    """At exit, SIGKILL the process's daemonic children (its DataLoader workers: nothing else of the job's is one).

    multiprocessing ends daemonic children at exit with SIGTERM and then joins them without a timeout. The workers
    ignore SIGTERM (leave_signals_to_the_rank), so a rank that exits while they are alive would wait forever: a
    failure in the middle of a step keeps the loader's iterator alive in the traceback (measured: a row error in a
    worker, exit 2 reported, the process never ended). They hold nothing to save. torch's SIGCHLD handler would take
    their deaths for a failed worker and raise in this handler (leaving the others alive): it goes first."""
    import multiprocessing

    children = [child for child in multiprocessing.active_children() if child.daemon]
    if not children:
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=10)


class PreemptionCallback(TrainerCallback):
    """Turns a received signal into save + stop at the next step boundary, on every rank at the same step.

    `save_cost_s()` estimates a save plus its upload from the last ones. If that does not fit in the time left, it
    stops without saving: a save cut off by the watchdog is wasted, and the previous COMPLETED checkpoint stands.
    """

    def __init__(self, guard: PreemptionGuard, save_cost_s=lambda: 0.0):
        self.guard = guard
        self.save_cost_s = save_cost_s
        self.stopped_at: int | None = None
        self.saved = False

    def on_step_end(self, args, state, control, **kwargs):
        if not distributed.any_rank(self.guard.requested, args.device):
            return control
        if self.guard.signal is None:  # another rank was signalled: this one stops with it
            self.guard.signal, self.guard.received_at = signal.SIGTERM, time.monotonic()
        self.stopped_at = state.global_step
        control.should_training_stop = True
        fits = self.guard.seconds_left() > 1.5 * self.save_cost_s()
        if distributed.any_rank(not fits, args.device):
            log.warning("step %d: %.1f s left but a save takes about %.1f s: stopping without saving",
                        state.global_step, self.guard.seconds_left(), self.save_cost_s())
            control.should_save = False
        else:
            control.should_save = True
            self.saved = True
        return control

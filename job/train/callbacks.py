"""Trainer callbacks: compact log lines, the COMPLETED marker that makes a checkpoint count, and the background
upload of each checkpoint to object storage."""

from __future__ import annotations

import logging
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from transformers import TrainerCallback

from job.storage.checkpoints import RemoteCheckpoints
from job.storage.completed import write_completed_marker
from job.train import distributed

__all__ = ["CompletedMarkerCallback", "LogCallback", "RankStateCallback", "RemoteCheckpointCallback"]

log = logging.getLogger("job.train")
_LOGGED = ("loss", "grad_norm", "learning_rate", "mean_token_accuracy", "epoch")


class LogCallback(TrainerCallback):
    """One plain line per logging step (readable in `kubectl logs`, where tqdm bars are noise)."""

    def __init__(self) -> None:
        self.history: list[dict] = []
        self._started = time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        self.history.append({"step": state.global_step, **logs})
        if "train_runtime" in logs:  # the Trainer's end-of-training summary, not another step
            log.info("training done: %d steps in %.0fs, mean loss %.4g", state.global_step, logs["train_runtime"],
                     logs.get("train_loss", float("nan")))
            return
        shown = " ".join(f"{k}={logs[k]:.4g}" for k in _LOGGED if isinstance(logs.get(k), (int, float)))
        elapsed = time.monotonic() - self._started
        log.info("step %d/%d %s (%.0fs)", state.global_step, state.max_steps, shown, elapsed)


def rank_state_name(rank: int) -> str:
    """The Trainer's per-rank RNG file in a checkpoint of a multi-process run."""
    return f"rng_state_{rank}.pth"


def add_missing_files(checkpoint: Path, files: dict[str, bytes]) -> list[str]:
    """Write the files this node's checkpoint lacks (another node's ranks saved them on their own disk)."""
    added = []
    for name, data in files.items():
        if not (checkpoint / name).is_file():
            (checkpoint / name).write_bytes(data)
            added.append(name)
    return added


class RankStateCallback(TrainerCallback):
    """Brings every rank's RNG state file into rank 0's checkpoint before it is marked COMPLETED and uploaded.

    Each rank saves `rng_state_<rank>.pth` on its own node's disk; only rank 0's checkpoint is marked and uploaded,
    so without this a multi-node resume would restore the dropout and sampling RNG of node 0's ranks only. The
    files are a few KB each: one gather per save, on every rank at the same step (on_save runs on all of them).
    On one node the files are all there already and nothing is written. A resume downloads the whole checkpoint on
    every node (local rank 0), so each rank finds its own file again.
    """

    def on_save(self, args, state, control, **kwargs):
        if not distributed.is_distributed():
            return control
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        mine = ckpt / rank_state_name(distributed.rank())
        gathered = distributed.gather_to_main({mine.name: mine.read_bytes()} if mine.is_file() else {})
        if gathered is not None and ckpt.is_dir():
            added = add_missing_files(ckpt, {k: v for files in gathered for k, v in files.items()})
            if added:
                log.info("checkpoint-%d: added the RNG state of other nodes' ranks: %s", state.global_step,
                         ", ".join(sorted(added)))
        return control


class CompletedMarkerCallback(TrainerCallback):
    """Writes `checkpoint-N/COMPLETED` once the Trainer has finished writing checkpoint-N.

    A checkpoint without the marker may be half-written (the pod died mid-save) and is never resumed from.
    `extra_files` (e.g. the pre-eval metrics, and the best-so-far directory of SFT_EVAL_STEPS) are copied into every
    checkpoint first, so a resume on a fresh pod finds them with the checkpoint.
    """

    def __init__(self, extra_files: tuple[Path, ...] = ()):
        self.extra_files = extra_files

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                for extra in self.extra_files:
                    if extra.is_file():
                        shutil.copy2(extra, ckpt / extra.name)
                    elif extra.is_dir():
                        shutil.copytree(extra, ckpt / extra.name, dirs_exist_ok=True)
                write_completed_marker(ckpt, state.global_step)
        return control


class RemoteCheckpointCallback(TrainerCallback):
    """After each local save (and its local COMPLETED), snapshot the checkpoint and upload it in the background."""

    def __init__(self, remote: RemoteCheckpoints, staging: Path):
        self.remote, self.staging = remote, staging
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-upload")
        self._pending: list[Future] = []
        self.last_upload_s = 0.0  # feeds the preemption budget: a save counts only once it is uploaded

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return control
        self._raise_failed()
        step = state.global_step
        snapshot = self.staging / f"checkpoint-{step}"
        shutil.rmtree(snapshot, ignore_errors=True)
        shutil.copytree(Path(args.output_dir) / f"checkpoint-{step}", snapshot, copy_function=os.link)
        self._pending.append(self._pool.submit(self._upload, snapshot, step))
        return control

    def _upload(self, snapshot: Path, step: int) -> None:
        started = time.monotonic()
        try:
            self.remote.upload(snapshot, step)
            self.last_upload_s = time.monotonic() - started
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)

    def _raise_failed(self) -> None:
        for future in [f for f in self._pending if f.done()]:
            self._pending.remove(future)
            future.result()  # re-raises an upload error here, on the training thread

    def drain(self) -> None:
        """Wait for every queued upload; raise the first failure."""
        for future in self._pending:
            future.result()
        self._pending.clear()

    def on_train_end(self, args, state, control, **kwargs):
        self.drain()
        return control

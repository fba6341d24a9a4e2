"""Every row through the row checker (job/data/checks.py), in this process or in worker processes, in dataset order.

Only a few numbers per row are kept (a `SplitTally` per split), never a decoded image. `job.preflight.run` decides
what the tallies mean (the bad-row policy) and writes the report.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import multiprocessing
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job.data.checks import RowChecker, RowResult
from job.data.loaders import content_fingerprint

# Below this, rows are checked in-process. Starting the pool (a forkserver that imports torch and transformers, then
# each worker unpickling the ~16 MB processor) measured 20-40 s on a busy 2-core machine, against 2.7 ms per demo row
# in-process (272 rows in 0.7 s) and tens of ms per real photo: the pool pays off from a few thousand rows.
POOL_MIN_ROWS = 2000


def make_issue(
    split: str, row_id: str | None, index: int | None, kind: str, field_name: str, message: str, fix: str
) -> dict:
    return {"split": split, "row_id": row_id, "index": index, "kind": kind, "field": field_name, "message": message,
            "fix": fix}


@dataclass
class SplitTally:
    """Running totals for one split: everything the report needs, a few numbers per row."""

    role: str
    name: str
    rows: int
    errors: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)
    bad: list[tuple[int, str]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    visual: list[int] = field(default_factory=list)
    supervised: list[int] = field(default_factory=list)
    labels: Counter = field(default_factory=Counter)
    label_rows: dict[str, str] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    lengths: dict[int, int] = field(default_factory=dict)  # row index -> total tokens
    row_digests: dict[int, str] = field(default_factory=dict)  # row index -> digest of its image bytes and fields
    skipped: bool = False

    def add(self, r: RowResult, train_digests: dict[str, str] | None) -> None:
        for e in r.errors:
            self.errors.append(make_issue(self.name, r.row_id, r.index, e.kind, e.field, e.message, e.fix))
        if r.errors:
            self.bad.append((r.index, r.row_id))
        if r.tokens is not None:
            self.lengths[r.index] = r.tokens
        for values, value in ((self.tokens, r.tokens), (self.visual, r.visual_tokens),
                              (self.supervised, r.supervised_tokens)):
            if value is not None:
                values.append(value)
        if not r.errors and r.label is not None:  # labels of the rows that would be trained on (or scored)
            self.labels[r.label] += 1
            self.label_rows.setdefault(r.label, r.row_id)
        if r.digest is not None:
            self.row_digests[r.index] = r.digest
            self._duplicates(r, r.digest, train_digests)

    def kept_indices(self) -> list[int]:
        gone = {index for index, _ in self.bad} if self.skipped else set()
        return [i for i in range(self.rows) if i not in gone]

    def fingerprint(self) -> str:
        """The split as training (or eval) reads it: the kept rows' digests in order (image bytes included)."""
        return content_fingerprint(self.row_digests.get(i, "") for i in self.kept_indices())

    def _duplicates(self, r: RowResult, digest: str, train_digests: dict[str, str] | None) -> None:
        if digest in self.digests:
            first = self.digests[digest]
            self.warnings.append(make_issue(self.name, r.row_id, r.index, "duplicate_row", "row",
                                        f"repeats {first} (same image bytes, query, caption and target)",
                                        "drop the repeated row (duplicates over-weight it)"))
        else:
            self.digests[digest] = r.row_id
        if train_digests and digest in train_digests:
            self.warnings.append(make_issue(self.name, r.row_id, r.index, "eval_row_in_train", "row",
                                        f"is identical to training row {train_digests[digest]}, so eval scores are "
                                        "inflated", "remove it from one of the splits"))


# -- scanning ----------------------------------------------------------------------------------------------------
# role -> (dataset view, checker): set by scan() in this process, and by _init_worker in each pool worker.
_JOBS: dict[str, tuple[Any, RowChecker]] = {}


def _init_worker(jobs: dict[str, tuple[Any, RowChecker]]) -> None:
    """Runs once per worker: the views and checkers arrive pickled (the processor, and the datasets by their Arrow
    files), instead of being inherited through fork."""
    # One worker per core already; tokenizers' own Rust thread pool inside each would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _JOBS.update(jobs)


def _check_task(task: tuple[str, int]) -> tuple[str, RowResult]:
    role, index = task
    view, checker = _JOBS[role]
    return role, checker.check(view[index], index)


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The container's CPU quota (Kubernetes limits.cpu), which the affinity mask does not show; None if unlimited."""
    v2, v1 = root / "cpu.max", root / "cpu" / "cpu.cfs_quota_us"
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()
        elif v1.is_file():
            quota, period = v1.read_text().strip(), v1.with_name("cpu.cfs_period_us").read_text().strip()
        else:
            return None
        return None if quota in ("max", "-1") else max(1, int(quota) // int(period))
    except (OSError, ValueError):
        return None


def worker_count() -> int:
    try:
        cores = len(os.sched_getaffinity(0))  # the CPUs this process may run on
    except AttributeError:
        cores = os.cpu_count() or 1
    # At most 16: each worker may hold one image of up to MAX_DECODE_PIXELS decoded (~270 MB as RGB).
    return max(1, min(cores, cgroup_cpu_limit() or cores, 16))


def effective_workers(workers: int, total: int) -> int:
    if workers < 2 or total < POOL_MIN_ROWS:
        return 1
    return workers


def _pool_context(preload: list[str]) -> multiprocessing.context.BaseContext:
    """Workers start from a clean process, never by forking this one: by the time preflight runs, `run` may have
    threads (W&B, the upload thread; under torch 2.8, loading a 4-bit model starts inductor's compile-worker pool,
    because bitsandbytes' CPU ops are torch.compile'd), and a fork copies their held locks into a child where no
    thread will ever release them (Python 3.12 warns about it). The forkserver is itself started by fork+exec, so
    it has no threads; spawn where there is no forkserver (Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # The forkserver imports these once (torch, the processor's transformers modules); each worker forked from it
    # starts with them instead of importing them itself (seconds each, on 2 cores).
    context.set_forkserver_preload(preload)
    return context


def _check_chunk(tasks: list[tuple[str, int]]) -> list[tuple[str, RowResult]]:
    return [_check_task(task) for task in tasks]


def _chunks(tasks: Iterator, size: int) -> Iterator[list]:
    while chunk := list(itertools.islice(tasks, size)):
        yield chunk


def _pool_map(executor, tasks: Iterator, chunksize: int, window: int) -> Iterator[tuple[str, RowResult]]:
    """Results in task order, with at most `window` chunks in flight (memory stays bounded for any split size)."""
    pending: collections.deque = collections.deque()
    try:
        for chunk in _chunks(tasks, chunksize):
            pending.append(executor.submit(_check_chunk, chunk))
            if len(pending) >= window:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    except BrokenProcessPool as exc:  # a RuntimeError: exit 1, with its traceback
        exc.add_note("a preflight worker process died (killed for memory, or an image decoder crashed); rerun with "
                     "more memory")
        raise


@contextlib.contextmanager
def _mapper(workers: int, total: int) -> Iterator[Callable]:
    """An ordered map: in-process for small jobs, else worker processes (deterministic: results come back in order).

    concurrent.futures rather than multiprocessing.Pool: a worker killed by the OOM killer makes the executor raise
    BrokenProcessPool, where Pool.imap would wait forever.
    """
    if effective_workers(workers, total) == 1:
        yield lambda tasks: map(_check_task, tasks)
        return
    chunksize = max(1, min(32, total // (workers * 16)))
    processors = {type(checker.processor).__module__ for _, checker in _JOBS.values()}
    with ProcessPoolExecutor(
        workers,
        mp_context=_pool_context([__name__, *sorted(processors)]),
        initializer=_init_worker,
        initargs=(dict(_JOBS),),
    ) as executor:
        yield lambda tasks: _pool_map(executor, iter(tasks), chunksize, window=workers * 4)


def scan(jobs: dict[str, tuple[Any, RowChecker, str]], workers: int) -> dict[str, SplitTally]:
    """Check every row of every split; jobs maps role -> (dataset view, checker, split name)."""
    from tqdm.auto import tqdm

    tallies = {role: SplitTally(role, name, len(view)) for role, (view, _, name) in jobs.items()}
    total = sum(t.rows for t in tallies.values())
    tasks = itertools.chain.from_iterable(((role, i) for i in range(len(view))) for role, (view, _, _) in jobs.items())
    _JOBS.update({role: (view, checker) for role, (view, checker, _) in jobs.items()})
    try:
        with _mapper(workers, total) as ordered_map, tqdm(total=total, desc="preflight", unit="row", file=sys.stderr,
                                                         disable=None, mininterval=1.0) as bar:
            for role, result in ordered_map(tasks):
                train = tallies.get("train")
                tallies[role].add(result, train.digests if role == "eval" and train else None)
                bar.update()
    finally:
        _JOBS.clear()
    return tallies

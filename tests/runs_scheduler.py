"""The shared runs' scheduler (tests/runs.py): at most `n` job processes at once, each kind of run in a thread.

A driver (`def name(ctx: Ctx) -> result`) gets a Ctx: the tiny assets, its own directory, its priority, the slots it
must hold while its processes run, and the results of the kinds it reads (`ctx.result(kind)`).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers import job_env
from runs_processes import DEADLINE_S, Run, Zygote, start


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

    def __init__(self, slots: Slots, zygote: Zygote, kinds: dict[str, Kind]):
        self.slots, self.zygote, self.kinds = slots, zygote, kinds
        self.futures: dict[str, Future] = {}
        self.started, self.finished_s = time.monotonic(), {}  # kind -> seconds from launch to its result
        self._pool = ThreadPoolExecutor(max_workers=len(kinds), thread_name_prefix="job-run")

    def launch(self, kind: str, ctx: Ctx) -> None:
        def timed():
            try:
                return self.kinds[kind].driver(ctx)
            finally:
                self.finished_s[kind] = time.monotonic() - self.started
        self.futures[kind] = self._pool.submit(timed)

    def result(self, kind: str):
        return self.futures[kind].result(timeout=3 * DEADLINE_S)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

"""The shared runs' processes (tests/runs.py): a finished run, the zygote that forks job processes, and the waits.

Job processes are forked by the zygote (tests/zygote.py: one interpreter that has imported the job, which saves
11-14 CPU-s of imports per process on 2 cores); each is still its own process with its own environment, signals and
exit code. Every wait here ends on an event (a file, a log line, an exit); DEADLINE_S is a failsafe.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers import REPO

DEADLINE_S = 600  # a failsafe only: every wait here ends on an event (a file, a log line, an exit)



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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

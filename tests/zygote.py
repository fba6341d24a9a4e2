"""A preloaded interpreter for the slow tier's job processes: `python -m job ...` without paying the imports each time.

Importing the job (torch, transformers, peft, TRL, bitsandbytes) costs 11-14 CPU-seconds on the 2-core CI machine,
more than a whole 8-step tiny run trains; the slow tier starts about thirty job processes. This script imports them
once, then forks one child per request, as the preflight pool's forkserver does. Each child is its own process with
the request's environment, working directory, stdin from /dev/null and stdout/stderr in files; it runs what followed
the interpreter's name (`-m job run`, another module, `-c` code or a script) through runpy, as the interpreter does,
and exits through the normal interpreter shutdown (atexit handlers run), so signals, exit codes and -SIGKILL are
those of a real process. What a fork cannot change is what modules read from the environment at import time: the
zygote starts with the environment every job run shares (HF_HUB_OFFLINE, WANDB_MODE, TOKENIZERS_PARALLELISM,
OMP_NUM_THREADS); a run that needs another one at import (HF_ENDPOINT, PYTHONWARNINGS) starts a real interpreter
(tests/runs.py: `fresh=True`).

Protocol, JSON lines. stdin: {"argv": [...], "env": {...}, "cwd": str, "stdout": path, "stderr": path}. stdout:
{"pid": n} when a child is forked, {"exited": pid, "code": c, "cpu_s": s} when it ends (c < 0: killed by signal
-c; s: the CPU seconds it used). The zygote
runs no threads, so forking it is safe; it exits when its stdin closes.
"""

from __future__ import annotations

import ctypes
import json
import os
import runpy
import select
import sys

# The entry point and what its commands import (run: the flow; eval: the eval command), and the heavy libraries the
# job imports only where it uses them (datasets, boto3).
import boto3  # noqa: F401
import datasets  # noqa: F401

import job.cli
import job.eval.command
import job.export.command
import job.train.flow  # noqa: F401

# Not W&B (0.3 CPU-s in a child, measured after the imports above): `import wandb` makes its media staging directory
# and registers its removal at exit, so the first forked child to exit would delete it for every other one (a
# wandb.Table logged afterwards failed with "No such file or directory"). Each child imports its own.
assert "wandb" not in sys.modules, "a preloaded module imported wandb: its staging directory would be shared"


def _malloc_tunables(env: dict[str, str]) -> None:
    """glibc reads MALLOC_TRIM_THRESHOLD_ and MALLOC_MMAP_THRESHOLD_ when a process starts; in a fork, mallopt does
    it (a value glibc refuses from the environment, mallopt refuses too)."""
    libc = ctypes.CDLL(None)
    for name, param in (("MALLOC_TRIM_THRESHOLD_", -1), ("MALLOC_MMAP_THRESHOLD_", -3)):
        if name in env:
            libc.mallopt(param, min(int(env[name]), 2**31 - 1))


def _child(request: dict) -> None:
    """Become `python <argv>`: never returns (SystemExit goes through the interpreter's normal shutdown)."""
    os.environ.clear()
    os.environ.update(request["env"])
    _malloc_tunables(request["env"])
    os.chdir(request["cwd"])
    sys.path[0] = request["cwd"]  # as `python -m` puts the working directory first
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(target, fd)
        os.close(target)
    # As PYTHONUNBUFFERED=1 does for a fresh interpreter: every line reaches the file when it is written.
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
    argv = request["argv"]
    if argv[0] == "-m":
        sys.argv = argv[1:]  # run_module puts the module's file in sys.argv[0]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))  # as `python script.py` puts the script's folder
        runpy.run_path(argv[0], run_name="__main__")
    raise SystemExit(0)


def _report(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> None:
    children: set[int] = set()
    buffered = b""
    while True:
        ready, _, _ = select.select([0], [], [], 0.05)
        for pid in list(children):
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                cpu_s = round(usage.ru_utime + usage.ru_stime, 2)  # its own and its waited-for children's
                _report({"exited": pid, "code": os.waitstatus_to_exitcode(status), "cpu_s": cpu_s})
        if not ready:
            continue
        chunk = os.read(0, 1 << 16)
        if not chunk:
            return  # the harness closed stdin: its children are its to kill
        buffered += chunk
        while b"\n" in buffered:
            line, buffered = buffered.split(b"\n", 1)
            request = json.loads(line)
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                _child(request)
            children.add(pid)
            _report({"pid": pid})


if __name__ == "__main__":
    main()

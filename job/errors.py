"""Error taxonomy and the process exit codes it maps to (one source of truth).

Modelled on llm-foundry's exceptions: a *user* error is something the person launching the job can
fix (config, data, credentials) and must never print a traceback; a *transient* error survived the
library-level retries (botocore, huggingface_hub) and may succeed if Kubernetes retries the pod;
anything else is an internal error (a bug) and keeps its traceback.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    INTERNAL = 1
    USER = 2
    TRANSIENT = 3
    GATE_REFUSED = 4
    PREEMPTED = 143  # 128 + SIGTERM, what Kubernetes expects from a signalled container

    @property
    def retryable(self) -> bool:
        """Whether a Kubernetes Job should retry a pod that exited with this code."""
        return self in (ExitCode.INTERNAL, ExitCode.TRANSIENT, ExitCode.PREEMPTED)


EXIT_CODE_MEANING = {
    ExitCode.OK: "success: adapter saved (and pushed when requested)",
    ExitCode.INTERNAL: "internal error (a bug or an unexpected library failure); traceback printed",
    ExitCode.USER: "user error: config, data, preflight, credentials or permissions; fix the input",
    ExitCode.TRANSIENT: "transient external error (network, throttling) that survived the retries",
    ExitCode.GATE_REFUSED: "quality gate refused the push; artifacts are kept in storage",
    ExitCode.PREEMPTED: "preempted (SIGTERM/SIGINT) after saving a COMPLETED checkpoint; rerun resumes",
}


class JobError(Exception):
    """Base class for errors that carry their own exit code."""

    exit_code: ExitCode = ExitCode.INTERNAL


class UserError(JobError):
    """Bad config, bad data or bad credentials: exit 2, one clear message, no traceback."""

    exit_code = ExitCode.USER


class ConfigError(UserError):
    """One or more invalid settings; `problems` lists every one so they can be fixed in one go."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


class DataError(UserError, ValueError):
    """A dataset row or split is unusable; the message names the split, row and field.

    It is also a ValueError, so code written against the seed collator (which raised ValueError) still catches it.
    """


class TransientError(JobError):
    """A network or service error that outlived the library retries: exit 3."""

    exit_code = ExitCode.TRANSIENT


class GateRefused(JobError):
    """The quality gate refused the push: exit 4."""

    exit_code = ExitCode.GATE_REFUSED


class Preempted(JobError):
    """Training stopped on SIGTERM/SIGINT after a COMPLETED checkpoint: exit 143."""

    exit_code = ExitCode.PREEMPTED


class PeerFailed(JobError):
    """On a DDP rank > 0: rank 0 failed in a step only it runs (preflight, eval); exit with rank 0's code."""

    def __init__(self, exit_code: ExitCode, message: str):
        super().__init__(message)
        self.exit_code = exit_code


def find_job_error(exc: BaseException) -> JobError | None:
    """The first JobError in the cause/context chain: a DataError wrapped as 'Qwen3 collate failed' is still exit 2."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, JobError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None

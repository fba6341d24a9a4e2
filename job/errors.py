"""Error taxonomy and the process exit codes it maps to (one source of truth).

Modelled on llm-foundry's exceptions: a *user* error is something the person launching the job can
fix (config, data, credentials) and must never print a traceback; a *transient* error survived the
library-level retries (botocore, huggingface_hub) and may succeed if Kubernetes retries the pod;
anything else is an internal error (a bug) and keeps its traceback.

Every error class of the job is here, each carrying its data (`ConfigError.problems`, `DataError.row`, ...), and so is
every mapping to an exit code: the class's `exit_code`, `exit_code_for` (an exception, its cause chain searched),
`INTERRUPTED` (Ctrl-C), `retryable` and `reported_code` (SFT_EXIT_CODES=kubeflow). Which library exception is which
error is read in job/utils/library_errors.py. Context is added to an exception with `add_note`, never by wrapping it;
the only wrappers are the seed's three RuntimeErrors (`Qwen3 collate failed`, `evaluate_qwen3 failed`, `Qwen3-VL SFT
failed`), which `find_job_error` sees through.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path

from job.utils import library_errors


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


# Ctrl-C (KeyboardInterrupt) before a checkpoint could be saved: 128 + SIGINT, as a shell reports it. An interactive
# stop, outside the contract's codes (a pod is stopped by SIGTERM: Preempted, 143).
INTERRUPTED = 130


def exit_code_for(exc: BaseException) -> int:
    """The exit code an exception ends the job with: its JobError's (find_job_error), else 1 (a bug)."""
    job_error = find_job_error(exc)
    return int(job_error.exit_code) if job_error is not None else int(ExitCode.INTERNAL)


def retryable(code: int) -> bool:
    """Whether a Kubernetes Job should retry this exit code: the contract's own codes as ExitCode says; any other
    code below 128 comes from no rank of this job (an interpreter that died on its own, a library's sys.exit) and is
    taken for an internal error, retryable; 128 and above are signal deaths (OOM kill, SIGTERM)."""
    known = {int(c): c for c in ExitCode}
    if code in known:
        return known[code].retryable
    return code > 0


def reported_code(code: int, style: str) -> int:
    """The code as it leaves the process. `kubeflow` (SFT_EXIT_CODES): a PyTorchJob with `restartPolicy: ExitCode`
    retries only 128-255 and takes 1-127 as permanent, so the retryable codes below 128 (1 internal, 3 transient)
    become 128 + code (129, 131); 2 and 4 stay permanent, 143 stays retryable."""
    if style == "kubeflow" and 0 < code < 128 and retryable(code):
        return 128 + code
    return code


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

    What the message names is also carried, when one row is at fault: `row` ("train.jsonl:4", "train[17]"),
    `field` (a column, or "line" for a line of a JSONL file that cannot be parsed) and `fix` (what to do about it).
    Preflight reads these instead of parsing the message. It is also a ValueError, so code written against the
    first collator of this job (it raised ValueError) still catches it.

        >>> err = DataError.for_row("train.jsonl:4", "image", "is missing", fix="every row needs an image")
        >>> str(err)
        "train.jsonl:4: field 'image' is missing; every row needs an image"
        >>> err.row, err.field
        ('train.jsonl:4', 'image')
    """

    def __init__(self, message: str, *, row: str | None = None, field: str | None = None, fix: str | None = None):
        super().__init__(message)
        self.row, self.field, self.fix = row, field, fix

    @classmethod
    def for_row(cls, row: str, field: str, problem: str, fix: str | None = None) -> DataError:
        """`{row}: field '{field}' {problem}[; {fix}]`, with row, field and fix carried."""
        return cls(f"{row}: field '{field}' {problem}" + (f"; {fix}" if fix else ""), row=row, field=field, fix=fix)


class LabelNamesMissing(DataError):
    """SFT_TARGET_FORMAT=label on a column of plain integers that declares no class names (no ClassLabel feature in
    the data, its dataset_info.json or its card) and no SFT_LABEL_NAMES: exit 2, naming the values found."""

    def __init__(self, column: str, values: list[int]):
        self.column, self.values = column, list(values)
        shown = ", ".join(map(str, self.values[:20])) + (", ..." if len(self.values) > 20 else "")
        fix = ("set SFT_LABEL_NAMES to the class names in index order, comma separated (index 0 first, e.g. "
               "SFT_LABEL_NAMES=non-sarcastic,sarcastic)")
        super().__init__(f"SFT_TARGET_KEY={column!r} holds plain integers (values found: {shown}) and declares no "
                         f"class names: {fix}, or give the column a ClassLabel feature", field=column, fix=fix)


class LabelNamesConflict(DataError):
    """SFT_LABEL_NAMES differs from the class names the label column declares (its ClassLabel): exit 2, naming both
    (the index -> name mapping must be one, or the verdicts would silently swap)."""

    def __init__(self, column: str, declared: list[str], given: list[str], source: str):
        self.column, self.declared, self.given, self.source = column, list(declared), list(given), source
        fix = "unset SFT_LABEL_NAMES (the declared names are used) or make it equal to them"
        super().__init__(f"SFT_LABEL_NAMES={','.join(given)} differs from the class names {source} declares for "
                         f"{column!r} ({','.join(declared)}): {fix}", field=column, fix=fix)


class QueryColumnConflict(DataError):
    """SFT_QUERY_TEXT with data that has its own query column: exit 2 (one of the two would be silently ignored)."""

    def __init__(self, column: str, split: str):
        self.column, self.split = column, split
        fix = "unset SFT_QUERY_TEXT to ask each row its own query, or drop the column"
        super().__init__(f"SFT_QUERY_TEXT asks every row the same question, and split {split!r} has a query column "
                         f"{column!r} (SFT_QUERY_KEY): {fix}", field=column, fix=fix)


class UnsafeObjectKey(UserError):
    """An object key that would be written outside the directory it is mirrored into (`..`, `.`, an absolute path,
    an empty segment, or the mirror's own bookkeeping file): exit 2, before anything of the prefix is written."""

    def __init__(self, uri: str, key: str, why: str):
        self.uri, self.key, self.why = uri, key, why
        super().__init__(f"refusing to mirror {uri}: object key {key!r} {why}, so it would not land inside the local "
                         "copy; rename or delete that object (nothing of the prefix was written)")


class TransientError(JobError):
    """A network or service error that outlived the library retries: exit 3."""

    exit_code = ExitCode.TRANSIENT


class GateRefused(JobError):
    """The quality gate refused the push: exit 4."""

    exit_code = ExitCode.GATE_REFUSED


class Preempted(JobError):
    """Training stopped on SIGTERM/SIGINT after a COMPLETED checkpoint: exit 143."""

    exit_code = ExitCode.PREEMPTED


class OutOfMemory(UserError):
    """A training step ran out of accelerator memory: exit 2, as a configuration problem.

    The first batch is the longest (job/train/sampler.py puts it first), so an OOM shows at step 1, and a retry on the
    same GPU fails the same way; a later one is exit 2 too (README, Exit codes). `settings` are the memory levers and
    their values ({"SFT_PER_DEVICE_BATCH_SIZE": "2", ...}); `longest` counts the visual tokens (the image pads are in
    input_ids)."""

    def __init__(self, step: int, rows: int, longest: int, settings: dict[str, str]):
        self.step, self.rows, self.longest, self.settings = step, rows, longest, dict(settings)
        levers = ", ".join(f"{name}={value}" for name, value in self.settings.items())
        later = ("" if step <= 1 else "; the first and longest batch fitted, so memory grew during training: also set "
                 "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True against fragmentation")
        super().__init__(
            f"out of GPU memory at training step {step} on a batch of {rows} row(s) whose longest sequence is "
            f"{longest} tokens (visual tokens included): lower the memory it needs with {levers} (lower the batch "
            f"size, the length or the pixel cap, or set SFT_GRADIENT_CHECKPOINTING=true){later}")


class NoMicroBatchFits(UserError):
    """SFT_PER_DEVICE_BATCH_SIZE=auto: not even one row of the longest batch fits in accelerator memory within the
    search's headroom (job/train/micro_batch.py): exit 2, before the first step. `tokens` is that row's length
    (visual tokens included), `settings` the memory levers and their values, as OutOfMemory names them."""

    def __init__(self, tokens: int, settings: dict[str, str], why: str):
        self.tokens, self.settings, self.why = tokens, dict(settings), why
        levers = ", ".join(f"{name}={value}" for name, value in self.settings.items())
        super().__init__(
            f"SFT_PER_DEVICE_BATCH_SIZE=auto: not even one row fits in GPU memory: the longest row, {tokens} tokens "
            f"(visual tokens included), {why}; lower the memory a row needs with {levers} (lower the length or "
            "the pixel cap, or set SFT_GRADIENT_CHECKPOINTING=true), or train on a GPU with more memory")


class CollectiveFailed(TransientError):
    """A collective (broadcast, all-reduce, barrier) across the ranks timed out or lost a peer: exit 3, naming the
    collective, this rank and the ranks it waited for. A retry of the pods can pass; a rank that failed first has
    its own message in its node's log."""

    def __init__(self, collective: str, rank: int, waited_for: str, problem: str):
        self.collective, self.rank, self.waited_for = collective, rank, waited_for
        super().__init__(f"rank {rank}: {collective} {problem} waiting for {waited_for}")


class PeerFailed(JobError):
    """On a DDP rank: another rank failed in a step every rank waits on (preflight, eval, a check); exit with that
    rank's code (1 for a code the contract does not know), naming it. The one wording of a relayed failure:
    `relays(message)` tells it from a rank's own failure (the launcher never takes a relay for the cause)."""

    _PREFIX = re.compile(r"rank \d+ failed: ")

    def __init__(self, source_rank: int, code: int, line: str):
        self.source_rank, self.line = source_rank, line
        self.exit_code = ExitCode(code) if code in {int(c) for c in ExitCode} else ExitCode.INTERNAL
        super().__init__(f"rank {source_rank} failed: {line} (full message in rank {source_rank}'s log)")

    @classmethod
    def relays(cls, message: str) -> bool:
        return cls._PREFIX.match(message) is not None


class ResumeDrift(UserError):
    """The checkpoint to resume was trained with other settings, data or run id: exit 2, before any model loads."""

    def __init__(self, checkpoint: Path, changes: list[str]):
        self.checkpoint, self.changes = checkpoint, list(changes)
        listed = "\n".join(f"  - {c}" for c in self.changes)
        super().__init__(
            f"refusing to resume {checkpoint}: it was trained with different settings ({len(self.changes)} changed):"
            f"\n{listed}\nways out: restore the settings above to resume; or use a new SFT_OUTPUT_DIR (and "
            "SFT_RUN_ID) for a new run; or set SFT_RESUME=never to start fresh here (the old checkpoints are moved "
            "aside, not deleted)")


class NothingToResume(UserError):
    """SFT_RESUME=require found no COMPLETED checkpoint: exit 2."""

    def __init__(self, where: list[str]):
        self.where = list(where)
        super().__init__(f"SFT_RESUME=require but there is no COMPLETED checkpoint to resume in {' or '.join(where)}; "
                         "check SFT_OUTPUT_DIR / SFT_RUN_ID / SFT_CHECKPOINT_URI, or set SFT_RESUME=auto")


class CheckpointNotOnThisNode(UserError):
    """Rank 0 resumes a checkpoint that this node's disk lacks, and there is no SFT_CHECKPOINT_URI to restore it
    from: exit 2 (every node of a multi-node run needs the store to resume)."""

    def __init__(self, checkpoint: Path, rank: int):
        self.checkpoint, self.rank = checkpoint, rank
        super().__init__(f"rank 0 resumes {checkpoint.name}, which rank {rank}'s node does not have at {checkpoint} "
                         "and cannot restore: set SFT_CHECKPOINT_URI (every node restores the checkpoint from it)")


class MergeMismatch(JobError):
    """export: the merged model does not reproduce base + adapter: a bug (exit 1), never a user's mistake."""


def classify_foreign(exc: BaseException) -> JobError | None:
    """A library exception as the JobError it amounts to (job/utils/library_errors.py reads the libraries'
    exceptions), or None when it is not one we can name (a bug: exit 1)."""
    found = library_errors.classify(exc)
    if found is None:
        return None
    name, message = found
    return {"UserError": UserError, "TransientError": TransientError, "DataError": DataError}[name](message)


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def find_job_error(exc: BaseException) -> JobError | None:
    """What decides the exit code: the first JobError in the cause/context chain, else the first library error
    in it that classify_foreign names. A DataError wrapped as 'Qwen3 collate failed' is still exit 2, and so is a
    RepositoryNotFoundError that transformers re-raised as an OSError."""
    chain = list(_chain(exc))
    for link in chain:
        if isinstance(link, JobError):
            return link
    for link in chain:
        found = classify_foreign(link)
        if found is not None:
            found.__cause__ = link
            return found
    return None


def classified(exc: BaseException, context: str) -> JobError | None:
    """A new JobError for a library exception in exc's chain, its message prefixed with `context` (the setting in
    use, e.g. "SFT_MODEL_ID='x'"); None when the chain already holds one of our own errors (which names its
    setting) or nothing classify_foreign knows. Use: `except Exception as e: raise classified(e, ctx) or e`."""
    chain = list(_chain(exc))
    if any(isinstance(link, JobError) for link in chain):
        return None
    found = find_job_error(exc)
    if found is None:
        return None
    described = type(found)(f"{context}: {found}")
    described.__cause__ = exc
    return described

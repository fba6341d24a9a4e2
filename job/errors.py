"""Error taxonomy and the process exit codes it maps to (one source of truth).

Modelled on llm-foundry's exceptions: a *user* error is something the person launching the job can
fix (config, data, credentials) and must never print a traceback; a *transient* error survived the
library-level retries (botocore, huggingface_hub) and may succeed if Kubernetes retries the pod;
anything else is an internal error (a bug) and keeps its traceback.
"""

from __future__ import annotations

import enum
import importlib
import re
import sys


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


class CollectiveFailed(TransientError):
    """A collective (broadcast, all-reduce, barrier) across the ranks timed out or lost a peer: exit 3, naming the
    collective, this rank and the ranks it waited for. A retry of the pods can pass; a rank that failed first has
    its own message in its node's log."""

    def __init__(self, collective: str, rank: int, waited_for: str, problem: str):
        self.collective, self.rank, self.waited_for = collective, rank, waited_for
        super().__init__(f"rank {rank}: {collective} {problem} waiting for {waited_for}")


class PeerFailed(JobError):
    """On a DDP rank > 0: rank 0 failed in a step only it runs (preflight, eval); exit with rank 0's code."""

    def __init__(self, exit_code: ExitCode, message: str):
        super().__init__(message)
        self.exit_code = exit_code


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def _http_status(exc: BaseException) -> int | None:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def _classify_s3(exc: BaseException) -> JobError | None:
    try:
        from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
        from botocore.exceptions import (
            ClientError,
            ConnectionError as BotoConnectionError,
            HTTPClientError,
            NoCredentialsError,
            NoRegionError,
            PartialCredentialsError,
        )
    except ImportError:  # boto3 is a dependency; only a broken install lacks it
        return None
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code, status = str(error.get("Code", "")), exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code not in S3_TRANSIENT_CODES and (code in S3_USER_CODES or status in (400, 401, 403, 404)):
            return UserError(f"S3 {exc.operation_name}: {code} {error.get('Message', '')}".strip()
                             + "; check the bucket, key and AWS credentials")
        return TransientError(f"S3 {exc.operation_name}: {code} {error.get('Message', '')} (after retries)".strip())
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError, NoRegionError)):
        return UserError(f"S3: {_first_line(exc)} (set AWS credentials or a role, and a region)")
    if isinstance(exc, (S3UploadFailedError, S3TransferFailedError)):
        # boto3's transfer manager wraps the ClientError in text only ("Failed to upload f to bucket/key: An error
        # occurred (SlowDown) ..."): a refused credential or bucket is still a user error.
        text = _first_line(exc, 500)
        if any(f"({code})" in text for code in S3_USER_CODES):
            return UserError(f"S3 transfer: {text}; check the bucket, key and AWS credentials")
        return TransientError(f"S3 transfer failed after retries: {text}")
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):  # incl. connect/read timeouts, resets
        return TransientError(f"S3: {type(exc).__name__}: {_first_line(exc)} (after retries)")
    return None


def _classify_hub(exc: BaseException) -> JobError | None:
    try:
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            HFValidationError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        return None
    url = getattr(getattr(exc, "response", None), "url", None)
    where = f" ({url})" if url else ""
    if isinstance(exc, GatedRepoError):
        return UserError(f"Hub: gated repository{where}: accept its terms on the Hub and set HF_TOKEN")
    if isinstance(exc, RepositoryNotFoundError):
        return UserError(f"Hub: repository not found or no access{where}: check the repo id and HF_TOKEN")
    if isinstance(exc, RevisionNotFoundError):
        return UserError(f"Hub: revision not found{where}: check SFT_MODEL_REVISION / SFT_DATASET_REVISION")
    if isinstance(exc, OfflineModeIsEnabled):
        return UserError(f"Hub: HF_HUB_OFFLINE=1 forbids this request: {_first_line(exc)}")
    if isinstance(exc, (EntryNotFoundError, HFValidationError)):
        return UserError(f"Hub: {_first_line(exc)}")
    if isinstance(exc, LocalEntryNotFoundError):
        if hub_offline():
            return UserError(f"Hub: HF_HUB_OFFLINE=1 and the files are not in the local cache: {_first_line(exc)}")
        return None  # the network error it wraps (its __cause__) decides
    if isinstance(exc, HfHubHTTPError):
        status = _http_status(exc)
        if status in (400, 422):  # the Hub names what it rejected (a file, a metadata field) in its message
            said = " ".join((exc.server_message or _first_line(exc)).split())[:500]
            # upload_folder has the Hub validate a README.md's metadata before the commit (/api/validate-yaml)
            card = str(url or "").endswith("/validate-yaml")
            what = "README.md's metadata (the model card)" if card else "the request"
            return UserError(f"Hub: HTTP {status}{where}: the Hub rejected {what}: {said}")
        if status in (401, 403, 404):
            return UserError(f"Hub: HTTP {status}{where}: check the repo id and that HF_TOKEN may read it (and write "
                             "it, for a push)")
        if status is None or status in _TRANSIENT_STATUSES or status >= 500:
            return TransientError(f"Hub: HTTP {status}{where} (after retries)")
        return UserError(f"Hub: HTTP {status}{where}: {_first_line(exc)}")
    return None


_TRANSIENT_STATUSES = (408, 429)  # request timeout, throttled: the rest of 4xx is the request's own fault


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it."""
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _classify_http(exc: BaseException) -> JobError | None:
    """requests (datasets, older hubs) and httpx (huggingface_hub >= 1.0): status codes, timeouts, refused connects."""
    transient_types: list[type] = [TimeoutError, ConnectionError]
    http_error_types: list[type] = []
    try:
        import requests

        transient_types += [requests.ConnectionError, requests.Timeout]
        http_error_types.append(requests.HTTPError)
    except ImportError:
        pass
    for name in ("httpx", "httpx2"):  # huggingface_hub 2 uses httpx2, a fork of httpx with the same error classes
        try:
            client = importlib.import_module(name)
        except ImportError:
            continue
        transient_types += [client.TransportError]
        http_error_types.append(client.HTTPStatusError)
    if isinstance(exc, tuple(http_error_types)):
        status = _http_status(exc)
        url = getattr(getattr(exc, "request", None), "url", None) or getattr(getattr(exc, "response", None), "url", "")
        if status is not None and 400 <= status < 500 and status not in _TRANSIENT_STATUSES:
            return UserError(f"HTTP {status} from {url}: check the id and the credentials")
        return TransientError(f"HTTP {status} from {url} (after retries)")
    if isinstance(exc, tuple(transient_types)) and not isinstance(exc, (FileNotFoundError, PermissionError)):
        return TransientError(f"network: {type(exc).__name__}: {_first_line(exc)} (after retries)")
    return None


_USER_ERRNOS = {"EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT", "ENOENT", "ENOTDIR", "EISDIR"}


def _classify_os(exc: BaseException) -> JobError | None:
    """Permissions, a read-only or full volume, a missing path: the person launching the job fixes these."""
    import errno

    if type(exc) is OSError or isinstance(exc, (PermissionError, FileNotFoundError, NotADirectoryError,
                                                IsADirectoryError)):
        name = errno.errorcode.get(exc.errno or -1)
        if name in _USER_ERRNOS and exc.filename is not None:
            return UserError(f"{exc.strerror}: {exc.filename!s}"
                             + (f" -> {exc.filename2!s}" if exc.filename2 else ""))
    return None


def _classify_out_of_memory(exc: BaseException) -> JobError | None:
    """torch.OutOfMemoryError outside a training step (which raises OutOfMemory with the batch): eval, export."""
    torch = sys.modules.get("torch")  # not imported: the error cannot be torch's
    if torch is None or not isinstance(exc, torch.OutOfMemoryError):
        return None
    return UserError(f"out of GPU memory outside training ({_first_line(exc, 200)}): lower SFT_EVAL_BATCH_SIZE, "
                     "SFT_MAX_LENGTH or SFT_IMAGE_MAX_PIXELS")


_WORKER_ERROR = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")
_WORKER_JOB_ERROR = re.compile(r"^job\.errors\.(\w+): (.+)$", re.MULTILINE)


def dataloader_worker_error(exc: BaseException) -> JobError | None:
    """The JobError raised in a DataLoader worker process. torch re-raises a worker's exception in the main process by
    its type and formatted traceback only (torch/_utils.py ExceptionWrapper): the collator's `RuntimeError('Qwen3
    collate failed')` arrives as a RuntimeError without a cause, its DataError only in the traceback's text, as
    `job.errors.DataError: <message>`. That line gives the class and the one-line message back (the first one: a
    chained traceback prints the cause first); the row and field are in the message."""
    if not isinstance(exc, RuntimeError) or not _WORKER_ERROR.match(str(exc)):
        return None
    # The errors a worker's code raises (reading and collating rows), each built again from its one-line message.
    rebuilt = {"DataError": DataError, "UserError": UserError, "TransientError": TransientError}
    for name, message in _WORKER_JOB_ERROR.findall(str(exc)):
        if name in rebuilt:
            return rebuilt[name](message)
    return None


S3_USER_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                           "NoSuchBucket", "NoSuchKey", "404", "403", "400", "401", "ExpiredToken", "InvalidToken",
                           "InvalidBucketName", "AccountProblem", "NotFound", "Forbidden"})
# HTTP 400 in S3 can still be transient (RequestTimeout: the socket was idle too long), as botocore's retries treat it.
S3_TRANSIENT_CODES = frozenset({"RequestTimeout", "RequestTimeoutException", "SlowDown", "Throttling",
                                "ThrottlingException", "RequestLimitExceeded", "InternalError", "ServiceUnavailable"})
_CLASSIFIERS = (_classify_s3, _classify_hub, _classify_http, _classify_os, _classify_out_of_memory,
                dataloader_worker_error)


def classify_foreign(exc: BaseException) -> JobError | None:
    """A library exception as the JobError it amounts to, or None when it is not one we can name (a bug: exit 1)."""
    for classifier in _CLASSIFIERS:
        found = classifier(exc)
        if found is not None:
            return found
    return None


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

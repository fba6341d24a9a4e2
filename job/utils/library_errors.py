"""What a library's exception amounts to: a user error (exit 2), a transient one (exit 3), or nothing we can name.

`classify` reads the exceptions of boto3/botocore, huggingface_hub, requests/httpx, the OS and torch and returns the
name of the job/errors.py class it amounts to with its message; job/errors.py (`classify_foreign`) builds that error.
This module imports no job code, so job/errors.py can use it.
"""

from __future__ import annotations

import importlib
import os
import re
import sys

USER, TRANSIENT = "UserError", "TransientError"
Found = tuple[str, str]  # (the job/errors.py class: UserError, TransientError or DataError, its message)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def _http_status(exc: BaseException) -> int | None:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def _classify_s3(exc: BaseException) -> Found | None:
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
            return (USER, f"S3 {exc.operation_name}: {code} {error.get('Message', '')}".strip()
                             + "; check the bucket, key and AWS credentials")
        return (TRANSIENT, f"S3 {exc.operation_name}: {code} {error.get('Message', '')} (after retries)".strip())
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError, NoRegionError)):
        return (USER, f"S3: {_first_line(exc)} (set AWS credentials or a role, and a region)")
    if isinstance(exc, (S3UploadFailedError, S3TransferFailedError)):
        # boto3's transfer manager wraps the ClientError in text only ("Failed to upload f to bucket/key: An error
        # occurred (SlowDown) ..."): a refused credential or bucket is still a user error.
        text = _first_line(exc, 500)
        if any(f"({code})" in text for code in S3_USER_CODES):
            return (USER, f"S3 transfer: {text}; check the bucket, key and AWS credentials")
        return (TRANSIENT, f"S3 transfer failed after retries: {text}")
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):  # incl. connect/read timeouts, resets
        return (TRANSIENT, f"S3: {type(exc).__name__}: {_first_line(exc)} (after retries)")
    return None


def _classify_hub(exc: BaseException) -> Found | None:
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
        return (USER, f"Hub: gated repository{where}: accept its terms on the Hub and set HF_TOKEN")
    if isinstance(exc, RepositoryNotFoundError):
        return (USER, f"Hub: repository not found or no access{where}: check the repo id and HF_TOKEN")
    if isinstance(exc, RevisionNotFoundError):
        return (USER, f"Hub: revision not found{where}: check SFT_MODEL_REVISION / SFT_DATASET_REVISION")
    if isinstance(exc, OfflineModeIsEnabled):
        return (USER, f"Hub: HF_HUB_OFFLINE=1 forbids this request: {_first_line(exc)}")
    if isinstance(exc, (EntryNotFoundError, HFValidationError)):
        return (USER, f"Hub: {_first_line(exc)}")
    if isinstance(exc, LocalEntryNotFoundError):
        if hub_offline():
            return (USER, f"Hub: HF_HUB_OFFLINE=1 and the files are not in the local cache: {_first_line(exc)}")
        return None  # the network error it wraps (its __cause__) decides
    if isinstance(exc, HfHubHTTPError):
        status = _http_status(exc)
        if status in (400, 422):  # the Hub names what it rejected (a file, a metadata field) in its message
            said = " ".join((exc.server_message or _first_line(exc)).split())[:500]
            # upload_folder has the Hub validate a README.md's metadata before the commit (/api/validate-yaml)
            card = str(url or "").endswith("/validate-yaml")
            what = "README.md's metadata (the model card)" if card else "the request"
            return (USER, f"Hub: HTTP {status}{where}: the Hub rejected {what}: {said}")
        if status in (401, 403, 404):
            return (USER, f"Hub: HTTP {status}{where}: check the repo id and that HF_TOKEN may read it (and write "
                             "it, for a push)")
        if status is None or status in _TRANSIENT_STATUSES or status >= 500:
            return (TRANSIENT, f"Hub: HTTP {status}{where} (after retries)")
        return (USER, f"Hub: HTTP {status}{where}: {_first_line(exc)}")
    return None


_TRANSIENT_STATUSES = (408, 429)  # request timeout, throttled: the rest of 4xx is the request's own fault


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _classify_http(exc: BaseException) -> Found | None:
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
            return (USER, f"HTTP {status} from {url}: check the id and the credentials")
        return (TRANSIENT, f"HTTP {status} from {url} (after retries)")
    if isinstance(exc, tuple(transient_types)) and not isinstance(exc, (FileNotFoundError, PermissionError)):
        return (TRANSIENT, f"network: {type(exc).__name__}: {_first_line(exc)} (after retries)")
    return None


_USER_ERRNOS = {"EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT", "ENOENT", "ENOTDIR", "EISDIR"}


def _classify_os(exc: BaseException) -> Found | None:
    """Permissions, a read-only or full volume, a missing path: the person launching the job fixes these."""
    import errno

    if type(exc) is OSError or isinstance(exc, (PermissionError, FileNotFoundError, NotADirectoryError,
                                                IsADirectoryError)):
        name = errno.errorcode.get(exc.errno or -1)
        if name in _USER_ERRNOS and exc.filename is not None:
            return (USER, f"{exc.strerror}: {exc.filename!s}"
                             + (f" -> {exc.filename2!s}" if exc.filename2 else ""))
    return None


def _classify_out_of_memory(exc: BaseException) -> Found | None:
    """torch.OutOfMemoryError outside a training step (which raises OutOfMemory with the batch): eval, export."""
    torch = sys.modules.get("torch")  # not imported: the error cannot be torch's
    if torch is None or not isinstance(exc, torch.OutOfMemoryError):
        return None
    return (USER, f"out of GPU memory outside training ({_first_line(exc, 200)}): lower SFT_EVAL_BATCH_SIZE, "
                     "SFT_MAX_LENGTH or SFT_IMAGE_MAX_PIXELS")


_WORKER_ERROR = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")
_WORKER_JOB_ERROR = re.compile(r"^job\.errors\.(\w+): (.+)$", re.MULTILINE)


def _dataloader_worker_error(exc: BaseException) -> Found | None:
    """The job error raised in a DataLoader worker process. torch re-raises a worker's exception in the main process by
    its type and formatted traceback only (torch/_utils.py ExceptionWrapper): the collator's `RuntimeError('Qwen3
    collate failed')` arrives as a RuntimeError without a cause, its DataError only in the traceback's text, as
    `job.errors.DataError: <message>`. That line gives the class and the one-line message back (the first one: a
    chained traceback prints the cause first); the row and field are in the message."""
    if not isinstance(exc, RuntimeError) or not _WORKER_ERROR.match(str(exc)):
        return None
    # The errors a worker's code raises (reading and collating rows), each built again from its one-line message.
    for name, message in _WORKER_JOB_ERROR.findall(str(exc)):
        if name in ("DataError", USER, TRANSIENT):
            return name, message
    return None


S3_USER_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                           "NoSuchBucket", "NoSuchKey", "404", "403", "400", "401", "ExpiredToken", "InvalidToken",
                           "InvalidBucketName", "AccountProblem", "NotFound", "Forbidden"})
# HTTP 400 in S3 can still be transient (RequestTimeout: the socket was idle too long), as botocore's retries treat it.
S3_TRANSIENT_CODES = frozenset({"RequestTimeout", "RequestTimeoutException", "SlowDown", "Throttling",
                                "ThrottlingException", "RequestLimitExceeded", "InternalError", "ServiceUnavailable"})
_CLASSIFIERS = (_classify_s3, _classify_hub, _classify_http, _classify_os, _classify_out_of_memory,
                _dataloader_worker_error)


def classify(exc: BaseException) -> Found | None:
    """(class name, message) of the job error a library exception amounts to, or None when it is not one we can
    name (a bug: exit 1)."""
    for classifier in _CLASSIFIERS:
        found = classifier(exc)
        if found is not None:
            return found
    return None

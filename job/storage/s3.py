"""S3 (and S3-compatible: MinIO, R2, GCS interop) transfers with botocore's own retries.

`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` are honoured by botocore itself. Every request is retried by botocore
(`AWS_RETRY_MODE`, default `standard`: exponential backoff with full jitter, capped at 20 s; `AWS_MAX_ATTEMPTS`,
default 10) on connection resets, timeouts, 5xx and throttling (`503 SlowDown`); the retries each client needed are
counted (`RetryCounter`) and logged. A whole checkpoint upload that still fails is retried by `with_retries`
(job/storage/checkpoints.py). Errors are mapped once, in `s3_errors`: auth, permission and not-found are user
errors (exit 2) naming the bucket and key; failures that outlived the retries are transient (exit 3).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from job.errors import TransientError, UnsafeObjectKey, UserError, classify_foreign
from job.utils.library_errors import S3_USER_CODES

log = logging.getLogger(__name__)
MANIFEST = ".s3-manifest.json"


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        if not uri.startswith("s3://") or not uri[5:].split("/", 1)[0]:
            raise UserError(f"{uri!r} is not an s3://bucket/prefix URI")
        bucket, _, prefix = uri[5:].partition("/")
        return cls(bucket, prefix.strip("/"))

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p and p.strip("/"))

    def child(self, *parts: str) -> S3Uri:
        return S3Uri(self.bucket, self.key(*parts))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


DEFAULT_MAX_ATTEMPTS = 10  # per request; with standard mode's backoff (<= 20 s each) a request gives up within ~3 min
T = TypeVar("T")


class RetryCounter:
    """Counts the retries botocore made for one client (from each response's ResponseMetadata.RetryAttempts)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.retries = 0
        self.calls = 0

    def __call__(self, parsed=None, **_kwargs) -> None:
        attempts = ((parsed or {}).get("ResponseMetadata") or {}).get("RetryAttempts") or 0
        with self._lock:
            self.calls += 1
            self.retries += attempts

    def take(self) -> int:
        """The retries since the last take (for a per-upload log line)."""
        with self._lock:
            taken, self.retries = self.retries, 0
            return taken


def client():
    import boto3  # only where used: local paths never need boto3 (the GPU kit, benchmarks/device, has none)
    from botocore.config import Config

    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS", str(DEFAULT_MAX_ATTEMPTS)))
    mode = os.environ.get("AWS_RETRY_MODE", "standard")
    s3 = boto3.client("s3", config=Config(retries={"mode": mode, "max_attempts": attempts},
                                          connect_timeout=10, read_timeout=60))
    s3.retry_counter = RetryCounter()
    s3.meta.events.register("after-call.s3", s3.retry_counter)
    return s3


def retries_taken(s3) -> int:
    counter = getattr(s3, "retry_counter", None)
    return counter.take() if counter is not None else 0


def with_retries(what: str, fn: Callable[[], T], attempts: int, base_s: float = 2.0, cap_s: float = 30.0) -> T:
    """fn(), retried on TransientError with exponential backoff and full jitter: for a whole multi-object operation
    (a checkpoint upload) whose requests already exhausted botocore's own retries."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except TransientError as exc:
            if attempt == attempts:
                raise TransientError(f"{exc} (gave up after {attempts} attempts of the whole {what})") from None
            pause = random.uniform(0, min(cap_s, base_s * 2 ** (attempt - 1)))
            log.warning("%s failed (attempt %d of %d): %s; retrying in %.1f s", what, attempt, attempts, exc, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def s3_errors(what: str):
    """Turn botocore failures into user (exit 2) or transient (exit 3) errors that name what was being done."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError as BotoConnectionError,
        NoCredentialsError,
    )

    try:
        try:
            yield
        except S3UploadFailedError as exc:
            # boto3's transfer manager re-raises a request's ClientError as this; classify the request's error.
            if isinstance(exc.__context__, ClientError):
                raise exc.__context__ from None
            raise TransientError(f"S3 {what}: {exc} (after retries)") from None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        message = exc.response.get("Error", {}).get("Message", "")
        if code in S3_USER_CODES:
            raise UserError(
                f"S3 {what}: {code} {message}".strip() + "; check the bucket name, key and credentials"
            ) from None
        raise TransientError(f"S3 {what}: {code} {message} (after retries)") from None
    except NoCredentialsError:
        raise UserError(
            f"S3 {what}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a role)"
        ) from None
    except (BotoConnectionError, BotoCoreError) as exc:
        raise TransientError(f"S3 {what}: {type(exc).__name__}: {exc} (after retries)") from None
    except Exception as exc:  # boto3's transfer manager: S3UploadFailedError around a 503 or an AccessDenied
        found = classify_foreign(exc)
        if found is None:
            raise
        raise type(found)(f"S3 {what}: {found}") from None


def list_objects(s3, uri: S3Uri) -> list[dict]:
    prefix = uri.prefix + "/" if uri.prefix else ""
    objects = []
    with s3_errors(f"list s3://{uri.bucket}/{prefix}"):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=prefix):
            objects.extend(page.get("Contents", []))
    return objects


# SFT_S3_CONCURRENCY's default; the job passes the configured value (cfg.storage.s3_concurrency) to every transfer.
DEFAULT_CONCURRENCY = 16


def _transfer_config(concurrency: int):
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(max_concurrency=concurrency, use_threads=True)


def _relative_key(uri: S3Uri, base: str, key: str) -> str:
    """key below the prefix, as a relative path; UnsafeObjectKey when it would land outside the local copy."""
    rel = key[len(base):]
    parts = rel.split("/")
    why = None
    if "" in parts:
        why = "is absolute below the prefix" if rel.startswith("/") else "has an empty path segment ('//')"
    elif any(part in (".", "..") for part in parts):
        why = "has a '.' or '..' path segment"
    elif rel == MANIFEST:
        why = f"is the mirror's own bookkeeping file ({MANIFEST})"
    if why is not None:
        raise UnsafeObjectKey(str(uri), key, why)
    return rel


def etags_digest(uri: S3Uri, etags: dict[str, str]) -> str:
    """A digest of the ETags of a mirror ({relative key: ETag}, what download_prefix returns): the exact object
    versions that were read."""
    base = uri.prefix + "/" if uri.prefix else ""
    return hashlib.sha256("".join(f"{base}{rel}={etags[rel]};" for rel in sorted(etags)).encode()).hexdigest()


def download_prefix(s3, uri: S3Uri, dest: Path, *, concurrency: int = DEFAULT_CONCURRENCY) -> dict[str, str]:
    """Make dest a copy of the prefix's current objects: fetch those whose size and ETag differ from what was fetched
    before, and remove every other file under dest (objects that left the prefix, a fetch cut short), so the loaders
    see exactly the prefix. Returns {relative key: ETag} of what dest now holds.

    Every key is checked before anything is written: one that would land outside dest is UnsafeObjectKey (exit 2).
    dest's bookkeeping (MANIFEST) is a dot file, which the data layouts never read (job/data/layouts.py).
    concurrency: parallel transfers per object (SFT_S3_CONCURRENCY, cfg.storage.s3_concurrency).
    """
    from concurrent.futures import ThreadPoolExecutor

    objects = [o for o in list_objects(s3, uri) if not o["Key"].endswith("/")]
    if not objects:
        raise UserError(f"nothing found under {uri}; check SFT_* URI and that the prefix has objects")
    base = uri.prefix + "/" if uri.prefix else ""
    wanted = {_relative_key(uri, base, o["Key"]): o for o in objects}
    dest.mkdir(parents=True, exist_ok=True)
    manifest_path = dest / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    removed = _remove_others(dest, set(wanted))
    manifest = {rel: seen for rel, seen in manifest.items() if rel in wanted}
    todo = []
    for rel, obj in wanted.items():
        target = dest / rel
        seen = manifest.get(rel)
        if target.is_file() and seen == [obj["Size"], obj["ETag"]] and target.stat().st_size == obj["Size"]:
            continue
        todo.append((obj, rel, target))

    def fetch(item):
        obj, rel, target = item
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        with s3_errors(f"download s3://{uri.bucket}/{obj['Key']}"):
            s3.download_file(uri.bucket, obj["Key"], str(tmp), Config=_transfer_config(concurrency))
        tmp.replace(target)
        return rel, [obj["Size"], obj["ETag"]]

    with ThreadPoolExecutor(max_workers=8) as pool:
        manifest.update(dict(pool.map(fetch, todo)))
    manifest_path.write_text(json.dumps(manifest, sort_keys=True))
    log.info("s3: %s -> %s (%d fetched, %d cached, %d removed: no longer in the prefix)", uri, dest, len(todo),
             len(wanted) - len(todo), len(removed))
    return {rel: obj["ETag"] for rel, obj in sorted(wanted.items())}


def _remove_others(dest: Path, wanted: set[str]) -> list[str]:
    """Delete every file under dest that is neither a wanted relative key nor MANIFEST, then the emptied folders."""
    removed = []
    for path in sorted(dest.rglob("*"), reverse=True):  # children before their folder
        rel = path.relative_to(dest).as_posix()
        if path.is_symlink() or path.is_file():
            if rel not in wanted and rel != MANIFEST:
                path.unlink()
                removed.append(rel)
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return removed


def upload_file(s3, path: Path, uri: S3Uri, name: str, *, concurrency: int = DEFAULT_CONCURRENCY) -> dict[str, int]:
    """Upload one file as uri/name; returns {key: size}."""
    key = uri.key(name)
    with s3_errors(f"upload s3://{uri.bucket}/{key}"):
        s3.upload_file(str(path), uri.bucket, key, Config=_transfer_config(concurrency))
    return {key: path.stat().st_size}


def upload_dir(s3, src: Path, uri: S3Uri, skip: tuple[str, ...] = (),
               *, concurrency: int = DEFAULT_CONCURRENCY) -> dict[str, int]:
    """Upload every file under src but the top-level entries named in skip; returns {key: size}. Each file goes up
    whole (multipart commits atomically).

    concurrency: parallel transfers per file (SFT_S3_CONCURRENCY, cfg.storage.s3_concurrency).
    """
    from concurrent.futures import ThreadPoolExecutor

    files = [p for p in sorted(src.rglob("*")) if p.is_file() and p.relative_to(src).parts[0] not in skip]

    def put(path: Path) -> dict[str, int]:
        return upload_file(s3, path, uri, path.relative_to(src).as_posix(), concurrency=concurrency)

    sizes: dict[str, int] = {}
    with ThreadPoolExecutor(max_workers=8) as pool:
        for one in pool.map(put, files):
            sizes.update(one)
    return sizes


def verify_sizes(s3, uri: S3Uri, expected: dict[str, int]) -> None:
    present = {o["Key"]: o["Size"] for o in list_objects(s3, uri)}
    bad = {k: (v, present.get(k)) for k, v in expected.items() if present.get(k) != v}
    if bad:
        raise TransientError(f"S3 verify {uri}: size mismatch or missing for {sorted(bad)[:5]}")


def put_text(s3, uri: S3Uri, key: str, text: str) -> None:
    with s3_errors(f"write s3://{uri.bucket}/{key}"):
        s3.put_object(Bucket=uri.bucket, Key=key, Body=text.encode())


def get_text(s3, uri: S3Uri, key: str) -> str | None:
    """The object's text, or None when it does not exist."""
    from botocore.exceptions import ClientError

    with s3_errors(f"read s3://{uri.bucket}/{key}"):
        try:
            return s3.get_object(Bucket=uri.bucket, Key=key)["Body"].read().decode()
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in ("NoSuchKey", "404"):
                return None
            raise


def delete_key(s3, uri: S3Uri, key: str) -> None:
    with s3_errors(f"delete s3://{uri.bucket}/{key}"):
        s3.delete_object(Bucket=uri.bucket, Key=key)


def copy_object(s3, bucket: str, source_key: str, key: str) -> None:
    with s3_errors(f"copy s3://{bucket}/{source_key} to {key}"):
        s3.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": source_key})


def delete_prefix(s3, uri: S3Uri) -> None:
    keys = [{"Key": o["Key"]} for o in list_objects(s3, uri)]
    for start in range(0, len(keys), 1000):
        with s3_errors(f"delete {uri}"):
            s3.delete_objects(Bucket=uri.bucket, Delete={"Objects": keys[start:start + 1000]})


def probe_write(s3, uri: S3Uri) -> None:
    """Fail before training, not after it, when the bucket is missing or not writable."""
    key = uri.key(".write-probe")
    put_text(s3, uri, key, "probe\n")
    with s3_errors(f"delete s3://{uri.bucket}/{key}"):
        s3.delete_object(Bucket=uri.bucket, Key=key)

"""Where data and weights come from: a local path, the HF Hub, or an s3:// prefix mirrored into a local cache."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

from job.storage import s3 as s3io

log = logging.getLogger(__name__)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir(cfg: dict) -> Path:
    return Path(
        cfg["storage"]["cache_dir"] or os.path.join(os.environ.get("HF_HOME", Path.home() / ".cache"), "qwen3-sft")
    )


def _hub_id(value: str | None, scheme: str) -> str | None:
    """The rule for every setting that names a local path or a Hub repo: a Hub id only when it has the form
    `owner/name` (or `hf://<scheme>...`) and no such local path exists; anything else is a local path."""
    if not value or Path(value).exists():
        return None
    if value.startswith(scheme):
        return value[len(scheme):].strip("/")
    return value if _HUB_ID.match(value) else None


def hub_dataset_id(uri: str | None) -> str | None:
    """`org/name` or `hf://datasets/org/name` when uri is not a local path; else None."""
    return _hub_id(uri, "hf://datasets/")


def hub_model_id(model_id: str | None) -> str | None:
    """`org/name` or `hf://org/name` when model_id is not a local path; else None."""
    return _hub_id(model_id, "hf://")


def _mirror(cfg: dict, uri: str, kind: str) -> Path:
    parsed = s3io.S3Uri.parse(uri)
    dest = cache_dir(cfg) / kind / parsed.bucket / (parsed.prefix or "_root")
    s3io.download_prefix(s3io.client(), parsed, dest)
    return dest


def localize(cfg: dict) -> dict:
    """Download s3:// sources into the cache and return cfg with local paths (the original URIs kept for lineage)."""
    data, model = dict(cfg["data"]), dict(cfg["model"])
    data["source_uri"], model["source"] = data["uri"], model["id"]
    if data["uri"] and data["uri"].startswith("s3://"):
        data["uri"] = str(_mirror(cfg, data["uri"], "datasets"))
    if model["id"].startswith("s3://"):
        model["id"] = str(_mirror(cfg, model["id"], "models"))
    return {**cfg, "data": data, "model": model}


def s3_etags(uri: str | None) -> str | None:
    """A digest of the ETags under an s3:// prefix: identifies the exact object versions that were read."""
    if not uri or not uri.startswith("s3://"):
        return None
    objects = s3io.list_objects(s3io.client(), s3io.S3Uri.parse(uri))
    return hashlib.sha256(
        "".join(f"{o['Key']}={o['ETag']};" for o in sorted(objects, key=lambda o: o["Key"])).encode()
    ).hexdigest()

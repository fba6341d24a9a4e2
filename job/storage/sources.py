"""Where data and weights come from: a local path, the HF Hub, or an s3:// prefix mirrored into a local cache.

`localize(cfg)` mirrors the s3:// sources and returns `Sources`: what the run learned about its inputs after the
config was built (where each was read from, next to what the user configured). The config itself never changes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.config import JobConfig
from job.storage import s3 as s3io

log = logging.getLogger(__name__)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir(cfg: JobConfig) -> Path:
    return Path(
        cfg.storage.cache_dir or os.path.join(os.environ.get("HF_HOME", Path.home() / ".cache"), "qwen3-sft")
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


def _mirror(cfg: JobConfig, uri: str, kind: str) -> Path:
    parsed = s3io.S3Uri.parse(uri)
    dest = cache_dir(cfg) / kind / parsed.bucket / (parsed.prefix or "_root")
    s3io.download_prefix(s3io.client(), parsed, dest, concurrency=cfg.storage.s3_concurrency)
    return dest


@dataclass(frozen=True)
class Sources:
    """The run's inputs: as configured (SFT_DATASET_URI, SFT_MODEL_ID) and where they are read from.

    Lineage, the resume fingerprint and error messages name the configured values; the loaders read the local ones.
    """

    dataset_uri: str | None  # as configured: a local path, a Hub id or an s3:// prefix
    model_id: str
    dataset_path: str | None  # where the rows are read: the local mirror of an s3:// prefix, else dataset_uri
    model_path: str

    def configured(self, cfg: JobConfig) -> JobConfig:
        """cfg as the user configured it: data.uri and model.id as set (the inverse of local)."""
        return cfg.replace(data={"uri": self.dataset_uri}, model={"id": self.model_id})

    def local(self, cfg: JobConfig) -> JobConfig:
        """cfg as the loaders take it: data.uri and model.id name the local copies."""
        return cfg.replace(data={"uri": self.dataset_path}, model={"id": self.model_path})

    def config_record(self, cfg: JobConfig) -> dict[str, Any]:
        """The config as training_meta.json and the W&B run have always stored it: the local paths in data.uri and
        model.id, the configured ones in data.source_uri and model.source (the last key of each)."""
        record = self.local(cfg).model_dump(mode="json")
        record["data"]["source_uri"] = self.dataset_uri
        record["model"]["source"] = self.model_id
        return record


def localize(cfg: JobConfig) -> Sources:
    """Download the s3:// sources into the cache; the others are read where they are."""
    dataset, model = cfg.data.uri, cfg.model.id
    if dataset and dataset.startswith("s3://"):
        dataset = str(_mirror(cfg, dataset, "datasets"))
    if model.startswith("s3://"):
        model = str(_mirror(cfg, model, "models"))
    return Sources(cfg.data.uri, cfg.model.id, dataset, model)


def s3_etags(uri: str | None) -> str | None:
    """A digest of the ETags under an s3:// prefix: identifies the exact object versions that were read."""
    if not uri or not uri.startswith("s3://"):
        return None
    objects = s3io.list_objects(s3io.client(), s3io.S3Uri.parse(uri))
    return hashlib.sha256(
        "".join(f"{o['Key']}={o['ETag']};" for o in sorted(objects, key=lambda o: o["Key"])).encode()
    ).hexdigest()

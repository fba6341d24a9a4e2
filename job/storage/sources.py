"""Where data and weights come from: a local path, the HF Hub, or an s3:// prefix mirrored into a local cache.

`localize(cfg)` mirrors the s3:// sources and Hub datasets and returns `Sources`: what the run learned about its
inputs after the config was built (where each was read from, the Hub commit a dataset revision resolved to, next to
what the user configured). The config itself never changes.

A Hub dataset (`owner/name`, `hf://datasets/owner/name[/path]`) is downloaded with huggingface_hub's
`snapshot_download` into its own cache (HF_HOME; HF_TOKEN for private and gated repos; HF_HUB_OFFLINE=1 reads the
cache only) at SFT_DATASET_REVISION, and then read like a local directory, so it has the same layouts
(job/data/layouts.py). The snapshot folder is named after the commit the revision resolved to.

SFT_DATASET_CONFIG picks a configuration the dataset card (README.md) declares, in the same way wherever the files
are: a local directory, the mirror of an s3:// prefix or a Hub snapshot (`config_root`).
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from job.config.schema import JobConfig
from job.config.sections.data import DataConfig
from job.config.sections.outputs import StorageConfig
from job.errors import UserError, classified
from job.storage import s3 as s3io
from job.utils.library_errors import hub_offline

log = logging.getLogger(__name__)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir(storage: StorageConfig) -> Path:
    """SFT_CACHE_DIR, else $HF_HOME/qwen3-sft (~/.cache/qwen3-sft)."""
    return Path(
        storage.cache_dir or os.path.join(os.environ.get("HF_HOME", Path.home() / ".cache"), "qwen3-sft")
    )


_HUB_SCHEMES = {"dataset": "hf://datasets/", "model": "hf://"}


def source_kind(value: str, what: Literal["dataset", "model"]) -> Literal["s3", "hub", "local"]:
    """The one rule for where SFT_DATASET_URI (`what="dataset"`) or SFT_MODEL_ID (`"model"`) points: `s3:` starts an
    S3 prefix (a malformed one too: S3Uri.parse says what is wrong with it); a Hub repo has the form `owner/name` (or
    `hf://datasets/...`, `hf://...`) and no such local path exists; anything else is a local path."""
    if value.startswith("s3:"):
        return "s3"
    return "hub" if _hub_id(value, what) is not None else "local"


def _hub_id(value: str | None, what: Literal["dataset", "model"]) -> str | None:
    if not value or value.startswith("s3:") or Path(value).exists():
        return None
    if value.startswith(_HUB_SCHEMES[what]):
        return value[len(_HUB_SCHEMES[what]):].strip("/")
    return value if _HUB_ID.match(value) else None


@dataclass(frozen=True)
class HubDataset:
    """A Hub dataset as SFT_DATASET_URI names it: the repo and a folder inside it ("" for the whole repo)."""

    repo_id: str
    path: str


def hub_dataset(uri: str | None) -> HubDataset | None:
    """`org/name` or `hf://datasets/org/name[/path]` when uri is not a local path; else None."""
    named = _hub_id(uri, "dataset")
    if named is None:
        return None
    owner, _, rest = named.partition("/")
    name, _, path = rest.partition("/")
    return HubDataset(f"{owner}/{name}", path.strip("/"))


def hub_dataset_id(uri: str | None) -> str | None:
    """The repo id (`org/name`) of a Hub dataset URI (`org/name`, `hf://datasets/org/name[/path]`); else None."""
    found = hub_dataset(uri)
    return found.repo_id if found is not None else None


def hub_model_id(model_id: str | None) -> str | None:
    """`org/name` or `hf://org/name` when model_id is not a local path; else None."""
    return _hub_id(model_id, "model")


def _mirror(storage: StorageConfig, uri: str, kind: str) -> tuple[Path, str]:
    """The local copy of the prefix (exactly its objects) and the digest of the ETags it holds."""
    parsed = s3io.S3Uri.parse(uri)
    dest = cache_dir(storage) / kind / parsed.bucket / (parsed.prefix or "_root")
    etags = s3io.download_prefix(s3io.client(), parsed, dest, concurrency=storage.s3_concurrency)
    return dest, s3io.etags_digest(parsed, etags)


@dataclass(frozen=True)
class Sources:
    """The run's inputs: as configured (SFT_DATASET_URI, SFT_MODEL_ID) and where they are read from.

    Lineage, the resume fingerprint and error messages name the configured values; the loaders, the processor and
    the model loads take the local ones (dataset_path, model_path) as an argument beside their config section.
    """

    dataset_uri: str | None  # as configured: a local path, a Hub id or an s3:// prefix
    model_id: str
    dataset_path: str | None  # where the rows are read: the local mirror of an s3:// prefix or Hub dataset
    model_path: str
    dataset_commit: str | None = None  # a Hub dataset: the commit SFT_DATASET_REVISION (or main) resolved to
    dataset_etags: str | None = None  # an s3:// dataset: the digest of the ETags of the objects mirrored and read

    def config_record(self, cfg: JobConfig) -> dict[str, Any]:
        """The config as training_meta.json and the W&B run have always stored it: the local paths in data.uri and
        model.id, the configured ones in data.source_uri and model.source (the last key of each)."""
        record = cfg.model_dump(mode="json")
        record["data"]["uri"], record["model"]["id"] = self.dataset_path, self.model_path
        record["data"]["source_uri"] = self.dataset_uri
        record["model"]["source"] = self.model_id
        return record


def _hub_snapshot(data: DataConfig, storage: StorageConfig, hub: HubDataset) -> tuple[Path, str]:
    """The dataset's files at SFT_DATASET_REVISION (only hub.path's, when the URI names a folder), and the commit."""
    from huggingface_hub import HfApi, snapshot_download

    context = _hub_context(data, hub)
    try:
        # The revision is resolved first, and the snapshot asked for by commit: snapshot_download alone falls back to
        # a cached snapshot when the Hub refuses (401/403) or fails, which would train on data the token may no
        # longer read, or on an old commit of a moved branch. HF_HUB_OFFLINE=1 reads the cache on purpose.
        revision = data.revision if hub_offline() else HfApi().dataset_info(hub.repo_id, revision=data.revision).sha
        local = Path(snapshot_download(hub.repo_id, repo_type="dataset", revision=revision,
                                       allow_patterns=[f"{hub.path}/**"] if hub.path else None))
    except Exception as exc:  # classified: 401/403/404 -> 2, timeouts and 5xx -> 3, else a bug
        if hub_offline():
            raise UserError(f"{context}: HF_HUB_OFFLINE=1 and it is not in the local cache; fix the path, download "
                            "it first, or unset HF_HUB_OFFLINE") from exc
        error = classified(exc, context)
        if error is None:
            raise
        raise error from exc
    root = local / hub.path
    if not root.is_dir():
        raise UserError(f"{context} has no folder {hub.path!r} at commit {local.name}")
    return root, local.name


def _hub_context(data: DataConfig, hub: HubDataset) -> str:
    pinned = f" at SFT_DATASET_REVISION={data.revision!r}" if data.revision else ""
    return f"SFT_DATASET_URI={data.uri!r} (no such local path, so the Hub dataset {hub.repo_id}{pinned})"


CARD = "README.md"  # a dataset's card: its YAML header declares its configurations and features


def declared_configs(root: Path) -> dict[str, dict]:
    """The configurations the dataset card in root declares (`configs:` in README.md's YAML header), by name."""
    from huggingface_hub.repocard import metadata_load

    card = root / CARD
    meta = (metadata_load(card) if card.is_file() else None) or {}
    return {str(c.get("config_name")): c for c in meta.get("configs") or [] if isinstance(c, dict)}


def _split_patterns(data_files: Any) -> dict[str, list[str]]:
    """`data_files` as the card writes it (a pattern, a list, or a list of {split, path}) as split -> patterns."""
    if isinstance(data_files, str):
        return {"train": [data_files]}
    if isinstance(data_files, dict):
        return {str(k): [v] if isinstance(v, str) else list(v) for k, v in data_files.items()}
    patterns: dict[str, list[str]] = {}
    for entry in data_files or []:
        if isinstance(entry, str):
            patterns.setdefault("train", []).append(entry)
        elif isinstance(entry, dict):
            path = entry.get("path", [])
            patterns.setdefault(str(entry.get("split", "train")), []).extend([path] if isinstance(path, str) else path)
    return patterns


def _unknown_config(name: str, root: Path, context: str) -> UserError:
    declared = sorted(declared_configs(root))
    known = declared + sorted(p.name for p in root.iterdir()
                              if p.is_dir() and not p.name.startswith(".") and p.name not in declared)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return UserError(f"SFT_DATASET_CONFIG={name!r}: {context} declares no such configuration and has no such folder "
                     f"(it has: {', '.join(known) or 'none'}); {hint}unset it or name one of them")


def config_root(data: DataConfig, storage: StorageConfig, root: Path, context: str) -> Path:
    """SFT_DATASET_CONFIG in the dataset at root (a local directory, the mirror of an s3:// prefix or a Hub snapshot,
    alike): the configuration its card declares (its `data_dir`, or its parquet `data_files` per split, globs
    relative to root, linked into `{split}/` folders of a view under SFT_CACHE_DIR/dataset-configs/ beside a link to
    the card), else the folder of that name (what push_to_hub(config_name=...) writes beside the card's entry)."""
    name = data.config or ""
    if not root.is_dir():
        raise UserError(f"SFT_DATASET_CONFIG={name!r}: {context} is a file, not a dataset directory with a card")
    declared = declared_configs(root).get(name)
    if declared is None:
        if (root / name).is_dir():
            return root / name
        raise _unknown_config(name, root, context)
    if declared.get("data_dir"):
        return root / str(declared["data_dir"])
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    view = cache_dir(storage) / "dataset-configs" / key / name
    shutil.rmtree(view, ignore_errors=True)
    for split, patterns in _split_patterns(declared.get("data_files")).items():
        matched = sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()})
        if not matched or any(p.suffix != ".parquet" for p in matched):
            raise UserError(f"SFT_DATASET_CONFIG={name!r}: {context}: split {split!r} of the configuration matches "
                            f"{[p.name for p in matched][:5] or 'no file'} ({patterns}); a configuration's data_files "
                            "must be parquet files here (or give it a data_dir)")
        (view / split).mkdir(parents=True)
        for path in matched:
            (view / split / path.relative_to(root).as_posix().replace("/", "--")).symlink_to(path.resolve())
    (view / CARD).symlink_to((root / CARD).resolve())  # its dataset_info names the classes (job/data/labels.py)
    return view


def localize(cfg: JobConfig) -> Sources:
    """Download the s3:// sources and Hub datasets into their caches; local paths and Hub models are read where
    they are (from_pretrained downloads a Hub model itself)."""
    dataset, model, commit, etags = cfg.data.uri, cfg.model.id, None, None
    context = f"SFT_DATASET_URI={dataset!r}"
    if dataset and source_kind(dataset, "dataset") == "s3":
        mirrored, etags = _mirror(cfg.storage, dataset, "datasets")
        dataset, context = str(mirrored), f"{context} (mirrored to {mirrored})"
    elif (hub := hub_dataset(dataset)) is not None:
        root, commit = _hub_snapshot(cfg.data, cfg.storage, hub)
        dataset, context = str(root), _hub_context(cfg.data, hub)
        print(f"dataset: Hub {hub.repo_id} revision {cfg.data.revision or 'main'} = commit {commit}", flush=True)
    if dataset and cfg.data.config:  # one reading of the card's configurations, wherever its files are
        dataset = str(config_root(cfg.data, cfg.storage, Path(dataset), context))
    if source_kind(model, "model") == "s3":
        model = str(_mirror(cfg.storage, model, "models")[0])
    return Sources(cfg.data.uri, cfg.model.id, dataset, model, commit, etags)

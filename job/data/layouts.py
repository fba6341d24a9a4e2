"""Where a split lies in a local dataset directory (a local path, the mirror of an s3:// prefix or a Hub snapshot).

The layouts, in the order they are looked for (README, "Data format"):
- `datasets.save_to_disk` of a DatasetDict (`dataset_dict.json`, one folder per split);
- `{split}.jsonl` or `{split}.json`;
- imagefolder, one folder per split: `{split}/metadata.jsonl` or `{split}/metadata.csv` (also under `data/`) with a
  `file_name` column naming an image beside it;
- parquet: `{split}*.parquet`, `{split}/*.parquet`, or `data/{split}-*.parquet` (what `push_to_hub` writes).

A source with one split (hold-out, job/data/holdout.py) is a single file, a `save_to_disk` of one Dataset, an
imagefolder with `metadata.jsonl`/`metadata.csv` at its root, or a directory whose only data is the training split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

JSONL_SUFFIXES = (".jsonl", ".json")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# Not data: the bookkeeping files of save_to_disk.
_NOT_DATA = ("dataset_info.json", "dataset_dict.json", "state.json")


@dataclass(frozen=True)
class SplitFiles:
    """One split's files and how to read them."""

    kind: Literal["saved", "jsonl", "imagefolder", "parquet"]
    files: tuple[Path, ...]


def _metadata(folder: Path) -> Path | None:
    return next((folder / name for name in METADATA_FILES if (folder / name).is_file()), None)


def _parquet(root: Path, split: str) -> list[Path]:
    return (sorted(root.glob(f"{split}*.parquet")) or sorted(root.glob(f"{split}/*.parquet"))
            or sorted(root.glob(f"data/{split}-*.parquet")))


def find_split(root: Path, split: str) -> SplitFiles | None:
    """The split's files in a dataset directory, in the first layout that has it; None when none does."""
    if (root / "dataset_dict.json").is_file():
        return SplitFiles("saved", (root / split,)) if (root / split).is_dir() else None
    for suffix in JSONL_SUFFIXES:
        if (root / f"{split}{suffix}").is_file():
            return SplitFiles("jsonl", (root / f"{split}{suffix}",))
    for folder in (root / split, root / "data" / split):
        if (metadata := _metadata(folder)) is not None:
            return SplitFiles("imagefolder", (metadata,))
    parquet = _parquet(root, split)
    return SplitFiles("parquet", tuple(parquet)) if parquet else None


def whole_source(root: Path) -> SplitFiles | None:
    """A source that is one split by its form: a file, one saved Dataset, a root-level imagefolder."""
    if root.is_file():
        kind: Literal["jsonl", "parquet"] = "parquet" if root.suffix == ".parquet" else "jsonl"
        return SplitFiles(kind, (root,))
    if (root / "dataset_info.json").is_file() and not (root / "dataset_dict.json").is_file():
        return SplitFiles("saved", (root,))
    if (metadata := _metadata(root)) is not None:
        return SplitFiles("imagefolder", (metadata,))
    return None


def data_files(root: Path) -> list[Path]:
    """The files of root that may hold rows. Never data: save_to_disk's bookkeeping, and anything hidden (a name or
    folder starting with "."): an s3:// mirror's .s3-manifest.json and a fetch's .part file, a Hub snapshot's
    .gitattributes, a .cache/ folder."""
    return [p for p in root.rglob("*") if (p.suffix in (*JSONL_SUFFIXES, ".parquet", ".csv"))
            and p.name not in _NOT_DATA and not any(part.startswith(".") for part in p.relative_to(root).parts)
            and p.is_file()]


def single_split_source(uri: str, train_split: str, eval_split: str) -> bool:
    """Whether the hold-out makes the eval rows: the source has one split by its form, or a directory holds the
    training split and no other data. Other data files may be the eval split under another name (a val.jsonl with
    SFT_EVAL_SPLIT=validation): then the missing split is an error naming the layouts, never a silent hold-out."""
    root = Path(uri)
    if not root.exists():
        return False
    train = find_split(root, train_split)
    if train is None:
        return whole_source(root) is not None
    if find_split(root, eval_split) is not None:
        return False
    if train.kind == "saved":  # a DatasetDict names its splits
        return json.loads((root / "dataset_dict.json").read_text()).get("splits") == [train_split]
    ours = {p.resolve() for p in train.files}
    return not [p for p in data_files(root) if p.resolve() not in ours]


def expected_layouts(split: str) -> str:
    return (f"{split}.jsonl, {split}/metadata.jsonl (imagefolder), {split}*.parquet, {split}/*.parquet, "
            f"data/{split}-*.parquet or a datasets.save_to_disk directory")

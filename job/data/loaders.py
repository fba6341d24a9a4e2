"""Local dataset loading: JSONL (file or split dir), `datasets.save_to_disk` dirs and parquet.

Every row gets a `row_id` such as `train.jsonl:17` (file and 1-based line) or `train[17]` (row index), so an error
anywhere downstream can name the exact row. Images stay as paths (or the `datasets.Image` value) until the collator
decodes them: holding every decoded image in memory would not scale.

The loaders take the data section (`cfg.data`) and, beside it, the path they read: `Sources.dataset_path`, the local
copy of an s3:// prefix or Hub dataset (job/storage/sources.py), which is the configured path for a local dataset.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from job.config.sections.data import DataConfig
from job.data.holdout import ROW_ID, holdout_sides
from job.data.layouts import JSONL_SUFFIXES, SplitFiles, expected_layouts, find_split, single_split_source, whole_source
from job.errors import DataError, TransientError
from job.storage.sources import declared_configs, hub_dataset_id
from job.utils.library_errors import hub_offline

# Columns the job adds to a split: each row's name in messages (loading), and its text + visual token count
# (preflight, for length-grouped sampling).
LENGTH_COLUMN = "sft_num_tokens"
IMAGEFOLDER_FILE_KEY = "file_name"  # the imagefolder convention's image column (README, "Data format")


def _jsonl_records(path: Path, split: str, name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line; a line that is not one JSON object names itself."""
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _line_error(split, f"{name}:{lineno}", f"is not valid UTF-8 ({exc.reason})",
                                  "re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _line_error(split, f"{name}:{lineno}", f"is not valid JSON ({exc.msg})",
                                  "each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise _line_error(split, f"{name}:{lineno}", f"is a JSON {type(row).__name__}",
                                  "expected an object", carried_fix="each line must be one JSON object")
            yield lineno, row


def _csv_records(path: Path, split: str, name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """An imagefolder's metadata.csv: (line number, row); an empty cell is a missing value (CSV has no null)."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            for lineno, row in enumerate(csv.DictReader(handle), start=2):
                yield lineno, {k: (v if v != "" else None) for k, v in row.items() if k is not None}
    except UnicodeDecodeError as exc:
        raise _line_error(split, name, f"is not valid UTF-8 ({exc.reason})", "re-encode the file as UTF-8") from None


def _jsonl_rows(path: Path, image_key: str, split: str, name: str | None = None,
                file_key: str | None = None) -> list[dict[str, Any]]:
    """Parse a JSONL (or an imagefolder's metadata.csv) file line by line so that an error names the line; resolve
    image paths against the file. name: the row ids' file part (the file name); file_key: the imagefolder column
    (`file_name`) that names the image, which becomes the image column."""
    root, name = path.parent.resolve(), name or path.name
    records = _csv_records(path, split, name) if path.suffix == ".csv" else _jsonl_records(path, split, name)
    rows = []
    for lineno, row in records:
        row[ROW_ID] = f"{name}:{lineno}"
        if file_key is not None and file_key in row:
            row[image_key] = row.pop(file_key)
        image = row.get(image_key)
        if isinstance(image, str):
            row[image_key] = _resolve_image_path(root, image, row[ROW_ID], image_key)
        rows.append(row)
    return rows


def _line_error(split: str, row: str, problem: str, fix: str, carried_fix: str | None = None) -> DataError:
    """A JSONL line that cannot be read: `{split}: {file}:{line}: line {problem}; {fix}` (`, {fix}` after "a JSON
    list"), carrying the row, field "line" and the fix."""
    joiner = ", " if carried_fix else "; "
    return DataError(f"{split}: {row}: line {problem}{joiner}{fix}", row=row, field="line", fix=carried_fix or fix)


def _resolve_image_path(root: Path, rel: str, row_id: str, image_key: str) -> str:
    """rel joined to the dataset directory. The check is on the path as written: absolute, or leaving the directory
    through `..`, is refused; a symlink inside the directory (a linked `images/`) is followed when the file is read."""
    written = Path(rel)
    normal = Path(os.path.normpath(rel))
    if written.is_absolute() or normal.parts[:1] == ("..",):
        why = "is absolute" if written.is_absolute() else "leaves it through '..'"
        raise DataError.for_row(row_id, image_key, f"path {rel!r} escapes the dataset directory {root} ({why})",
                                fix="use a path relative to the dataset directory, inside it")
    return str(root / normal)


def _resolved_images(ds, root: Path, image_key: str):
    """Parquet and save_to_disk rows: image paths (strings, or `datasets.Image` values and plain `{bytes, path}`
    structs without bytes) resolved against the dataset directory and confined to it as JSONL paths are, so the same
    dataset loads from any working directory."""
    import datasets

    if image_key not in ds.column_names or ROW_ID not in ds.column_names:
        return ds
    feature = ds.features[image_key]
    if isinstance(feature, datasets.Image):
        chunks = ds.data.column(image_key).chunks  # Arrow structs {bytes, path}
        if not sum(chunk.field("bytes").null_count for chunk in chunks):  # every image embedded: no path to resolve
            return ds
        view = ds.cast_column(image_key, datasets.Image(decode=False)) if feature.decode else ds
    elif ((isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"))
          or (isinstance(feature, dict) and "path" in feature)):  # a string, or a plain struct {bytes, path}
        view = ds
    else:
        return ds  # a column of another type: the row checks name it

    def resolve(value: Any, row_id: str) -> Any:
        if isinstance(value, str) and value:
            return _resolve_image_path(root, value, row_id, image_key)
        if isinstance(value, dict) and not value.get("bytes") and value.get("path"):
            return {**value, "path": _resolve_image_path(root, value["path"], row_id, image_key)}
        return value

    def batch(rows: dict) -> dict:
        return {image_key: [resolve(v, r) for v, r in zip(rows[image_key], rows[ROW_ID], strict=True)]}

    resolved = view.map(batch, batched=True)
    return resolved.cast_column(image_key, feature) if resolved.features[image_key] != feature else resolved


def _rows_to_dataset(rows: list[dict[str, Any]]):
    import datasets

    # Mixed-type columns (a caption that is sometimes null) are fine for Arrow; objects in target_json are not
    # uniform across rows, so they are stored as JSON text and parsed back by parse_target.
    for row in rows:
        for key, value in list(row.items()):
            if isinstance(value, (dict, list)):
                row[key] = json.dumps(value)
    _check_column_types(rows)
    return datasets.Dataset.from_list(rows)


def _type_class(value: Any) -> str:
    # Arrow widens int to float but cannot mix str, bool and numbers in one column.
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


def _check_column_types(rows: list[dict[str, Any]]) -> None:
    """Name the rows whose value type differs from the rest of its column (e.g. one numeric query among strings).

    Without this, Arrow fails on the whole file with an ArrowTypeError that names neither the row nor the column.
    """
    seen: dict[str, Counter] = {}
    for row in rows:
        for key, value in row.items():
            if value is not None:
                seen.setdefault(key, Counter())[_type_class(value)] += 1
    odd: list[tuple[str, str, str]] = []  # (row id, column, what is odd)
    for key, types in seen.items():
        if len(types) > 1:
            usual = types.most_common(1)[0][0]
            odd += [(row[ROW_ID], key, f"is {_type_class(row[key])} {row[key]!r:.40} where other rows have {usual}")
                    for row in rows if row.get(key) is not None and _type_class(row[key]) != usual]
    if odd:
        listed = "; ".join(f"{row}: field '{key}' {what}" for row, key, what in odd[:20])
        listed += f"; ... and {len(odd) - 20} more" if len(odd) > 20 else ""
        fix = "every row must use one type per column (e.g. a JSON string)"
        raise DataError(f"{listed}; {fix}", row=odd[0][0], field=odd[0][1], fix=fix)


def _with_row_ids(ds, split: str):
    if ROW_ID in ds.column_names:
        return ds
    return ds.add_column(ROW_ID, [f"{split}[{i}]" for i in range(len(ds))])


def _read(found: SplitFiles, base: Path, root: Path, split: str, image_key: str, label: str):
    """A split's rows from its files (see job/data/layouts.py), named `{label}[i]` where the files give no line."""
    import datasets

    files = found.files
    if found.kind == "jsonl":
        return _rows_to_dataset(_jsonl_rows(files[0], image_key, split))
    if found.kind == "imagefolder":
        # Named as the dataset lays it out; not resolved: a Hub snapshot's files are links into its blob store.
        name = os.path.relpath(files[0], base).replace(os.sep, "/")
        return _rows_to_dataset(_jsonl_rows(files[0], image_key, split, name=name, file_key=IMAGEFOLDER_FILE_KEY))
    if found.kind == "parquet":
        ds = datasets.Dataset.from_parquet([str(p) for p in files])
    else:
        ds = datasets.load_from_disk(str(files[0]))
    return _resolved_images(_with_row_ids(ds, label), root, image_key)


def load_local_split(uri: str, split: str, image_key: str = "image"):
    """Load one split from a local path. Raises DataError naming the path and what was expected."""
    path = Path(uri)
    if not path.exists():
        raise DataError(f"dataset path {uri!r} does not exist (SFT_DATASET_URI)")
    if path.is_file() and path.suffix not in (*JSONL_SUFFIXES, ".parquet"):
        raise DataError(f"dataset file {uri!r} is not .jsonl, .json or .parquet (SFT_DATASET_URI)")
    root = path.resolve() if path.is_dir() else path.resolve().parent
    found = find_split(path, split) if path.is_dir() else None
    whole = whole_source(path) if found is None else None
    if found is not None:
        ds = _read(found, path, root, split, image_key, split)
    elif whole is not None:  # one split by its form: rows named after the file or directory (`all.parquet[17]`)
        ds = _read(whole, path if path.is_dir() else path.parent, root, split, image_key, path.name)
    elif (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits")
        raise DataError(f"split {split!r} not found in {uri}: it has {splits}; set SFT_TRAIN_SPLIT/SFT_EVAL_SPLIT")
    elif configs := sorted(declared_configs(path)) if path.is_dir() else []:
        raise DataError(f"no {split!r} split in {uri}: its dataset card declares the configurations "
                        f"{', '.join(configs)}; set SFT_DATASET_CONFIG to one of them")
    else:
        raise DataError(f"no {split!r} split in {uri}: expected {expected_layouts(split)}; add it, or set "
                        "SFT_TRAIN_SPLIT/SFT_EVAL_SPLIT to a split it has")
    if len(ds) == 0:
        raise DataError(
            f"split {split!r} in {uri} is empty; add rows or point SFT_TRAIN_SPLIT/SFT_EVAL_SPLIT elsewhere"
        )
    return ds


def _cwd_note(path: str) -> str:
    return "" if Path(path).is_absolute() else f" (relative to the working directory {Path.cwd()})"


def _select_subset(ds, n: int | None, seed: int):
    """A deterministic random subset of n rows (the whole split when n is None or not smaller)."""
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def load_hub_split(dataset_id: str, split: str, config: str | None, revision: str | None):
    """A split of a Hub dataset (cached by `datasets`; HF_HUB_OFFLINE=1 uses the cache only)."""
    import datasets

    not_local = f"SFT_DATASET_URI={dataset_id!r}: no such local path{_cwd_note(dataset_id)}, and as a Hub dataset"
    try:
        ds = datasets.load_dataset(dataset_id, config, revision=revision, split=split)
    except (ConnectionError, TimeoutError) as exc:
        if hub_offline():  # OfflineModeIsEnabled is a ConnectionError: nothing transient about it
            raise DataError(f"{not_local} it is not in the local cache and HF_HUB_OFFLINE=1") from None
        raise TransientError(f"{not_local}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - not found, no access, bad split: all fixable by the user
        raise DataError(f"{not_local} split {split!r} (revision {revision}): {type(exc).__name__}: "
                        f"{(str(exc).splitlines() or [''])[0]}") from None
    if len(ds) == 0:
        raise DataError(f"split {split!r} of Hub dataset {dataset_id} is empty")
    return _with_row_ids(ds, split)


def load_split(data: DataConfig, path: str | None, split: str):
    """One split of the dataset at path (`Sources.dataset_path`: a local path, or the local copy of an s3:// prefix
    or Hub dataset; a Hub id that was not mirrored is read with `datasets`), with data's keys and Hub settings."""
    if not path:
        raise DataError("SFT_DATASET_URI is not set: point it at a local path, s3://bucket/prefix or a Hub dataset id")
    if (hub_id := hub_dataset_id(path)) is not None:
        return load_hub_split(hub_id, split, data.config, data.revision)
    return load_local_split(path, split, data.image_key)


def holds_out(data: DataConfig, path: str | None) -> bool:
    """Whether eval rows are held out of the source's one split (SFT_EVAL_HOLDOUT) rather than read from its own."""
    if not path or hub_dataset_id(path) is not None:
        return False
    return single_split_source(path, data.train_split, data.eval_split)


def _load_role(data: DataConfig, path: str | None, seed: int, role: str):
    """The train or eval rows: the split SFT_TRAIN_SPLIT / SFT_EVAL_SPLIT names, or a side of the hold-out."""
    if not holds_out(data, path):
        return load_split(data, path, data.train_split if role == "train" else data.eval_split)
    whole = load_split(data, path, data.train_split)
    sides = holdout_sides(whole, seed, data.eval_holdout, data.image_key, str(path))
    return whole.select(sides[role])


def load_train_dataset(data: DataConfig, path: str | None, seed: int):
    """The training rows of the dataset at path (see load_split), SFT_TRAIN_SUBSET of them when set; seed
    (SFT_SEED) draws the subset and the hold-out."""
    ds = _load_role(data, path, seed, "train")
    return _select_subset(ds, data.train_subset, seed)


def _load_eval_dataset(data: DataConfig, path: str | None, seed: int):
    """The eval rows, as load_train_dataset reads the training rows."""
    ds = _load_role(data, path, seed, "eval")
    return _select_subset(ds, data.eval_subset, seed)


def content_fingerprint(row_digests: Iterable[str]) -> str:
    """sha256 over a split's per-row digests in training order (each digest covers the row's image bytes and text).

    The digests come from the preflight pass, which reads every image anyway: the fingerprint costs no extra I/O,
    and it sees the images of a single-file dataset (a JSONL whose rows point at image files) as well as the rows.
    """
    digest = hashlib.sha256()
    for row in row_digests:
        digest.update(row.encode() + b"\n")
    return digest.hexdigest()


def dataset_fingerprint(split_fingerprints: dict[str, str] | None) -> str | None:
    """One sha256 for the data a run used: its splits' content fingerprints (see content_fingerprint)."""
    if not split_fingerprints:
        return None
    digest = hashlib.sha256()
    for role in sorted(split_fingerprints):
        digest.update(f"{role}={split_fingerprints[role]}\n".encode())
    return digest.hexdigest()

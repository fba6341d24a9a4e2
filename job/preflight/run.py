"""Preflight of every row (`qwen3-sft preflight`, and the first phase of `run`, `eval` and `export`, through
job/inputs.py): every row of both splits checked on the CPU.

It loads the processor only (no model weights), so it runs on a CPU runner before any GPU hour is spent. Each row
goes through job/data/checks.py (schema, full image decode and pixel bounds, target JSON and label, token length
including visual tokens against SFT_MAX_LENGTH, supervised tokens); then duplicates and the label distribution are
checked across rows. Rows are streamed through worker processes in dataset order; only a few numbers per row are
kept, never a decoded image.

Output: a summary table on stdout and `preflight_report.json` in SFT_OUTPUT_DIR, the only file preflight writes.
Policy (SFT_BAD_ROWS): `fail` raises DataError (exit 2) if any row is bad; `skip` drops bad rows and raises only
when more than SFT_MAX_BAD_FRACTION of a split is bad. A split the loader cannot parse at all (a line that is not
JSON or not UTF-8, an image path escaping the dataset directory, an empty split) always fails.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job import outputs
from job.collators.qwen3_collator import build_collators
from job.config.schema import JobConfig
from job.config.sections.data import DataConfig
from job.data.checks import RowChecker
from job.data.holdout import ROW_ID
from job.data.labels import LabelColumn, label_column, with_verdicts
from job.data.loaders import LENGTH_COLUMN, _load_eval_dataset, holds_out, load_train_dataset
from job.errors import DataError, QueryColumnConflict
from job.preflight.report import (
    MAX_LISTED_ERRORS,
    build_report,
    failure_message,
    format_issue,
    summary_table,
    understood,
)
from job.preflight.scan import SplitTally, effective_workers, make_issue, scan, worker_count

log = logging.getLogger("job.preflight")

REPORT_NAME = "preflight_report.json"
ROLES = ("train", "eval")


@dataclass
class PreflightResult:
    report: dict
    train_dataset: Any  # bad rows removed under SFT_BAD_ROWS=skip; the loaded split otherwise
    eval_dataset: Any
    # What was done to each split ({"train": {"dropped": [...], "lengths": [...]}, "eval": {...}}): small enough to
    # broadcast, so DDP ranks other than 0 rebuild the same datasets without scanning again (apply_plan).
    plan: dict = field(default_factory=dict)


# -- loading -----------------------------------------------------------------------------------------------------
def _load_error(split: str, exc: DataError) -> dict:
    """The loader stops at the first unparseable line: keep its message, and the row and field it carries."""
    # Only a file:line problem is fixed in the file; the others (unset URI, missing split, empty split) carry
    # their own fix in the loader's message.
    fix = "correct the file; until then the whole split cannot be loaded" if exc.row else ""
    return make_issue(split, exc.row, None, "split_unreadable", exc.field or "line",
                  str(exc).removeprefix(f"{split}: "), fix)


def _split_name(data: DataConfig, role: str) -> str:
    return data.train_split if role == "train" else data.eval_split


def _load_splits(data: DataConfig, path: str | None, seed: int, roles: tuple[str, ...] = ROLES
                 ) -> tuple[dict[str, Any], list[dict]]:
    loaders = {"train": load_train_dataset, "eval": _load_eval_dataset}
    loaded, errors = {}, []
    for role in roles:
        load = loaders[role]
        try:
            loaded[role] = load(data, path, seed)
        except DataError as exc:
            errors.append(_load_error(_split_name(data, role), exc))
    return loaded, errors


def _check_view(ds, image_key: str):
    """The split with images left undecoded: the checker decodes them itself, with the bomb limit, one at a time."""
    import datasets

    feature = ds.features.get(image_key)
    if isinstance(feature, datasets.Image) and feature.decode:
        return ds.cast_column(image_key, datasets.Image(decode=False))
    return ds


# -- policy and report -------------------------------------------------------------------------------------------
def _label_warnings(tallies: dict[str, SplitTally], field_name: str, data: DataConfig) -> None:
    if "train" in tallies:
        _class_balance_warnings(tallies["train"], field_name, data)
    if "train" not in tallies or "eval" not in tallies:
        return
    train, ev = tallies["train"], tallies["eval"]
    for label, count in sorted(ev.labels.items()):
        if label not in train.labels:
            ev.warnings.append(make_issue(ev.name, ev.label_rows[label], None, "eval_label_not_in_train", field_name,
                                      f"label {label!r} is in {count} eval row(s) but in no training row",
                                      "add training rows with this label, or fix its spelling"))


def _class_balance_warnings(train: SplitTally, field_name: str, data: DataConfig) -> None:
    """A label with too few training rows, and a largest/smallest ratio above the limit: the model then learns to
    answer the majority label (a 5-class set of 128/34/24/11/3 rows trained to "red" for every row: accuracy 0.68,
    macro-F1 0.18). Warnings, not errors: the user may know, and the per-class eval shows the effect."""
    if not train.labels:
        return
    small = sorted((n, label) for label, n in train.labels.items() if n < data.min_class_rows)
    for n, label in small:
        train.warnings.append(make_issue(
            train.name, train.label_rows[label], None, "class_too_small", field_name,
            f"label {label!r} has {n} training row(s), fewer than SFT_MIN_CLASS_ROWS={data.min_class_rows}",
            "add training rows with this label (or merge it into another); SFT_MIN_CLASS_ROWS=0 silences this"))
    by_size = sorted((n, label) for label, n in train.labels.items())
    (least, bottom), (most, top) = by_size[0], by_size[-1]
    if least and most / least > data.max_class_ratio:
        train.warnings.append(make_issue(
            train.name, None, None, "class_imbalance", field_name,
            f"the largest label {top!r} has {most / least:.1f}x the rows of the smallest {bottom!r} ({most} vs "
            f"{least}), above SFT_MAX_CLASS_RATIO={data.max_class_ratio:g}",
            "rebalance the training rows (oversample the small labels, or subsample the large one), and read the "
            "per-class metrics, not only accuracy"))


def _policy_failure(data: DataConfig, tallies: dict[str, SplitTally]) -> str | None:
    """None when the run may go on; else why it may not. Marks the splits whose bad rows are dropped."""
    mode, limit = data.bad_rows, data.max_bad_fraction
    bad = {t.name: len(t.bad) for t in tallies.values() if t.bad}
    if not bad:
        return None
    over = [t for t in tallies.values() if t.bad and (len(t.bad) / t.rows > limit or len(t.bad) == t.rows)]
    if mode == "fail":
        counts = ", ".join(f"{name}: {n}" for name, n in bad.items())
        # SFT_BAD_ROWS=skip is suggested only where it would let the run go on.
        advice = ("fix the rows" if over else
                  f"fix the rows, or set SFT_BAD_ROWS=skip to drop up to SFT_MAX_BAD_FRACTION={limit} of a split")
        return f"{sum(bad.values())} bad row(s) ({counts}); SFT_BAD_ROWS=fail stops here ({advice})"
    if over:
        return (
            "; ".join(
                f"{t.name}: {len(t.bad)} of {t.rows} rows are bad ({len(t.bad) / t.rows:.1%}), above "
                f"SFT_MAX_BAD_FRACTION={limit}"
                for t in over
            )
            + " (fix the rows or raise SFT_MAX_BAD_FRACTION)"
        )
    for t in tallies.values():
        t.skipped = bool(t.bad)
    return None


def eval_overlap(data: DataConfig, tallies: dict[str, SplitTally]) -> dict | None:
    """Eval rows identical to training rows (image bytes, query, caption and target): how many, and the limit."""
    if "train" not in tallies or "eval" not in tallies:
        return None
    ev = tallies["eval"]
    rows = sorted({w["row_id"] for w in ev.warnings if w["kind"] == "eval_row_in_train"})
    return {"rows": len(rows), "of": ev.rows, "fraction": round(len(rows) / ev.rows, 6) if ev.rows else 0.0,
            "limit": data.max_eval_overlap, "row_ids": rows}


def _overlap_failure(overlap: dict | None) -> str | None:
    if overlap is None or overlap["fraction"] <= overlap["limit"]:
        return None
    listed = ", ".join(overlap["row_ids"][:10]) + (", ..." if overlap["rows"] > 10 else "")
    return (f"{overlap['rows']} of {overlap['of']} eval rows ({overlap['fraction']:.1%}) are identical to training "
            f"rows ({listed}), above SFT_MAX_EVAL_OVERLAP={overlap['limit']}: the eval (and the gate) would measure "
            "memorisation; remove them from one split, or raise SFT_MAX_EVAL_OVERLAP")


def _holdout_record(data: DataConfig, path: str | None, seed: int, loaded: dict[str, Any]) -> dict | None:
    """A source with one split: how it was split, and the row ids on each side (after the subsets)."""
    if not holds_out(data, path):
        return None
    return {"seed": seed, "eval_holdout": data.eval_holdout,
            **{f"{role}_row_ids": list(loaded[role][ROW_ID]) for role in loaded}}


def _publish(output_dir: str, report: dict, name: str = REPORT_NAME) -> Path:
    path = Path(output_dir) / name
    outputs.write_json(path, report)
    print(summary_table(report, path), flush=True)
    for warning in report["warnings"][:MAX_LISTED_ERRORS]:
        log.warning("%s", format_issue(warning))
    return path


# -- entry points ------------------------------------------------------------------------------------------------
def _plan_entry(tally: SplitTally, with_lengths: bool) -> dict:
    dropped = sorted(index for index, _ in tally.bad) if tally.skipped else []
    lengths = [tally.lengths.get(i, 0) for i in tally.kept_indices()] if with_lengths else None
    return {"dropped": dropped, "lengths": lengths}


def apply_plan_entry(ds, entry: dict):
    """The split as training sees it: the dropped rows removed and, for train, the per-row token counts added."""
    gone = set(entry["dropped"])
    if gone:
        ds = ds.select([i for i in range(len(ds)) if i not in gone])
    if entry.get("lengths") is not None:
        if LENGTH_COLUMN in ds.column_names:
            ds = ds.remove_columns(LENGTH_COLUMN)
        ds = ds.add_column(LENGTH_COLUMN, entry["lengths"])
    return ds


def apply_plan(data: DataConfig, path: str | None, seed: int, plan: dict) -> tuple[Any, Any]:
    """Load both splits (as run_preflight loads them) and apply a plan it made on another process (DDP ranks > 0)."""
    loaded, errors = _load_splits(data, path, seed)
    if errors:
        raise DataError("; ".join(format_issue(e) for e in errors))
    labels = label_column(loaded, data, path)
    train, evals = (with_verdicts(apply_plan_entry(loaded[role], plan[role]), labels) for role in ROLES)
    return train, evals


def _jobs(data: DataConfig, max_length: int, loaded: dict[str, Any], processor,
          labels: LabelColumn | None) -> dict[str, tuple[Any, RowChecker, str]]:
    # The checkers wrap the very collators training and eval use, so both see rows the same way.
    collators = dict(zip(ROLES, build_collators(data, max_length, processor), strict=True))
    return {role: (_check_view(loaded[role], data.image_key), RowChecker(collators[role], data.label_field, labels),
                   _split_name(data, role)) for role in loaded}


def _check_query_column(data: DataConfig, loaded: dict[str, Any]) -> None:
    """SFT_QUERY_TEXT with a query column in the data: one of the two would be silently ignored (exit 2)."""
    for role, ds in loaded.items():
        if data.query_text is not None and data.query_key in ds.column_names:
            raise QueryColumnConflict(data.query_key, _split_name(data, role))


# A required column missing from at least this share of a split's rows is a column-name mismatch, reported once
# (with the split's columns and the SFT_*_KEY to set) instead of once per row.
COLUMN_MISMATCH_FRACTION = 0.9
KEY_SETTINGS = {"image_key": "SFT_IMAGE_KEY", "query_key": "SFT_QUERY_KEY", "target_key": "SFT_TARGET_KEY"}


def _column_mismatches(data: DataConfig, tallies: dict[str, SplitTally], loaded: dict[str, Any]) -> list[dict]:
    """One `column_missing` issue per (split, required column) that (nearly) no row has; its per-row errors go."""
    issues = []
    for role, tally in tallies.items():
        columns = [c for c in loaded[role].column_names if c not in (ROW_ID, LENGTH_COLUMN)]
        for key, setting in KEY_SETTINGS.items():
            column = getattr(data, key)
            missing = [e for e in tally.errors if e["kind"] == "missing_field" and e["field"] == column]
            if column in columns or len(missing) < COLUMN_MISMATCH_FRACTION * tally.rows:
                continue
            gone = {id(e) for e in missing}
            tally.errors = [e for e in tally.errors if id(e) not in gone]
            issues.append(make_issue(tally.name, None, None, "column_missing", column,
                                 f"column '{column}' is missing from {len(missing)} of {tally.rows} rows; the split's "
                                 f"columns are {', '.join(columns)}",
                                 f"set {setting} to the column that holds it (now {setting}={column})"))
    return issues


# A json target column whose rows (nearly) all fail as verdicts this way holds class labels (SFT_TARGET_FORMAT=label).
NOT_VERDICTS = ("target_not_object", "target_not_json")


def _held_values(ds, key: str) -> str:
    import datasets

    feature = ds.features.get(key)
    if isinstance(feature, datasets.ClassLabel):
        return f"ClassLabel indices (names: {', '.join(feature.names)})"
    values = sorted({v for v in ds.unique(key) if v is not None}, key=str)
    shown = ", ".join(repr(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
    return f"plain {type(values[0]).__name__ if values else 'null'} values ({shown})"


def _label_column_hints(data: DataConfig, tallies: dict[str, SplitTally], loaded: dict[str, Any]) -> list[dict]:
    """SFT_TARGET_FORMAT=json on a column of class labels (an integer or plain-string column): one `target_is_label`
    issue per split, with the hint to use SFT_TARGET_FORMAT=label, instead of one error per row."""
    key, issues = data.target_key, []
    for role, tally in tallies.items():
        found = [e for e in tally.errors if e["field"] == key and e["kind"] in NOT_VERDICTS]
        if data.target_format != "json" or not found or len(found) < COLUMN_MISMATCH_FRACTION * tally.rows:
            continue
        gone = {id(e) for e in found}
        tally.errors = [e for e in tally.errors if id(e) not in gone]
        held = _held_values(loaded[role], key)
        names = " with SFT_LABEL_NAMES=<the class names in index order>" if held.startswith("plain int") else ""
        issues.append(make_issue(tally.name, None, None, "target_is_label", key,
                                 f"column '{key}' holds {held} in {len(found)} of {tally.rows} rows, not JSON "
                                 "verdicts", f"set SFT_TARGET_FORMAT=label{names}: each row's verdict is then "
                                 f'{{"{data.label_field}": <its class name>}}'))
    return issues


def run_preflight(cfg: JobConfig, dataset_path: str | None, processor, roles: tuple[str, ...] = ROLES,
                  report_name: str = REPORT_NAME) -> PreflightResult:
    """Check every row of the given splits (train and eval by default) of the dataset at dataset_path
    (`Sources.dataset_path`); raise DataError per SFT_BAD_ROWS, else return the datasets (None for a role not
    checked). `eval` checks its split alone, into eval/."""
    data, output_dir = cfg.data, cfg.train.output_dir
    loaded, load_errors = _load_splits(data, dataset_path, cfg.train.seed, roles)
    if load_errors:
        report = build_report(cfg, dataset_path, {}, load_errors, "a split could not be loaded", 0.0, 0)
        raise DataError(failure_message(report, _publish(output_dir, report, report_name)))
    _check_query_column(data, loaded)
    labels = label_column(loaded, data, dataset_path)
    jobs = _jobs(data, cfg.train.max_length, loaded, processor, labels)
    workers = effective_workers(worker_count(), sum(len(view) for view, _, _ in jobs.values()))
    started = time.monotonic()
    tallies = scan(jobs, workers)
    seconds = time.monotonic() - started
    _label_warnings(tallies, f"{data.target_key}.{data.label_field}", data)
    mismatches = _column_mismatches(data, tallies, loaded)
    hints = _label_column_hints(data, tallies, loaded)
    failure = _policy_failure(data, tallies)
    if hints:  # no SFT_BAD_ROWS setting can help either: the column holds labels
        failure = "the target column holds class labels, not JSON verdicts: set SFT_TARGET_FORMAT=label"
    if mismatches:  # no SFT_BAD_ROWS setting can help: the column names are wrong
        failure = "the dataset's columns do not match the SFT_*_KEY settings"
    overlap = eval_overlap(data, tallies)
    failure = failure or _overlap_failure(overlap)
    report = build_report(cfg, dataset_path, tallies, mismatches + hints, failure, seconds, workers)
    report["holdout"] = _holdout_record(data, dataset_path, cfg.train.seed, loaded)
    report["eval_overlap"] = overlap
    report["understood"] = understood(data, {t.name: loaded[role].column_names for role, t in tallies.items()},
                                      labels, tallies)
    # Free: every image was already read and hashed by the row checks above (the duplicate digests).
    report["data_fingerprint"] = {role: tally.fingerprint() for role, tally in tallies.items()}
    path = _publish(output_dir, report, report_name)
    if failure is not None:
        raise DataError(failure_message(report, path))
    plan = {role: _plan_entry(tallies[role], role == "train") for role in roles}
    datasets = {role: with_verdicts(apply_plan_entry(loaded[role], plan[role]), labels) for role in roles}
    return PreflightResult(report, datasets.get("train"), datasets.get("eval"), plan)

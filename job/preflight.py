"""`qwen3-sft preflight` (and the first phase of `run`): every row of both splits checked on the CPU.

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

import collections
import contextlib
import itertools
import logging
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job.cards import ModelCards
from job.collators.qwen3_collator import build_collators
from job.config import build_cfg
from job.data.checks import RowChecker, RowResult
from job.data.loaders import LENGTH_COLUMN, ROW_ID, _load_eval_dataset, content_fingerprint, load_train_dataset
from job.early_checks import check_inputs, load_processor_checked
from job.errors import DataError
from job.preflight_report import MAX_LISTED_ERRORS, _failure_message, build_report, format_issue, summary_table
from job.train import artifacts

log = logging.getLogger("job.preflight")

REPORT_NAME = "preflight_report.json"
# Below this, rows are checked in-process. Starting the pool (a forkserver that imports torch and transformers, then
# each worker unpickling the ~16 MB processor) measured 20-40 s on a busy 2-core machine, against 2.7 ms per demo row
# in-process (272 rows in 0.7 s) and tens of ms per real photo: the pool pays off from a few thousand rows.
POOL_MIN_ROWS = 2000
ROLES = ("train", "eval")




@dataclass
class PreflightResult:
    report: dict
    train_dataset: Any  # bad rows removed under SFT_BAD_ROWS=skip; the loaded split otherwise
    eval_dataset: Any
    # What was done to each split ({"train": {"dropped": [...], "lengths": [...]}, "eval": {...}}): small enough to
    # broadcast, so DDP ranks other than 0 rebuild the same datasets without scanning again (apply_plan).
    plan: dict = field(default_factory=dict)


def _issue(
    split: str, row_id: str | None, index: int | None, kind: str, field_name: str, message: str, fix: str
) -> dict:
    return {"split": split, "row_id": row_id, "index": index, "kind": kind, "field": field_name, "message": message,
            "fix": fix}


@dataclass
class SplitTally:
    """Running totals for one split: everything the report needs, a few numbers per row."""

    role: str
    name: str
    rows: int
    errors: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)
    bad: list[tuple[int, str]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    visual: list[int] = field(default_factory=list)
    supervised: list[int] = field(default_factory=list)
    labels: Counter = field(default_factory=Counter)
    label_rows: dict[str, str] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    lengths: dict[int, int] = field(default_factory=dict)  # row index -> total tokens
    row_digests: dict[int, str] = field(default_factory=dict)  # row index -> digest of its image bytes and fields
    skipped: bool = False

    def add(self, r: RowResult, train_digests: dict[str, str] | None) -> None:
        for e in r.errors:
            self.errors.append(_issue(self.name, r.row_id, r.index, e.kind, e.field, e.message, e.fix))
        if r.errors:
            self.bad.append((r.index, r.row_id))
        if r.tokens is not None:
            self.lengths[r.index] = r.tokens
        for values, value in ((self.tokens, r.tokens), (self.visual, r.visual_tokens),
                              (self.supervised, r.supervised_tokens)):
            if value is not None:
                values.append(value)
        if not r.errors and r.label is not None:  # labels of the rows that would be trained on (or scored)
            self.labels[r.label] += 1
            self.label_rows.setdefault(r.label, r.row_id)
        if r.digest is not None:
            self.row_digests[r.index] = r.digest
            self._duplicates(r, r.digest, train_digests)

    def kept_indices(self) -> list[int]:
        gone = {index for index, _ in self.bad} if self.skipped else set()
        return [i for i in range(self.rows) if i not in gone]

    def fingerprint(self) -> str:
        """The split as training (or eval) reads it: the kept rows' digests in order (image bytes included)."""
        return content_fingerprint(self.row_digests.get(i, "") for i in self.kept_indices())

    def _duplicates(self, r: RowResult, digest: str, train_digests: dict[str, str] | None) -> None:
        if digest in self.digests:
            first = self.digests[digest]
            self.warnings.append(_issue(self.name, r.row_id, r.index, "duplicate_row", "row",
                                        f"repeats {first} (same image bytes, query, caption and target)",
                                        "drop the repeated row (duplicates over-weight it)"))
        else:
            self.digests[digest] = r.row_id
        if train_digests and digest in train_digests:
            self.warnings.append(_issue(self.name, r.row_id, r.index, "eval_row_in_train", "row",
                                        f"is identical to training row {train_digests[digest]}, so eval scores are "
                                        "inflated", "remove it from one of the splits"))


# -- scanning ----------------------------------------------------------------------------------------------------
# role -> (dataset view, checker): set by scan() in this process, and by _init_worker in each pool worker.
_JOBS: dict[str, tuple[Any, RowChecker]] = {}


def _init_worker(jobs: dict[str, tuple[Any, RowChecker]]) -> None:
    """Runs once per worker: the views and checkers arrive pickled (the processor, and the datasets by their Arrow
    files), instead of being inherited through fork."""
    # One worker per core already; tokenizers' own Rust thread pool inside each would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _JOBS.update(jobs)


def _check_task(task: tuple[str, int]) -> tuple[str, RowResult]:
    role, index = task
    view, checker = _JOBS[role]
    return role, checker.check(view[index], index)


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The container's CPU quota (Kubernetes limits.cpu), which the affinity mask does not show; None if unlimited."""
    v2, v1 = root / "cpu.max", root / "cpu" / "cpu.cfs_quota_us"
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()
        elif v1.is_file():
            quota, period = v1.read_text().strip(), v1.with_name("cpu.cfs_period_us").read_text().strip()
        else:
            return None
        return None if quota in ("max", "-1") else max(1, int(quota) // int(period))
    except (OSError, ValueError):
        return None


def worker_count() -> int:
    try:
        cores = len(os.sched_getaffinity(0))  # the CPUs this process may run on
    except AttributeError:
        cores = os.cpu_count() or 1
    # At most 16: each worker may hold one image of up to MAX_DECODE_PIXELS decoded (~270 MB as RGB).
    return max(1, min(cores, cgroup_cpu_limit() or cores, 16))


def effective_workers(workers: int, total: int) -> int:
    if workers < 2 or total < POOL_MIN_ROWS:
        return 1
    return workers


def _pool_context(preload: list[str]) -> multiprocessing.context.BaseContext:
    """Workers start from a clean process, never by forking this one: by the time preflight runs, `run` may have
    threads (W&B, the upload thread; under torch 2.8, loading a 4-bit model starts inductor's compile-worker pool,
    because bitsandbytes' CPU ops are torch.compile'd), and a fork copies their held locks into a child where no
    thread will ever release them (Python 3.12 warns about it). The forkserver is itself started by fork+exec, so
    it has no threads; spawn where there is no forkserver (Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # The forkserver imports these once (torch, the processor's transformers modules); each worker forked from it
    # starts with them instead of importing them itself (seconds each, on 2 cores).
    context.set_forkserver_preload(preload)
    return context


def _check_chunk(tasks: list[tuple[str, int]]) -> list[tuple[str, RowResult]]:
    return [_check_task(task) for task in tasks]


def _chunks(tasks: Iterator, size: int) -> Iterator[list]:
    while chunk := list(itertools.islice(tasks, size)):
        yield chunk


def _pool_map(executor, tasks: Iterator, chunksize: int, window: int) -> Iterator[tuple[str, RowResult]]:
    """Results in task order, with at most `window` chunks in flight (memory stays bounded for any split size)."""
    pending: collections.deque = collections.deque()
    try:
        for chunk in _chunks(tasks, chunksize):
            pending.append(executor.submit(_check_chunk, chunk))
            if len(pending) >= window:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    except BrokenProcessPool as exc:
        raise RuntimeError("a preflight worker process died (killed for memory, or an image decoder crashed); "
                           "rerun with more memory") from exc


@contextlib.contextmanager
def _mapper(workers: int, total: int) -> Iterator[Callable]:
    """An ordered map: in-process for small jobs, else worker processes (deterministic: results come back in order).

    concurrent.futures rather than multiprocessing.Pool: a worker killed by the OOM killer makes the executor raise
    BrokenProcessPool, where Pool.imap would wait forever.
    """
    if effective_workers(workers, total) == 1:
        yield lambda tasks: map(_check_task, tasks)
        return
    chunksize = max(1, min(32, total // (workers * 16)))
    processors = {type(checker.processor).__module__ for _, checker in _JOBS.values()}
    with ProcessPoolExecutor(
        workers,
        mp_context=_pool_context([__name__, *sorted(processors)]),
        initializer=_init_worker,
        initargs=(dict(_JOBS),),
    ) as executor:
        yield lambda tasks: _pool_map(executor, iter(tasks), chunksize, window=workers * 4)


def scan(jobs: dict[str, tuple[Any, RowChecker, str]], workers: int) -> dict[str, SplitTally]:
    """Check every row of every split; jobs maps role -> (dataset view, checker, split name)."""
    from tqdm.auto import tqdm

    tallies = {role: SplitTally(role, name, len(view)) for role, (view, _, name) in jobs.items()}
    total = sum(t.rows for t in tallies.values())
    tasks = itertools.chain.from_iterable(((role, i) for i in range(len(view))) for role, (view, _, _) in jobs.items())
    _JOBS.update({role: (view, checker) for role, (view, checker, _) in jobs.items()})
    try:
        with _mapper(workers, total) as ordered_map, tqdm(total=total, desc="preflight", unit="row", file=sys.stderr,
                                                         disable=None, mininterval=1.0) as bar:
            for role, result in ordered_map(tasks):
                train = tallies.get("train")
                tallies[role].add(result, train.digests if role == "eval" and train else None)
                bar.update()
    finally:
        _JOBS.clear()
    return tallies


# -- loading -----------------------------------------------------------------------------------------------------
def _load_error(split: str, exc: DataError) -> dict:
    """The loader stops at the first unparseable line: keep its message, and the row and field it carries."""
    # Only a file:line problem is fixed in the file; the others (unset URI, missing split, empty split) carry
    # their own fix in the loader's message.
    fix = "correct the file; until then the whole split cannot be loaded" if exc.row else ""
    return _issue(split, exc.row, None, "split_unreadable", exc.field or "line",
                  str(exc).removeprefix(f"{split}: "), fix)


def _load_splits(cfg: dict, roles: tuple[str, ...] = ROLES) -> tuple[dict[str, Any], list[dict]]:
    loaders = {"train": load_train_dataset, "eval": _load_eval_dataset}
    loaded, errors = {}, []
    for role in roles:
        load = loaders[role]
        try:
            loaded[role] = load(cfg)
        except DataError as exc:
            errors.append(_load_error(cfg["data"][f"{role}_split"], exc))
    return loaded, errors


def _check_view(ds, image_key: str):
    """The split with images left undecoded: the checker decodes them itself, with the bomb limit, one at a time."""
    import datasets

    feature = ds.features.get(image_key)
    if isinstance(feature, datasets.Image) and feature.decode:
        return ds.cast_column(image_key, datasets.Image(decode=False))
    return ds


# -- policy and report -------------------------------------------------------------------------------------------
def _label_warnings(tallies: dict[str, SplitTally], field_name: str) -> None:
    if "train" not in tallies or "eval" not in tallies:
        return
    train, ev = tallies["train"], tallies["eval"]
    for label, count in sorted(ev.labels.items()):
        if label not in train.labels:
            ev.warnings.append(_issue(ev.name, ev.label_rows[label], None, "eval_label_not_in_train", field_name,
                                      f"label {label!r} is in {count} eval row(s) but in no training row",
                                      "add training rows with this label, or fix its spelling"))


def _policy_failure(cfg: dict, tallies: dict[str, SplitTally]) -> str | None:
    """None when the run may go on; else why it may not. Marks the splits whose bad rows are dropped."""
    mode, limit = cfg["data"]["bad_rows"], cfg["data"]["max_bad_fraction"]
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


def _publish(cfg: dict, report: dict, name: str = REPORT_NAME) -> Path:
    path = Path(cfg["train"]["output_dir"]) / name
    artifacts.write_json(path, report)
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


def apply_plan(cfg: dict, plan: dict) -> tuple[Any, Any]:
    """Load both splits and apply a plan made by run_preflight on another process (DDP ranks > 0)."""
    loaded, errors = _load_splits(cfg)
    if errors:
        raise DataError("; ".join(format_issue(e) for e in errors))
    return apply_plan_entry(loaded["train"], plan["train"]), apply_plan_entry(loaded["eval"], plan["eval"])


def _jobs(cfg: dict, loaded: dict[str, Any], processor) -> dict[str, tuple[Any, RowChecker, str]]:

    # The checkers wrap the very collators training and eval use, so both see rows the same way.
    collators = dict(zip(ROLES, build_collators(cfg, processor), strict=True))
    data = cfg["data"]
    return {role: (_check_view(loaded[role], data["image_key"]), RowChecker(collators[role], data["label_field"]),
                   data[f"{role}_split"]) for role in loaded}


# A required column missing from at least this share of a split's rows is a column-name mismatch, reported once
# (with the split's columns and the SFT_*_KEY to set) instead of once per row.
COLUMN_MISMATCH_FRACTION = 0.9
KEY_SETTINGS = {"image_key": "SFT_IMAGE_KEY", "query_key": "SFT_QUERY_KEY", "target_key": "SFT_TARGET_KEY"}


def _column_mismatches(cfg: dict, tallies: dict[str, SplitTally], loaded: dict[str, Any]) -> list[dict]:
    """One `column_missing` issue per (split, required column) that (nearly) no row has; its per-row errors go."""
    issues = []
    for role, tally in tallies.items():
        columns = [c for c in loaded[role].column_names if c not in (ROW_ID, LENGTH_COLUMN)]
        for key, setting in KEY_SETTINGS.items():
            column = cfg["data"][key]
            missing = [e for e in tally.errors if e["kind"] == "missing_field" and e["field"] == column]
            if column in columns or len(missing) < COLUMN_MISMATCH_FRACTION * tally.rows:
                continue
            gone = {id(e) for e in missing}
            tally.errors = [e for e in tally.errors if id(e) not in gone]
            issues.append(_issue(tally.name, None, None, "column_missing", column,
                                 f"column '{column}' is missing from {len(missing)} of {tally.rows} rows; the split's "
                                 f"columns are {', '.join(columns)}",
                                 f"set {setting} to the column that holds it (now {setting}={column})"))
    return issues


def run_preflight(cfg: dict, processor=None, roles: tuple[str, ...] = ROLES,
                  report_name: str = REPORT_NAME) -> PreflightResult:
    """Check every row of the given splits (train and eval by default); raise DataError per SFT_BAD_ROWS, else
    return the datasets (None for a role not checked). `eval` checks its split alone, into eval/."""
    loaded, load_errors = _load_splits(cfg, roles)
    if load_errors:
        report = build_report(cfg, {}, load_errors, "a split could not be loaded", 0.0, 0)
        raise DataError(_failure_message(report, _publish(cfg, report, report_name)))
    if processor is None:
        processor = load_processor_checked(cfg)
    jobs = _jobs(cfg, loaded, processor)
    workers = effective_workers(worker_count(), sum(len(view) for view, _, _ in jobs.values()))
    started = time.monotonic()
    tallies = scan(jobs, workers)
    seconds = time.monotonic() - started
    _label_warnings(tallies, f"{cfg['data']['target_key']}.{cfg['data']['label_field']}")
    mismatches = _column_mismatches(cfg, tallies, loaded)
    failure = _policy_failure(cfg, tallies)
    if mismatches:  # no SFT_BAD_ROWS setting can help: the column names are wrong
        failure = "the dataset's columns do not match the SFT_*_KEY settings"
    report = build_report(cfg, tallies, mismatches, failure, seconds, workers)
    # Free: every image was already read and hashed by the row checks above (the duplicate digests).
    report["data_fingerprint"] = {role: tally.fingerprint() for role, tally in tallies.items()}
    path = _publish(cfg, report, report_name)
    if failure is not None:
        raise DataError(_failure_message(report, path))
    plan = {role: _plan_entry(tallies[role], role == "train") for role in roles}
    datasets = {role: apply_plan_entry(loaded[role], plan[role]) for role in roles}
    return PreflightResult(report, datasets.get("train"), datasets.get("eval"), plan)


def main(env: dict | None = None) -> PreflightResult:
    cfg = build_cfg(ModelCards().qwen3_vl_8b_instruct, env)
    check_inputs(cfg, "preflight")
    return run_preflight(cfg, load_processor_checked(cfg))

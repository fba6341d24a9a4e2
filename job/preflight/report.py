"""The preflight report: `preflight_report.json` (every error and warning) and the summary table on stdout."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from job.config.schema import JobConfig
from job.data.checks import MAX_DECODE_PIXELS

MAX_LISTED_ERRORS = 50  # in the exception message; the JSON report lists every error


def format_issue(issue: dict) -> str:
    fix = f"; fix: {issue['fix']}" if issue["fix"] else ""
    # The message already names the file, line or column; or the issue is about a split, not a row.
    if issue["kind"] in ("split_unreadable", "column_missing") or issue["row_id"] is None:
        return f"{issue['split']}: {issue['message']}{fix}"
    where = "row" if issue["field"] == "row" else f"field '{issue['field']}'"
    return f"{issue['split']}: {issue['row_id']}: {where} {issue['message']}{fix}"


def _stats(values: list[int]) -> dict[str, int | None]:
    """Nearest-rank percentiles: real row lengths, not interpolated ones."""
    if not values:
        return {"p50": None, "p95": None, "max": None}
    ordered = sorted(values)
    rank = lambda p: ordered[max(0, -(-len(ordered) * p // 100) - 1)]  # noqa: E731 - ceil(n*p/100)-th value
    return {"p50": rank(50), "p95": rank(95), "max": ordered[-1]}


def _split_report(t: Any) -> dict:
    return {
        "split": t.name,
        "rows": t.rows,
        "rows_bad": len(t.bad),
        "bad_fraction": round(len(t.bad) / t.rows, 6) if t.rows else 0.0,
        "rows_skipped": len(t.bad) if t.skipped else 0,
        "skipped_row_ids": [rid for _, rid in t.bad] if t.skipped else [],
        "errors_by_kind": dict(Counter(e["kind"] for e in t.errors)),
        "warnings_by_kind": dict(Counter(w["kind"] for w in t.warnings)),
        "tokens": _stats(t.tokens),
        "visual_tokens": _stats(t.visual),
        "supervised_tokens": _stats(t.supervised),
        "labels": dict(sorted(t.labels.items())),
    }


def build_report(cfg: JobConfig, dataset_path: str | None, tallies: dict[str, Any], load_errors: list[dict],
                 failure: str | None, seconds: float, workers: int) -> dict:
    """The report of a preflight of the dataset read at dataset_path (`Sources.dataset_path`, which it names)."""
    errors = load_errors + [e for t in tallies.values() for e in t.errors]
    warnings = [w for t in tallies.values() for w in t.warnings]
    rows = sum(t.rows for t in tallies.values())
    return {
        "ok": failure is None,
        "failure": failure,
        "dataset_uri": dataset_path,
        "policy": {"bad_rows": cfg.data.bad_rows, "max_bad_fraction": cfg.data.max_bad_fraction},
        "limits": {
            "max_length": cfg.train.max_length,
            "image_min_pixels": cfg.image.min_pixels,
            "image_max_pixels": cfg.image.max_pixels,
            "max_decode_pixels": MAX_DECODE_PIXELS,
        },
        # The scan alone (decode, tokenize, check), without loading the processor and the splits.
        "rows_checked": rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds, 1) if seconds > 0 else None,
        "workers": workers,
        "splits": {role: _split_report(t) for role, t in tallies.items()},
        "errors_by_kind": dict(Counter(e["kind"] for e in errors)),
        "warnings_by_kind": dict(Counter(w["kind"] for w in warnings)),
        "errors": errors,
        "warnings": warnings,
    }


def _kinds(counts: dict) -> str:
    return ", ".join(f"{k}={n}" for k, n in sorted(counts.items())) or "none"


def _triple(stats: dict) -> str:
    return "/".join("-" if stats[k] is None else str(stats[k]) for k in ("p50", "p95", "max"))


def summary_table(report: dict, path: Path) -> str:
    speed = f"in {report['seconds']:.1f} s ({report['rows_per_s'] or 0:.0f} rows/s, {report['workers']} worker(s))"
    lines = [f"preflight: {report['rows_checked']} rows checked {speed if report['rows_checked'] else ''}; "
             f"policy SFT_BAD_ROWS={report['policy']['bad_rows']}",
             f"{'split':<14}{'rows':>8}{'bad':>6}{'skipped':>9}  {'tokens p50/p95/max':<22}{'visual p50/p95/max':<22}"]
    for split in report["splits"].values():
        lines.append(f"{split['split']:<14}{split['rows']:>8}{split['rows_bad']:>6}{split['rows_skipped']:>9}  "
                     f"{_triple(split['tokens']):<22}{_triple(split['visual_tokens']):<22}")
    lines.append(f"errors by kind:   {_kinds(report['errors_by_kind'])}")
    lines.append(f"warnings by kind: {_kinds(report['warnings_by_kind'])}")
    for split in report["splits"].values():
        lines.append(f"labels {split['split']}: {_kinds(split['labels'])}")
    lines.append(f"report: {path}" + ("" if report["ok"] else f"  FAILED: {report['failure']}"))
    return "\n".join(lines)


def failure_message(report: dict, path: Path) -> str:
    errors = report["errors"]
    listed = "\n".join(f"  - {format_issue(e)}" for e in errors[:MAX_LISTED_ERRORS])
    more = f"\n  ... and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
    return f"preflight failed: {report['failure']}\n{listed}{more}\nfull report: {path}"

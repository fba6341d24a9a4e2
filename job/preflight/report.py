"""The preflight report: `preflight_report.json` (every error and warning) and the summary table on stdout."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from job.config.schema import JobConfig
from job.config.sections.data import DataConfig
from job.data.checks import MAX_DECODE_PIXELS
from job.data.labels import LabelColumn

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


def understood(data: DataConfig, columns: dict[str, list[str]], labels: LabelColumn | None,
               tallies: dict[str, Any]) -> dict:
    """What preflight read each part of a row from: the column -> role mapping (with the splits that hold each
    column), the fixed query (SFT_QUERY_TEXT), the target's format and its class names with their rows per split."""
    def column(name: str) -> dict:
        return {"column": name, "splits": [split for split, names in columns.items() if name in names]}

    query = {"text": data.query_text} if data.query_text is not None else column(data.query_key)
    target = labels.to_json() if labels is not None else {"format": "json", "label_field": data.label_field}
    declared = (labels.names or ()) if labels is not None else ()
    counts = {t.name: {**dict.fromkeys(declared, 0), **dict(t.labels)} for t in tallies.values()}
    return {"image": column(data.image_key), "query": query, "caption": column(data.caption_key),
            "target": {**column(data.target_key), **target}, "label_counts": counts}


def _role_line(role: str, found: dict) -> str:
    if "text" in found:
        return f"{role} <- SFT_QUERY_TEXT {found['text']!r}"
    where = ", ".join(found["splits"]) or "no split: none"
    return f"{role} <- '{found['column']}' ({where})"


def understood_lines(found: dict) -> list[str]:
    """The summary's account of `understood`: one line of columns, one of the target and its names."""
    target = found["target"]
    roles = "; ".join(_role_line(role, found[role]) for role in ("image", "query", "caption"))
    if target["format"] == "json":
        shape = f"a JSON verdict whose '{target['label_field']}' is the label"
    else:
        names = ", ".join(target["names"]) if target["names"] is not None else "each value is its name"
        shape = (f"class labels ({target['kind']}; names from {target['names_from']}: {names}), the verdict "
                 f"{{\"{target['label_field']}\": name}}")
    return [f"columns: {roles}", f"target <- '{target['column']}': {shape}"]


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
    found = report.get("understood")
    lines += understood_lines(found) if found else []
    for split in report["splits"].values():
        counts = found["label_counts"][split["split"]] if found else split["labels"]
        lines.append(f"labels {split['split']}: {_kinds(counts)}")
    lines.append(f"report: {path}" + ("" if report["ok"] else f"  FAILED: {report['failure']}"))
    return "\n".join(lines)


def failure_message(report: dict, path: Path) -> str:
    errors = report["errors"]
    listed = "\n".join(f"  - {format_issue(e)}" for e in errors[:MAX_LISTED_ERRORS])
    more = f"\n  ... and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
    return f"preflight failed: {report['failure']}\n{listed}{more}\nfull report: {path}"

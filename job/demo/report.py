"""Print a metrics file we write as a table: `python -m job.demo.report FILE`.

FILE is `metrics.json` (pre and post side by side) or any `eval/*_metrics.json` (pre, post or standalone: one
column). Without a file, or with one that is not a metrics file, it prints usage and exits 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from job.metric_table import CORE_METRICS, REPORTED_WHEN_MEASURED

KEYS = (*CORE_METRICS, "n")
OPTIONAL_KEYS = REPORTED_WHEN_MEASURED  # shown when a column has them
USAGE = "usage: python -m job.demo.report METRICS_FILE  (metrics.json or eval/{pre,post,standalone}_metrics.json)"


def _columns(metrics: dict, name: str) -> dict[str, dict]:
    """{column title: scalars}: run metrics have pre/post; an eval file is one column named after its phase."""
    if "pre" in metrics or "post" in metrics:
        return {"pre": metrics.get("pre") or {}, "post": metrics.get("post") or {}}
    return {name.removesuffix("_metrics") or "value": metrics}


def _cell(value) -> str:
    return f"{value:>12.3f}" if isinstance(value, (int, float)) else f"{'-':>12}"  # None: not measured in this mode


def format_metrics(metrics: dict, name: str = "value") -> str:
    columns = _columns(metrics, name)
    lines = [f"{'metric':<16}" + "".join(f"{title:>12}" for title in columns)]
    keys = [*KEYS, *(k for k in OPTIONAL_KEYS if any(k in cols for cols in columns.values()))]
    for key in keys:
        lines.append(f"{key:<16}" + "".join(_cell(cols.get(key)) for cols in columns.values()))
    last = columns.get("post") or next(iter(columns.values()))
    if last.get("per_class"):
        lines.append(f"{'per class':<16}{'precision':>12}{'recall':>12}{'f1':>12}{'support':>12}")
        for label, c in last["per_class"].items():
            lines.append(f"  {label:<14}" + "".join(_cell(c[k]) for k in ("precision", "recall", "f1"))
                         + f"{c['support']:>12}")
    if metrics.get("best"):
        best = metrics["best"]
        steps = ", ".join(str(e["step"]) for e in best["history"])
        lines.append(f"best step: {best['step']} of {best['final_step']} by {best['metric']}="
                     f"{_cell(best['value']).strip()} of the label probabilities (evals at steps {steps})")
    for picture in ((metrics.get("report") or {}).get("files") or {}).values():
        lines.append(f"picture: {picture} (in the adapter folder and in report/)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 2
    path = Path(args[0])
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"job.demo.report: cannot read {path}: {exc}\n{USAGE}", file=sys.stderr)
        return 2
    if not isinstance(metrics, dict) or not any(k in metrics for k in (*KEYS, "pre", "post")):
        print(f"job.demo.report: {path} is not a metrics file (no {', '.join(KEYS)}, pre or post)\n{USAGE}",
              file=sys.stderr)
        return 2
    print(format_metrics(metrics, path.stem))
    return 0


if __name__ == "__main__":
    sys.exit(main())

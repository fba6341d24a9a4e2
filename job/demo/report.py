"""Print a metrics file we write as a table: `python -m job.demo.report FILE`.

FILE is `metrics.json` (pre and post side by side) or any `eval/*_metrics.json` (pre, post or standalone: one
column). Without a file, or with one that is not a metrics file, it prints usage and exits 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KEYS = ("accuracy", "macro_f1", "json_parse_rate", "exact_match", "n")
USAGE = "usage: python -m job.demo.report METRICS_FILE  (metrics.json or eval/{pre,post,standalone}_metrics.json)"


def _columns(metrics: dict, name: str) -> dict[str, dict]:
    """{column title: scalars}: run metrics have pre/post; an eval file is one column named after its phase."""
    if "pre" in metrics or "post" in metrics:
        return {"pre": metrics.get("pre") or {}, "post": metrics.get("post") or {}}
    return {name.removesuffix("_metrics") or "value": metrics}


def format_metrics(metrics: dict, name: str = "value") -> str:
    columns = _columns(metrics, name)
    lines = [f"{'metric':<16}" + "".join(f"{title:>12}" for title in columns)]
    for key in KEYS:
        lines.append(f"{key:<16}" + "".join(f"{cols.get(key, float('nan')):>12.3f}" for cols in columns.values()))
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

"""Print the pre vs post metrics of a run: `python -m job.report outputs/metrics.json`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

KEYS = ("accuracy", "macro_f1", "json_parse_rate", "exact_match", "n")


def format_metrics(metrics: dict) -> str:
    pre, post = metrics.get("pre") or {}, metrics.get("post") or {}
    lines = [f"{'metric':<16}{'pre':>10}{'post':>10}"]
    for key in KEYS:
        lines.append(f"{key:<16}{pre.get(key, float('nan')):>10.3f}{post.get(key, float('nan')):>10.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_metrics(json.loads(Path(sys.argv[1]).read_text())))

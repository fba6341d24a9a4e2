"""A checkpoint counts only with its COMPLETED marker: written last and atomically, read by every resume.

Storage-level (no Trainer): the Trainer callback that writes it (job/train/callbacks.py), the remote store
(job/storage/checkpoints.py) and the resume logic (job/train/resume.py) all use these.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

COMPLETED = "COMPLETED"


def write_completed_marker(ckpt: Path, step: int) -> None:
    tmp = ckpt / f".{COMPLETED}.tmp"
    tmp.write_text(json.dumps({"step": step, "time": time.time()}) + "\n")
    tmp.replace(ckpt / COMPLETED)  # atomic: the marker is either absent or whole


def checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def latest_completed_checkpoint(checkpoints_dir: Path) -> tuple[Path | None, list[Path]]:
    """The newest checkpoint with a COMPLETED marker, and the incomplete ones that were skipped."""
    if not checkpoints_dir.is_dir():
        return None, []
    candidates = sorted(
        (p for p in checkpoints_dir.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) >= 0), key=checkpoint_step
    )
    complete = [p for p in candidates if (p / COMPLETED).is_file()]
    incomplete = [p for p in candidates if not (p / COMPLETED).is_file()]
    return (complete[-1] if complete else None), incomplete

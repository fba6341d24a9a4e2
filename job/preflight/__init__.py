"""Preflight, before any weights load: `early` (settings, paths, the output dir, Hub access, LoRA targets: seconds),
then `run` (every row of both splits, scanned by `scan`; the bad-row policy) and `report` (the JSON and the table).

`job.preflight` was one module before 0.1.0; its names still resolve here, lazily from `run` and `scan`, until 0.2.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    for module in ("job.preflight.run", "job.preflight.scan"):
        value = getattr(importlib.import_module(module), name, None)
        if value is not None:
            return value
    raise AttributeError(f"module 'job.preflight' has no attribute {name!r}")

"""Preflight, before any weights load: `early` (settings, paths, the output dir, Hub access, LoRA targets: seconds),
then `run` (every row of both splits, scanned by `scan`; the bad-row policy) and `report` (the JSON and the table)."""

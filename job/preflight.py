"""`qwen3-sft preflight`: every row of both splits through the real processor and collator, on the CPU.

It loads the processor only (no model weights), so it runs on a CPU runner before any GPU hour is spent.
"""

from __future__ import annotations

import logging
from pathlib import Path

from job.cards import ModelCards
from job.collators.qwen3_collator import IGNORE_INDEX
from job.config import build_cfg
from job.data.loaders import _load_eval_dataset, load_train_dataset
from job.errors import DataError, find_job_error
from job.train import artifacts
from job.train.model import load_processor
from job.train.qwen3_vl_8b_sft import _build_collators

log = logging.getLogger("job.preflight")


def _row_problem(collator, row: dict) -> str | None:
    try:
        batch = collator([row])
    except Exception as exc:  # noqa: BLE001 - every row problem is collected, then raised once
        inner = find_job_error(exc)
        return str(inner if inner is not None else exc)
    if not (batch["labels"] != IGNORE_INDEX).any():
        return f"{row.get('row_id')}: no supervised tokens"
    return None


def check_split(collator, ds, split: str) -> dict:
    problems, lengths = [], []
    for i in range(len(ds)):
        row = ds[i]
        problem = _row_problem(collator, row)
        if problem:
            problems.append(f"{split}: {problem}")
        else:
            lengths.append(int(collator([row])["attention_mask"].sum()))
    return {"rows": len(ds), "errors": problems, "max_tokens": max(lengths, default=0)}


def run_preflight(cfg: dict) -> dict:
    processor = load_processor(cfg)
    collator, _ = _build_collators(cfg, processor)
    report = {
        cfg["data"]["train_split"]: check_split(collator, load_train_dataset(cfg), cfg["data"]["train_split"]),
        cfg["data"]["eval_split"]: check_split(collator, _load_eval_dataset(cfg), cfg["data"]["eval_split"]),
    }
    artifacts.write_json(Path(cfg["train"]["output_dir"]) / "preflight_report.json", report)
    errors = [e for split in report.values() for e in split["errors"]]
    for split, info in report.items():
        print(f"preflight {split}: {info['rows']} rows, {len(info['errors'])} errors, max {info['max_tokens']} tokens")
    if errors:
        raise DataError(f"preflight found {len(errors)} bad rows:\n" + "\n".join(f"  - {e}" for e in errors[:50]))
    return report


def main(env: dict | None = None) -> dict:
    return run_preflight(build_cfg(ModelCards().qwen3_vl_8b_instruct, env))

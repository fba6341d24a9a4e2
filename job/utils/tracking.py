"""Weights & Biases: one run per SFT_RUN_ID, never an interactive login prompt."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

WandbMode = Literal["online", "offline", "disabled"]
# WANDB_MODE values we honour ("dryrun" is wandb's old name for offline).
_MODES: dict[str, WandbMode] = {"online": "online", "offline": "offline", "disabled": "disabled", "dryrun": "offline"}


def wandb_mode() -> WandbMode:
    """The effective mode. Without an API key an online run would block on a login prompt at 3 am: go offline."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in _MODES:
        return _MODES[mode]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    return "offline"


def init_wandb(run_id: str, config: dict, *, enabled: bool, output_dir: str):
    """Start (or resume) the W&B run; returns None when W&B is disabled (SFT_WANDB_ENABLED=false or WANDB_MODE).

    Plain values, not the JobConfig: job.utils sits below job.config. config is what the run page shows.
    """
    if not enabled or wandb_mode() == "disabled":
        return None
    import wandb  # only here: a run with W&B off never imports it (the GPU kit, benchmarks/device, has none)

    mode = wandb_mode()
    if mode == "offline" and not os.environ.get("WANDB_MODE"):
        log.info("W&B: no WANDB_API_KEY, logging offline (sync later with `wandb sync`)")
    # Offline, wandb's only warning in a run here is "URL not available in offline run", printed at every save
    # because transformers' WandbCallback reads run.url (wandb 0.31, transformers 5.24): an offline run has no URL by
    # definition. Online runs keep every wandb warning. (Terminal output is configured by setup(), not init().)
    wandb.setup(settings=wandb.Settings(show_warnings=mode != "offline"))
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "qwen3-sft"),
        id=run_id, name=run_id, resume="allow", mode=mode, config=config,
        dir=os.environ.get("WANDB_DIR") or output_dir,
        # quiet: no version banner and no 30-line run-history footer; the offline header (where the run's files are,
        # how to sync them) still prints.
        settings=wandb.Settings(quiet=True),
    )


def flat_scalars(prefix: str, metrics: dict) -> dict[str, float]:
    """The numbers of a metrics dict for W&B, per-class ones flattened: `{prefix}per_class/<label>/f1`.

    >>> flat_scalars("gen_eval/post_", {"accuracy": 0.5, "per_class": {"red": {"f1": 1.0}}, "eval_mode": "both"})
    {'gen_eval/post_accuracy': 0.5, 'gen_eval/post_per_class/red/f1': 1.0}
    """
    flat = {f"{prefix}{k}": v for k, v in metrics.items() if _is_number(v)}
    for label, scores in (metrics.get("per_class") or {}).items():
        flat.update({f"{prefix}per_class/{label}/{k}": v for k, v in scores.items() if _is_number(v)})
    return flat


def _is_number(value) -> bool:
    """A W&B scalar: a number; not a bool (a flag is no metric), None (roc_auc of a one-class eval) or a dict."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def log_metrics(run, prefix: str, metrics: dict) -> None:
    if run is None:
        return
    run.log(flat_scalars(prefix, metrics))


def log_confusion_matrix(run, key: str, confusion: dict) -> None:
    """The confusion matrix (job/eval/metrics.py per_class_report) as a W&B table: one row per gold label, a `gold`
    column, then one column per predicted label and `unparsed`, the counts as the metrics file holds them. Its
    picture is a report image (log_pictures). In the offline run: files/media/table/<key>_<step>_<hash>.table.json.
    """
    if run is None or not confusion:
        return
    import wandb  # as in init_wandb: only a run with W&B on imports it

    columns, rows = confusion_table(confusion)
    run.log({key: wandb.Table(columns=columns, data=rows)})


def confusion_table(confusion: dict) -> tuple[list[str], list[list]]:
    """(columns, rows) of the W&B table for a {labels, columns, matrix} confusion matrix.

    >>> confusion_table({"labels": ["blue", "red"], "columns": ["blue", "red", "unparsed"],
    ...                  "matrix": [[0, 7, 0], [1, 4, 0]]})
    (['gold', 'blue', 'red', 'unparsed'], [['blue', 0, 7, 0], ['red', 1, 4, 0]])
    """
    rows = [[gold, *counts] for gold, counts in zip(confusion["labels"], confusion["matrix"], strict=True)]
    return ["gold", *confusion["columns"]], rows


def log_pictures(run, pictures: dict[str, Path]) -> None:
    """The report's PNGs (job/eval/plots.py) as W&B images, `report/<name>`: the confusion matrices pre and post, the
    curves, the reliability diagram. From the file, so wandb copies it into the run and stages nothing."""
    if run is None or not pictures:
        return
    import wandb  # as in init_wandb: only a run with W&B on imports it

    run.log({f"report/{name}": wandb.Image(str(path), caption=path.name) for name, path in pictures.items()})


def finish(run) -> None:
    if run is not None:
        run.finish()

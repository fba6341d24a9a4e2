"""Weights & Biases: one run per SFT_RUN_ID, never an interactive login prompt."""

from __future__ import annotations

import logging
import os
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


def log_metrics(run, prefix: str, metrics: dict) -> None:
    if run is None:
        return
    run.log({f"{prefix}{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})


def finish(run) -> None:
    if run is not None:
        run.finish()

"""Helpers for tests that run the job as a real subprocess on the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_PIXELS = {"SFT_IMAGE_MIN_PIXELS": "4096", "SFT_IMAGE_MAX_PIXELS": "16384"}


def job_env(tmp_path: Path, tiny_assets, base: Mapping[str, str] | None = None, **overrides: str) -> dict[str, str]:
    """A clean environment for running the job as a subprocess on the tiny model (from `base`, else os.environ)."""
    model_dir, data_dir = tiny_assets
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("SFT_")}
    env.update({
        "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
        "SFT_MODEL_ID": str(model_dir), "SFT_DATASET_URI": str(data_dir), "SFT_OUTPUT_DIR": str(tmp_path / "out"),
        "SFT_RUN_ID": "test-run", "SFT_MAX_STEPS": "4", "SFT_SAVE_STEPS": "2", "SFT_LEARNING_RATE": "5e-3",
        "SFT_PER_DEVICE_BATCH_SIZE": "2", "SFT_GRAD_ACCUM": "1", "SFT_LOGGING_STEPS": "1", "SFT_LORA_DROPOUT": "0",
        "SFT_MAX_LENGTH": "512", "SFT_GRADIENT_CHECKPOINTING": "false", "SFT_EVAL_MAX_NEW_TOKENS": "8",
        "SFT_EVAL_BATCH_SIZE": "4", "SFT_EVAL_SUBSET": "4", "SFT_TRAIN_SUBSET": "32", "SFT_DATALOADER_NUM_WORKERS": "0",
        **TINY_PIXELS,
    })
    env.update(overrides)
    return env


def run_job(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "job", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )

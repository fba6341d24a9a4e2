"""Helpers for tests that run the job as a real subprocess on the tiny model, and images they build."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import zlib
from collections.abc import Mapping
from pathlib import Path

from PIL import Image

from benchmarks import REPO

# Log lines the job writes when it loads the processor and the weights (job/model.py): absent = failed early.
PROCESSOR_LOADED = "loading processor"
WEIGHTS_LOADED = "loading model weights"
TRACEBACK = "Traceback (most recent call last)"
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


def noise_image(size=(96, 64), mode="RGB", seed=0) -> Image.Image:
    rng = random.Random(seed)
    return Image.frombytes(mode, size, bytes(rng.getrandbits(8) for _ in range(size[0] * size[1] * len(mode))))


def bomb_png(path: Path, width: int, height: int) -> None:
    """A valid 1-bit PNG of width x height that is tiny on disk (zero rows compress ~1000:1), written without PIL."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    line, comp = b"\x00" * (1 + (width + 7) // 8), zlib.compressobj(9)
    idat = b"".join(comp.compress(line) for _ in range(height)) + comp.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def count_configs(monkeypatch) -> dict[str, int]:
    """How often this process parses the SFT_* environment ("parsed"; "refused" when it is invalid) and constructs a
    JobConfig ("built": from the environment or from the launcher's serialized form), until the test ends."""
    from job.config import schema

    counts = {"parsed": 0, "refused": 0, "built": 0}
    load, from_settings, from_json = (schema.load_settings, schema.JobConfig.from_settings,
                                      schema.JobConfig.model_validate_json)

    def parse(*args, **kwargs):
        counts["parsed"] += 1
        try:
            return load(*args, **kwargs)
        except Exception:
            counts["refused"] += 1
            raise

    def build(settings, card):
        counts["built"] += 1
        return from_settings(settings, card)

    def decode(data, **kwargs):
        counts["built"] += 1
        return from_json(data, **kwargs)

    monkeypatch.setattr(schema, "load_settings", parse)
    monkeypatch.setattr(schema.JobConfig, "from_settings", build)
    monkeypatch.setattr(schema.JobConfig, "model_validate_json", decode)
    return counts

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


# -- the public multimodal sarcasm datasets' shape (#35) -------------------------------------------------------------
SARCASM_NAMES = ["non-sarcastic", "sarcastic"]
SARCASM_ROWS = {"train": 6, "validation": 2, "test": 2}  # per configuration
SARCASM_QUERY = 'Is this post sarcastic? Answer in JSON: {"label": "sarcastic"} or {"label": "non-sarcastic"}.'


def png_bytes(seed: int, size=(40, 32)) -> bytes:
    import io

    buf = io.BytesIO()
    noise_image(size, seed=seed).save(buf, "PNG")
    return buf.getvalue()


def sarcasm_card_dataset(root: Path, rows: Mapping[str, int] = SARCASM_ROWS, languages=("en", "zh")) -> Path:
    """A dataset shaped as the public ones, written with `datasets` as push_to_hub writes it: a card (README.md)
    declaring one configuration per language with per-split `data_files` globs (`en/train-*`) and its `dataset_info`,
    parquet shards with the images embedded, columns id, image, text, text_label, image_label, multi_label, language
    (each label a ClassLabel of SARCASM_NAMES), no query column. Row i of a split is sarcastic when i is odd."""
    import datasets
    from datasets.info import DatasetInfo, DatasetInfosDict
    from huggingface_hub import DatasetCardData

    label = datasets.ClassLabel(names=SARCASM_NAMES)
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "text": datasets.Value("string"), "text_label": label, "image_label": label,
                                  "multi_label": label, "language": datasets.Value("string")})
    configs, infos = [], {}
    for n_language, language in enumerate(languages):
        for n_split, (split, count) in enumerate(rows.items()):
            records = [{"id": f"{language}-{split}-{i}", "image": {"bytes": png_bytes(1000 * n_language + 100 * n_split
                                                                                      + i), "path": None},
                        "text": f"{language} post {i} of {split}", "text_label": i % 2, "image_label": 0,
                        "multi_label": i % 2, "language": language} for i in range(count)]
            shard = root / language / f"{split}-00000-of-00001.parquet"
            shard.parent.mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_list(records, features=features).to_parquet(str(shard))
        configs.append({"config_name": language,
                        "data_files": [{"split": split, "path": f"{language}/{split}-*"} for split in rows]})
        infos[language] = DatasetInfo(features=features, config_name=language)
    card = DatasetCardData(configs=configs)
    DatasetInfosDict(infos).to_dataset_card_data(card)
    (root / "README.md").write_text(f"---\n{card.to_yaml()}\n---\n\n# Multimodal sarcasm (test copy)\n")
    return root

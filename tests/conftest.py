"""Shared fixtures: the tiny offline Qwen3-VL (real processor class, real vocabulary) and its demo dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config: pytest.Config) -> None:
    """The job's named third-party warning filters, applied to every test (pytest resets filters per test)."""
    from job.utils.redact import THIRD_PARTY_WARNINGS

    for message, category in THIRD_PARTY_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}")


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> tuple[Path, Path]:
    """(model_dir, data_dir), built once per session with job.tiny exactly as `make demo` builds them."""
    from job.tiny import build_demo_assets

    return build_demo_assets(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def processor(tiny_assets):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(tiny_assets[0]), size={"shortest_edge": 4096, "longest_edge": 16384})
    proc.tokenizer.padding_side = "right"
    return proc

"""Shared fixtures: the tiny offline Qwen3-VL (real processor class, real vocabulary) and its demo dataset.

The shared job runs of the slow tier (reference run, interrupted chain, S3 and DDP runs) are in runs.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ("runs",)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch/OpenMP thread, for these tests and (through job_env) the job runs beside them: on 2 busy cores OpenMP's
# spinning threads cost more than they bring. Measured under load: an 8-step job run 34 CPU-s with one thread, 55
# with two; test_generate + test_model_gradients 30 CPU-s and 48 s with one, 47 CPU-s and 72 s with two.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    """The job's named third-party warning filters, applied to every test (pytest resets filters per test)."""
    from job.utils.redact import THIRD_PARTY_WARNINGS

    for message, category in THIRD_PARTY_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}")


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> tuple[Path, Path]:
    """(model_dir, data_dir), built once per session with job.demo.tiny exactly as `make demo` builds them."""
    from job.demo.tiny import build_demo_assets

    return build_demo_assets(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def processor(tiny_assets):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(tiny_assets[0]), size={"shortest_edge": 4096, "longest_edge": 16384})
    proc.tokenizer.padding_side = "right"
    return proc


@pytest.fixture
def root_handlers_restored():
    """cli.main installs the job's root log handler on the sys.stderr it finds (capsys's, closed after the test):
    later in-process tests must not log into it."""
    import logging

    root = logging.getLogger()
    saved = list(root.handlers)
    yield
    root.handlers[:] = saved

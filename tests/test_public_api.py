"""The public API in job/__init__.py: every exported name resolves to its defining module's object, lazily."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from helpers import REPO

import job


@pytest.mark.parametrize("name", sorted(job._EXPORTS))
def test_each_export_is_the_object_of_its_module(name):
    assert getattr(job, name) is getattr(importlib.import_module(job._EXPORTS[name]), name)
    assert name in job.__all__ and name in dir(job)


def test_all_lists_exactly_the_exports():
    assert sorted(job.__all__) == sorted(["__version__", *job._EXPORTS])


def test_the_seed_names_are_exported():
    seed = {"Qwen3VisionSFTCollator", "evaluate_qwen3", "build_cfg", "ModelCards", "Queries", "LogCallback",
            "_select_subset", "_load_eval_dataset", "_count_trainable_params", "log_run_metadata"}
    assert seed <= set(job.__all__)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Trainer'"):
        job.Trainer  # noqa: B018


def test_import_job_loads_no_torch():
    code = ("import sys, job; job.build_cfg, job.ModelCards; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]

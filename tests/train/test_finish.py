"""A rerun of a finished run retries a push that failed and never repeats one that reached the repo (in-process).

HF_HUB_OFFLINE=1 makes any real push attempt fail loudly (UserError naming HF_HUB_OFFLINE), so "attempted" and
"not attempted" are told apart by the real push path, with no stand-in for the Hub.
"""

from __future__ import annotations

import json

import pytest

from job.cards import ModelCards
from job.config.schema import build_cfg
from job.errors import UserError
from job.train.finish import publish
from job.train.prepare import RunPaths

METRICS = {"pre": {"macro_f1": 0.1}, "post": {"macro_f1": 0.5}, "train": {"global_step": 2}}
COMMIT = "https://huggingface.co/org/repo/commit/0123abcd"


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = build_cfg(ModelCards().qwen3_vl_8b_instruct, {"SFT_HUB_REPO_ID": "org/repo"})
    return cfg, RunPaths(tmp_path).create()


def test_a_recorded_push_to_the_same_repo_is_not_repeated(setup):
    cfg, paths = setup
    metrics = {**METRICS, "gate": {"passed": True, "reason": "earlier", "pushed_to": COMMIT}}
    publish(cfg, paths, "run-x", None, metrics, 2)  # would raise on any push attempt
    saved = json.loads((paths.root / "metrics.json").read_text())
    assert saved["gate"]["pushed_to"] == COMMIT and saved["gate"]["passed"] is True


@pytest.mark.parametrize("earlier", [None, "https://huggingface.co/org/other-repo/commit/0123abcd"],
                         ids=["push-failed-before", "pushed-elsewhere"])
def test_a_push_that_did_not_reach_this_repo_is_attempted_again(setup, earlier):
    cfg, paths = setup
    metrics = {**METRICS, "gate": {"passed": True, "reason": "earlier", "pushed_to": earlier}}
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1"):
        publish(cfg, paths, "run-x", None, metrics, 2)

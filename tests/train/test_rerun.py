"""Re-runs are safe: a finished run trains nothing and redoes only what did not finish; drift is refused (exit 2).

One real 2-step run (tiny Qwen3-VL, CPU) is shared by every test here: the reruns run as job processes on its
output directory (`rerun_chain` in tests/runs.py); the drift cases go through the flow's own `_prepare` +
`_resume_plan` in-process (no model loads there), and one of them also as a job process, for the exit code and the
message a user sees.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from runs import checkpoint_files as _checkpoint_files

from job.cards import ModelCards
from job.cli import exit_code_for
from job.config import build_cfg
from job.errors import ExitCode
from job.train import resume
from job.train.flow import Timer, _prepare, _resume_plan

pytestmark = pytest.mark.slow


def _log(proc) -> str:
    return proc.stdout + proc.stderr


def test_first_run_finishes_and_the_gate_refuses(rerun_chain):
    stages = rerun_chain.stages
    assert stages["first"].returncode == ExitCode.GATE_REFUSED, _log(stages["first"])[-3000:]
    assert "step 2/2" in _log(stages["first"])


def test_same_command_again_trains_nothing_and_exits_with_the_same_code(rerun_chain):
    tmp, stages = rerun_chain.tmp, rerun_chain.stages
    again = _log(stages["again"])
    assert stages["again"].returncode == ExitCode.GATE_REFUSED, again[-3000:]
    assert "training already finished: checkpoint-2 is at step 2 of 2" in again
    assert "step 3/" not in again and " loaded: attn=" not in again  # no step, not even a model load
    assert "quality gate refused" in again
    assert stages["again_files"] == stages["first_files"]  # no checkpoint-3, nothing rewritten
    meta = json.loads((tmp / "out/training_meta.json").read_text())
    assert meta["global_step"] == 2


def test_lost_post_eval_is_redone_on_the_checkpoint_without_training(rerun_chain):
    tmp, stages = rerun_chain.tmp, rerun_chain.stages
    log = _log(stages["lost_outputs"])
    assert stages["lost_outputs"].returncode == ExitCode.OK, log[-3000:]
    assert "post-eval or the save did not finish" in log and "post-eval:" in log
    assert "step 3/" not in log and "pre-eval:" not in log  # pre-eval reused from the checkpoint
    assert (tmp / "out/adapter/adapter_model.safetensors").read_bytes() == stages["first_adapter"]
    metrics = json.loads((tmp / "out/metrics.json").read_text())
    first = stages["first_metrics"]
    assert metrics["post"] == first["post"] and metrics["pre"] == first["pre"]
    assert metrics["train"]["global_step"] == 2 and metrics["gate"]["passed"] is True
    assert _checkpoint_files(tmp / "out") == stages["first_files"]


def test_finished_and_published_run_says_so_and_exits_0(rerun_chain):
    stages = rerun_chain.stages
    log = _log(stages["published"])
    assert stages["published"].returncode == ExitCode.OK, log[-3000:]
    assert "nothing to do: run rerun finished at step 2" in log and "post-eval:" not in log


# -- drift --------------------------------------------------------------------------------------------------------
def _plan(env: dict[str, str]):
    """The flow up to the resume decision, in-process: config, data, preflight, checkpoint and drift check."""
    cfg = build_cfg(ModelCards().qwen3_vl_8b_instruct, env)
    return _resume_plan(_prepare(cfg, Timer()))


@pytest.mark.parametrize(("override", "expected"), [
    ({"SFT_LEARNING_RATE": "1e-3"}, "SFT_LEARNING_RATE: 0.005 -> 0.001"),
    ({"SFT_RUN_ID": "another-run"}, "SFT_RUN_ID: rerun -> another-run"),
    ({"SFT_LORA_R": "4"}, "SFT_LORA_R: 16 -> 4"),
    ({"SFT_GRAD_ACCUM": "2", "SFT_WARMUP_RATIO": "0.1"}, "SFT_GRAD_ACCUM: 1 -> 2"),
], ids=["learning-rate", "run-id", "lora-r", "two-settings"])
def test_changed_settings_are_refused_with_old_and_new(rerun_chain, tiny_assets, override, expected):
    env = rerun_chain.env
    with pytest.raises(resume.ResumeDrift) as caught:
        _plan({**env, **override})
    assert expected in caught.value.changes
    assert len(caught.value.changes) == len(override)  # nothing else is reported as changed
    assert exit_code_for(caught.value) == ExitCode.USER
    assert "SFT_RESUME=never" in str(caught.value) and "SFT_OUTPUT_DIR" in str(caught.value)


def test_other_data_is_refused_and_the_images_count(rerun_chain, tiny_assets, tmp_path):
    env = rerun_chain.env
    data = tmp_path / "data"
    shutil.copytree(tiny_assets[1], data)
    with pytest.raises(resume.ResumeDrift) as caught:  # the same rows at another path: still the same data
        _plan({**env, "SFT_DATASET_URI": str(data), "SFT_LEARNING_RATE": "1e-3"})
    assert caught.value.changes == ["SFT_LEARNING_RATE: 0.005 -> 0.001"]

    from PIL import Image

    for image in sorted((data / "images").glob("train-*.png")):  # same names, same row text, mirrored pixels
        Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image)
    with pytest.raises(resume.ResumeDrift) as caught:
        _plan({**env, "SFT_DATASET_URI": str(data)})
    (change,) = caught.value.changes
    assert change.startswith(f"data (train split rows and images) (SFT_DATASET_URI {tiny_assets[1]} -> {data})")


def test_settings_that_cannot_change_the_weights_are_not_drift(rerun_chain):
    env = rerun_chain.env
    plan = _plan({**env, "SFT_LOGGING_STEPS": "5", "SFT_EVAL_BATCH_SIZE": "1", "SFT_EVAL_MAX_NEW_TOKENS": "4",
                  "SFT_PREEMPT_GRACE_S": "9", "SFT_DATALOADER_NUM_WORKERS": "2", "SFT_SAVE_TOTAL_LIMIT": "5"})
    assert plan.progress.finished and Path(plan.checkpoint).name == "checkpoint-2"


def test_lora_rank_change_exits_2_before_any_model_loads(rerun_chain, run_forked):
    env = rerun_chain.env
    proc = run_forked(["-m", "job", "run"], {**env, "SFT_LORA_R": "4"})
    log = _log(proc)
    assert proc.returncode == ExitCode.USER, log[-3000:]
    assert "SFT_LORA_R: 16 -> 4" in proc.stderr and "Traceback" not in log and " loaded: attn=" not in log


def test_resume_never_moves_old_checkpoints_aside(rerun_chain, tmp_path):
    tmp, env, stages = rerun_chain.tmp, rerun_chain.env, rerun_chain.stages
    shutil.copytree(tmp / "out", tmp_path / "out")
    plan = _plan({**env, "SFT_OUTPUT_DIR": str(tmp_path / "out"), "SFT_RESUME": "never", "SFT_LORA_R": "4"})
    assert plan.checkpoint is None
    (aside,) = (tmp_path / "out").glob("checkpoints.replaced-*")
    moved = {str(p.relative_to(aside)): p.read_bytes() for p in sorted(aside.rglob("*")) if p.is_file()}
    assert moved == {k.removeprefix("checkpoints/"): v for k, v in stages["first_files"].items()}
    assert not any((tmp_path / "out/checkpoints").iterdir())


def test_resume_require_without_a_checkpoint_is_a_user_error(rerun_chain, tmp_path):
    env = rerun_chain.env
    with pytest.raises(resume.NothingToResume, match="SFT_RESUME=require"):
        _plan({**env, "SFT_OUTPUT_DIR": str(tmp_path / "empty"), "SFT_RESUME": "require"})
    plan = _plan({**env, "SFT_RESUME": "require"})  # with one, it resumes as auto does
    assert Path(plan.checkpoint).name == "checkpoint-2"

"""Re-runs are safe: a finished run trains nothing and redoes only what did not finish; drift is refused (exit 2).

One real 2-step run (tiny Qwen3-VL, CPU) is shared by every test here: the reruns run as job processes on its
output directory (`rerun_chain` in tests/runs.py); the drift cases go through the flow's own `prepare_run` +
`resume_plan` in-process (no model loads there), and one of them also as a job process, for the exit code and the
message a user sees.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from runs_reference import checkpoint_files as _checkpoint_files

from job import errors
from job.cards import ModelCards
from job.config.schema import build_cfg
from job.errors import ExitCode, exit_code_for
from job.storage import s3 as s3io
from job.storage.checkpoints import RemoteCheckpoints
from job.train.finish import stored_pre_metrics
from job.train.prepare import Timer, prepare_run
from job.train.rerun import _finished_metrics, resume_plan

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


def test_another_run_in_a_finished_runs_directory_ends_with_its_own_adapter_and_metadata(rerun_chain):
    """The issue's A/B case: run A finished in the directory; run B (another run id and learning rate,
    SFT_RESUME=never) is SIGKILLed after its last checkpoint; B's retry (the same launch) continues B, and ends with
    B's adapter (its checkpoint's weights) and B's training_meta.json; A's outputs are kept aside, untouched."""
    from safetensors.torch import load_file

    stages, out = rerun_chain.stages, rerun_chain.tmp / "ab/out"
    assert stages["b_killed"] != 0
    retry = stages["b_retry"]
    log = _log(retry)
    assert retry.returncode == ExitCode.OK, log[-3000:]
    assert "SFT_RESUME=never: SFT_LAUNCH_ID=launch-b started this run in an earlier pod; continuing it" in log
    assert "training already finished: checkpoint-2 is at step 2 of 2" in log and "step 3/" not in log
    if not stages["b_saved_before_the_kill"]:  # killed before its save (the usual case): the retry redoes it
        assert "post-eval or the save did not finish" in log
    meta = json.loads((out / "training_meta.json").read_text())
    assert meta["run_id"] == "run-b" and meta["config"]["train"]["learning_rate"] == 1e-3
    assert json.loads((out / "run_stamp.json").read_text())["run_id"] == "run-b"
    adapter = load_file(str(out / "adapter/adapter_model.safetensors"))
    trained = load_file(str(out / "checkpoints/checkpoint-2/adapter_model.safetensors"))
    assert adapter.keys() == trained.keys() and all(adapter[k].equal(trained[k]) for k in adapter)
    (aside,) = out.glob("replaced-*")
    assert (aside / "adapter/adapter_model.safetensors").read_bytes() == stages["first_adapter"]
    assert (out / "adapter/adapter_model.safetensors").read_bytes() != stages["first_adapter"]


# -- drift --------------------------------------------------------------------------------------------------------
def _plan(env: dict[str, str]):
    """The flow up to the resume decision, in-process: config, data, preflight, checkpoint and drift check."""
    cfg = build_cfg(ModelCards().qwen3_vl_8b_instruct, env)
    return resume_plan(prepare_run(cfg, Timer()))


@pytest.mark.parametrize(("override", "expected"), [
    ({"SFT_LEARNING_RATE": "1e-3"}, "SFT_LEARNING_RATE: 0.005 -> 0.001"),
    ({"SFT_RUN_ID": "another-run"}, "SFT_RUN_ID: rerun -> another-run"),
    ({"SFT_LORA_R": "4"}, "SFT_LORA_R: 16 -> 4"),
    ({"SFT_GRAD_ACCUM": "2", "SFT_WARMUP_RATIO": "0.1"}, "SFT_GRAD_ACCUM: 1 -> 2"),
], ids=["learning-rate", "run-id", "lora-r", "two-settings"])
def test_changed_settings_are_refused_with_old_and_new(rerun_chain, tiny_assets, override, expected):
    env = rerun_chain.env
    with pytest.raises(errors.ResumeDrift) as caught:
        _plan({**env, **override})
    assert expected in caught.value.changes
    assert len(caught.value.changes) == len(override)  # nothing else is reported as changed
    assert exit_code_for(caught.value) == ExitCode.USER
    assert "SFT_RESUME=never" in str(caught.value) and "SFT_OUTPUT_DIR" in str(caught.value)


def test_other_data_is_refused_and_the_images_count(rerun_chain, tiny_assets, tmp_path):
    env = rerun_chain.env
    data = tmp_path / "data"
    shutil.copytree(tiny_assets[1], data)
    with pytest.raises(errors.ResumeDrift) as caught:  # the same rows at another path: still the same data
        _plan({**env, "SFT_DATASET_URI": str(data), "SFT_LEARNING_RATE": "1e-3"})
    assert caught.value.changes == ["SFT_LEARNING_RATE: 0.005 -> 0.001"]

    from PIL import Image

    for image in sorted((data / "images").glob("train-*.png")):  # same names, same row text, mirrored pixels
        Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image)
    with pytest.raises(errors.ResumeDrift) as caught:
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


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# What SFT_RESUME=never moves aside (docs/operations.md, "Preemption and resume"): every output of the previous run;
# the run's own preflight report (written before the decision) stays. The rerun chain's directory holds these.
PREVIOUS_RUN = {"adapter", "checkpoints", "eval", "metrics.json", "training_meta.json", "resume_fingerprint.json",
                "run_stamp.json", "report"}


def test_resume_never_moves_every_output_of_the_old_run_aside(rerun_chain, tmp_path):
    tmp, env = rerun_chain.tmp, rerun_chain.env
    shutil.copytree(tmp / "out", tmp_path / "out")
    before = _tree(tmp_path / "out")
    assert {name.split("/")[0] for name in before} == PREVIOUS_RUN | {"preflight_report.json"}
    plan = _plan({**env, "SFT_OUTPUT_DIR": str(tmp_path / "out"), "SFT_RESUME": "never", "SFT_LORA_R": "4"})
    assert plan.checkpoint is None
    (aside,) = (tmp_path / "out").glob("replaced-*")
    assert _tree(aside) == {k: v for k, v in before.items() if k.split("/")[0] in PREVIOUS_RUN}
    left = {p.name for p in (tmp_path / "out").iterdir()}
    assert left == {aside.name, "preflight_report.json", "resume_fingerprint.json", "checkpoints", "eval"}
    assert not any((tmp_path / "out/checkpoints").iterdir()) and not any((tmp_path / "out/eval").iterdir())


def test_a_never_run_retried_within_its_launch_continues_and_a_new_launch_starts_over(rerun_chain, s3_endpoint,
                                                                                     tmp_path):
    """SFT_LAUNCH_ID (a Kubernetes Job's uid, shared by its retried pods): the first pod of a launch moves the old run
    aside (locally and in the store) and records the launch; its retries continue what it started, on the same disk
    or on a fresh one (the record beside the checkpoints in the store); another launch starts over again."""
    tmp, env = rerun_chain.tmp, rerun_chain.env
    s3 = s3io.client()
    s3.create_bucket(Bucket="never-launch")
    out, fresh = tmp_path / "out", tmp_path / "fresh-pod"
    shutil.copytree(tmp / "out", out)
    never = {**env, "SFT_RESUME": "never", "SFT_CHECKPOINT_URI": "s3://never-launch/runs"}
    remote = RemoteCheckpoints("s3://never-launch/runs", "rerun", keep=2)
    remote.upload(out / "checkpoints/checkpoint-2", 2)  # the old run's checkpoint in the store

    def store() -> set[str]:
        return {o["Key"] for o in s3io.list_objects(s3, s3io.S3Uri("never-launch", "runs"))}

    old_keys = store()
    first = _plan({**never, "SFT_OUTPUT_DIR": str(out), "SFT_LAUNCH_ID": "launch-1"})
    assert first.checkpoint is None
    (aside,) = out.glob("replaced-*")
    (stored_aside,) = {k.split("/")[1] for k in store() if ".replaced-" in k}
    assert store() == {"runs/rerun/resume_launch.json"} | {k.replace("runs/rerun/", f"runs/{stored_aside}/")
                                                           for k in old_keys}
    assert json.loads((out / "resume_launch.json").read_text())["launch_id"] == "launch-1"
    # The first pod trains and checkpoints (the same settings: the old run's checkpoint stands in for it), is killed.
    shutil.move(aside / "checkpoints/checkpoint-2", out / "checkpoints/checkpoint-2")
    remote.upload(out / "checkpoints/checkpoint-2", 2)
    first_pod_keys = old_keys
    retried = _plan({**never, "SFT_OUTPUT_DIR": str(out), "SFT_LAUNCH_ID": "launch-1"})
    assert Path(retried.checkpoint or "") == out / "checkpoints/checkpoint-2" and retried.progress.finished
    assert list(out.glob("replaced-*")) == [aside]
    on_a_fresh_pod = _plan({**never, "SFT_OUTPUT_DIR": str(fresh), "SFT_LAUNCH_ID": "launch-1"})
    assert Path(on_a_fresh_pod.checkpoint or "") == fresh / "checkpoints/checkpoint-2"
    assert store() == {"runs/rerun/resume_launch.json", *first_pod_keys} | {
        k.replace("runs/rerun/", f"runs/{stored_aside}/") for k in old_keys}  # nothing moved aside by the retries
    new_launch = _plan({**never, "SFT_OUTPUT_DIR": str(out), "SFT_LAUNCH_ID": "launch-2"})
    assert new_launch.checkpoint is None and len(list(out.glob("replaced-*"))) == 2
    assert store() == {"runs/rerun/resume_launch.json"} | {k for k in store() if ".replaced-" in k}
    assert len({k.split("/")[1] for k in store() if ".replaced-" in k}) == 2


def test_outputs_of_another_run_are_not_trusted(rerun_chain, tmp_path, caplog):
    """The issue's A/B case: run B (another run id and learning rate) at its last step in a directory holding run A's
    finished outputs: A's adapter, metrics and pre-eval are not B's (post-eval and the save are redone, the pre-eval
    is not reused); A itself trusts them, until its adapter is not the one its stamp names."""
    tmp, env, stages = rerun_chain.tmp, rerun_chain.env, rerun_chain.stages
    out = tmp_path / "out"
    shutil.copytree(tmp / "out", out)
    checkpoint = str(out / "checkpoints/checkpoint-2")
    cfg_b = build_cfg(ModelCards().qwen3_vl_8b_instruct, {**env, "SFT_OUTPUT_DIR": str(out), "SFT_RUN_ID": "run-b",
                                                          "SFT_LEARNING_RATE": "1e-3"})
    b = prepare_run(cfg_b, Timer())
    with caplog.at_level("WARNING", logger="job.train"):
        assert _finished_metrics(b, 2) is None
        assert stored_pre_metrics(b, checkpoint) is None
    warned = caplog.text
    assert "are not this run's (run_id: rerun -> run-b; fingerprint: " in warned
    assert "pre_metrics.json: it is not this run's pre-eval (run_id: rerun -> run-b" in warned
    a = prepare_run(build_cfg(ModelCards().qwen3_vl_8b_instruct, {**env, "SFT_OUTPUT_DIR": str(out)}), Timer())
    assert _finished_metrics(a, 2) == json.loads((tmp / "out/metrics.json").read_text())
    assert stored_pre_metrics(a, checkpoint) == stages["first_metrics"]["pre"]
    (out / "adapter/adapter_model.safetensors").write_bytes(stages["first_adapter"][:-1] + b"x")
    assert _finished_metrics(a, 2) is None


def test_resume_require_without_a_checkpoint_is_a_user_error(rerun_chain, tmp_path):
    env = rerun_chain.env
    with pytest.raises(errors.NothingToResume, match="SFT_RESUME=require"):
        _plan({**env, "SFT_OUTPUT_DIR": str(tmp_path / "empty"), "SFT_RESUME": "require"})
    plan = _plan({**env, "SFT_RESUME": "require"})  # with one, it resumes as auto does
    assert Path(plan.checkpoint).name == "checkpoint-2"

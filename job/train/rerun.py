"""Reruns: SFT_RESUME, drift, and a run whose training finished in an earlier process."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from job import outputs
from job.errors import CheckpointNotOnThisNode, NothingToResume
from job.inputs import Prepared, RunPaths, Timer
from job.model import _count_trainable_params, keep_trainable_params_fp32, trainable_model
from job.storage.checkpoints import RemoteCheckpoints
from job.storage.completed import COMPLETED, checkpoint_step, latest_completed_checkpoint
from job.train import best, distributed, resume
from job.train.finish import Trained, earlier_push, finish, owner, publish, stored_pre_metrics
from job.train.prepare import start_tracking
from job.utils import tracking

log = logging.getLogger("job.train")


class TrainResult(NamedTuple):
    """What finish reads of trainer.train()'s TrainOutput, rebuilt for a run whose training finished earlier."""

    global_step: int
    training_loss: float | None  # None when the checkpoint's log history holds no loss entry


@dataclass(frozen=True)
class ResumePlan:
    checkpoint: str | None  # the COMPLETED checkpoint to continue, None for a fresh start
    progress: resume.Progress | None


def _resume_checkpoint(paths: RunPaths) -> str | None:
    latest, incomplete = latest_completed_checkpoint(paths.checkpoints)
    for path in incomplete:
        log.warning("ignoring %s: no COMPLETED marker (interrupted save)", path.name)
    if latest is not None:
        log.info("resuming from %s", latest)
    return str(latest) if latest is not None else None


def _resume_point(paths: RunPaths, remote: RemoteCheckpoints | None) -> str | None:
    """The newest COMPLETED checkpoint, local or remote (a fresh pod has only the remote one)."""
    if remote is not None:
        remote.restore_latest(paths.checkpoints)
    return _resume_checkpoint(paths)


def resume_plan(p: Prepared) -> ResumePlan:
    """SFT_RESUME and the newest COMPLETED checkpoint (local, else restored from storage), checked for drift.

    Runs before any model loads, so a refused resume costs no GPU time. The run's fingerprint is written to
    SFT_OUTPUT_DIR and copied into every checkpoint it saves (and uploads). On global rank 0 only: `agreed_resume_plan`.
    """
    mode = p.cfg.train.resume
    current = resume.Fingerprint.of(p.cfg, p.run_id, p.preflight.get("data_fingerprint") or {})
    checkpoint = None
    if mode == "never" and _continues_launch(p):
        log.info("SFT_RESUME=never: SFT_LAUNCH_ID=%s started this run in an earlier pod; continuing it",
                 p.cfg.train.launch_id)
        mode = "auto"
    if mode == "never":
        _start_over(p)
    else:
        checkpoint = _resume_point(p.paths, p.remote)
    if checkpoint is None and mode == "require":
        where = [str(p.paths.checkpoints)] + ([str(p.remote.run_uri)] if p.remote is not None else [])
        raise NothingToResume(where)
    if checkpoint is not None:
        resume.check_resumable(Path(checkpoint), current)
    outputs.write_json(p.paths.root / resume.FINGERPRINT_FILE, current.to_json())
    return ResumePlan(checkpoint, resume.Progress.read(Path(checkpoint)) if checkpoint else None)


def _continues_launch(p: Prepared) -> bool:
    """SFT_RESUME=never: whether this pod is a retry of the launch (SFT_LAUNCH_ID) whose first pod started the run:
    the launch id recorded in SFT_OUTPUT_DIR, or beside the checkpoints in the store (a fresh pod's empty disk)."""
    launch_id = p.cfg.train.launch_id
    if launch_id is None:
        return False
    local = p.paths.root / resume.LAUNCH_FILE
    recorded = [resume.recorded_launch(local.read_text() if local.is_file() else None)]
    if p.remote is not None:
        recorded.append(resume.recorded_launch(p.remote.read_run_file(resume.LAUNCH_FILE)))
    return resume.continues_launch(launch_id, recorded)


def _start_over(p: Prepared) -> None:
    """SFT_RESUME=never, a new start: every output of the previous run moved aside (locally and in the store), then
    the launch recorded, so that a retried pod of this launch continues this run instead of starting it again."""
    resume.move_aside(p.paths.root)
    p.paths.create()
    if p.remote is not None:
        p.remote.move_aside()
    if p.cfg.train.launch_id is not None:
        record = {"launch_id": p.cfg.train.launch_id, "run_id": p.run_id, "time": time.time()}
        outputs.write_json(p.paths.root / resume.LAUNCH_FILE, record)
        if p.remote is not None:
            p.remote.write_run_file(resume.LAUNCH_FILE, json.dumps(record))


def agreed_resume_plan(p: Prepared) -> ResumePlan:
    """`resume_plan`, decided once by global rank 0 (from the store and its own disk: the resume point, drift,
    whether training finished) and broadcast. Every node then has that checkpoint on its own disk before any
    collective needs it: a node whose disk lacks it (a new pod) restores it from the store; the path each rank
    loads is its own node's (the output directories of the nodes may differ)."""
    plan = distributed.main_process_result(resume_plan, p)
    if plan.checkpoint is None or not distributed.is_distributed():
        return plan
    local = p.paths.checkpoints / Path(plan.checkpoint).name
    with distributed.local_main_first():  # one download per node; the node's other ranks then find it
        if not (local / COMPLETED).is_file():
            if p.remote is None:
                raise CheckpointNotOnThisNode(local, distributed.rank())
            p.remote.restore(p.paths.checkpoints, checkpoint_step(local))
    return ResumePlan(str(local), plan.progress)


def _training_loss(log_history: list[dict]) -> float | None:
    """Mean loss over every step of the run, from the logged per-interval means (not only this process's steps)."""
    total, steps, last = 0.0, 0, 0
    for entry in log_history:
        if "loss" in entry:
            total += entry["loss"] * (entry["step"] - last)
            steps += entry["step"] - last
            last = entry["step"]
    return total / steps if steps else None


def _finished_metrics(p: Prepared, step: int) -> dict | None:
    """The saved metrics of this run's post-eval and save at this step; None if they did not finish, or the outputs
    in SFT_OUTPUT_DIR are not this run's: RUN_STAMP (written last by the save) must name this run id, fingerprint,
    step and the adapter that is there now."""
    path = p.paths.root / "metrics.json"
    if not all(f.is_file() for f in (path, p.paths.root / "training_meta.json",
                                        *(p.paths.adapter / n for n in outputs.ADAPTER_FILES))):
        return None
    mine = owner(p)
    expected = outputs.Stamp(mine.run_id, mine.fingerprint, outputs.adapter_sha256(p.paths.adapter), step)
    conflicts = expected.conflicts(outputs.Stamp.read(p.paths.root / outputs.RUN_STAMP))
    if conflicts:
        log.warning("the outputs in %s are not this run's (%s): post-eval and the save are redone", p.paths.root,
                    "; ".join(conflicts))
        return None
    metrics = json.loads(path.read_text())
    if (metrics.get("train") or {}).get("global_step") != step or (p.cfg.eval.post and not metrics.get("post")):
        return None
    return metrics


def _finished_outputs(p: Prepared, step: int) -> tuple[dict, dict, bool] | None:
    """On rank 0: (metrics, training_meta, published) of a run that got through post-eval and the save; None if not."""
    metrics = _finished_metrics(p, step)
    if metrics is None:
        return None
    meta = json.loads((p.paths.root / "training_meta.json").read_text())
    return metrics, meta, _already_published(p, metrics, step)


def _already_published(p: Prepared, metrics: dict, step: int) -> bool:
    gate = metrics.get("gate") or {}
    if not gate.get("passed"):
        return False  # never gated, or refused: the gate runs again (and refuses again with the same settings)
    if p.cfg.hub.repo_id and not earlier_push(metrics, p.cfg.hub.repo_id):
        return False
    return p.remote is None or p.remote.final_step() == step


def complete_finished_run(p: Prepared, checkpoint: str, progress: resume.Progress, timer: Timer) -> dict[str, Any]:
    """Training reached its last step in an earlier process: train nothing, redo only what did not finish.

    Post-eval and the save when their outputs are missing (the model loads with the checkpoint's adapter); then the
    gate, the final upload and the push (one that failed before is retried). The exit code is the one the first
    run would have given: 4 when the gate refuses again.
    """
    step = progress.step
    log.info("training already finished: %s is at step %d of %d; no step is trained again", Path(checkpoint).name,
             step, progress.max_steps)
    # Rank 0's files and the store decide for every rank: the other nodes' disks hold none of the outputs.
    finished = distributed.main_process_result(_finished_outputs, p, step)
    if finished is None:
        log.info("post-eval or the save did not finish: running them on the checkpoint's adapter")
        return _evaluate_finished_checkpoint(p, checkpoint, step, timer)
    metrics, meta, published = finished
    if published:
        log.info("nothing to do: run %s finished at step %d; its artifacts are in %s and were published (%s)",
                 p.run_id, step, p.paths.root, metrics["gate"].get("pushed_to") or metrics["gate"]["reason"])
        return meta
    log.info("the publish step did not finish: gate, final upload and push again")
    distributed.main_process_result(publish, p.cfg, p.paths, p.run_id, p.remote, metrics, step)
    return meta


def _evaluate_finished_checkpoint(p: Prepared, checkpoint: str, step: int, timer: Timer) -> dict[str, Any]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    started = time.monotonic()
    model = trainable_model(p.cfg.model, p.cfg.lora, p.sources.model_path)
    keep_trainable_params_fp32(model)  # as the Trainer left it: fp32 LoRA weights
    set_peft_model_state_dict(model, load_file(str(Path(checkpoint) / "adapter_model.safetensors")))
    kept = None
    # The adapter kept is the best step's, stored in the checkpoint: rank 0 evaluates, saves and pushes it.
    if p.cfg.eval.steps is not None and distributed.is_main_process():
        best.restore(p.paths.root, checkpoint)
        best_state = best.load_best_adapter(model, p.paths.root)
        kept = None if best_state is None else {**best_state.to_json(), "final_step": step}
    params = _count_trainable_params(model)
    run = start_tracking(p)
    timer.track("model", started)
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        result = TrainResult(step, _training_loss(state["log_history"]))
        pre = distributed.main_process_result(stored_pre_metrics, p, checkpoint)  # rank 0 writes eval/
        trained = Trained(result, params, pre, checkpoint, kept,
                          state["log_history"])
        return finish(p, model, run, timer, trained)
    finally:
        tracking.finish(run)

"""QLoRA SFT of Qwen3-VL-8B-Instruct: setup -> pre-eval -> train -> post-eval -> save -> gate -> push.

The steps and their names follow `gemma3sft`, the Gemma 3 training script this job was ported from (not in this
repository), so its users find their way.

`main()` is a readable sequence of small steps; each step is a function below that can be tested on its own.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from job import outputs
from job.cards import ModelCards
from job.collators.qwen3_collator import IGNORE_INDEX, Qwen3VisionSFTCollator, build_collators
from job.config import JobConfig, build_cfg
from job.data.loaders import dataset_fingerprint
from job.errors import DataError, GateRefused, JobError
from job.eval.generate import evaluate_qwen3
from job.model import (
    _count_trainable_params,
    apply_liger,
    apply_lora,
    keep_trainable_params_fp32,
    load_model,
)
from job.preflight import early
from job.preflight.run import apply_plan, run_preflight
from job.storage import s3 as s3io
from job.storage.checkpoints import RemoteCheckpoints
from job.storage.completed import latest_completed_checkpoint
from job.storage.hub import build_model_card, check_push_access, gate_decision, push_adapter
from job.storage.sources import Sources, localize
from job.train import distributed, resume
from job.train.preemption import PreemptionGuard
from job.train.trainer import build_trainer
from job.utils import tracking
from job.utils.redact import redact

log = logging.getLogger("job.train")
_build_collators = build_collators  # the old name, for code that imported it from here (one release)


@dataclass
class RunPaths:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def create(self) -> RunPaths:
        for path in (self.root, self.checkpoints, self.eval):
            path.mkdir(parents=True, exist_ok=True)
        return self


@dataclass
class Timer:
    durations: dict[str, float] = field(default_factory=dict)

    def track(self, name: str, started: float) -> None:
        self.durations[name] = round(time.monotonic() - started, 3)


# -- setup -------------------------------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def _resolve_run_id(cfg: JobConfig) -> str:
    """SFT_RUN_ID; unset, the run id of the checkpoint a rerun continues; else a new timestamped id."""
    if cfg.train.run_id:
        return cfg.train.run_id
    if cfg.train.resume != "never":
        stored = resume.stored_run_id(RunPaths(Path(cfg.train.output_dir)).checkpoints)
        if stored is not None:
            log.info("SFT_RUN_ID unset: continuing run %s (from its newest checkpoint)", stored)
            return stored
    return f"qwen3-sft-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def _uses_hub(cfg: JobConfig) -> bool:
    return not Path(cfg.model.id).exists() or not Path(cfg.data.uri or ".").exists()


def _hub_access(cfg: JobConfig) -> None:
    """The Hub is used only for a model or dataset that is not local. Tokens come from HF_TOKEN (never logged)."""
    if not _uses_hub(cfg):
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        log.info("Hub: HF_HUB_OFFLINE=1, using the local cache only")
    elif os.environ.get("HF_TOKEN"):
        log.info("Hub: authenticating with HF_TOKEN")
    else:
        log.info("Hub: no HF_TOKEN set, anonymous access (public repos only)")


def _check_supervised_tokens(collator: Qwen3VisionSFTCollator, train_ds, batch_size: int) -> list[int]:
    """One real batch through the collator: every row must have supervised tokens (else the loss is silently 0)."""
    rows = [train_ds[i] for i in range(min(batch_size, len(train_ds)))]
    batch = collator(rows)
    counts = (batch["labels"] != IGNORE_INDEX).sum(dim=1).tolist()
    print(f"supervised tokens per row (first batch): {counts}", flush=True)
    if min(counts) == 0:
        raise DataError(
            f"rows {[r.get('row_id') for r, c in zip(rows, counts, strict=True) if c == 0]} have no supervised tokens"
        )
    return counts


def _init_wandb(p: Prepared):
    """The W&B run (rank 0 only; None elsewhere or when disabled), its config as training_meta.json stores it."""
    if not distributed.is_main_process():
        return None
    return tracking.init_wandb(p.run_id, redact(p.sources.config_record(p.cfg)), enabled=p.cfg.wandb.enabled,
                               output_dir=p.cfg.train.output_dir)


# -- train -------------------------------------------------------------------------------------------------------
def _resume_checkpoint(paths: RunPaths) -> str | None:
    latest, incomplete = latest_completed_checkpoint(paths.checkpoints)
    for path in incomplete:
        log.warning("ignoring %s: no COMPLETED marker (interrupted save)", path.name)
    if latest is not None:
        log.info("resuming from %s", latest)
    return str(latest) if latest is not None else None


# -- eval --------------------------------------------------------------------------------------------------------
def _evaluate(phase: str, cfg: JobConfig, model, processor, eval_ds, eval_collator, paths: RunPaths,
              run) -> dict | None:
    """Generation eval on rank 0 only (the others wait): one process gives the exact single-GPU metrics."""
    if not (cfg.eval.pre if phase == "pre" else cfg.eval.post):
        return None
    return distributed.main_process_result(_evaluate_here, phase, cfg, model, processor, eval_ds, eval_collator,
                                           paths, run)


def _evaluate_here(phase: str, cfg: JobConfig, model, processor, eval_ds, eval_collator, paths: RunPaths, run) -> dict:
    metrics = evaluate_qwen3(model, processor, eval_ds, eval_collator, cfg)
    outputs.write_predictions(paths.eval / f"{phase}_predictions.jsonl", metrics["predictions"])
    scalars = outputs.scalar_metrics(metrics)
    outputs.write_json(paths.eval / f"{phase}_metrics.json", scalars)
    tracking.log_metrics(run, f"gen_eval/{phase}_", scalars)
    print(f"{phase}-eval: " + " ".join(f"{k}={v:.4g}" for k, v in scalars.items()), flush=True)
    return scalars


def _stored_pre_metrics(paths: RunPaths, checkpoint: str) -> dict | None:
    """Pre-eval is not re-run on resume: its result travels inside every checkpoint."""
    stored = Path(checkpoint) / "pre_metrics.json"
    if not stored.is_file():
        stored = paths.eval / "pre_metrics.json"
    if stored.is_file():
        log.info("resume: reusing the stored pre-eval metrics (%s)", stored)
        local = paths.eval / "pre_metrics.json"
        if stored != local:  # a fresh pod: keep them in eval/, so later checkpoints and the final upload carry them
            outputs.write_json(local, json.loads(stored.read_text()))
        return json.loads(stored.read_text())
    return None


# -- save --------------------------------------------------------------------------------------------------------
def _save_outputs(cfg, sources, model, processor, paths, run_id, run, *, metrics, timer, params, resumed_from,
                  step, preflight) -> dict:
    started = time.monotonic()

    files = outputs.save_adapter(model, processor, paths.adapter)
    lineage = outputs.lineage(cfg, sources, model, dataset_fingerprint(preflight.get("data_fingerprint")))
    build_model_card(cfg, run_id, metrics, lineage).save(paths.adapter / "README.md")
    outputs.write_json(paths.root / "metrics.json", metrics)
    timer.track("save", started)
    meta = outputs.training_meta(cfg, sources, run_id, lineage_info=lineage, metrics=metrics, durations=timer.durations,
                                   params=params, resumed_from=resumed_from, global_step=step)
    meta["adapter_files"] = files
    meta["preflight"] = preflight
    outputs.write_json(paths.root / "training_meta.json", meta)
    outputs.log_run_metadata(run, meta)
    return meta


def _preflight_summary(report: dict) -> dict:
    """What training_meta.json keeps of the preflight report: the policy and which rows were skipped."""
    return {"rows_checked": report["rows_checked"], "policy": report["policy"],
            "rows_skipped": {s["split"]: s["rows_skipped"] for s in report["splits"].values()},
            "skipped_row_ids": {s["split"]: s["skipped_row_ids"] for s in report["splits"].values()},
            "warnings_by_kind": report["warnings_by_kind"], "data_fingerprint": report.get("data_fingerprint")}


# -- storage and publishing ---------------------------------------------------------------------------------------
def _remote_checkpoints(cfg: JobConfig, run_id: str):
    """The object-store checkpoint sync, write-probed before any GPU time is spent (None without a URI).

    Every rank gets one (each node restores the checkpoint it resumes from); only rank 0 probes and uploads.
    """
    uri = cfg.storage.checkpoint_uri
    if not uri:
        return None

    remote = RemoteCheckpoints(uri, run_id, keep=cfg.train.save_total_limit, concurrency=cfg.storage.s3_concurrency)
    if distributed.is_main_process():
        s3io.probe_write(remote.s3, remote.run_uri)
    return remote


def _check_publish_access(cfg: JobConfig) -> None:
    if cfg.hub.repo_id and distributed.is_main_process():

        log.info("Hub: push as %s to %s", check_push_access(cfg.hub.repo_id), cfg.hub.repo_id)


def _resume_point(paths: RunPaths, remote) -> str | None:
    """The newest COMPLETED checkpoint, local or remote (a fresh pod has only the remote one)."""
    with distributed.local_main_first():
        if remote is not None:
            remote.restore_latest(paths.checkpoints)
    return _resume_checkpoint(paths)


def _publish(cfg: JobConfig, paths: RunPaths, run_id: str, remote, metrics: dict, step: int | None = None) -> None:
    """Gate, then upload the final artifacts (always) and push to the Hub (only when the gate passes).

    On a rerun of a finished run, a push that already reached this repo is not repeated.
    """

    hub = cfg.hub
    gated = bool(hub.repo_id or hub.min_metric)
    passed, reason = (
        gate_decision(metrics, hub.min_metric, hub.require_improvement) if gated else (True, "no gate")
    )
    earlier_push = _earlier_push(metrics, hub.repo_id)
    metrics["gate"] = {"passed": passed, "reason": reason, "pushed_to": None}
    outputs.write_json(paths.root / "metrics.json", metrics)
    if passed and hub.repo_id:
        if earlier_push:
            log.info("Hub: already pushed by an earlier process (%s); not pushing again", earlier_push)
        metrics["gate"]["pushed_to"] = earlier_push or push_adapter(
            paths.adapter, hub.repo_id, hub.private, run_id
        )
        outputs.write_json(paths.root / "metrics.json", metrics)
    log.info("outputs: %s (%s)", paths.root, ", ".join(FINAL_ARTIFACTS))
    if remote is not None:
        log.info("final artifacts uploaded to %s", remote.upload_final(paths.root, FINAL_ARTIFACTS, step))
    if not passed:
        raise GateRefused(f"quality gate refused the push: {reason}; artifacts kept in {paths.root}")


FINAL_ARTIFACTS = ("adapter", "training_meta.json", "metrics.json", "eval", "preflight_report.json")


def _earlier_push(metrics: dict, repo_id: str | None) -> str | None:
    """The commit URL of a push of these artifacts to repo_id recorded by an earlier process, if any."""
    pushed = (metrics.get("gate") or {}).get("pushed_to")
    return pushed if repo_id and pushed and f"/{repo_id}/" in f"{pushed}/" else None


# -- the flow ----------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """Everything the run needs before the model loads."""

    cfg: JobConfig  # data.uri and model.id name the local copies (sources.local)
    sources: Sources
    paths: RunPaths
    run_id: str
    remote: Any
    processor: Any
    train_ds: Any
    eval_ds: Any
    collator: Qwen3VisionSFTCollator
    eval_collator: Qwen3VisionSFTCollator
    preflight: dict


def _checked_datasets(cfg: JobConfig, processor) -> tuple[Any, Any, dict]:
    """Preflight on rank 0 (every row of both splits, before any weight loads); other ranks apply its plan."""

    checked = None

    def scan() -> dict:
        nonlocal checked
        checked = run_preflight(cfg, processor)
        return {"plan": checked.plan, "summary": _preflight_summary(checked.report)}

    shared = distributed.main_process_result(scan)
    if checked is not None:
        return checked.train_dataset, checked.eval_dataset, shared["summary"]
    return (*apply_plan(cfg, shared["plan"]), shared["summary"])


def _prepare(cfg: JobConfig, timer: Timer) -> Prepared:
    """Everything up to a trainable model: fails fast (exit 2) on bad config, data or credentials.

    Preflight runs before anything is written to the checkpoint store or the Hub is asked for access, so a
    run that fails on its data leaves nothing behind but preflight_report.json.
    """

    started = time.monotonic()
    distributed.init_process_group()
    _seed_everything(cfg.train.seed)
    run_id = _resolve_run_id(cfg)
    early.check_inputs(cfg, "run")  # paths and the output dir, before any download
    _hub_access(cfg)
    with distributed.local_main_first():  # one download per node into the shared cache
        sources = localize(cfg)
        cfg = sources.local(cfg)
        early.check_lora_targets(cfg, sources.model_id)  # config.json on the meta device, no weights
        processor = early.load_processor_checked(cfg, sources.model_id)
    train_ds, eval_ds, preflight = _checked_datasets(cfg, processor)
    log.info("data: %d train rows, %d eval rows from %s", len(train_ds), len(eval_ds), cfg.data.uri)
    remote = _remote_checkpoints(cfg, run_id)
    _check_publish_access(cfg)
    paths = RunPaths(Path(cfg.train.output_dir)).create()
    collator, eval_collator = build_collators(cfg, processor)
    _check_supervised_tokens(collator, train_ds, cfg.train.per_device_batch_size)
    timer.track("setup", started)
    return Prepared(cfg, sources, paths, run_id, remote, processor, train_ds, eval_ds, collator, eval_collator,
                    preflight)


def _train(p: Prepared, model, run, guard: PreemptionGuard, resume_from: str | None):
    """The Trainer loop. Returns its result, or raises Preempted once the preemption checkpoint is uploaded."""
    report_to = ["wandb"] if run is not None else []
    trainer, uploader, preemption = build_trainer(
        p.cfg, model, p.processor, p.collator, p.train_ds, p.paths.checkpoints, p.run_id, report_to, guard=guard,
        extra_files=(p.paths.eval / "pre_metrics.json", p.paths.root / resume.FINGERPRINT_FILE), remote=p.remote)
    guard.in_training = True
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    finally:
        guard.in_training = False
    if uploader is not None:
        uploader.drain()
    if guard.requested:
        # Ranks > 0 wait for rank 0's save and upload: torchrun tears down every rank once one exits.
        distributed.barrier()
        if run is not None:
            run.mark_preempting()  # W&B shows the run as preempted, not crashed; it resumes under the same id
        saved = (
            f"checkpoint-{preemption.stopped_at} is COMPLETED" if preemption.saved else "no new checkpoint (no time)"
        )
        log.warning("preempted at step %s: %s", preemption.stopped_at, saved)
        guard.raise_if_requested(preemption.stopped_at)
    return trainer, result


def run_job(cfg: JobConfig) -> dict[str, Any]:
    timer = Timer()
    with PreemptionGuard(cfg.train.preempt_grace_s) as guard:
        p = _prepare(cfg, timer)
        plan = _resume_plan(p)  # drift is refused here, before any model loads
        if plan.checkpoint is not None and plan.progress is not None and plan.progress.finished:
            return _complete_finished_run(p, plan.checkpoint, plan.progress, timer)
        started = time.monotonic()
        model = apply_lora(load_model(p.cfg), p.cfg)
        apply_liger(p.cfg, model)  # SFT_USE_LIGER: on with CUDA and liger-kernel (auto); never on the CPU
        params = _count_trainable_params(model)
        run = _init_wandb(p)
        timer.track("model", started)
        try:
            resume_from = plan.checkpoint
            started = time.monotonic()
            pre = (_stored_pre_metrics(p.paths, resume_from) if resume_from else None) or _evaluate(
                "pre", p.cfg, model, p.processor, p.eval_ds, p.eval_collator, p.paths, run)
            timer.track("pre_eval", started)

            started = time.monotonic()
            trainer, result = _train(p, model, run, guard, resume_from)
            timer.track("train", started)
            return _finish(p, trainer.model, result, run, timer, params=params, pre=pre, resume_from=resume_from)
        finally:
            tracking.finish(run)


def _finish(p: Prepared, model, result, run, timer: Timer, *, params, pre, resume_from) -> dict[str, Any]:
    """Post-eval, then (rank 0) the adapter, metadata, gate, final upload and push."""
    started = time.monotonic()
    post = _evaluate("post", p.cfg, model, p.processor, p.eval_ds, p.eval_collator, p.paths, run)
    timer.track("post_eval", started)
    metrics = {"pre": pre, "post": post, "train": {"loss": result.training_loss, "global_step": result.global_step}}

    def outputs() -> dict[str, Any]:
        meta = _save_outputs(p.cfg, p.sources, model, p.processor, p.paths, p.run_id, run, metrics=metrics, timer=timer,
                             params=params, resumed_from=resume_from, step=result.global_step,
                             preflight=p.preflight)
        _publish(p.cfg, p.paths, p.run_id, p.remote, metrics, result.global_step)
        return meta

    # Rank 0 writes and publishes; the other ranks wait and exit with its exit code (0, or 4 on a refused gate).
    return distributed.main_process_result(outputs)


# -- reruns: SFT_RESUME, drift, a finished run ------------------------------------------------------------------
class TrainResult(NamedTuple):
    """What _finish reads of trainer.train()'s TrainOutput, rebuilt for a run whose training finished earlier."""

    global_step: int
    training_loss: float | None  # None when the checkpoint's log history holds no loss entry


@dataclass(frozen=True)
class ResumePlan:
    checkpoint: str | None  # the COMPLETED checkpoint to continue, None for a fresh start
    progress: resume.Progress | None


def _resume_plan(p: Prepared) -> ResumePlan:
    """SFT_RESUME and the newest COMPLETED checkpoint (local, else restored from storage), checked for drift.

    Runs before any model loads, so a refused resume costs no GPU time. The run's fingerprint is written to
    SFT_OUTPUT_DIR and copied into every checkpoint it saves (and uploads).
    """
    mode = p.cfg.train.resume
    current = resume.Fingerprint.of(p.cfg, p.run_id, p.preflight.get("data_fingerprint") or {}, p.sources)
    checkpoint = None
    if mode == "never":
        with distributed.local_main_first():
            if distributed.is_main_process():
                resume.move_aside(p.paths.checkpoints)
                if p.remote is not None:
                    p.remote.move_aside()
    else:
        checkpoint = _resume_point(p.paths, p.remote)
    if checkpoint is None and mode == "require":
        where = [str(p.paths.checkpoints)] + ([str(p.remote.run_uri)] if p.remote is not None else [])
        raise resume.NothingToResume(where)
    if checkpoint is not None:
        resume.check_resumable(Path(checkpoint), current)
    if distributed.is_main_process():
        outputs.write_json(p.paths.root / resume.FINGERPRINT_FILE, current.to_json())
    return ResumePlan(checkpoint, resume.Progress.read(Path(checkpoint)) if checkpoint else None)


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
    """The saved metrics of a run that got through post-eval and the save at this step; None if it did not."""
    path = p.paths.root / "metrics.json"
    if not all(f.is_file() for f in (path, p.paths.root / "training_meta.json",
                                        *(p.paths.adapter / n for n in outputs.ADAPTER_FILES))):
        return None
    metrics = json.loads(path.read_text())
    if (metrics.get("train") or {}).get("global_step") != step or (p.cfg.eval.post and not metrics.get("post")):
        return None
    return metrics


def _already_published(p: Prepared, metrics: dict, step: int) -> bool:
    gate = metrics.get("gate") or {}
    if not gate.get("passed"):
        return False  # never gated, or refused: the gate runs again (and refuses again with the same settings)
    if p.cfg.hub.repo_id and not _earlier_push(metrics, p.cfg.hub.repo_id):
        return False
    return p.remote is None or p.remote.final_step() == step


def _complete_finished_run(p: Prepared, checkpoint: str, progress: resume.Progress, timer: Timer) -> dict[str, Any]:
    """Training reached its last step in an earlier process: train nothing, redo only what did not finish.

    Post-eval and the save when their outputs are missing (the model loads with the checkpoint's adapter); then the
    gate, the final upload and the push (one that failed before is retried). The exit code is the one the first
    run would have given: 4 when the gate refuses again.
    """
    step = progress.step
    log.info("training already finished: %s is at step %d of %d; no step is trained again", Path(checkpoint).name,
             step, progress.max_steps)
    metrics = _finished_metrics(p, step)
    if metrics is None:
        log.info("post-eval or the save did not finish: running them on the checkpoint's adapter")
        return _evaluate_finished_checkpoint(p, checkpoint, step, timer)
    meta = json.loads((p.paths.root / "training_meta.json").read_text())
    if _already_published(p, metrics, step):
        log.info("nothing to do: run %s finished at step %d; its artifacts are in %s and were published (%s)",
                 p.run_id, step, p.paths.root, metrics["gate"].get("pushed_to") or metrics["gate"]["reason"])
        return meta
    log.info("the publish step did not finish: gate, final upload and push again")
    distributed.main_process_result(_publish, p.cfg, p.paths, p.run_id, p.remote, metrics, step)
    return meta


def _evaluate_finished_checkpoint(p: Prepared, checkpoint: str, step: int, timer: Timer) -> dict[str, Any]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    started = time.monotonic()
    model = apply_lora(load_model(p.cfg), p.cfg)
    apply_liger(p.cfg, model)
    keep_trainable_params_fp32(model)  # as the Trainer left it: fp32 LoRA weights
    set_peft_model_state_dict(model, load_file(str(Path(checkpoint) / "adapter_model.safetensors")))
    params = _count_trainable_params(model)
    run = _init_wandb(p)
    timer.track("model", started)
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        result = TrainResult(step, _training_loss(state["log_history"]))
        pre = _stored_pre_metrics(p.paths, checkpoint)
        return _finish(p, model, result, run, timer, params=params, pre=pre, resume_from=checkpoint)
    finally:
        tracking.finish(run)


def main(env: dict[str, str] | None = None) -> dict[str, Any]:
    """Build the config from the environment and run the job; user errors keep their type (and exit code)."""
    cfg = build_cfg(ModelCards().qwen3_vl_8b_instruct, env)
    try:
        return run_job(cfg)
    except JobError:
        raise
    except Exception as exc:
        raise RuntimeError(f"Qwen3-VL SFT failed: {exc}") from exc

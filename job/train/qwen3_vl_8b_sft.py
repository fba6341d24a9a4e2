"""QLoRA SFT of Qwen3-VL-8B-Instruct: setup -> pre-eval -> train -> post-eval -> save (mirrors gemma3sft's flow).

`main()` is a readable sequence of small steps; each step is a function below that can be tested on its own.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from job.cards import ModelCards
from job.collators.qwen3_collator import IGNORE_INDEX, Qwen3VisionSFTCollator
from job import early_checks
from job.config import build_cfg
from job.data.loaders import dataset_fingerprint
from job.errors import DataError, JobError
from job.train import artifacts, distributed
from job.train.callbacks import latest_completed_checkpoint
from job.train.model import _count_trainable_params, apply_liger, apply_lora, load_model
from job.train.preemption import PreemptionGuard
from job.train.trainer import build_trainer
from job.utils import tracking
from job.utils.eval_sarcasm import evaluate_qwen3
from job.utils.redact import redact

log = logging.getLogger("job.train")


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


def _resolve_run_id(cfg: dict) -> str:
    return cfg["train"]["run_id"] or f"qwen3-sft-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def _uses_hub(cfg: dict) -> bool:
    return not Path(cfg["model"]["id"]).exists() or not Path(cfg["data"]["uri"] or ".").exists()


def _hub_access(cfg: dict) -> None:
    """The Hub is used only for a model or dataset that is not local. Tokens come from HF_TOKEN (never logged)."""
    if not _uses_hub(cfg):
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        log.info("Hub: HF_HUB_OFFLINE=1, using the local cache only")
    elif os.environ.get("HF_TOKEN"):
        log.info("Hub: authenticating with HF_TOKEN")
    else:
        log.info("Hub: no HF_TOKEN set, anonymous access (public repos only)")


def _build_collators(cfg: dict, processor) -> tuple[Qwen3VisionSFTCollator, Qwen3VisionSFTCollator]:
    data = cfg["data"]
    common = dict(
        processor=processor, max_length=cfg["train"]["max_length"], image_key=data["image_key"],
        query_key=data["query_key"], caption_key=data["caption_key"], target_key=data["target_key"],
        system_prompt=data["system_prompt"],
    )
    return Qwen3VisionSFTCollator(training=True, **common), Qwen3VisionSFTCollator(training=False, **common)


def _check_supervised_tokens(collator: Qwen3VisionSFTCollator, train_ds, batch_size: int) -> list[int]:
    """One real batch through the collator: every row must have supervised tokens (else the loss is silently 0)."""
    rows = [train_ds[i] for i in range(min(batch_size, len(train_ds)))]
    batch = collator(rows)
    counts = (batch["labels"] != IGNORE_INDEX).sum(dim=1).tolist()
    print(f"supervised tokens per row (first batch): {counts}", flush=True)
    if min(counts) == 0:
        raise DataError(f"rows {[r.get('row_id') for r, c in zip(rows, counts) if c == 0]} have no supervised tokens")
    return counts


# -- train -------------------------------------------------------------------------------------------------------
def _resume_checkpoint(paths: RunPaths) -> str | None:
    latest, incomplete = latest_completed_checkpoint(paths.checkpoints)
    for path in incomplete:
        log.warning("ignoring %s: no COMPLETED marker (interrupted save)", path.name)
    if latest is not None:
        log.info("resuming from %s", latest)
    return str(latest) if latest is not None else None


# -- eval --------------------------------------------------------------------------------------------------------
def _evaluate(phase: str, cfg, model, processor, eval_ds, eval_collator, paths: RunPaths, run) -> dict | None:
    """Generation eval on rank 0 only (the others wait): one process gives the exact single-GPU metrics."""
    if not cfg["eval"][phase]:
        return None
    return distributed.main_process_result(_evaluate_here, phase, cfg, model, processor, eval_ds, eval_collator,
                                           paths, run)


def _evaluate_here(phase: str, cfg, model, processor, eval_ds, eval_collator, paths: RunPaths, run) -> dict:
    metrics = evaluate_qwen3(model, processor, eval_ds, eval_collator, cfg)
    artifacts.write_predictions(paths.eval / f"{phase}_predictions.jsonl", metrics["predictions"])
    scalars = artifacts.scalar_metrics(metrics)
    artifacts.write_json(paths.eval / f"{phase}_metrics.json", scalars)
    tracking.log_metrics(run, f"gen_eval/{phase}_", scalars)
    print(f"{phase}-eval: " + " ".join(f"{k}={v:.4g}" for k, v in scalars.items()), flush=True)
    return scalars


def _stored_pre_metrics(paths: RunPaths, checkpoint: str) -> dict | None:
    """Pre-eval is not re-run on resume: its result travels inside every checkpoint."""
    stored = Path(checkpoint) / "pre_metrics.json"
    if not stored.is_file():
        stored = paths.eval / "pre_metrics.json"
    if stored.is_file():
        import json

        log.info("resume: reusing the stored pre-eval metrics (%s)", stored)
        return json.loads(stored.read_text())
    return None


# -- save --------------------------------------------------------------------------------------------------------
def _save_outputs(cfg, model, processor, paths, run_id, run, *, metrics, timer, params, resumed_from, step,
                  preflight) -> dict:
    started = time.monotonic()
    from job.storage.hub import build_model_card

    files = artifacts.save_adapter(model, processor, paths.adapter)
    lineage = artifacts.lineage(cfg, model, dataset_fingerprint(cfg["data"]["uri"]))
    build_model_card(cfg, run_id, metrics, lineage).save(paths.adapter / "README.md")
    artifacts.write_json(paths.root / "metrics.json", metrics)
    timer.track("save", started)
    meta = artifacts.training_meta(cfg, run_id, lineage_info=lineage, metrics=metrics, durations=timer.durations,
                                   params=params, resumed_from=resumed_from, global_step=step)
    meta["adapter_files"] = files
    meta["preflight"] = preflight
    artifacts.write_json(paths.root / "training_meta.json", meta)
    artifacts.log_run_metadata(run, meta)
    return meta


def _preflight_summary(report: dict) -> dict:
    """What training_meta.json keeps of the preflight report: the policy and which rows were skipped."""
    return {"rows_checked": report["rows_checked"], "policy": report["policy"],
            "rows_skipped": {s["split"]: s["rows_skipped"] for s in report["splits"].values()},
            "skipped_row_ids": {s["split"]: s["skipped_row_ids"] for s in report["splits"].values()},
            "warnings_by_kind": report["warnings_by_kind"]}


# -- storage and publishing ---------------------------------------------------------------------------------------
def _remote_checkpoints(cfg: dict, run_id: str):
    """The object-store checkpoint sync, write-probed before any GPU time is spent (None without a URI).

    Every rank gets one (each node restores the checkpoint it resumes from); only rank 0 probes and uploads.
    """
    uri = cfg["storage"]["checkpoint_uri"]
    if not uri:
        return None
    from job.storage import s3 as s3io
    from job.storage.checkpoints import RemoteCheckpoints

    remote = RemoteCheckpoints(uri, run_id, keep=cfg["train"]["save_total_limit"])
    if distributed.is_main_process():
        s3io.probe_write(remote.s3, remote.run_uri)
    return remote


def _check_publish_access(cfg: dict) -> None:
    if cfg["hub"]["repo_id"] and distributed.is_main_process():
        from job.storage.hub import check_push_access

        log.info("Hub: push as %s to %s", check_push_access(cfg["hub"]["repo_id"]), cfg["hub"]["repo_id"])


def _resume_point(paths: RunPaths, remote) -> str | None:
    """The newest COMPLETED checkpoint, local or remote (a fresh pod has only the remote one)."""
    with distributed.local_main_first():
        if remote is not None:
            remote.restore_latest(paths.checkpoints)
    return _resume_checkpoint(paths)


def _publish(cfg: dict, paths: RunPaths, run_id: str, remote, metrics: dict) -> None:
    """Gate, then upload the final artifacts (always) and push to the Hub (only when the gate passes)."""
    from job.errors import GateRefused
    from job.storage.hub import gate_decision, push_adapter

    hub = cfg["hub"]
    gated = bool(hub["repo_id"] or hub["min_metric"])
    passed, reason = gate_decision(metrics, hub["min_metric"], hub["require_improvement"]) if gated else (True, "no gate")
    metrics["gate"] = {"passed": passed, "reason": reason, "pushed_to": None}
    artifacts.write_json(paths.root / "metrics.json", metrics)
    if passed and hub["repo_id"]:
        metrics["gate"]["pushed_to"] = push_adapter(paths.adapter, hub["repo_id"], hub["private"], run_id)
        artifacts.write_json(paths.root / "metrics.json", metrics)
    log.info("outputs: %s (%s)", paths.root, ", ".join(FINAL_ARTIFACTS))
    if remote is not None:
        log.info("final artifacts uploaded to %s", remote.upload_final(paths.root, FINAL_ARTIFACTS))
    if not passed:
        raise GateRefused(f"quality gate refused the push: {reason}; artifacts kept in {paths.root}")


FINAL_ARTIFACTS = ("adapter", "training_meta.json", "metrics.json", "eval", "preflight_report.json")


# -- the flow ----------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """Everything the run needs before the model loads."""

    cfg: dict
    paths: RunPaths
    run_id: str
    remote: Any
    processor: Any
    train_ds: Any
    eval_ds: Any
    collator: Qwen3VisionSFTCollator
    eval_collator: Qwen3VisionSFTCollator
    preflight: dict


def _checked_datasets(cfg: dict, processor) -> tuple[Any, Any, dict]:
    """Preflight on rank 0 (every row of both splits, before any weight loads); other ranks apply its plan."""
    from job.preflight import apply_plan, run_preflight

    checked = None

    def scan() -> dict:
        nonlocal checked
        checked = run_preflight(cfg, processor)
        return {"plan": checked.plan, "summary": _preflight_summary(checked.report)}

    shared = distributed.main_process_result(scan)
    if checked is not None:
        return checked.train_dataset, checked.eval_dataset, shared["summary"]
    return (*apply_plan(cfg, shared["plan"]), shared["summary"])


def _prepare(cfg: dict, timer: Timer) -> Prepared:
    """Everything up to a trainable model: fails fast (exit 2) on bad config, data or credentials.

    Preflight runs before anything is written to the checkpoint store or the Hub is asked for access, so a
    run that fails on its data leaves nothing behind but preflight_report.json.
    """
    from job.storage.sources import localize

    started = time.monotonic()
    distributed.init_process_group()
    _seed_everything(cfg["train"]["seed"])
    run_id = _resolve_run_id(cfg)
    early_checks.check_inputs(cfg, "run")  # paths and the output dir, before any download
    _hub_access(cfg)
    with distributed.local_main_first():  # one download per node into the shared cache
        cfg = localize(cfg)
        early_checks.check_lora_targets(cfg)  # config.json on the meta device, no weights
        processor = early_checks.load_processor_checked(cfg)
    train_ds, eval_ds, preflight = _checked_datasets(cfg, processor)
    log.info("data: %d train rows, %d eval rows from %s", len(train_ds), len(eval_ds), cfg["data"]["uri"])
    remote = _remote_checkpoints(cfg, run_id)
    _check_publish_access(cfg)
    paths = RunPaths(Path(cfg["train"]["output_dir"])).create()
    collator, eval_collator = _build_collators(cfg, processor)
    _check_supervised_tokens(collator, train_ds, cfg["train"]["per_device_batch_size"])
    timer.track("setup", started)
    return Prepared(cfg, paths, run_id, remote, processor, train_ds, eval_ds, collator, eval_collator, preflight)


def _train(p: Prepared, model, run, guard: PreemptionGuard, resume_from: str | None):
    """The Trainer loop. Returns its result, or raises Preempted once the preemption checkpoint is uploaded."""
    report_to = ["wandb"] if run is not None else []
    trainer, uploader, preemption = build_trainer(
        p.cfg, model, p.processor, p.collator, p.train_ds, p.paths.checkpoints, p.run_id, report_to, guard=guard,
        extra_files=(p.paths.eval / "pre_metrics.json",), remote=p.remote)
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
        saved = f"checkpoint-{preemption.stopped_at} is COMPLETED" if preemption.saved else "no new checkpoint (no time)"
        log.warning("preempted at step %s: %s", preemption.stopped_at, saved)
        guard.raise_if_requested(preemption.stopped_at)
    return trainer, result


def run_job(cfg: dict) -> dict[str, Any]:
    timer = Timer()
    with PreemptionGuard(cfg["train"]["preempt_grace_s"]) as guard:
        p = _prepare(cfg, timer)
        started = time.monotonic()
        model = apply_lora(load_model(p.cfg), p.cfg)
        apply_liger(p.cfg, model)  # SFT_USE_LIGER: on with CUDA and liger-kernel (auto); never on the CPU
        params = _count_trainable_params(model)
        run = tracking.init_wandb(p.cfg, p.run_id, redact(p.cfg)) if distributed.is_main_process() else None
        timer.track("model", started)
        try:
            resume_from = _resume_point(p.paths, p.remote)
            started = time.monotonic()
            pre = (_stored_pre_metrics(p.paths, resume_from) if resume_from else None) or _evaluate(
                "pre", p.cfg, model, p.processor, p.eval_ds, p.eval_collator, p.paths, run)
            timer.track("pre_eval", started)

            started = time.monotonic()
            trainer, result = _train(p, model, run, guard, resume_from)
            timer.track("train", started)
            return _finish(p, trainer, result, run, timer, params=params, pre=pre, resume_from=resume_from)
        finally:
            tracking.finish(run)


def _finish(p: Prepared, trainer, result, run, timer: Timer, *, params, pre, resume_from) -> dict[str, Any]:
    """Post-eval, then (rank 0) the adapter, metadata, gate, final upload and push."""
    started = time.monotonic()
    post = _evaluate("post", p.cfg, trainer.model, p.processor, p.eval_ds, p.eval_collator, p.paths, run)
    timer.track("post_eval", started)
    metrics = {"pre": pre, "post": post, "train": {"loss": result.training_loss, "global_step": result.global_step}}

    def outputs() -> dict[str, Any]:
        meta = _save_outputs(p.cfg, trainer.model, p.processor, p.paths, p.run_id, run, metrics=metrics, timer=timer,
                             params=params, resumed_from=resume_from, step=result.global_step,
                             preflight=p.preflight)
        _publish(p.cfg, p.paths, p.run_id, p.remote, metrics)
        return meta

    # Rank 0 writes and publishes; the other ranks wait and exit with its exit code (0, or 4 on a refused gate).
    return distributed.main_process_result(outputs)


def main(env: dict[str, str] | None = None) -> dict[str, Any]:
    """Build the config from the environment and run the job; user errors keep their type (and exit code)."""
    cfg = build_cfg(ModelCards().qwen3_vl_8b_instruct, env)
    try:
        return run_job(cfg)
    except JobError:
        raise
    except Exception as exc:
        raise RuntimeError(f"Qwen3-VL SFT failed: {exc}") from exc

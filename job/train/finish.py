"""After the setup: the generation evals, then (rank 0) the save, the quality gate, the final upload and the push."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job import outputs
from job.config.schema import JobConfig
from job.data.loaders import dataset_fingerprint
from job.errors import GateRefused
from job.eval import plots
from job.eval.generate import evaluate_qwen3
from job.inputs import Prepared, RunPaths, Timer
from job.storage.checkpoints import RemoteCheckpoints
from job.storage.hub import build_model_card, gate_decision, push_adapter
from job.train import distributed, resume
from job.utils import tracking

log = logging.getLogger("job.train")

REPORT_DIR = "report"  # the pictures, in the run's root and in the adapter folder


@dataclass(frozen=True)
class Trained:
    """What training hands to the post-eval and the save."""

    result: Any  # trainer.train()'s TrainOutput, or rerun.TrainResult for a run whose training finished earlier
    params: dict  # trainable / total parameter counts
    pre: dict | None  # the pre-eval metrics (None with SFT_EVAL_PRE=false)
    resumed_from: str | None  # the checkpoint this process continued, None for a fresh start
    best: dict | None = None  # SFT_EVAL_STEPS: the best step's record (job/train/best.py), whose adapter this is
    log_history: list[dict] = field(default_factory=list)  # the Trainer's log entries (the loss curve)
    micro_batch: dict | None = None  # the micro-batch trained with, and how it was chosen (job/train/micro_batch.py)


# -- eval --------------------------------------------------------------------------------------------------------
def evaluate(phase: str, p: Prepared, model, run) -> dict | None:
    """Generation eval on rank 0 only (the others wait): one process gives the exact single-GPU metrics."""
    if not (p.cfg.eval.pre if phase == "pre" else p.cfg.eval.post):
        return None
    return distributed.main_process_result(_evaluate_here, phase, p, model, run)


def owner(p: Prepared) -> outputs.Stamp:
    """This run, as the stamps of its outputs name it: the run id and the digest of its resume fingerprint."""
    fingerprint = resume.Fingerprint.of(p.cfg, p.run_id, p.preflight.get("data_fingerprint") or {})
    return outputs.Stamp(p.run_id, fingerprint.digest())


def _evaluate_here(phase: str, p: Prepared, model, run) -> dict:
    # The stamp of what is about to be replaced goes first: a process killed mid-write leaves outputs nobody trusts.
    stamp = p.paths.eval / outputs.PRE_STAMP if phase == "pre" else p.paths.root / outputs.RUN_STAMP
    stamp.unlink(missing_ok=True)
    metrics = evaluate_qwen3(model, p.processor, p.eval_ds, p.eval_collator, p.cfg, p.label_set)
    outputs.write_predictions(p.paths.eval / f"{phase}_predictions.jsonl", metrics["predictions"])
    scalars = outputs.scalar_metrics(metrics)
    outputs.write_json(p.paths.eval / f"{phase}_metrics.json", scalars)
    if phase == "pre":  # the post-eval's outputs are stamped with the adapter, by the save (RUN_STAMP)
        owner(p).write(stamp)
    tracking.log_metrics(run, f"gen_eval/{phase}_", scalars)
    tracking.log_confusion_matrix(run, f"gen_eval/{phase}_confusion_matrix", scalars.get("confusion_matrix") or {})
    print(f"{phase}-eval: " + outputs.headline(scalars), flush=True)
    return scalars


def stored_pre_metrics(p: Prepared, checkpoint: str) -> dict | None:
    """Pre-eval is not re-run on resume: its result travels inside every checkpoint, with the stamp of the run that
    made it. Only this run's is trusted (a leftover of another run in eval/ is not): else None, and it runs again."""
    mine = owner(p)
    for folder in (Path(checkpoint), p.paths.eval):
        stored = folder / "pre_metrics.json"
        if not stored.is_file():
            continue
        conflicts = mine.conflicts(outputs.Stamp.read(folder / outputs.PRE_STAMP))
        if conflicts:
            log.warning("not reusing %s: it is not this run's pre-eval (%s)", stored, "; ".join(conflicts))
            continue
        log.info("resume: reusing the stored pre-eval metrics (%s)", stored)
        metrics = json.loads(stored.read_text())
        if folder != p.paths.eval:  # a fresh pod: into eval/, so later checkpoints and the final upload carry them
            outputs.write_json(p.paths.eval / "pre_metrics.json", metrics)
            mine.write(p.paths.eval / outputs.PRE_STAMP)
        return metrics
    return None


# -- save --------------------------------------------------------------------------------------------------------
def _save_outputs(p: Prepared, model, run, trained: Trained, metrics: dict, timer: Timer) -> dict:
    started = time.monotonic()
    (p.paths.root / outputs.RUN_STAMP).unlink(missing_ok=True)  # rewritten last, once everything below is
    files = outputs.save_adapter(model, p.processor, p.paths.adapter)
    metrics["report"] = _pictures(p, metrics, trained, run)
    lineage = outputs.lineage(p.cfg, p.sources, model, dataset_fingerprint(p.preflight.get("data_fingerprint")))
    target = (p.preflight.get("understood") or {}).get("target") or {}
    lineage.update(eval_overlap=p.preflight.get("eval_overlap"), eval_holdout=p.preflight.get("eval_holdout"),
                   label_names=target.get("names"))  # SFT_TARGET_FORMAT=label: the class names, as resolved
    build_model_card(p.cfg, p.run_id, metrics, lineage).save(p.paths.adapter / "README.md")
    outputs.write_json(p.paths.root / "metrics.json", metrics)
    timer.track("save", started)
    meta = outputs.training_meta(p.cfg, p.sources, p.run_id, lineage_info=lineage, metrics=metrics,
                                 durations=timer.durations, params=trained.params, resumed_from=trained.resumed_from,
                                 global_step=trained.result.global_step)
    meta["adapter_files"] = files
    meta["micro_batch"] = trained.micro_batch
    meta["preflight"] = p.preflight
    outputs.write_json(p.paths.root / "training_meta.json", meta)
    # Last: what a rerun (and an export) trusts of these outputs is what this stamp names.
    stamp = owner(p)
    outputs.Stamp(stamp.run_id, stamp.fingerprint, outputs.adapter_sha256(p.paths.adapter),
                  trained.result.global_step).write(p.paths.root / outputs.RUN_STAMP)
    outputs.log_run_metadata(run, meta)
    return meta


def _pictures(p: Prepared, metrics: dict, trained: Trained, run) -> dict | None:
    """report/*.png (job/eval/plots.py), copied into the adapter folder too: the card links them by relative path,
    which the Hub renders from the pushed repo; and in the W&B run, as `report/<name>` images."""
    drawn = plots.write_report(p.paths.root / REPORT_DIR, metrics, trained.log_history)
    if not drawn:
        return None
    target = p.paths.adapter / REPORT_DIR
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for path in drawn.values():
        shutil.copy2(path, target / path.name)
        (target / path.name).chmod(0o644)
    for name, path in drawn.items():
        print(f"report: {name} {path}", flush=True)
    tracking.log_pictures(run, drawn)
    return {"dir": REPORT_DIR, "files": {name: f"{REPORT_DIR}/{path.name}" for name, path in drawn.items()}}


# -- gate, upload, push ------------------------------------------------------------------------------------------
def publish(cfg: JobConfig, paths: RunPaths, run_id: str, remote: RemoteCheckpoints | None, metrics: dict,
             step: int | None = None) -> None:
    """Gate, then upload the final artifacts (always) and push to the Hub (only when the gate passes).

    On a rerun of a finished run, a push that already reached this repo is not repeated.
    """

    hub = cfg.hub
    gated = bool(hub.repo_id or hub.min_metric)
    passed, reason = (
        gate_decision(metrics, hub.min_metric, hub.require_improvement) if gated else (True, "no gate")
    )
    pushed_before = earlier_push(metrics, hub.repo_id)
    metrics["gate"] = {"passed": passed, "reason": reason, "pushed_to": None}
    outputs.write_json(paths.root / "metrics.json", metrics)
    if passed and hub.repo_id:
        if pushed_before:
            log.info("Hub: already pushed by an earlier process (%s); not pushing again", pushed_before)
        metrics["gate"]["pushed_to"] = pushed_before or push_adapter(
            paths.adapter, hub.repo_id, hub.private, run_id
        )
        outputs.write_json(paths.root / "metrics.json", metrics)
    log.info("outputs: %s (%s)", paths.root, ", ".join(outputs.FINAL_ARTIFACTS))
    if remote is not None:
        log.info("final artifacts uploaded to %s", remote.upload_final(paths.root, outputs.FINAL_ARTIFACTS, step))
    if not passed:
        raise GateRefused(f"quality gate refused the push: {reason}; artifacts kept in {paths.root}")


def earlier_push(metrics: dict, repo_id: str | None) -> str | None:
    """The commit URL of a push of these artifacts to repo_id recorded by an earlier process, if any."""
    pushed = (metrics.get("gate") or {}).get("pushed_to")
    return pushed if repo_id and pushed and f"/{repo_id}/" in f"{pushed}/" else None


def finish(p: Prepared, model, run, timer: Timer, trained: Trained) -> dict[str, Any]:
    """Post-eval, then (rank 0) the adapter, metadata, gate, final upload and push."""
    started = time.monotonic()
    post = evaluate("post", p, model, run)
    timer.track("post_eval", started)
    step = trained.result.global_step
    metrics = {"pre": trained.pre, "post": post, "train": {"loss": trained.result.training_loss, "global_step": step},
               "label_set": p.label_set.to_json() if p.label_set is not None else None, "best": trained.best}

    def save_and_publish() -> dict[str, Any]:
        meta = _save_outputs(p, model, run, trained, metrics, timer)
        publish(p.cfg, p.paths, p.run_id, p.remote, metrics, step)
        return meta

    # Rank 0 writes and publishes; the other ranks wait and exit with its exit code (0, or 4 on a refused gate).
    return distributed.main_process_result(save_and_publish)

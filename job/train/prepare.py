"""The run's setup, up to a trainable model: config checks, s3:// mirrors, processor, preflight, storage and Hub
access, one real batch. Everything here fails fast (exit 2) on bad config, data or credentials.

Preflight runs before anything is written to the checkpoint store or the Hub is asked for access, so a run that
fails on its data leaves nothing behind but preflight_report.json.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from job import inputs
from job.collators.qwen3_collator import IGNORE_INDEX, Qwen3VisionSFTCollator, build_collators
from job.config.schema import JobConfig
from job.config.sections.data import DataConfig
from job.config.sections.eval import EvalConfig
from job.config.sections.model import ModelConfig
from job.config.sections.outputs import ExportConfig, HubConfig, StorageConfig
from job.errors import DataError
from job.eval.generate import gold_label
from job.eval.score import LabelSet
from job.inputs import Prepared, RunPaths, Timer
from job.metric_table import SCORED_GATE_METRICS
from job.preflight import early
from job.preflight.run import apply_plan, run_preflight
from job.storage import s3 as s3io
from job.storage.checkpoints import RemoteCheckpoints
from job.storage.hub import check_push_access, parse_min_metric
from job.storage.sources import localize, source_kind
from job.train import distributed, micro_batch, resume
from job.utils import tracking
from job.utils.redact import redact

log = logging.getLogger("job.train")


def _seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def _resolve_run_id(cfg: JobConfig, preflight: dict) -> str:
    """SFT_RUN_ID; unset, the run id of the checkpoint a rerun continues; else one derived from the data and the
    training settings (the resume fingerprint's), so that a restarted pod (no local checkpoint, the same settings)
    finds its checkpoints under SFT_CHECKPOINT_URI and continues its W&B run."""
    if cfg.train.run_id:
        return cfg.train.run_id
    if cfg.train.resume != "never":
        stored = resume.stored_run_id(RunPaths(Path(cfg.train.output_dir)).checkpoints)
        if stored is not None:
            print(f"run id: {stored} (SFT_RUN_ID unset: continuing the run of the newest checkpoint)", flush=True)
            return stored
    derived = resume.derived_run_id(cfg, preflight.get("data_fingerprint") or {})
    print(f"run id: {derived} (SFT_RUN_ID unset: derived from the data fingerprint and the training settings; "
          "the same data and settings give the same id, so a restart resumes)", flush=True)
    return derived


def _uses_hub(model: ModelConfig, data: DataConfig) -> bool:
    return "hub" in (source_kind(model.id, "model"), source_kind(data.uri or ".", "dataset"))


def _hub_access(model: ModelConfig, data: DataConfig) -> None:
    """The Hub is used only for a model or dataset that is not local. Tokens come from HF_TOKEN (never logged)."""
    if not _uses_hub(model, data):
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        log.info("Hub: HF_HUB_OFFLINE=1, using the local cache only")
    elif os.environ.get("HF_TOKEN"):
        log.info("Hub: authenticating with HF_TOKEN")
    else:
        log.info("Hub: no HF_TOKEN set, anonymous access (public repos only)")


def _check_supervised_tokens(collator: Qwen3VisionSFTCollator, train_ds, batch_size: int) -> list[int]:
    """One real batch through the collator, which refuses a row without supervised tokens (its rule: lacks_answer,
    job/collators/qwen3_collator.py); the counts are printed."""
    rows = [train_ds[i] for i in range(min(batch_size, len(train_ds)))]
    counts = (collator(rows)["labels"] != IGNORE_INDEX).sum(dim=1).tolist()
    print(f"supervised tokens per row (first batch): {counts}", flush=True)
    return counts


def _remote_checkpoints(storage: StorageConfig, keep: int, run_id: str) -> RemoteCheckpoints | None:
    """The object-store checkpoint sync (keeping SFT_SAVE_TOTAL_LIMIT, `keep`), write-probed before any GPU time is
    spent (None without a URI).

    Every rank gets one (each node restores the checkpoint it resumes from); only rank 0 probes and uploads.
    """
    uri = storage.checkpoint_uri
    if not uri:
        return None

    remote = RemoteCheckpoints(uri, run_id, keep=keep, concurrency=storage.s3_concurrency)
    distributed.main_process_result(s3io.probe_write, remote.s3, remote.run_uri)
    return remote


def _check_publish_access(hub: HubConfig, export: ExportConfig) -> None:
    if hub.repo_id and distributed.is_main_process():
        log.info("Hub: push as %s to %s", check_push_access(hub.repo_id), hub.repo_id)
    export_repo = export.repo_id
    if export.enabled and export_repo and distributed.is_main_process():  # the export after training pushes
        log.info("Hub: merged model pushed as %s to %s", check_push_access(export_repo, "SFT_EXPORT_REPO_ID"),
                 export_repo)


def _preflight_summary(report: dict) -> dict:
    """What training_meta.json keeps of the preflight report: the policy and which rows were skipped."""
    return {"rows_checked": report["rows_checked"], "policy": report["policy"],
            "rows_skipped": {s["split"]: s["rows_skipped"] for s in report["splits"].values()},
            "skipped_row_ids": {s["split"]: s["skipped_row_ids"] for s in report["splits"].values()},
            "warnings_by_kind": report["warnings_by_kind"], "data_fingerprint": report.get("data_fingerprint"),
            "eval_overlap": {k: v for k, v in (report.get("eval_overlap") or {}).items() if k != "row_ids"} or None,
            "eval_holdout": report["holdout"]["eval_holdout"] if report.get("holdout") else None,
            # the columns each part of a row came from, the target's format and its class names (and their rows)
            "understood": report.get("understood")}


def _checked_datasets(cfg: JobConfig, dataset_path: str | None, processor) -> tuple[Any, Any, dict]:
    """Preflight on rank 0 (every row of both splits of the dataset at dataset_path, before any weight loads);
    other ranks apply its plan."""

    checked = None

    def scan() -> dict:
        nonlocal checked
        checked = run_preflight(cfg, dataset_path, processor)
        return {"plan": checked.plan, "summary": _preflight_summary(checked.report)}

    shared = distributed.main_process_result(scan)
    if checked is not None:
        return checked.train_dataset, checked.eval_dataset, shared["summary"]
    return (*apply_plan(cfg.data, dataset_path, cfg.train.seed, shared["plan"]), shared["summary"])


def prepare_run(cfg: JobConfig, timer: Timer) -> Prepared:
    """Everything up to a trainable model, in the order of the module docstring. The run keeps the config as
    configured; where its sources are read from (their local copies) is `Sources`, beside it."""

    started = time.monotonic()
    distributed.init_process_group()
    _seed_everything(cfg.train.seed)
    distributed.every_rank_ok(early.check_inputs, cfg, "run")  # paths and each node's output dir, before downloads
    _hub_access(cfg.model, cfg.data)
    with distributed.local_main_first():  # one download per node into the shared cache
        sources = localize(cfg)
        early.check_lora_targets(cfg.model, cfg.lora, sources.model_path)  # config.json on the meta device
        processor = early.load_processor_checked(cfg.model, cfg.image, sources.model_path)
    train_ds, eval_ds, preflight = _checked_datasets(cfg, sources.dataset_path, processor)
    run_id = distributed.main_process_result(_resolve_run_id, cfg, preflight)  # rank 0's disk decides
    log.info("data: %d train rows, %d eval rows from %s", len(train_ds), len(eval_ds), sources.dataset_path)
    remote = _remote_checkpoints(cfg.storage, cfg.train.save_total_limit, run_id)
    distributed.main_process_result(_check_publish_access, cfg.hub, cfg.export)
    paths = RunPaths(Path(cfg.train.output_dir)).create()
    collator, eval_collator = build_collators(cfg.data, cfg.train.max_length, processor)
    size = cfg.train.per_device_batch_size
    _check_supervised_tokens(collator, train_ds, size if isinstance(size, int) else micro_batch.DEFAULT_SIZE)
    label_set = training_label_set(cfg.data, cfg.eval, train_ds)
    check_gate_measurable(cfg.hub, cfg.data, label_set, eval_ds)
    timer.track("setup", started)
    return Prepared(cfg, sources, paths, run_id, remote, processor, train_ds, eval_ds, collator, eval_collator,
                    preflight, label_set)


def training_label_set(data: DataConfig, eval_cfg: EvalConfig, train_ds) -> LabelSet | None:
    """The label set (job.inputs.label_set), which SFT_EVAL_STEPS needs: without one it is exit 2 here, before any
    weight loads."""
    label_set = inputs.label_set(data, eval_cfg.mode, train_ds)
    if eval_cfg.steps is not None and label_set is None:
        raise DataError(
            "SFT_EVAL_STEPS scores the labels during training, and the training targets give no label set to score "
            f"('{data.label_field}' must be the first key of every target): unset SFT_EVAL_STEPS")
    return label_set


def check_gate_measurable(hub: HubConfig, data: DataConfig, label_set: LabelSet | None, eval_ds) -> None:
    """A gate on a scoring metric (SFT_PUSH_MIN_METRIC=roc_auc:...) that the post-eval cannot measure is exit 2 here,
    before any weights load, not a refusal (exit 4) after the whole training: without a label set there is no
    scoring, and with one gold label in the eval split ROC-AUC is undefined."""
    threshold = parse_min_metric(hub.min_metric)
    if threshold is None or threshold[0] not in SCORED_GATE_METRICS:
        return
    spec = f"SFT_PUSH_MIN_METRIC={hub.min_metric}"
    if label_set is None:
        raise DataError(f"{spec} needs scoring mode, and the training targets give no label set to score "
                        f"('{data.label_field}' must be the first key of every target): gate on macro_f1")
    golds = {gold_label(t, data.label_field) for t in eval_ds[data.target_key]}
    if len(golds) < 2:
        raise DataError(f"{spec}: the eval split has one gold label ({', '.join(sorted(golds))}), so ROC-AUC is "
                        "undefined: add rows of another label to the eval split, or gate on accuracy")


def start_tracking(p: Prepared):
    """The W&B run (rank 0 only; None elsewhere or when disabled), its config as training_meta.json stores it."""
    if not distributed.is_main_process():
        return None
    return tracking.init_wandb(p.run_id, redact(p.sources.config_record(p.cfg)), enabled=p.cfg.wandb.enabled,
                               output_dir=p.cfg.train.output_dir)

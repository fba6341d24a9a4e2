"""The checked inputs of `run`, `preflight`, `eval` and `export`: one set-up from a config to what a model is given.

The steps, each failing fast (exit 2) before a costlier one: the local paths and the output directory
(job.preflight.early.check_inputs) -> the s3:// and Hub sources mirrored (`Sources`, a value beside the config: each
later step takes its config section and, beside it, the local path from `Sources`) -> the processor -> every row of
the splits the command reads, preflighted (job/preflight/run.py) -> the training and eval collators -> the training
split's label set (what scoring mode scores, job/eval/score.py). `preflight`, `eval` and `export` take them in one
call (`prepare_inputs`); `run` takes the same steps across its ranks (job/train/prepare.py: each node mirrors once,
rank 0 preflights and the others apply its plan).

The types a run's steps share live here too: `RunPaths` (where a run writes), `Timer` and `Prepared` (everything
the run has before its model loads).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job.collators.qwen3_collator import Qwen3VisionSFTCollator, build_collators
from job.config.schema import JobConfig
from job.config.sections.data import DataConfig
from job.data.labels import label_column, with_verdicts
from job.data.loaders import load_train_dataset
from job.errors import DataError
from job.eval.score import LabelSet, resolve_mode
from job.preflight.early import Command, check_inputs, load_processor_checked
from job.preflight.run import PreflightResult, run_preflight
from job.storage.checkpoints import RemoteCheckpoints
from job.storage.sources import Sources, localize

log = logging.getLogger("job.inputs")


@dataclass(frozen=True)
class Inputs:
    """What `preflight`, `eval` and `export` read, checked. The config is not here: the command has it, as
    configured; where its sources are read from is `sources` (model_path, dataset_path)."""

    sources: Sources
    processor: Any
    preflight: PreflightResult
    collator: Qwen3VisionSFTCollator
    eval_collator: Qwen3VisionSFTCollator
    label_set: LabelSet | None


def label_set(data: DataConfig, eval_mode: str, train_ds) -> LabelSet | None:
    """The label set scoring mode scores, from the training targets (a column read: no image is decoded), with
    SFT_EVAL_MODE (`eval_mode`) resolved against it (exit 2 for `score` without one) before any weight loads."""
    found = LabelSet.from_targets(list(train_ds[data.target_key]), data.label_field)
    mode = resolve_mode(eval_mode, found)
    if found is not None:
        log.info("eval mode %s; labels (%s): %s", mode, found.scored, ", ".join(found.labels))
    return found


def _stored_label_set(cfg: JobConfig, sources: Sources) -> LabelSet | None:
    """`eval`: the training split's label set, when the source has one (SFT_EVAL_MODE=auto then generates only)."""
    try:
        train_ds = load_train_dataset(cfg.data, sources.dataset_path, cfg.train.seed)
    except DataError as exc:
        log.info("eval: no training split to take the label set from (%s)", str(exc).splitlines()[0])
        resolve_mode(cfg.eval.mode, None)
        return None
    # Not preflighted: a row without a valid label has no verdict, and the label set skips it.
    labels = label_column({"train": train_ds}, cfg.data, sources.dataset_path)
    return label_set(cfg.data, cfg.eval.mode, with_verdicts(train_ds, labels))


def prepare_inputs(cfg: JobConfig, command: Command, roles: tuple[str, ...] = ("train", "eval"),
                   report_name: str | None = None) -> Inputs:
    """The set-up of one process's command: the cheap checks, then `open_inputs`."""
    check_inputs(cfg, command)
    return open_inputs(cfg, command, roles, report_name)


def open_inputs(cfg: JobConfig, command: Command, roles: tuple[str, ...] = ("train", "eval"),
                report_name: str | None = None) -> Inputs:
    """Sources, processor, preflight of `roles`, collators and (`run`, `eval`) the label set, for a config that
    passed check_inputs (`export` checks first, and skips an up-to-date export before anything loads)."""
    sources = localize(cfg)
    loaded = load_processor_checked(cfg.model, cfg.image, sources.model_path)
    checked = run_preflight(cfg, sources.dataset_path, loaded, roles=roles,
                            **({"report_name": report_name} if report_name else {}))
    if "train" in roles:
        labels = label_set(cfg.data, cfg.eval.mode, checked.train_dataset) if command != "preflight" else None
    else:
        labels = _stored_label_set(cfg, sources) if command == "eval" else None
    collator, eval_collator = build_collators(cfg.data, cfg.train.max_length, loaded)
    return Inputs(sources, loaded, checked, collator, eval_collator, labels)


def skipped_rows(command: str, inputs: Inputs, report: Path) -> None:
    """Print the eval rows SFT_BAD_ROWS=skip dropped, naming the report that lists why."""
    skipped = inputs.preflight.report["splits"]["eval"]["skipped_row_ids"]
    if skipped:
        print(f"{command}: skipped {len(skipped)} bad row(s) (SFT_BAD_ROWS=skip, see {report}): "
              + ", ".join(skipped), flush=True)


def preflight_command(cfg: JobConfig) -> PreflightResult:
    """`qwen3-sft preflight`: every row of both splits, read from the same cache as `run` uses."""
    return prepare_inputs(cfg, "preflight").preflight


# -- the types a run's steps share ----------------------------------------------------------------------------------
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


@dataclass
class Prepared:
    """Everything the run needs before the model loads."""

    cfg: JobConfig  # as configured: the local copies of the sources are in sources (model_path, dataset_path)
    sources: Sources
    paths: RunPaths
    run_id: str
    remote: RemoteCheckpoints | None
    processor: Any
    train_ds: Any
    eval_ds: Any
    collator: Qwen3VisionSFTCollator
    eval_collator: Qwen3VisionSFTCollator
    preflight: dict
    label_set: LabelSet | None = None  # the training split's labels and their scored answers (job/eval/score.py)

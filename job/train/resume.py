"""Safe re-runs: what a checkpoint was trained with, and whether this run may continue it.

Every checkpoint carries `resume_fingerprint.json`: the settings that shape training, the content fingerprint of the
data (rows and image bytes, per split, from preflight) and the run id. A run that finds a COMPLETED checkpoint
compares it with its own before any model loads; a difference is `ResumeDrift` (exit 2) listing each change as
`old -> new`. Settings that cannot change the trained weights (logging, eval batch size and generation length,
output paths, secrets, W&B, Hub repo and gate, preemption budget, dataloader workers, save cadence) are not in it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from job import outputs
from job.config.schema import JobConfig
from job.errors import ResumeDrift
from job.storage.completed import latest_completed_checkpoint

log = logging.getLogger("job.train")

FINGERPRINT_FILE = "resume_fingerprint.json"
FINGERPRINT_VERSION = 1
RESUME_MODES = ("auto", "never", "require")

# Env name -> where the flow reads it (in the config as configured: SFT_MODEL_ID as set, not its local mirror).
# Each of these changes the weights a step produces, the order of the rows or
# which rows there are; the pre-eval metrics stored in a checkpoint depend on the model and eval rows, covered here.
TRAINING_SETTINGS: tuple[tuple[str, Callable[[JobConfig], Any]], ...] = (
    ("SFT_MODEL_ID", lambda c: c.model.id),
    ("SFT_MODEL_REVISION", lambda c: c.model.revision),
    ("SFT_LOAD_IN_4BIT", lambda c: c.model.load_in_4bit),
    ("SFT_ATTN_IMPLEMENTATION", lambda c: c.model.attn_implementation),
    ("SFT_GRADIENT_CHECKPOINTING", lambda c: c.model.gradient_checkpointing),
    ("SFT_USE_LIGER", lambda c: c.model.use_liger),
    ("SFT_DATASET_REVISION", lambda c: c.data.revision),
    ("SFT_DATASET_CONFIG", lambda c: c.data.config),
    ("SFT_TRAIN_SPLIT", lambda c: c.data.train_split),
    ("SFT_EVAL_SPLIT", lambda c: c.data.eval_split),
    ("SFT_TRAIN_SUBSET", lambda c: c.data.train_subset),
    ("SFT_EVAL_SUBSET", lambda c: c.data.eval_subset),
    ("SFT_IMAGE_KEY", lambda c: c.data.image_key),
    ("SFT_QUERY_KEY", lambda c: c.data.query_key),
    ("SFT_CAPTION_KEY", lambda c: c.data.caption_key),
    ("SFT_TARGET_KEY", lambda c: c.data.target_key),
    ("SFT_LABEL_FIELD", lambda c: c.data.label_field),
    ("SFT_SYSTEM_PROMPT", lambda c: c.data.system_prompt),
    # What the answer is made of (a label column's verdicts, their names) and the question every row is asked.
    ("SFT_TARGET_FORMAT", lambda c: c.data.target_format),
    ("SFT_LABEL_NAMES", lambda c: list(c.data.label_names) if c.data.label_names is not None else None),
    ("SFT_QUERY_TEXT", lambda c: c.data.query_text),
    ("SFT_IMAGE_MIN_PIXELS", lambda c: c.image.min_pixels),
    ("SFT_IMAGE_MAX_PIXELS", lambda c: c.image.max_pixels),
    ("SFT_SEED", lambda c: c.train.seed),
    ("SFT_MAX_STEPS", lambda c: c.train.max_steps),
    # Ignored by the Trainer when SFT_MAX_STEPS > 0, so it only counts then.
    ("SFT_NUM_EPOCHS", lambda c: c.train.num_epochs if c.train.max_steps <= 0 else None),
    ("SFT_LEARNING_RATE", lambda c: c.train.learning_rate),
    ("SFT_LR_SCHEDULER_TYPE", lambda c: c.train.lr_scheduler_type),
    ("SFT_WARMUP_RATIO", lambda c: c.train.warmup_ratio),
    ("SFT_WEIGHT_DECAY", lambda c: c.train.weight_decay),
    ("SFT_MAX_GRAD_NORM", lambda c: c.train.max_grad_norm),
    ("SFT_PER_DEVICE_BATCH_SIZE", lambda c: c.train.per_device_batch_size),
    ("SFT_GRAD_ACCUM", lambda c: c.train.grad_accum),
    ("SFT_MAX_LENGTH", lambda c: c.train.max_length),
    ("SFT_GROUP_BY_LENGTH", lambda c: c.train.group_by_length),
    ("SFT_LORA_R", lambda c: c.lora.r),
    ("SFT_LORA_ALPHA", lambda c: c.lora.alpha),
    ("SFT_LORA_DROPOUT", lambda c: c.lora.dropout),
    ("SFT_LORA_TARGET_MODULES", lambda c: ",".join(c.lora.target_modules)),
    # The global batch is per-device batch x accumulation x processes.
    ("WORLD_SIZE", lambda c: int(os.environ.get("WORLD_SIZE", "1"))),
    # Not the weights, but the best-so-far a checkpoint carries (job/train/best.py): which steps were scored, on which
    # rows, by which metric. Changing them mid-run would compare evals that are not comparable.
    ("SFT_EVAL_STEPS", lambda c: c.eval.steps),
    ("SFT_EVAL_DURING_TRAIN_ROWS", lambda c: c.eval.during_train_rows if c.eval.steps is not None else None),
    ("SFT_BEST_METRIC", lambda c: c.eval.best_metric if c.eval.steps is not None else None),
)
# Settings recorded since a later version, with the value that a checkpoint written before then was trained with:
# such a checkpoint resumes without drift when the setting still has that value.
RECORDED_SINCE: dict[str, Any] = {"SFT_EVAL_STEPS": None, "SFT_EVAL_DURING_TRAIN_ROWS": None, "SFT_BEST_METRIC": None,
                                  "SFT_TARGET_FORMAT": "json", "SFT_LABEL_NAMES": None, "SFT_QUERY_TEXT": None}


@dataclass(frozen=True)
class Fingerprint:
    run_id: str
    settings: dict[str, Any]
    data: dict[str, str]  # split role -> content fingerprint (rows and image bytes)
    dataset_uri: str | None  # informative only: the same content under another path is not drift

    @classmethod
    def of(cls, cfg: JobConfig, run_id: str, data: dict[str, str]) -> Fingerprint:
        """The fingerprint of a run of cfg (as configured: SFT_DATASET_URI as the user set it) on data."""
        settings = {name: get(cfg) for name, get in TRAINING_SETTINGS}
        # Stored as JSON: compare what the file will hold (tuples become lists, ints stay ints).
        settings = json.loads(json.dumps(settings, default=str))
        return cls(run_id, settings, dict(data), cfg.data.uri)

    def to_json(self) -> dict:
        return {"version": FINGERPRINT_VERSION, "run_id": self.run_id, "settings": self.settings, "data": self.data,
                "dataset_uri": self.dataset_uri}

    def digest(self) -> str:
        """sha256 of what changes_since compares (not dataset_uri): what the outputs' stamps carry (job/outputs.py)."""
        compared = {k: v for k, v in self.to_json().items() if k != "dataset_uri"}
        return hashlib.sha256(json.dumps(compared, sort_keys=True).encode()).hexdigest()

    @classmethod
    def read(cls, checkpoint: Path) -> Fingerprint | None:
        path = checkpoint / FINGERPRINT_FILE
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        return cls(raw["run_id"], raw["settings"], raw["data"], raw.get("dataset_uri"))

    def changes_since(self, stored: Fingerprint) -> list[str]:
        """Every difference, as `NAME: old -> new`."""
        changes = []
        if stored.run_id != self.run_id:
            changes.append(f"SFT_RUN_ID: {stored.run_id} -> {self.run_id}")
        for name in [n for n, _ in TRAINING_SETTINGS] + sorted(
            set(stored.settings) - {n for n, _ in TRAINING_SETTINGS}
        ):
            missing = RECORDED_SINCE.get(name, "<not recorded>")
            old, new = stored.settings.get(name, missing), self.settings.get(name, "<not recorded>")
            if old != new:
                changes.append(f"{name}: {_show(old)} -> {_show(new)}")
        for role in sorted(set(stored.data) | set(self.data)):
            old, new = stored.data.get(role), self.data.get(role)
            if old != new:
                where = f" (SFT_DATASET_URI {stored.dataset_uri} -> {self.dataset_uri})" \
                    if stored.dataset_uri != self.dataset_uri else ""
                changes.append(f"data ({role} split rows and images){where}: sha256 {str(old)[:12]} -> {str(new)[:12]}")
        return changes


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


MICRO_BATCH_KEY = "micro_batch"  # SFT_PER_DEVICE_BATCH_SIZE=auto: what the search chose (job/train/micro_batch.py)


def record_micro_batch(root: Path, record: dict) -> None:
    """Add the micro-batch `auto` chose to the run's fingerprint file, which every checkpoint carries: a resumed run
    trains with it again. Not compared for drift (the run being resumed has not searched yet when it compares)."""
    path = root / FINGERPRINT_FILE
    outputs.write_json(path, {**json.loads(path.read_text()), MICRO_BATCH_KEY: record})


def recorded_micro_batch(checkpoint: Path) -> dict | None:
    """The micro-batch record of a checkpoint's fingerprint file (None: none recorded, a hand-set batch)."""
    path = checkpoint / FINGERPRINT_FILE
    return json.loads(path.read_text()).get(MICRO_BATCH_KEY) if path.is_file() else None


@dataclass(frozen=True)
class Progress:
    """How far a checkpoint got: its global step and the Trainer's planned max_steps (also set for epoch runs)."""

    step: int
    max_steps: int

    @property
    def finished(self) -> bool:
        return self.max_steps > 0 and self.step >= self.max_steps

    @classmethod
    def read(cls, checkpoint: Path) -> Progress:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        return cls(int(state["global_step"]), int(state.get("max_steps") or 0))


def derived_run_id(cfg: JobConfig, data: dict[str, str]) -> str:
    """`qwen3-sft-<12 hex>`: a digest of what the resume fingerprint compares, the training settings and the data's
    content fingerprint (so the run id is not itself part of it)."""
    fingerprint = Fingerprint.of(cfg, "", data)
    content = json.dumps({"settings": fingerprint.settings, "data": fingerprint.data}, sort_keys=True)
    return f"qwen3-sft-{hashlib.sha256(content.encode()).hexdigest()[:12]}"


def stored_run_id(checkpoints: Path) -> str | None:
    """The run id recorded in the newest COMPLETED checkpoint (SFT_RUN_ID unset: a rerun continues that run)."""
    latest, _ = latest_completed_checkpoint(checkpoints)
    stored = Fingerprint.read(latest) if latest is not None else None
    return stored.run_id if stored is not None else None


def check_resumable(checkpoint: Path, current: Fingerprint) -> None:
    """Raise ResumeDrift when the checkpoint was made with other settings/data/run id; warn if it predates this."""
    stored = Fingerprint.read(checkpoint)
    if stored is None:
        log.warning("%s has no %s (written by an older version): cannot check it for changed settings",
                    checkpoint.name, FINGERPRINT_FILE)
        return
    changes = current.changes_since(stored)
    if changes:
        raise ResumeDrift(checkpoint, changes)


REPLACED = "replaced-"  # SFT_RESUME=never: `replaced-<time>/` in SFT_OUTPUT_DIR holds the previous run's outputs
# Written by this process before the resume decision: this run's, not the previous run's.
KEPT_BY_NEVER = ("preflight_report.json",)
LAUNCH_FILE = "resume_launch.json"  # SFT_RESUME=never: the launch (SFT_LAUNCH_ID) whose first pod started this run


def move_aside(root: Path) -> Path | None:
    """SFT_RESUME=never: move every output of the previous run in root (checkpoints, adapter, metrics, eval, best,
    report, stamps, merged, W&B files, ...) into `root/replaced-<time>/`, kept, not deleted; None when there was
    nothing. Left in place: this run's preflight report and the folders earlier starts moved aside."""
    if not root.is_dir():
        return None
    old = [p for p in sorted(root.iterdir()) if p.name not in KEPT_BY_NEVER and not p.name.startswith(REPLACED)
           and not (p.is_dir() and not any(p.rglob("*")))]
    if not old:
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    target = root / f"{REPLACED}{stamp}"
    target.mkdir()
    for path in old:
        shutil.move(str(path), str(target / path.name))
    log.warning("SFT_RESUME=never: moved the previous run's outputs aside to %s (%s)", target,
                ", ".join(p.name for p in old))
    return target


def continues_launch(launch_id: str | None, recorded: list[str | None]) -> bool:
    """SFT_RESUME=never: whether this start is a retry of the launch that started the run (so it continues it, as
    auto does) rather than a new start (which moves the old outputs aside). recorded: the launch ids LAUNCH_FILE
    holds locally and in the store (None where there is none). Without SFT_LAUNCH_ID every start is a new one."""
    return launch_id is not None and launch_id in recorded


def recorded_launch(text: str | None) -> str | None:
    """The launch id a LAUNCH_FILE's text records (None for no file or another form)."""
    try:
        return json.loads(text).get("launch_id") if text else None
    except (ValueError, AttributeError):
        return None

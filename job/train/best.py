"""SFT_EVAL_STEPS: score a fixed eval subset during training and keep the best step's adapter.

Every SFT_EVAL_STEPS optimizer steps, and at the last step, SFT_EVAL_DURING_TRAIN_ROWS eval rows (stratified by label,
during_train_subset) are scored in scoring mode (job/eval/score.py: each label's probability, no generation).
SFT_BEST_METRIC (default macro_f1 of the argmax labels; log_loss and ece are lower-is-better) picks the best step; a
tie keeps the lower log-loss, then the earlier step. The best step's adapter and `best.json` (the metric, the step,
every eval so far) live in `$SFT_OUTPUT_DIR/best/`, which is copied into every checkpoint before it is marked
COMPLETED (and uploaded), so a resume, also on a fresh pod, restores the best-so-far of the step it continues from.
After training the best adapter is loaded into the model: the post-eval, the save, the gate and the push all see it.

An eval step that a preemption skipped (a SIGTERM at that very step leaves no time for it) is scored when the run
resumes from that step's checkpoint: the weights are the same, so the result is too.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from job import outputs
from job.config.schema import JobConfig
from job.config.sections.data import DataConfig
from job.config.sections.eval import EvalConfig
from job.eval.generate import compute_metrics, gold_label, score_labels
from job.eval.metrics import probability_metrics, stratified_rows
from job.eval.score import LabelSet, argmax_labels
from job.metric_table import BEST_METRICS, LOWER_IS_BETTER
from job.train import distributed
from job.train.preemption import PreemptionGuard
from job.utils import tracking

log = logging.getLogger("job.train")

BEST_DIR = "best"
BEST_FILE = "best.json"


@dataclass
class BestState:
    """What `best.json` holds: the metric, the best step and its value, and every eval during training."""

    metric: str
    eval_steps: int
    rows: int
    step: int | None = None
    value: float | None = None
    history: list[dict] = field(default_factory=list)

    def _key(self, entry: dict) -> tuple[float, float]:
        """Larger is better: the metric (negated when lower is better), then minus the log-loss."""
        value, loss = entry.get(self.metric), entry.get("log_loss")
        primary = float("-inf") if value is None else (-value if self.metric in LOWER_IS_BETTER else value)
        return primary, float("-inf") if loss is None else -loss

    def add(self, entry: dict) -> bool:
        """Record one eval; True when it is the new best (strictly better: a full tie keeps the earlier step)."""
        self.history.append(entry)
        best = next((e for e in self.history if e["step"] == self.step), None)
        if best is not None and self._key(entry) <= self._key(best):
            return False
        self.step, self.value = entry["step"], entry.get(self.metric)
        return True

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def read(cls, directory: Path) -> BestState | None:
        path = directory / BEST_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None


def restore(root: Path, checkpoint: str | None) -> BestState | None:
    """Make `root/best` the best-so-far of the checkpoint being continued (none for a fresh start): a leftover of a
    later step, of an interrupted process, must not stand in for it. Returns what it holds (on global rank 0: the
    other ranks get it broadcast, they never read their own disk)."""
    best = root / BEST_DIR
    shutil.rmtree(best, ignore_errors=True)
    stored = Path(checkpoint) / BEST_DIR if checkpoint else None
    if stored is not None and stored.is_dir():
        shutil.copytree(stored, best)
        log.info("resume: the best step so far is %s (from %s)", (BestState.read(best) or BestState("", 0, 0)).step,
                 Path(checkpoint or "").name)
    return BestState.read(best)


def best_adapter(directory: Path) -> Path | None:
    """The best step's adapter weights under `directory` (a run root or a checkpoint), if there are any."""
    path = directory / BEST_DIR / "adapter" / "adapter_model.safetensors"
    return path if path.is_file() else None


def load_best_adapter(model, root: Path) -> BestState | None:
    """Put the best step's LoRA weights into the model (saved from these fp32 parameters: an exact copy)."""
    from peft import set_peft_model_state_dict  # imported where a model is built, as in the rest of the job
    from safetensors.torch import load_file

    state, weights = BestState.read(root / BEST_DIR), best_adapter(root)
    if state is None or weights is None:
        return None
    set_peft_model_state_dict(model, load_file(str(weights)))
    log.info("best step: %s (%s=%.4g); its adapter is loaded for the post-eval, the save and the push",
             state.step, state.metric, state.value if state.value is not None else float("nan"))
    return state


def during_train_subset(data: DataConfig, eval_cfg: EvalConfig, eval_ds):
    """The SFT_EVAL_DURING_TRAIN_ROWS eval rows that every eval during training scores, the same in every process
    (resume included): stratified by gold label, so that a file sorted by label still gives every label its rows
    (the colour test's eval file, red 5 then blue 3, green 2, yellow 1, purple 1: its first 8 rows held no green,
    yellow or purple, and macro-F1 over them ignored three labels of five)."""
    golds = [gold_label(t, data.label_field) for t in eval_ds[data.target_key]]
    chosen = stratified_rows(golds, eval_cfg.during_train_rows)
    counts: dict[str, int] = {}
    for i in chosen:
        counts[golds[i]] = counts.get(golds[i], 0) + 1
    if distributed.is_main_process():  # the rank that scores them
        log.info("eval during training: %d of %d eval rows, every %d steps (%s)", len(chosen), len(golds),
                 eval_cfg.steps, ", ".join(f"{label} {k}" for label, k in counts.items()))
    return eval_ds.select(chosen)


@dataclass(frozen=True)
class DuringTrainEval:
    """What the callback scores with: the fixed eval subset, its collator, the label set and the run's root, and the
    best-so-far of the checkpoint being continued (rank 0's, broadcast: the same history on every rank)."""

    cfg: JobConfig
    eval_ds: Any
    eval_collator: Any
    label_set: LabelSet
    root: Path
    run: Any = None
    restored: BestState | None = None


class BestCheckpointCallback(TrainerCallback):
    """Scores the eval subset every SFT_EVAL_STEPS steps (rank 0; the other ranks wait) and keeps the best step.

    Whether a step evaluates depends only on the step and on the history every rank got from rank 0 (at the start,
    and after each eval): every rank enters the eval's collective at the same step, whatever its node's disk holds.
    """

    def __init__(self, setup: DuringTrainEval, guard: PreemptionGuard):
        self.setup, self.guard = setup, guard
        ev = setup.cfg.eval
        self.every = int(ev.steps or 0)
        self.state = setup.restored or BestState(ev.best_metric, self.every, len(setup.eval_ds))
        self._first_step = True

    def _due(self, step: int, max_steps: int) -> bool:
        return step > 0 and (step % self.every == 0 or step == max_steps)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        # The first step of a resumed run: the eval of the checkpoint's own step, if a preemption skipped it.
        if self._first_step:
            self._first_step = False
            step = state.global_step
            if self._due(step, state.max_steps) and all(e["step"] != step for e in self.state.history):
                self._evaluate(step, model)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self._due(state.global_step, state.max_steps):
            return control
        # The same answer on every rank (rank 0 alone scores, inside a collective): a preemption's save comes first.
        if distributed.any_rank(self.guard.requested, args.device):
            log.warning("eval at step %d skipped: preempted (a resume from this step scores it)", state.global_step)
            return control
        self._evaluate(state.global_step, model)
        return control

    def _evaluate(self, step: int, model) -> None:
        self.state = distributed.main_process_result(self._score_and_keep, step, model)

    def _score_and_keep(self, step: int, model) -> BestState:
        s = self.setup
        # Scoring draws no random numbers, but a fork keeps the training RNG streams (dropout) untouched regardless.
        with torch.random.fork_rng(devices=[]):
            probs = score_labels(model, s.eval_ds, s.eval_collator, s.label_set, s.cfg.eval.batch_size)
        labels = argmax_labels(s.label_set, probs)
        scored = compute_metrics([s.label_set.prediction_text(label) for label in labels],
                                 list(s.eval_ds[s.cfg.data.target_key]), s.cfg.data.label_field)
        scored.update(probability_metrics(s.label_set.labels, probs.tolist(),
                                          [r["gold_label"] for r in scored["predictions"]], None))
        entry = {"step": step, **{k: scored.get(k) for k in BEST_METRICS}}
        improved = self.state.add(entry)
        best_dir = s.root / BEST_DIR
        if improved:
            model.save_pretrained(best_dir / "adapter")
        outputs.write_json(best_dir / BEST_FILE, self.state.to_json())
        tracking.log_metrics(s.run, "train_eval/", {**entry, "best_step": self.state.step})
        shown = " ".join(f"{k}={v:.4g}" for k, v in entry.items() if k != "step" and isinstance(v, (int, float)))
        log.info("eval at step %d on %d rows: %s; best %s=%.4g at step %s%s", step, len(s.eval_ds), shown,
                 self.state.metric, self.state.value if self.state.value is not None else float("nan"),
                 self.state.step, " (new best)" if improved else "")
        return self.state

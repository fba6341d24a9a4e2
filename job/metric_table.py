"""The metrics an eval reports: each one's name, direction, the SFT_EVAL_MODE values that measure it, and what may use
it. The one table that the settings (SFT_PUSH_MIN_METRIC, SFT_BEST_METRIC and their cross-field rules), the gate, the
best checkpoint, the plots and the reports (model card, export report, `python -m job.demo.report`) derive from.

Job code only: no torch, so job.config reads it at `qwen3-sft config` speed. The values are computed by
job/eval/generate.py (the generated verdicts) and job/eval/metrics.py (the label probabilities of scoring mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

# The SFT_EVAL_MODE values whose eval generates a verdict, and those that score the label set (auto is both when the
# training split gives a label set, else generate: job/eval/score.py).
GENERATE = frozenset({"generate", "both", "auto"})
SCORE = frozenset({"score", "both", "auto"})
EVAL_MODES = ("auto", "both", "generate", "score")


@dataclass(frozen=True)
class Metric:
    name: str  # the key in eval/*_metrics.json and metrics.json
    label: str  # as the plots write it
    higher_is_better: bool
    modes: frozenset[str]  # the SFT_EVAL_MODE values whose eval measures it
    gateable: bool = False  # SFT_PUSH_MIN_METRIC may gate on it (a post-eval value in [0, 1], higher is better)
    best: bool = False  # SFT_BEST_METRIC may pick the best step with it (the eval during training scores)
    unit: bool = True  # a value in [0, 1] (the plots share one axis for these)
    core: bool = False  # a row of every report, "-" when not measured; the others are shown when measured
    on_card: bool = True  # in the model card's table and its YAML eval results (when measured)


METRICS: tuple[Metric, ...] = (
    Metric("accuracy", "accuracy", True, GENERATE | SCORE, gateable=True, best=True, core=True),
    Metric("macro_f1", "macro-F1", True, GENERATE | SCORE, gateable=True, best=True, core=True),
    Metric("json_parse_rate", "JSON parse rate", True, GENERATE, gateable=True, core=True),
    Metric("exact_match", "exact match", True, GENERATE, gateable=True, core=True),
    Metric("weighted_f1", "weighted F1", True, GENERATE | SCORE, gateable=True, best=True),
    Metric("roc_auc", "ROC AUC", True, SCORE, gateable=True, best=True),  # needs the label probabilities
    Metric("log_loss", "log-loss", False, SCORE, best=True, unit=False),
    Metric("ece", "ECE", False, SCORE, best=True),
    Metric("score_accuracy", "score accuracy", True, SCORE, on_card=False),  # the argmax label's accuracy
    Metric("score_agreement", "score agreement", True, GENERATE & SCORE),  # argmax label = generated label
)
BY_NAME = {m.name: m for m in METRICS}

# The metric used when none is named: SFT_BEST_METRIC's default and the improvement gate's (SFT_PUSH_MIN_METRIC
# unset, SFT_PUSH_REQUIRE_IMPROVEMENT=true).
PRIMARY = "macro_f1"
GATE_METRICS = tuple(m.name for m in METRICS if m.gateable)  # what SFT_PUSH_MIN_METRIC may name
# The gate metrics only scoring measures (roc_auc): under SFT_EVAL_MODE=auto they need a label set, known only once
# the training split is read (job/train/prepare.py checks it before any weights load).
SCORED_GATE_METRICS = tuple(m.name for m in METRICS if m.gateable and "generate" not in m.modes)
BEST_METRICS = (PRIMARY, *(m.name for m in METRICS if m.best and m.name != PRIMARY))  # SFT_BEST_METRIC's choices
LOWER_IS_BETTER = frozenset(m.name for m in METRICS if not m.higher_is_better)
CORE_METRICS = tuple(m.name for m in METRICS if m.core)
REPORTED_WHEN_MEASURED = tuple(m.name for m in METRICS if not m.core)
CARD_WHEN_MEASURED = tuple(m.name for m in METRICS if not m.core and m.on_card)
EVAL_MODE_METRICS = {mode: tuple(m.name for m in METRICS if mode in m.modes) for mode in EVAL_MODES}

if TYPE_CHECKING:
    BestMetric = str
else:  # pydantic validates SFT_BEST_METRIC against these values, in this order (the default first)
    BestMetric = Literal[BEST_METRICS]

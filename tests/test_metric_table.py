"""job/metric_table.py: the one metric table, and what each user of it reads off it (README: Settings, Evaluation)."""

from __future__ import annotations

import typing

from job import metric_table as table
from job.config import schema


def test_the_gate_and_the_best_step_take_the_readmes_metrics():
    assert table.GATE_METRICS == ("accuracy", "macro_f1", "json_parse_rate", "exact_match", "weighted_f1", "roc_auc")
    assert table.BEST_METRICS == ("macro_f1", "accuracy", "weighted_f1", "roc_auc", "log_loss", "ece")
    assert typing.get_args(schema.Settings.model_fields["best_metric"].annotation) == table.BEST_METRICS
    assert schema.Settings.model_fields["best_metric"].default == "macro_f1"
    assert frozenset({"log_loss", "ece"}) == table.LOWER_IS_BETTER
    assert table.SCORED_GATE_METRICS == ("roc_auc",)  # needs a label set under SFT_EVAL_MODE=auto


def test_each_eval_mode_measures_what_the_readme_says():
    verdict, scored = {"json_parse_rate", "exact_match"}, {"roc_auc", "log_loss", "ece", "score_accuracy"}
    labels = {"accuracy", "macro_f1", "weighted_f1"}
    assert set(table.EVAL_MODE_METRICS["generate"]) == labels | verdict
    assert set(table.EVAL_MODE_METRICS["score"]) == labels | scored
    for mode in ("both", "auto"):
        assert set(table.EVAL_MODE_METRICS[mode]) == labels | verdict | scored | {"score_agreement"}


def test_the_reports_show_the_core_rows_always_and_the_rest_when_measured():
    assert table.CORE_METRICS == ("accuracy", "macro_f1", "json_parse_rate", "exact_match")
    assert table.REPORTED_WHEN_MEASURED == ("weighted_f1", "roc_auc", "log_loss", "ece", "score_accuracy",
                                            "score_agreement")
    assert table.CARD_WHEN_MEASURED == ("weighted_f1", "roc_auc", "log_loss", "ece", "score_agreement")

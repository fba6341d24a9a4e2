"""job/eval/metrics.py: the scoring-mode metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from job.eval.metrics import calibration, probability_metrics, roc_auc, stratified_rows


def test_binary_auc_counts_ordered_pairs_and_ties_half():
    # positives (gold "b") score 0.9, 0.4; negatives 0.4, 0.1: pairs (0.9>0.4), (0.9>0.1), (0.4=0.4: half), (0.4>0.1)
    probs = [[0.1, 0.9], [0.6, 0.4], [0.6, 0.4], [0.9, 0.1]]
    assert roc_auc(probs, ["b", "b", "a", "a"], ("a", "b")) == pytest.approx(3.5 / 4)
    assert roc_auc(probs, ["b"] * 4, ("a", "b")) is None  # one class only: undefined, not 0.5


def test_multiclass_auc_is_the_macro_one_vs_rest_mean_over_labels_with_both_classes():
    labels = ("a", "b", "c")
    probs = [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2]]
    golds = ["a", "b", "a"]  # "c" has no positive row: left out of the mean
    auc_a = 1.0  # a-scores of the a rows (0.8, 0.5) both beat the b row's 0.2
    auc_b = 1.0  # the b row's 0.7 beats 0.1 and 0.3
    assert roc_auc(probs, golds, labels) == pytest.approx((auc_a + auc_b) / 2)


def test_ece_is_the_row_weighted_gap_between_confidence_and_accuracy():
    ece, bins = calibration([0.95, 0.95, 0.55, 0.55], [True, False, True, True])
    # bin [0.9, 1.0]: confidence 0.95, accuracy 0.5 -> 0.45 x 2/4; bin [0.5, 0.6): 0.55 vs 1.0 -> 0.45 x 2/4
    assert ece == pytest.approx(0.45)
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 0, 2, 0, 0, 0, 2]
    assert bins[0]["confidence"] is None and bins[9]["accuracy"] == 0.5
    assert calibration([1.0], [True])[1][-1]["count"] == 1  # a probability of exactly 1 is in the last bin


def test_probability_metrics_on_a_majority_class_model():
    """The issue's failure, in probabilities: every row leans to "red"."""
    labels = ("blue", "red")
    probs = [[0.3, 0.7]] * 3 + [[0.4, 0.6]]
    golds = ["red", "red", "red", "blue"]
    generated = ["red", None, "blue", "red"]
    m = probability_metrics(labels, probs, golds, generated)
    assert m["score_accuracy"] == 0.75 and m["score_macro_f1"] == pytest.approx((0 + 2 * 3 / 7) / 2)
    assert m["log_loss"] == pytest.approx(-(3 * math.log(0.7) + math.log(0.4)) / 4)
    assert m["score_agreement"] == pytest.approx(2 / 3)  # rows 0, 2, 3 parsed; argmax red agrees on 0 and 3
    assert m["roc_auc"] == pytest.approx(1.0)  # red's 0.7 beats the blue row's 0.6 every time: ranking is right
    assert m["score_rows"] == 4
    assert probability_metrics(labels, probs, ["red", "red", "red", "green"], None)["score_rows"] == 3


def test_the_during_train_subset_keeps_every_label_and_otherwise_each_share():
    sorted_file = ["red"] * 5 + ["blue"] * 3 + ["green"] * 2 + ["yellow", "purple"]  # the colour test's eval file
    picked = stratified_rows(sorted_file, 8)
    assert [sorted_file[i] for i in picked] == ["red"] * 3 + ["blue"] * 2 + ["green", "yellow", "purple"]
    assert stratified_rows(sorted_file, 3) == [0, 5, 8]  # fewer rows than labels: the most frequent labels
    assert stratified_rows(sorted_file, 12) == list(range(12)) and stratified_rows(sorted_file, 50) == list(range(12))
    # Shares: 900 "a" and 100 "b" rows interleaved give 90 and 10 of 100, each label's first rows.
    mixed = ["b" if i % 10 == 3 else "a" for i in range(1000)]
    chosen = stratified_rows(mixed, 100)
    assert len(chosen) == len(set(chosen)) == 100 and chosen == sorted(chosen)
    assert [mixed[i] for i in chosen].count("b") == 10 and chosen[:3] == [0, 1, 2]
    assert [i for i in chosen if mixed[i] == "b"] == list(range(3, 100, 10))

"""Classification metrics of one eval, pure functions of the gold and predicted labels (and label probabilities).

Generation's (job/eval/generate.py) and scoring's (job/eval/score.py) metrics are both computed here, so a label is
counted the same way by both. A prediction that did not parse is `INVALID`: wrong for every class.
"""

from __future__ import annotations

import math
from typing import Any

INVALID = "<invalid>"
ECE_BINS = 10


def _f1(tp: int, fp: int, fn: int) -> float:
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def macro_f1(golds: list[str], preds: list[str]) -> float:
    """Macro F1 over the gold label set; an unparseable prediction is simply wrong for every class."""
    classes = sorted(set(golds))
    if not classes:
        return 0.0
    scores = []
    for label in classes:
        tp = sum(g == label and p == label for g, p in zip(golds, preds, strict=True))
        fp = sum(g != label and p == label for g, p in zip(golds, preds, strict=True))
        fn = sum(g == label and p != label for g, p in zip(golds, preds, strict=True))
        scores.append(_f1(tp, fp, fn))
    return sum(scores) / len(scores)


def stratified_rows(golds: list[str], n: int) -> list[int]:
    """The indices, in order, of n rows that keep every label while n allows and otherwise each label's share.

    Deterministic, no RNG: every label first gets one row (the most frequent labels first when n is smaller than
    the label count), then each next row goes to the label furthest below its share n * count / len(golds) (ties:
    the more frequent, then the first seen); a label's rows are taken in order. On a file sorted by label, the first
    n rows would hold only the first labels:

    >>> stratified_rows(["a"] * 6 + ["b"] * 3 + ["c"], 4)
    [0, 1, 6, 9]
    """
    if n >= len(golds):
        return list(range(len(golds)))
    rows: dict[str, list[int]] = {}
    for i, label in enumerate(golds):
        rows.setdefault(label, []).append(i)
    order = sorted(rows, key=lambda label: -len(rows[label]))  # stable: equal counts keep first-seen order
    taken = dict.fromkeys(order, 0)
    for _ in range(n):
        open_ = [label for label in order if taken[label] < len(rows[label])]
        unseen = [label for label in open_ if taken[label] == 0]
        pick = unseen[0] if unseen else max(open_, key=lambda label: n * len(rows[label]) / len(golds) - taken[label])
        taken[pick] += 1
    return sorted(i for label in order for i in rows[label][: taken[label]])


def per_class_report(golds: list[str], preds: list[str]) -> dict[str, Any]:
    """Per-label precision, recall, F1 and support, the support-weighted F1 and the confusion matrix.

    The labels are the gold labels, then any other label the model answered, sorted; the matrix has one row per
    label (gold) and one column per label plus "unparsed" (no JSON object, or no label field):

    >>> per_class_report(["a", "a", "b"], ["a", INVALID, "a"])["confusion_matrix"]
    {'labels': ['a', 'b'], 'columns': ['a', 'b', 'unparsed'], 'matrix': [[1, 0, 1], [1, 0, 0]]}
    """
    labels = sorted(set(golds) | {p for p in preds if p != INVALID})
    column = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * (len(labels) + 1) for _ in labels]
    for gold, pred in zip(golds, preds, strict=True):
        matrix[column[gold]][column.get(pred, len(labels))] += 1
    per_class = {}
    for i, label in enumerate(labels):
        tp, support = matrix[i][i], sum(matrix[i])
        predicted = sum(row[i] for row in matrix)
        per_class[label] = {"precision": tp / predicted if predicted else 0.0,
                            "recall": tp / support if support else 0.0,
                            "f1": _f1(tp, predicted - tp, support - tp), "support": support}
    total = sum(c["support"] for c in per_class.values())
    weighted = sum(c["f1"] * c["support"] for c in per_class.values()) / total if total else 0.0
    return {"per_class": per_class, "weighted_f1": weighted,
            "confusion_matrix": {"labels": labels, "columns": [*labels, "unparsed"], "matrix": matrix}}


# -- probabilities (scoring mode) -------------------------------------------------------------------------------
def _auc(scores: list[float], positive: list[bool]) -> float | None:
    """Mann-Whitney ROC-AUC, ties counted half; None without both classes."""
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    if not pos or not neg:
        return None
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def roc_auc(probs: list[list[float]], golds: list[str], labels: tuple[str, ...]) -> float | None:
    """Binary: the AUC of the second label's probability. More labels: the macro one-vs-rest mean over the labels
    that have both positive and negative eval rows. None when no label does."""
    if len(labels) == 2:
        return _auc([p[1] for p in probs], [g == labels[1] for g in golds])
    aucs = [_auc([p[i] for p in probs], [g == label for g in golds]) for i, label in enumerate(labels)]
    known = [a for a in aucs if a is not None]
    return sum(known) / len(known) if known else None


def calibration(confidences: list[float], correct: list[bool], bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """(ECE, bins): equal-width bins on the argmax probability; ECE = sum over bins of |accuracy - confidence| x the
    bin's share of rows."""
    table = []
    ece = 0.0
    n = len(confidences)
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(confidences) if lo <= c < hi or (b == bins - 1 and c == hi)]
        conf = sum(confidences[i] for i in members) / len(members) if members else None
        acc = sum(correct[i] for i in members) / len(members) if members else None
        if members and conf is not None and acc is not None:
            ece += abs(acc - conf) * len(members) / n
        table.append({"lo": lo, "hi": hi, "count": len(members), "confidence": conf, "accuracy": acc})
    return ece, table


def probability_metrics(labels: tuple[str, ...], rows: list[list[float]], golds: list[str],
                        generated: list[str | None] | None) -> dict[str, Any]:
    """The scoring-mode metrics of one eval (eval/{phase}_metrics.json's keys; README: Evaluation), from `rows`: each
    row's probability per label, in `labels` order.

    `golds`: each row's gold label (str); `generated`: each row's generated label, None where it did not parse
    (None for the whole list in score-only mode). A gold label the training split lacks counts as wrong everywhere
    and has no log-loss term (`score_rows` counts the rows that have one).
    """
    argmax = [labels[max(range(len(labels)), key=row.__getitem__)] for row in rows]
    index = {label: i for i, label in enumerate(labels)}
    known = [i for i, g in enumerate(golds) if g in index]
    log_loss = (-sum(math.log(max(rows[i][index[golds[i]]], 1e-15)) for i in known) / len(known)) if known else None
    ece, bins = calibration([max(row) for row in rows], [a == g for a, g in zip(argmax, golds, strict=True)])
    agreement = None
    if generated is not None:
        parsed = [(a, g) for a, g in zip(argmax, generated, strict=True) if g is not None]
        agreement = sum(a == g for a, g in parsed) / len(parsed) if parsed else None
    n = len(golds)
    return {
        "roc_auc": roc_auc(rows, golds, labels), "log_loss": log_loss, "ece": ece,
        "score_accuracy": sum(a == g for a, g in zip(argmax, golds, strict=True)) / n if n else 0.0,
        "score_macro_f1": macro_f1(golds, argmax), "score_agreement": agreement, "score_rows": len(known),
        "calibration": {"bins": bins},
    }

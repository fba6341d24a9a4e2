"""job/eval/plots.py: the report's PNGs from realistic metric dicts (no model): real pictures, absent data skipped.

The dicts come from job/eval/metrics.py's own functions over an imbalanced 5-class colour task (red 128, blue 34,
green 24, yellow 11, purple 3): a base model that often answers nothing parseable and sometimes a colour the data
lacks ("orange"), and an adapter that answers mostly red.
"""

from __future__ import annotations

import copy
import logging
import random
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from job.eval.metrics import INVALID, calibration, macro_f1, per_class_report
from job.eval.plots import write_report

SUPPORT = {"red": 128, "blue": 34, "green": 24, "yellow": 11, "purple": 3}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _phase(golds: list[str], preds: list[str], confidences: list[float] | None) -> dict:
    n = len(golds)
    phase = {"n": n, "accuracy": sum(g == p for g, p in zip(golds, preds, strict=True)) / n,
             "macro_f1": macro_f1(golds, preds), "json_parse_rate": sum(p != INVALID for p in preds) / n,
             **per_class_report(golds, preds)}
    if confidences is not None:
        ece, bins = calibration(confidences, [g == p for g, p in zip(golds, preds, strict=True)])
        phase.update(eval_mode="both", ece=ece, calibration={"bins": bins})
    return phase


def example(scored: bool = True) -> tuple[dict, list[dict]]:
    """(metrics.json's dict, the Trainer's log history) of a run on the colour task."""
    rng = random.Random(19)
    golds = [label for label, count in SUPPORT.items() for _ in range(count)]
    labels = [*SUPPORT, "orange"]
    pre = [INVALID if rng.random() < 0.25 else g if rng.random() < 0.35 else rng.choice(labels) for g in golds]
    post = [INVALID if rng.random() < 0.06 else g if g == "red" or rng.random() < 0.25 else "red" for g in golds]
    pre_conf = [rng.uniform(0.3, 0.8) if p == g else rng.uniform(0.2, 0.65) for g, p in zip(golds, pre, strict=True)]
    post_conf = [rng.uniform(0.75, 0.99) if p == g else rng.uniform(0.55, 0.95) for g, p in zip(golds, post,
                                                                                                 strict=True)]
    history = []
    for step in range(20, 201, 20):
        rise = step / 200
        history.append({"step": step, "macro_f1": 0.15 + 0.3 * rise - (0.12 if step > 140 else 0.0),
                        "accuracy": 0.55 + 0.3 * rise, "weighted_f1": 0.5 + 0.3 * rise, "roc_auc": 0.6 + 0.3 * rise,
                        "log_loss": 1.6 - 0.9 * rise, "ece": 0.25 - 0.15 * rise})
    best_entry = max(history, key=lambda e: e["macro_f1"])
    best = {"metric": "macro_f1", "step": best_entry["step"], "value": best_entry["macro_f1"], "final_step": 200,
            "eval_steps": 20, "rows": 64, "history": history}
    loss_history: list[dict] = [{"step": s, "loss": 2.4 * 0.985 ** s + rng.uniform(0, 0.08), "learning_rate": 1e-4}
                                for s in range(5, 201, 5)]
    loss_history += [{"step": 100, "eval_loss": 0.9}, {"step": 200, "train_loss": 0.61, "train_runtime": 812.0}]
    metrics = {"pre": _phase(golds, pre, pre_conf if scored else None),
               "post": _phase(golds, post, post_conf if scored else None),
               "train": {"loss": 0.61, "global_step": 200}, "best": best}
    return metrics, loss_history


def _picture(path: Path) -> Image.Image:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.load()
        picture = image.convert("RGB")
    assert picture.width >= 500 and picture.height >= 400, picture.size
    assert len(picture.getcolors(maxcolors=1 << 20) or []) > 20  # drawn on, not a blank canvas
    return picture


def test_every_picture_from_a_scored_run(tmp_path):
    metrics, loss_history = example()
    written = write_report(tmp_path / "report", metrics, loss_history)
    assert written == {name: tmp_path / "report" / f"{name}.png" for name in ("confusion", "training", "reliability")}
    sizes = {name: _picture(path).size for name, path in written.items()}
    assert sizes == {"confusion": (1000, 450), "training": (1000, 450), "reliability": (1000, 450)}
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(p.name for p in written.values())


def test_generate_mode_has_no_reliability_diagram(tmp_path):
    metrics, _ = example(scored=False)
    written = write_report(tmp_path, {**metrics, "best": None}, [])  # no training picture either: one to draw
    assert set(written) == {"confusion"}
    assert not (tmp_path / "reliability.png").exists()


def test_absent_phases_and_pieces_are_skipped(tmp_path):
    metrics, loss_history = example()
    assert write_report(tmp_path / "none", {"pre": None, "post": None, "best": None, "train": None}, []) == {}
    assert not (tmp_path / "none").exists()

    only_post = {**metrics, "pre": None, "best": None}
    written = write_report(tmp_path / "post", only_post, [{"step": 200, "train_loss": 0.6}])  # no per-step loss
    assert set(written) == {"confusion", "reliability"}
    assert _picture(written["confusion"]).width < 1000  # one panel, not two

    no_matrix = copy.deepcopy(metrics)
    del no_matrix["pre"]["confusion_matrix"]
    no_matrix["post"]["confusion_matrix"] = None
    no_matrix["post"]["calibration"] = {"bins": [{"lo": 0.0, "hi": 1.0, "count": 0, "confidence": None,
                                                  "accuracy": None}]}
    written = write_report(tmp_path / "pieces", no_matrix, loss_history)
    assert set(written) == {"training", "reliability"}  # the pre calibration alone

    best_only = {"best": metrics["best"]}
    assert set(write_report(tmp_path / "best", best_only, [])) == {"training"}


def test_the_confusion_picture_shows_the_matrix(tmp_path):
    metrics, _ = example(scored=False)
    changed = copy.deepcopy(metrics)
    matrix = changed["post"]["confusion_matrix"]["matrix"]
    matrix[0][0], matrix[0][1] = matrix[0][0] - 40, matrix[0][1] + 40  # 40 red rows answered blue instead
    first = _picture(write_report(tmp_path / "a", {"pre": metrics["pre"], "post": metrics["post"]}, [])["confusion"])
    second = _picture(write_report(tmp_path / "b", {"pre": metrics["pre"], "post": changed["post"]}, [])["confusion"])
    box = ImageChops.difference(first, second).getbbox()
    assert box is not None
    assert box[0] >= first.width // 2  # only the post panel (the right half) changed


@pytest.mark.parametrize("classes", [2, 20])
def test_confusion_from_two_to_twenty_classes(tmp_path, classes):
    labels = [f"class_{i:02d}_with_a_long_name" for i in range(classes)]
    golds = [label for i, label in enumerate(labels) for _ in range(3 + i)]
    preds = [golds[(i * 7) % len(golds)] if i % 5 else INVALID for i in range(len(golds))]
    phase = {"n": len(golds), "accuracy": 0.1, "macro_f1": macro_f1(golds, preds), **per_class_report(golds, preds)}
    picture = _picture(write_report(tmp_path, {"pre": None, "post": phase}, [])["confusion"])
    # one panel: 5.5 in wide for two classes; 0.4 x 0.35 in per cell for twenty (21 columns with "unparsed"), so a
    # three-digit count fits its cell
    assert picture.width == 550 if classes == 2 else picture.width >= 1000 and picture.height >= 900


def test_without_matplotlib_the_pictures_are_skipped_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # what `import` does when it is not installed
    metrics, loss_history = example()
    with caplog.at_level(logging.WARNING, logger="job.eval"):
        assert write_report(tmp_path / "report", metrics, loss_history) == {}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "pip install 'qwen3-sft[report]'" in warnings[0].getMessage()
    assert not (tmp_path / "report").exists()

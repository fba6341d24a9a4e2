"""#19 on a job run: an imbalanced 5-class colour task (runs_colour.py COLOUR) with eval during training.

Per-class metrics and the confusion matrix in the metrics files and the card, label probabilities in every
prediction record, preflight's class warnings, the best step's adapter as the one saved (the folder pushed to the
Hub), and the same best step and adapter after a SIGTERM and a resume.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image
from runs_colour import COLOUR_EVAL, COLOUR_EVERY, COLOUR_QUERY, COLOUR_STEPS, COLOUR_TRAIN, COLOURS
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ADAPTER = "adapter/adapter_model.safetensors"


def _tensors_equal(a, b) -> bool:
    left, right = load_file(str(a)), load_file(str(b))
    return left.keys() == right.keys() and all((left[k] == right[k]).all() for k in left)


def test_per_class_metrics_and_probabilities(colour_run):
    assert colour_run.returncode == 0, colour_run.log[-3000:]
    metrics = json.loads((colour_run.out / "metrics.json").read_text())
    for phase in ("pre", "post"):
        m = json.loads((colour_run.out / f"eval/{phase}_metrics.json").read_text())
        assert m == metrics[phase] and m["eval_mode"] == "both"
        confusion = m["confusion_matrix"]  # rows: every gold label, plus any other label the model answered
        rows = dict(zip(confusion["labels"], map(sum, confusion["matrix"]), strict=True))
        assert {c: rows[c] for c in COLOUR_EVAL} == COLOUR_EVAL and sum(rows.values()) == sum(COLOUR_EVAL.values())
        assert {c: m["per_class"][c]["support"] for c in COLOUR_EVAL} == COLOUR_EVAL
        assert 0 <= m["ece"] <= 1 and m["log_loss"] > 0 and m["score_rows"] == sum(COLOUR_EVAL.values())
        records = [json.loads(line) for line in (colour_run.out / f"eval/{phase}_predictions.jsonl").open()]
        assert len(records) == sum(COLOUR_EVAL.values())
        for record in records:
            assert sorted(record["label_probs"]) == sorted(COLOUR_TRAIN)
            assert abs(sum(record["label_probs"].values()) - 1) < 1e-9
        parsed = [r for r in records if r["pred_label"] is not None]
        print(f"{phase}: argmax agrees with generation on {m['score_agreement']} of {len(parsed)} parsed rows; "
              f"accuracy {m['accuracy']:.3f} macro_f1 {m['macro_f1']:.3f} roc_auc {m['roc_auc']}")
    assert metrics["label_set"]["labels"] == sorted(COLOUR_TRAIN) and metrics["label_set"]["scored"] == "full"
    preflight = json.loads((colour_run.out / "preflight_report.json").read_text())
    assert preflight["warnings_by_kind"]["class_too_small"] == 4  # all but red have fewer than 10 training rows
    assert preflight["warnings_by_kind"]["class_imbalance"] == 1  # red 32 vs purple 1


def test_a_class_label_dataset_without_queries_trains_on_the_names(colour_run):
    """#35: the card's configuration, the ClassLabel's names and the fixed question, from preflight to the card."""
    assert colour_run.returncode == 0, colour_run.log[-3000:]
    understood = json.loads((colour_run.out / "preflight_report.json").read_text())["understood"]
    assert understood["query"] == {"text": COLOUR_QUERY}
    assert understood["target"] == {"column": "colour", "splits": ["train", "validation"], "format": "label",
                                    "kind": "class_label", "label_field": "label", "names": list(COLOURS),
                                    "names_from": "the column's ClassLabel feature"}
    assert understood["label_counts"] == {"train": COLOUR_TRAIN, "validation": COLOUR_EVAL}
    assert "target <- 'colour': class labels (class_label; names from the column's ClassLabel feature: red, blue, " \
           'green, yellow, purple), the verdict {"label": name}' in colour_run.log
    meta = json.loads((colour_run.out / "training_meta.json").read_text())
    assert {k: meta["dataset"][k] for k in ("config", "target_format", "label_names", "query_text")} == {
        "config": "colours", "target_format": "label", "label_names": list(COLOURS), "query_text": COLOUR_QUERY}
    card = (colour_run.out / "adapter" / "README.md").read_text()
    assert f"then this query, exactly (every row was asked it, SFT_QUERY_TEXT):\n\n  ```text\n  {COLOUR_QUERY}\n" \
           "  ```\n" in card
    assert f'"text": "{COLOUR_QUERY}\\nCAPTION: <caption>"' in card
    assert "`label` is one of `blue`, `green`, `purple`, `red`, `yellow`" in card


def test_the_saved_adapter_is_the_best_steps(colour_run):
    out = colour_run.out
    best = json.loads((out / "metrics.json").read_text())["best"]
    steps = list(range(COLOUR_EVERY, COLOUR_STEPS + 1, COLOUR_EVERY))
    assert [e["step"] for e in best["history"]] == steps and best["final_step"] == COLOUR_STEPS
    assert best["metric"] == "macro_f1" and best["step"] in steps
    top = max(e["macro_f1"] for e in best["history"])
    assert best["value"] == top and best["step"] == min(
        (e for e in best["history"] if e["macro_f1"] == top), key=lambda e: (e["log_loss"], e["step"]))["step"]
    assert _tensors_equal(out / ADAPTER, out / "best" / ADAPTER)
    final = out / f"checkpoints/checkpoint-{COLOUR_STEPS}"
    assert _tensors_equal(out / ADAPTER, final / "best" / ADAPTER)  # the best-so-far travels in the checkpoint
    assert _tensors_equal(out / ADAPTER, final / "adapter_model.safetensors") == (best["step"] == COLOUR_STEPS)
    assert f"best macro_f1={best['value']:.4g} at step {best['step']}" in colour_run.log
    # Stratified by label: the eval file is sorted (red 5 first), yet every label is in the scored rows.
    assert best["rows"] == 8 and "eval during training: 8 of 12 eval rows, every 5 steps " \
        "(red 3, blue 2, green 1, yellow 1, purple 1)" in colour_run.log
    print(f"best step {best['step']} of {[(e['step'], round(e['macro_f1'], 3)) for e in best['history']]}")


def test_a_resumed_run_keeps_the_same_best_step_and_adapter(colour_run, colour_resumed):
    code, completed = colour_resumed.stages["sigterm"]
    assert code == 143 and completed, colour_resumed.log[-3000:]
    assert colour_resumed.stages["final"] == (0,), colour_resumed.log[-3000:]
    straight = json.loads((colour_run.out / "metrics.json").read_text())
    resumed = json.loads((colour_resumed.out / "metrics.json").read_text())
    assert resumed["best"] == straight["best"]
    assert _tensors_equal(colour_resumed.out / ADAPTER, colour_run.out / ADAPTER)
    assert resumed["post"] == straight["post"]
    skipped = f"eval at step {COLOUR_EVERY} skipped: preempted" in colour_resumed.log
    print(f"SIGTERM landed in step {max(completed)} ({'its eval skipped, scored on resume' if skipped else 'no eval'})")


def test_the_card_and_the_pictures(colour_run):
    """The card pushed with the adapter: the task's wording, the per-class table and the best step, and the pictures
    it links, which are in the adapter folder (the Hub renders them from the pushed repo's relative paths)."""
    out = colour_run.out
    card = (out / "adapter/README.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert "colour-classification" in card and "Main colour of an image (5 colours)" in card
    assert "### Per class (post-eval" in card and f"This is the adapter of step {metrics['best']['step']}" in card
    assert "one of `blue`, `green`, `purple`, `red`, `yellow`" in card
    assert set(metrics["report"]["files"]) == {"confusion", "training", "reliability"}
    for name, rel in metrics["report"]["files"].items():
        assert f"]({rel})" in card
        for where in (out / "adapter" / rel, out / rel):
            assert where.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", where
        assert f"report: {name} {out / rel}" in colour_run.log  # printed for make demo's reader


def test_the_cards_example_runs(colour_run, tmp_path):
    """The card's "How to use" code, run as written on the trained adapter: only the repo (the local adapter) and the
    image are filled in, and the caption left out (the query is the run's SFT_QUERY_TEXT, written in the card)."""
    card = (colour_run.out / "adapter/README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    Image.new("RGB", (64, 64), COLOURS["red"]).save(tmp_path / "image.png")
    assert f'"text": "{COLOUR_QUERY}\\nCAPTION: <caption>"' in code
    code = (code.replace("<this repo or directory>", str(colour_run.out / "adapter"))
            .replace('"image.png"', json.dumps(str(tmp_path / "image.png"))).replace("\\nCAPTION: <caption>", ""))
    script = tmp_path / "example.py"
    script.write_text(code + "print('VERDICT', verdict)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    verdict = proc.stdout.split("VERDICT ", 1)[1]
    assert "'label'" in verdict, proc.stdout

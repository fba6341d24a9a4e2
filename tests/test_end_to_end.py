"""`python -m job run` end to end on the tiny Qwen3-VL (real processor, 4-bit bitsandbytes, PEFT, TRL, W&B offline).

Reads the shared reference run (tests/runs.py): STEPS steps on the tiny data plus one blank-query row that
SFT_BAD_ROWS=skip drops, with known secrets in HF_TOKEN and WANDB_API_KEY.
"""

from __future__ import annotations

import json

import pytest
from runs_reference import REFERENCE, SECRET, STEPS, WANDB_SECRET
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def test_output_tree(reference_run):
    assert reference_run.returncode == 0, reference_run.log[-3000:]
    out = reference_run.out
    for rel in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/README.md",
                "adapter/tokenizer.json", "adapter/processor_config.json", "adapter/chat_template.jinja",
                "training_meta.json", "metrics.json", "eval/pre_predictions.jsonl", "eval/post_predictions.jsonl",
                *(f"checkpoints/checkpoint-{step}/COMPLETED" for step in range(2, STEPS + 1, 2))):
        assert (out / rel).is_file(), rel
    metrics = json.loads((out / "metrics.json").read_text())
    for phase in ("pre", "post"):
        assert set(metrics[phase]) >= {"accuracy", "macro_f1", "json_parse_rate", "exact_match", "n"}
        assert metrics[phase]["n"] == 4
    assert metrics["train"]["global_step"] == STEPS
    rows = [json.loads(line) for line in (out / "eval/post_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all({"prediction", "target", "row_id"} <= set(r) for r in rows)


def test_training_meta(reference_run):
    meta = json.loads((reference_run.out / "training_meta.json").read_text())
    assert meta["run_id"] == REFERENCE["SFT_RUN_ID"] and meta["global_step"] == STEPS
    assert len(meta["dataset"]["fingerprint_sha256"]) == 64
    assert meta["versions"]["transformers"] and meta["versions"]["peft"] and meta["versions"]["bitsandbytes"]
    assert meta["config"]["train"]["max_steps"] == STEPS and meta["config"]["eval"]["max_new_tokens"] == 8
    assert meta["trainable_params"]["trainable"] > 0
    assert set(meta["durations_s"]) >= {"setup", "model", "pre_eval", "train", "post_eval", "save"}
    # SFT_BAD_ROWS=skip: the blank-query row was dropped, and the metadata says which one
    assert meta["preflight"]["rows_skipped"] == {"train": 1, "validation": 0}
    assert meta["preflight"]["skipped_row_ids"]["train"] == ["train.jsonl:1"]  # rows are named by file:line
    assert meta["preflight"]["policy"] == {"bad_rows": "skip", "max_bad_fraction": 0.1}
    # Its own eval split (no hold-out), none of whose rows is a training row; the card says both.
    assert meta["preflight"]["eval_holdout"] is None and meta["preflight"]["eval_overlap"]["rows"] == 0
    assert meta["dataset"]["commit_sha"] is None  # a local dataset
    card = (reference_run.out / "adapter" / "README.md").read_text()
    assert "- eval rows: the dataset's own eval split" in card and "identical to training rows" not in card


def test_trainable_params_changed(reference_run):
    final = load_file(str(reference_run.out / "adapter/adapter_model.safetensors"))
    lora_b = {k: v for k, v in final.items() if "lora_B" in k}
    assert lora_b and all(k.startswith("base_model.model.model.language_model.layers.") for k in final)
    # PEFT initialises lora_B to zero: any non-zero value was learned.
    assert all(v.abs().sum() > 0 for v in lora_b.values())
    first = load_file(str(reference_run.out / "checkpoints/checkpoint-2/adapter_model.safetensors"))
    assert any(not first[k].equal(final[k]) for k in final), f"steps 3-{STEPS} changed nothing"
    assert all(v.dtype.is_floating_point and v.dtype.itemsize == 4 for v in final.values()), "adapters stay fp32"


def test_secrets_never_written(reference_run):
    log = reference_run.log
    assert SECRET not in log and WANDB_SECRET not in log
    for path in reference_run.tmp.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            data = path.read_bytes()
            assert SECRET.encode() not in data and WANDB_SECRET.encode() not in data, path


def test_wandb_offline_run_files(reference_run):
    wandb = reference_run.tmp / "wandb"
    runs = list(wandb.glob(f"offline-run-*-{REFERENCE['SFT_RUN_ID']}"))
    assert len(runs) == 1, list(wandb.glob("*"))
    assert list(runs[0].glob("*.wandb")), "the offline run must have its binary log"
    # The confusion matrices as W&B tables, each the metrics file's matrix: a gold column, then the counts.
    for phase in ("pre", "post"):
        cm = json.loads((reference_run.out / f"eval/{phase}_metrics.json").read_text())["confusion_matrix"]
        (table,) = (runs[0] / "files/media/table/gen_eval").glob(f"{phase}_confusion_matrix_*.table.json")
        assert json.loads(table.read_text()) == {
            "columns": ["gold", *cm["columns"]],
            "data": [[gold, *counts] for gold, counts in zip(cm["labels"], cm["matrix"], strict=True)]}
    # The report's pictures as W&B images (report/<name>), the same bytes as $SFT_OUTPUT_DIR/report/.
    drawn = json.loads((reference_run.out / "metrics.json").read_text())["report"]["files"]
    assert "confusion" in drawn, drawn
    logged = {p.name.split("_")[0]: p for p in (runs[0] / "files/media/images/report").glob("*.png")}
    assert set(logged) == set(drawn), (logged, drawn)
    for name, relative in drawn.items():
        assert logged[name].read_bytes() == (reference_run.out / relative).read_bytes(), name


def test_adapter_reloads_in_fresh_process(adapter_reload):
    """A fresh process loads the saved adapter on the base model: every saved tensor is live, a forward is finite."""
    proc = adapter_reload
    assert proc.returncode == 0 and "RELOAD_OK" in proc.stdout, proc.stderr[-3000:]


def test_resume_skips_incomplete_checkpoint(resumed_from_an_incomplete_checkpoint):
    """A checkpoint without COMPLETED is ignored; training resumes from the newest complete one and finishes.

    The run: a copy of the reference run whose checkpoint-STEPS lost its marker (as if the pod died while writing
    it), rerun with the same settings (a changed SFT_MAX_STEPS is refused as drift: test_rerun.py)."""
    run, last, end = resumed_from_an_incomplete_checkpoint, STEPS, STEPS
    out, log = run.out, run.log
    assert run.returncode == 0, log[-3000:]
    assert f"ignoring checkpoint-{last}: no COMPLETED marker" in log
    assert "resuming from" in log and f"checkpoint-{last - 2}" in log.split("resuming from", 1)[1].splitlines()[0]
    assert "reusing the stored pre-eval metrics" in log
    state = json.loads((out / f"checkpoints/checkpoint-{end}/trainer_state.json").read_text())
    assert state["global_step"] == end
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps == list(range(1, end + 1)), steps
    meta = json.loads((out / "training_meta.json").read_text())
    assert meta["resumed_from"].endswith(f"checkpoint-{last - 2}") and meta["global_step"] == end

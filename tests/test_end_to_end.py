"""`python -m job run` end to end on the tiny Qwen3-VL (real processor, 4-bit bitsandbytes, PEFT, TRL, W&B offline)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import REPO, job_env, run_job

SECRET = "hf_TESTSECRET_do_not_leak_123"
WANDB_SECRET = "wandbkey_TESTSECRET_0123456789"


BAD_ROW = {"id": "bad-empty-query", "image": "images/train-00000.png", "query": " ", "caption": None,
           "target_json": '{"label": "sarcastic"}'}


def _data_with_one_bad_row(data_dir: Path, dest: Path) -> Path:
    """31 rows of the tiny data plus one whose query is blank (32 rows: SFT_TRAIN_SUBSET=32 keeps them all)."""
    dest.mkdir()
    shutil.copytree(data_dir / "images", dest / "images")
    (dest / "validation.jsonl").write_text((data_dir / "validation.jsonl").read_text())
    (dest / "train.jsonl").write_text(json.dumps(BAD_ROW) + "\n" + "".join((data_dir / "train.jsonl").read_text().splitlines(keepends=True)[:31]))
    return dest


@pytest.fixture(scope="module")
def finished_run(tiny_assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    data = _data_with_one_bad_row(tiny_assets[1], tmp / "data")
    env = job_env(tmp, tiny_assets, HF_TOKEN=SECRET, WANDB_API_KEY=WANDB_SECRET, SFT_DATASET_URI=str(data),
                  SFT_BAD_ROWS="skip", SFT_MAX_BAD_FRACTION="0.1")
    proc = run_job(["run"], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, env, proc


def test_output_tree(finished_run):
    tmp, _, _ = finished_run
    out = tmp / "out"
    for rel in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/README.md",
                "adapter/tokenizer.json", "adapter/processor_config.json", "adapter/chat_template.jinja",
                "training_meta.json", "metrics.json", "eval/pre_predictions.jsonl", "eval/post_predictions.jsonl",
                "checkpoints/checkpoint-2/COMPLETED", "checkpoints/checkpoint-4/COMPLETED"):
        assert (out / rel).is_file(), rel
    metrics = json.loads((out / "metrics.json").read_text())
    for phase in ("pre", "post"):
        assert set(metrics[phase]) >= {"accuracy", "macro_f1", "json_parse_rate", "exact_match", "n"}
        assert metrics[phase]["n"] == 4
    assert metrics["train"]["global_step"] == 4
    rows = [json.loads(line) for line in (out / "eval/post_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all({"prediction", "target", "row_id"} <= set(r) for r in rows)


def test_training_meta(finished_run):
    tmp, _, _ = finished_run
    meta = json.loads((tmp / "out/training_meta.json").read_text())
    assert meta["run_id"] == "test-run" and meta["global_step"] == 4
    assert len(meta["dataset"]["fingerprint_sha256"]) == 64
    assert meta["versions"]["transformers"] and meta["versions"]["peft"] and meta["versions"]["bitsandbytes"]
    assert meta["config"]["train"]["max_steps"] == 4 and meta["config"]["eval"]["max_new_tokens"] == 8
    assert meta["trainable_params"]["trainable"] > 0
    assert set(meta["durations_s"]) >= {"setup", "model", "pre_eval", "train", "post_eval", "save"}
    # SFT_BAD_ROWS=skip: the blank-query row was dropped, and the metadata says which one
    assert meta["preflight"]["rows_skipped"] == {"train": 1, "validation": 0}
    assert meta["preflight"]["skipped_row_ids"]["train"] == ["train.jsonl:1"]  # rows are named by file:line
    assert meta["preflight"]["policy"] == {"bad_rows": "skip", "max_bad_fraction": 0.1}


def test_trainable_params_changed(finished_run):
    tmp, _, _ = finished_run
    final = load_file(str(tmp / "out/adapter/adapter_model.safetensors"))
    lora_b = {k: v for k, v in final.items() if "lora_B" in k}
    assert lora_b and all(k.startswith("base_model.model.model.language_model.layers.") for k in final)
    # PEFT initialises lora_B to zero: any non-zero value was learned.
    assert all(v.abs().sum() > 0 for v in lora_b.values())
    first = load_file(str(tmp / "out/checkpoints/checkpoint-2/adapter_model.safetensors"))
    assert any(not first[k].equal(final[k]) for k in final), "steps 3-4 changed nothing"
    assert all(v.dtype.is_floating_point and v.dtype.itemsize == 4 for v in final.values()), "adapters stay fp32"


def test_secrets_never_written(finished_run):
    tmp, _, proc = finished_run
    assert SECRET not in proc.stdout + proc.stderr and WANDB_SECRET not in proc.stdout + proc.stderr
    for path in tmp.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            data = path.read_bytes()
            assert SECRET.encode() not in data and WANDB_SECRET.encode() not in data, path


def test_wandb_offline_run_files(finished_run):
    tmp, _, _ = finished_run
    runs = list((tmp / "wandb").glob("offline-run-*-test-run"))
    assert len(runs) == 1, list((tmp / "wandb").glob("*"))
    assert list(runs[0].glob("*.wandb")), "the offline run must have its binary log"


def test_adapter_reloads_in_fresh_process(finished_run, tiny_assets):
    tmp, _, _ = finished_run
    script = f"""
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration
from job.collators.qwen3_collator import Qwen3VisionSFTCollator
from job.data.loaders import load_local_split
adapter = {str(tmp / "out/adapter")!r}
base = Qwen3VLForConditionalGeneration.from_pretrained({str(tiny_assets[0])!r})
model = PeftModel.from_pretrained(base, adapter).eval()
saved = load_file(adapter + "/adapter_model.safetensors")
state = model.state_dict()
for key, value in saved.items():
    live = key.replace(".weight", ".default.weight")
    assert torch.equal(state[live].float(), value.float()), key
processor = AutoProcessor.from_pretrained(adapter, min_pixels=4096, max_pixels=16384)
rows = [load_local_split({str(tiny_assets[1])!r}, "validation")[0]]
batch = Qwen3VisionSFTCollator(processor)(rows)
with torch.no_grad():
    loss = model(**batch).loss
assert torch.isfinite(loss), loss
print("RELOAD_OK", len(saved), float(loss))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "RELOAD_OK" in proc.stdout, proc.stderr[-3000:]


def test_resume_skips_incomplete_checkpoint(finished_run, tiny_assets):
    """A checkpoint without COMPLETED is ignored; training resumes from the newest complete one and finishes."""
    tmp, env, _ = finished_run
    out = tmp / "out"
    (out / "checkpoints/checkpoint-4/COMPLETED").unlink()  # as if the pod died while writing checkpoint-4
    proc = run_job(["run"], env)  # the same settings: a changed SFT_MAX_STEPS would be refused (test_rerun.py)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "ignoring checkpoint-4: no COMPLETED marker" in log
    assert "resuming from" in log and "checkpoint-2" in log.split("resuming from", 1)[1].splitlines()[0]
    assert "reusing the stored pre-eval metrics" in log
    state = json.loads((out / "checkpoints/checkpoint-4/trainer_state.json").read_text())
    assert state["global_step"] == 4
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps == [1, 2, 3, 4], steps
    meta = json.loads((out / "training_meta.json").read_text())
    assert meta["resumed_from"].endswith("checkpoint-2") and meta["global_step"] == 4

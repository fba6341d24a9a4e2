"""`qwen3-sft export`: the pure parts in-process (equivalence, merge cost, drop gate, report, card, early exits, Hub
errors, atomic install); the slow tier exports a copy of the shared reference run's adapter (no training of its own):
one export whose merged model a separate process loads with plain transformers, and one whose drop gate refuses.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
from helpers import PROCESSOR_LOADED, REPO, TRACEBACK, WEIGHTS_LOADED
from huggingface_hub import ModelCard
from loopback import HubErrorHandler, serve

from job import cli, errors
from job.cards import ModelCards
from job.config.schema import build_cfg
from job.errors import ConfigError, GateRefused, TransientError, UserError
from job.export import command, merge
from job.export.report import (
    build_merged_card,
    build_report,
    drop_decision,
    equivalence,
    merge_cost,
    mismatch_message,
    up_to_date,
)
from job.storage import hub
from job.train import prepare

CARD = ModelCards().qwen3_vl_8b_instruct
METRICS = {"accuracy": 0.80, "macro_f1": 0.75, "json_parse_rate": 1.0, "exact_match": 0.7, "n": 20}


def _preds(texts: list[str]) -> list[dict]:
    return [{"row_id": f"validation.jsonl:{i + 1}", "prediction": t} for i, t in enumerate(texts)]


# -- equivalence ---------------------------------------------------------------------------------------------------
def test_fp32_needs_every_row_identical_and_names_the_rows_that_are_not():
    same = _preds(['{"label": "sarcastic"}'] * 100)
    assert equivalence(same, same, "float32", 1e-6)["passed"]
    one_off = _preds(['{"label": "sarcastic"}'] * 99 + ['{"label": "not_sarcastic"}'])
    eq = equivalence(same, one_off, "float32", 0.5)
    assert not eq["passed"] and eq["identical"] == 99 and eq["mismatched_rows"] == ["validation.jsonl:100"]
    message = mismatch_message(eq)
    assert "validation.jsonl:100" in message and "1 of 100" in message and "bug" in message


def test_bf16_tolerates_one_row_in_a_hundred():
    base = _preds(["a"] * 200)
    assert equivalence(base, _preds(["a"] * 198 + ["b"] * 2), "bfloat16", 0.1)["passed"]  # 99.0%
    assert not equivalence(base, _preds(["a"] * 197 + ["b"] * 3), "bfloat16", 0.1)["passed"]  # 98.5%
    assert not equivalence([], [], "float32", None)["passed"]  # nothing verified proves nothing


# -- merge cost and the drop gate ----------------------------------------------------------------------------------
def test_drop_gate_refuses_a_drop_beyond_the_limit_and_names_the_metric():
    merged = {**METRICS, "accuracy": 0.78, "macro_f1": 0.749}
    cost = merge_cost(METRICS, merged)
    assert cost["accuracy"] == {"qlora": 0.80, "merged": 0.78, "delta": pytest.approx(-0.02)}
    passed, reason = drop_decision(cost, 0.01)
    assert not passed and "accuracy 0.8000 -> 0.7800" in reason and "macro_f1" not in reason
    assert drop_decision(cost, 0.02)[0]  # exactly at the limit passes
    assert drop_decision(merge_cost(METRICS, METRICS), 0.0) == (True, "largest drop 0.0000 <= SFT_EXPORT_MAX_DROP=0.0")
    assert drop_decision(merge_cost(METRICS, {**METRICS, "accuracy": 0.9}), 0.0)[0]  # a gain is no drop
    assert drop_decision(merge_cost(None, METRICS), 0.0)[0]  # no QLoRA model to compare


def _report(**overrides) -> dict:
    eq = equivalence(_preds(["a"]), _preds(["a"]), "float32", 0.0)
    args = dict(run_id="run-1", adapter=Path("/out/adapter"), adapter_sha256="ab" * 32, base_model="Qwen/Qwen3-VL-8B",
                dtype="float32", device="cpu", row_ids=["validation.jsonl:1"], eq=eq,
                metrics={"unmerged": METRICS, "merged": METRICS, "qlora": METRICS}, qlora_source="evaluated",
                max_drop=0.01, versions={"transformers": "5.24.0"})
    return build_report(**{**args, **overrides})


def test_report_and_when_an_earlier_export_stands():
    report = _report()
    assert report["drop_gate"]["passed"] and report["rows"] == 1 and report["merge_cost"]["macro_f1"]["delta"] == 0
    json.dumps(report)  # JSON as it is
    assert up_to_date(report, "ab" * 32, None)
    assert not up_to_date(report, "cd" * 32, None)  # another adapter
    assert not up_to_date(report, "ab" * 32, "org/merged")  # not pushed yet
    report["publish"]["pushed_to"] = "https://huggingface.co/org/merged/commit/123"
    assert up_to_date(report, "ab" * 32, "org/merged") and not up_to_date(report, "ab" * 32, "org/other")
    refused = _report(metrics={"unmerged": METRICS, "merged": {**METRICS, "accuracy": 0.5}, "qlora": METRICS})
    assert not refused["drop_gate"]["passed"] and not up_to_date(refused, "ab" * 32, None)


def test_merged_card_metadata_and_table(tmp_path):
    cfg = build_cfg(CARD, {"SFT_DATASET_URI": "/data"})
    report = _report(metrics={"unmerged": METRICS, "merged": {**METRICS, "accuracy": 0.79}, "qlora": METRICS})
    lineage = {"base_model": "Qwen/Qwen3-VL-8B-Instruct", "base_model_revision": "abc", "dataset_uri": "/data"}
    build_merged_card(cfg, report, lineage, {**METRICS, "accuracy": 0.5}).save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "Qwen/Qwen3-VL-8B-Instruct"
    assert card.data.base_model_relation == "merge" and card.data.pipeline_tag == "image-text-to-text"
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["accuracy"] == 0.79
    assert "| accuracy | 0.5000 | 0.8000 | 0.7900 | -0.0100 |" in card.text
    assert "\\nCAPTION: <caption>" in card.text and "identical on 1 of 1" in card.text


# -- configuration, early exits, the run's SFT_EXPORT ----------------------------------------------------------------
def test_export_settings():
    cfg = build_cfg(CARD, {"SFT_EXPORT": "true", "SFT_EXPORT_VERIFY_ROWS": "50", "SFT_EXPORT_MAX_DROP": "0",
                           "SFT_EXPORT_REPO_ID": "org/merged"})
    assert cfg.export.model_dump() == {"enabled": True, "verify_rows": 50, "max_drop": 0.0, "repo_id": "org/merged"}
    assert build_cfg(CARD, {}).export.model_dump() == {"enabled": False, "verify_rows": None, "max_drop": 0.01,
                                                       "repo_id": None}
    with pytest.raises(ConfigError, match="SFT_EXPORT_MAX_DROP"):
        build_cfg(CARD, {"SFT_EXPORT_MAX_DROP": "2"})
    with pytest.raises(ConfigError, match="need their own repos"):
        build_cfg(CARD, {"SFT_EXPORT_REPO_ID": "org/x", "SFT_HUB_REPO_ID": "org/x"})


@pytest.fixture()
def export_env(tiny_assets, tmp_path, monkeypatch):
    """The environment of an export of the tiny model into tmp_path/out."""
    for key in [k for k in os.environ if k.startswith("SFT_")]:
        monkeypatch.delenv(key)
    env = {"SFT_MODEL_ID": str(tiny_assets[0]), "SFT_DATASET_URI": str(tiny_assets[1]),
           "SFT_OUTPUT_DIR": str(tmp_path / "out"), "HF_HUB_OFFLINE": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    handlers = list(logging.getLogger().handlers)
    yield monkeypatch
    for handler in logging.getLogger().handlers:  # cli.main's root handler writes to this test's captured stderr
        if handler not in handlers:
            logging.getLogger().removeHandler(handler)


@pytest.mark.parametrize("setting, fragment", [
    ({}, "no adapter directory"),  # no run saved $SFT_OUTPUT_DIR/adapter
    ({"SFT_EVAL_ADAPTER": "none"}, "export merges an adapter"),
    ({"SFT_EVAL_ADAPTER": "/nonexistent/adapter"}, "'/nonexistent/adapter'"),
    ({"SFT_MODEL_ID": "/nonexistent/base"}, "SFT_MODEL_ID='/nonexistent/base': no such local model directory"),
])
def test_export_user_errors_exit_2_before_anything_loads(export_env, capsys, setting, fragment):
    for key, value in setting.items():
        export_env.setenv(key, value)
    assert cli.main(["export"]) == 2
    err = capsys.readouterr().err
    assert fragment in err and TRACEBACK not in err
    assert PROCESSOR_LOADED not in err and WEIGHTS_LOADED not in err  # the job's own log lines (job/model.py)


def test_a_directory_without_adapter_weights_is_exit_2(export_env, tmp_path, capsys):
    (tmp_path / "out" / "adapter").mkdir(parents=True)
    (tmp_path / "out" / "adapter" / "adapter_config.json").write_text("{}")
    assert cli.main(["export"]) == 2
    assert "adapter_model.safetensors missing" in capsys.readouterr().err


# -- Hub errors: those of the adapter push, naming SFT_EXPORT_REPO_ID ----------------------------------------------
@pytest.fixture()
def loopback_hub(monkeypatch):
    """huggingface_hub's real client pointed at a loopback Hub that answers by repository (tests/loopback.py)."""
    url, server = serve(HubErrorHandler)
    monkeypatch.setattr(hub_constants, "ENDPOINT", url)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_loopback")
    yield url
    server.shutdown()


# The codes are docs/operations.md's (Exit codes): 2 for a repo the token may not reach, 3 for the Hub's own
# failure (503).
# Every status of a push is in tests/storage/test_hub.py; these name SFT_EXPORT_REPO_ID.
@pytest.mark.parametrize("repo, code", [("org/private", 2), ("org/gated", 2), ("org/down", 3)])
def test_merged_push_errors_are_classified(loopback_hub, tmp_path, repo, code):
    with pytest.raises(Exception) as raised:
        hub.push_adapter(tmp_path, repo, True, "run-1", setting="SFT_EXPORT_REPO_ID", what="export")
    assert errors.exit_code_for(raised.value) == code
    assert f"Hub push to {repo} (SFT_EXPORT_REPO_ID)" in str(raised.value)


# -- atomic install ------------------------------------------------------------------------------------------------
def test_install_replaces_merged_whole(tmp_path):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "old.safetensors").write_text("old")
    (tmp_path / f"{merge.STAGING_PREFIX}999").mkdir()  # left by an interrupted export
    staging = merge.staging_dir(tmp_path)
    assert [p.name for p in tmp_path.glob(f"{merge.STAGING_PREFIX}*")] == [staging.name]
    (staging / "model.safetensors").write_text("new")
    merge.install(staging, tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert [p.name for p in (tmp_path / "merged").iterdir()] == ["model.safetensors"]


# -- slow: real exports of the reference run's adapter ---------------------------------------------------------------
# What a user pastes (docs/export.md, "Serving recipes"): plain transformers, the chat template, the trained prompt.
RELOAD = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

merged, data_dir, rows = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model = AutoModelForImageTextToText.from_pretrained(merged, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(merged)
system = json.load(open(merged + "/export_report.json"))["prompt"]["system"]
out = {}
for row in rows:
    text = row["query"].strip() + (f"\nCAPTION: {row['caption'].strip()}" if (row.get("caption") or "").strip() else "")
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = Image.open(f"{data_dir}/{row['image']}").convert("RGB")
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    inputs.pop("token_type_ids", None)
    with torch.no_grad():
        ids = model.generate(**inputs)  # greedy and max_new_tokens from the exported generation_config.json
    out[row["row_id"]] = processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
print("PREDICTIONS " + json.dumps(out))
"""


def _copy_run(reference, dest: Path, *, checkpoints: bool = False) -> Path:
    """A copy of the shared run's outputs (never change a shared run's files), without its checkpoints unless asked
    (with them, `run` sees a finished run)."""
    skip = (".upload-staging", "wandb") if checkpoints else ("checkpoints", ".upload-staging", "wandb")
    shutil.copytree(reference.out, dest, ignore=shutil.ignore_patterns(*skip))
    return dest


def _export(zygote, reference, tmp: Path, **overrides: str) -> subprocess.CompletedProcess:
    env = {**reference.env, "SFT_OUTPUT_DIR": str(tmp / "out"), "WANDB_MODE": "disabled", **overrides}
    return zygote.run(["-m", "job", "export"], env, tmp / "export")


@pytest.fixture(scope="module")
def exported(reference_run, zygote, tmp_path_factory):
    """One export of a copy of the reference run's adapter. Its post-eval predictions are removed, so the trained
    QLoRA model (4-bit base + adapter) is loaded and scored here, as for an adapter trained elsewhere."""
    assert reference_run.returncode == 0, reference_run.log[-3000:]
    tmp = tmp_path_factory.mktemp("export")
    (_copy_run(reference_run, tmp / "out") / "eval" / "post_predictions.jsonl").unlink()
    done = _export(zygote, reference_run, tmp)
    return tmp, done


@pytest.mark.slow
def test_export_writes_a_verified_merged_model(exported, reference_run):
    tmp, done = exported
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    merged = tmp / "out" / "merged"
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "chat_template.jinja", "tokenizer.json",
            "processor_config.json", "README.md", "export_report.json"} <= names
    assert not [p for p in (tmp / "out").iterdir() if p.name.startswith(".merged")]  # no staging left behind
    assert json.loads((merged / "config.json").read_text())["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    processor = json.loads((merged / "processor_config.json").read_text())["image_processor"]
    assert processor["size"] == {"shortest_edge": 4096, "longest_edge": 16384}  # the training pixel bounds
    generation = json.loads((merged / "generation_config.json").read_text())
    # greedy as the top 1 token (docs/export.md): servers that ignore do_sample read top_k; no temperature, no top_p
    assert generation["do_sample"] is True and generation["top_k"] == 1 and generation["max_new_tokens"] == 8
    assert not {"temperature", "top_p"} & generation.keys()
    report = json.loads((merged / "export_report.json").read_text())
    # vLLM's server lines (job/serving.py): SFT_MAX_LENGTH 512 + 8 new tokens, the pixel bounds of the adapter's
    # processor files, LoRA r 16, the run id as the served name
    out, base = tmp / "out", reference_run.env["SFT_MODEL_ID"]
    assert report["serve"] == {
        "vllm_merged": f"python -m vllm.entrypoints.openai.api_server --model {out}/merged --served-model-name "
                       "test-run --max-model-len 520 --limit-mm-per-prompt '{\"image\": 1}'",
        "vllm_adapter": f"python -m vllm.entrypoints.openai.api_server --model {base} --enable-lora --lora-modules "
                        f"test-run={out}/adapter --max-lora-rank 16 --max-model-len 520 --limit-mm-per-prompt "
                        "'{\"image\": 1}' --mm-processor-kwargs '{\"size\": {\"shortest_edge\": 4096, "
                        "\"longest_edge\": 16384}}' --override-generation-config "
                        "'{\"top_k\": 1, \"max_new_tokens\": 8}'",
    }
    eq = report["equivalence"]
    assert report["dtype"] == eq["dtype"] == "float32" and eq["rows"] == 4 and eq["identical"] == 4 and eq["passed"]
    assert 0 <= eq["max_abs_logit_diff"] < 1e-3
    assert report["qlora_source"].startswith("evaluated") and report["drop_gate"]["passed"]
    for name in ("accuracy", "macro_f1", "json_parse_rate", "exact_match"):
        assert set(report["merge_cost"][name]) == {"qlora", "merged", "delta"}
        assert report["merge_cost"][name]["delta"] is not None
    assert report["metrics"]["merged"]["n"] == report["metrics"]["qlora"]["n"] == 4
    assert (tmp / "out" / "eval" / "export_qlora_predictions.jsonl").is_file()
    card = ModelCard.load(merged / "README.md")
    # the tiny base is a local directory: no Hub base_model (the Hub refuses a path there), the text says what it was
    assert not {"base_model", "base_model_relation", "base_model_revision"} & set(card.data.to_dict())
    assert card.data.pipeline_tag == "image-text-to-text"
    assert "a local copy (SFT_MODEL_ID), not a Hub model id" in card.text
    assert f"```bash\n{report['serve']['vllm_merged']}\n```" in card.text
    assert json.loads((tmp / "out" / "eval" / "export_report.json").read_text())["equivalence"] == eq


@pytest.mark.slow
def test_the_merged_model_alone_reproduces_the_adapters_predictions(exported, reference_run, zygote, tiny_assets):
    """Plain transformers in another process: no PEFT, no job code, the processor and decoding from merged/."""
    tmp, done = exported
    assert done.returncode == 0
    data = Path(reference_run.env["SFT_DATASET_URI"])
    rows = {f"validation.jsonl:{i}": json.loads(line)
            for i, line in enumerate((data / "validation.jsonl").read_text().splitlines(), start=1)}
    expected = {r["row_id"]: r["prediction"] for r in map(
        json.loads, (tmp / "out" / "eval" / "export_unmerged_predictions.jsonl").read_text().splitlines())}
    chosen = [{**rows[row_id], "row_id": row_id} for row_id in expected]
    reload = zygote.run(["-c", RELOAD, str(tmp / "out" / "merged"), str(data), json.dumps(chosen)],
                        {**reference_run.env, "WANDB_MODE": "disabled"}, tmp / "reload")
    assert reload.returncode == 0, reload.stderr[-3000:]
    got = json.loads(reload.stdout.split("PREDICTIONS ", 1)[1])
    assert got == expected


@pytest.mark.slow
def test_run_with_sft_export_exports_after_the_gate_and_the_drop_gate_refuses(reference_run, zygote, tmp_path):
    """`qwen3-sft run` with SFT_EXPORT=true on a copy of the finished reference run: no step is trained again, the
    run's gate passes (none is set), then the export runs, and its drop gate refuses with exit 4. Deterministic: the
    run's post-eval, which export reuses as the trained model's scores, is made perfect on the verified rows; the
    merged model (6 tiny steps) is not, so any drop beyond SFT_EXPORT_MAX_DROP=0 refuses."""
    out = _copy_run(reference_run, tmp_path / "out", checkpoints=True)
    post = out / "eval" / "post_predictions.jsonl"
    records = [json.loads(line) for line in post.read_text().splitlines()]
    post.write_text("".join(json.dumps({**r, "prediction": json.dumps(r["target"])}) + "\n" for r in records))
    env = {**reference_run.env, "SFT_OUTPUT_DIR": str(out), "WANDB_MODE": "disabled", "SFT_EXPORT": "true",
           "SFT_EXPORT_MAX_DROP": "0", "SFT_EXPORT_VERIFY_ROWS": "2"}
    done = zygote.run(["-m", "job", "run"], env, tmp_path / "run")
    assert "no step is trained again" in done.stderr, done.stderr[-3000:]
    report = json.loads((out / "merged" / "export_report.json").read_text())
    assert report["metrics"]["qlora"]["accuracy"] == 1.0
    assert report["metrics"]["merged"]["accuracy"] < 1.0, "precondition: the tiny merged model is not perfect"
    assert done.returncode == 4, done.stderr[-3000:]
    assert "export refused: merging costs more than SFT_EXPORT_MAX_DROP=0.0" in done.stderr
    assert TRACEBACK not in done.stderr
    assert report["rows"] == 2 and report["qlora_source"].startswith("eval/post_predictions.jsonl")
    assert not report["drop_gate"]["passed"] and report["publish"]["gate"]["passed"] is False
    assert (out / "merged" / "model.safetensors").is_file()  # kept, like the adapter after a refused gate


def test_reload_script_is_the_docs_recipe():
    """docs/export.md's transformers recipe and the reload test build the same prompt (system, image, query and
    caption)."""
    page = (REPO / "docs" / "export.md").read_text()
    recipe = page.split("<!-- serve-transformers -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    for line in ('text = query + (f"\\nCAPTION: {caption}" if caption else "")',
                 '{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}',
                 "add_generation_prompt=True"):
        assert line in recipe, line


def test_publish_access_of_the_run_covers_the_export_repo(loopback_hub):
    """SFT_EXPORT=true with SFT_EXPORT_REPO_ID: the token is checked before training (whoami), not after it. The
    loopback Hub refuses every whoami, so a check that runs fails naming the setting."""
    unexported = build_cfg(CARD, {"SFT_EXPORT_REPO_ID": "org/merged"})
    prepare._check_publish_access(unexported.hub, unexported.export)  # no export: no check
    exported = build_cfg(CARD, {"SFT_EXPORT_REPO_ID": "org/merged", "SFT_EXPORT": "true"})
    with pytest.raises(UserError, match="SFT_EXPORT_REPO_ID"):
        prepare._check_publish_access(exported.hub, exported.export)


def _publish_setup(tmp_path: Path, env: dict[str, str], post: dict | None = None):
    cfg = build_cfg(CARD, {"SFT_OUTPUT_DIR": str(tmp_path), **env})
    (tmp_path / command.MERGED).mkdir()
    if post is not None:
        (tmp_path / "metrics.json").write_text(json.dumps({"pre": None, "post": post}))
    return cfg


def test_the_merged_push_follows_both_gates(tmp_path, loopback_hub):
    """Both gates pass: the report says so before the push, and the push goes to SFT_EXPORT_REPO_ID (the loopback
    Hub answers 503 for org/down: the push was attempted, and a Hub outage is transient)."""
    cfg = _publish_setup(tmp_path, {"SFT_EXPORT_REPO_ID": "org/down"}, post=METRICS)
    with pytest.raises(TransientError, match="push to org/down"):
        command._publish(cfg, tmp_path, _report(), "run-1")
    written = json.loads((tmp_path / "merged" / "export_report.json").read_text())
    assert written["publish"] == {"gate": {"passed": True, "reason": written["publish"]["gate"]["reason"]},
                                  "pushed_to": None}
    assert json.loads((tmp_path / "eval" / "export_report.json").read_text()) == written


@pytest.mark.parametrize("env, refused_by", [
    ({"SFT_PUSH_MIN_METRIC": "macro_f1:0.9"}, "below SFT_PUSH_MIN_METRIC"),  # the run's gate
    ({}, "merging costs more than SFT_EXPORT_MAX_DROP"),  # the drop gate
])
def test_a_refused_export_is_exit_4_and_pushes_nothing(tmp_path, loopback_hub, env, refused_by):
    """A refusal raises before any push: a push to org/private would have been a UserError from the loopback Hub."""
    cfg = _publish_setup(tmp_path, {"SFT_EXPORT_REPO_ID": "org/private", **env}, post=METRICS)
    report = _report(metrics={"unmerged": METRICS, "merged": METRICS if env else {**METRICS, "accuracy": 0.5},
                              "qlora": METRICS})
    with pytest.raises(GateRefused, match=refused_by) as raised:
        command._publish(cfg, tmp_path, report, "run-1")
    assert errors.exit_code_for(raised.value) == 4
    written = json.loads((tmp_path / "merged" / "export_report.json").read_text())
    assert written["publish"]["gate"]["passed"] is False and written["publish"]["pushed_to"] is None


def test_a_merge_mismatch_is_a_bug_exit_1_naming_the_rows():
    same = _preds(["a", "a", "a"])
    eq = equivalence(same, _preds(["b", "a", "a"]), "float32", 0.3)
    error = errors.MergeMismatch(mismatch_message(eq))
    assert errors.exit_code_for(error) == 1 and "validation.jsonl:1" in str(error) and "1 of 3" in str(error)


def test_the_merge_cost_baseline_is_the_post_eval_of_this_adapter_in_this_eval_mode(tmp_path):
    """eval/post_predictions.jsonl is reused as the trained model's scores only when the run's stamp names the
    adapter being merged (its sha256) and it was made with this eval mode; otherwise export evaluates again."""
    from job import outputs

    cfg = build_cfg(ModelCards().qwen3_vl_8b_instruct, {"SFT_OUTPUT_DIR": str(tmp_path)})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"the adapter post-eval scored")
    outputs.write_json(tmp_path / "training_meta.json", {"config": cfg.model_dump(mode="json")})
    target = json.dumps({"label": "sarcastic"})
    outputs.write_predictions(tmp_path / "eval" / "post_predictions.jsonl",
                              [{"row_id": "validation.jsonl:1", "prediction": target, "target": target}])
    stamp = outputs.Stamp("run-a", "f" * 64, outputs.adapter_sha256(adapter), 2)
    rows = ["validation.jsonl:1"]
    assert command._stored_post_metrics(cfg, adapter, tmp_path, rows) is None  # no stamp: not known to be its own
    stamp.write(tmp_path / outputs.RUN_STAMP)
    assert command._stored_post_metrics(cfg, adapter, tmp_path, rows)["accuracy"] == 1.0
    other_mode = cfg.replace(eval={"mode": "generate"})
    assert command._stored_post_metrics(other_mode, adapter, tmp_path, rows) is None
    (adapter / "adapter_model.safetensors").write_bytes(b"another adapter, copied over it")
    assert command._stored_post_metrics(cfg, adapter, tmp_path, rows) is None

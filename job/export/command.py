"""`qwen3-sft export`: merge the adapter into the base model, prove what the merge changed, publish `merged/`.

The steps, one model in memory at a time (load, evaluate, free). Expected peak for Qwen3-VL-8B on a GPU: one bf16
copy of the model (about 17.5 GB) plus generation activations for SFT_EVAL_BATCH_SIZE rows, about 20 GB; the merge
is in place (each layer's B @ A is a transient of at most 12288 x 4096 values) and the 4-bit QLoRA model of step 3
(about 7 GB) loads only after the bf16 one is freed. On the CPU everything is fp32 (about 35 GB of RAM for 8B).

1. base (bf16, fp32 on the CPU, never 4-bit) + adapter: greedy predictions and next-token logits on the verified
   rows; merge_and_unload in place; save to a staging directory; free.
2. the merged model loaded back from that directory with AutoModelForImageTextToText (what a user does): the same
   predictions and logits. Equivalence: identical predictions on every row in fp32, on 99% in bf16 (else exit 1,
   a bug, the rows named), the max logit difference reported.
3. the trained QLoRA model (4-bit base + adapter), metric by metric: the real cost of merging. Its scores are the
   run's own post-eval when that covered these rows with this adapter and these decoding settings, else evaluated
   here. More than SFT_EXPORT_MAX_DROP lost in accuracy or macro-F1: refused (exit 4), artifacts kept.
4. export_report.json and the card into the staging directory, renamed to merged/; then the gate and the push
   (SFT_EXPORT_REPO_ID) and the upload with the final artifacts (SFT_CHECKPOINT_URI).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from job import outputs, serving
from job.config.schema import JobConfig
from job.config.sections.data import DataConfig
from job.config.sections.eval import EvalConfig
from job.config.sections.model import ModelConfig
from job.errors import GateRefused, MergeMismatch
from job.eval.generate import compute_metrics, evaluate_qwen3, next_token_logits
from job.export import merge
from job.export.report import (
    build_merged_card,
    build_report,
    equivalence,
    file_sha256,
    mismatch_message,
    up_to_date,
)
from job.inputs import open_inputs, skipped_rows
from job.model import has_cuda, load_model
from job.preflight.early import check_inputs, export_adapter
from job.storage.checkpoints import RemoteCheckpoints
from job.storage.hub import check_push_access, gate_decision, push_adapter
from job.storage.sources import Sources
from job.train.preemption import PreemptionGuard

log = logging.getLogger("job.export")
PREFLIGHT_REPORT = "eval/export_preflight_report.json"
REPORT = "export_report.json"
MERGED = "merged"


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _run_id(configured: str | None, out: Path) -> str:
    """SFT_RUN_ID (configured), else the run's (training_meta.json), else one named after the time."""
    meta = _read_json(out / "training_meta.json") or {}
    generated = f"qwen3-sft-export-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    return configured or meta.get("run_id") or generated


def _verified_rows(eval_ds, limit: int | None):
    """The eval split as preflight kept it, cut to its first SFT_EXPORT_VERIFY_ROWS rows."""
    return eval_ds if limit is None or limit >= len(eval_ds) else eval_ds.select(range(limit))


class Verifier:
    """One eval split and collator, scored under the eval settings; each model's predictions kept in eval/."""

    def __init__(self, cfg: JobConfig, processor, rows, eval_collator, out: Path):
        self.cfg, self.processor, self.rows, self.collator, self.out = cfg, processor, rows, eval_collator, out
        self.row_ids = [str(r) for r in rows["row_id"]]

    def score(self, name: str, model) -> dict:
        started = time.monotonic()
        # Generation only, whatever SFT_EVAL_MODE says: the proof compares the generated answers (and the logits).
        metrics = evaluate_qwen3(model, self.processor, self.rows, self.collator, self.cfg.replace(
            eval={"mode": "generate"}))
        outputs.write_predictions(self.out / "eval" / f"export_{name}_predictions.jsonl", metrics["predictions"])
        scalars = outputs.scalar_metrics(metrics)
        print(f"export {name}: " + outputs.headline(scalars)
              + f" ({time.monotonic() - started:.1f} s)", flush=True)
        return metrics

    def logits(self, model):
        return next_token_logits(model, self.rows, self.collator, self.cfg.eval.batch_size)


def _merge_and_verify(model_cfg: ModelConfig, eval_cfg: EvalConfig, model_path: str, verifier: Verifier,
                      adapter: Path, staging: Path) -> tuple[dict, dict, dict]:
    """Steps 1 and 2: (unmerged metrics, merged metrics, equivalence), the base read from model_path
    (`Sources.model_path`). One model in memory at a time."""
    merge.release()  # after `run`: its training model (in reference cycles through the Trainer) goes first
    model = merge.apply_adapter(merge.load_base(model_cfg, model_path), adapter)
    unmerged = verifier.score("unmerged", model)
    reference_logits = verifier.logits(model)
    model = merge.merge(model)
    files = merge.save(model, verifier.processor, eval_cfg, staging)
    log.info("export: merged model written (%s)", ", ".join(files))
    model = None
    merge.release()
    model = merge.load_merged(model_cfg, staging)
    merged = verifier.score("merged", model)
    diff = (verifier.logits(model) - reference_logits).abs().max().item() if len(verifier.row_ids) else None
    model = None
    merge.release()
    eq = equivalence(unmerged["predictions"], merged["predictions"], merge.dtype_name(merge.export_dtype()), diff)
    return unmerged, merged, eq


def _stored_post_metrics(cfg: JobConfig, adapter: Path, out: Path, row_ids: list[str],
                         sources: Sources | None = None) -> dict | None:
    """The run's post-eval of this adapter, when it scored every verified row with the decoding and eval mode used
    here. "Of this adapter": the run's stamp (written last by its save) names the sha256 of the adapter merged here.
    sources: compared as training_meta.json stores the config (the local copies in data.uri and model.id)."""
    meta, path = _read_json(out / "training_meta.json"), out / "eval" / "post_predictions.jsonl"
    if meta is None or not path.is_file() or adapter.resolve() != (out / "adapter").resolve():
        return None
    stamp = outputs.Stamp.read(out / outputs.RUN_STAMP)
    if stamp is None or stamp.adapter is None or stamp.adapter != outputs.adapter_sha256(adapter):
        log.info("export: eval/post_predictions.jsonl is not the post-eval of this adapter (%s): not reused",
                 "no run stamp" if stamp is None else "another adapter's")
        return None
    then = meta.get("config") or {}
    now = sources.config_record(cfg) if sources is not None else cfg.model_dump(mode="json")
    same = all((then.get(section) or {}).get(key) == now[section][key] for section, key in (
        ("eval", "max_new_tokens"), ("eval", "do_sample"), ("eval", "mode"), ("data", "system_prompt"),
        ("data", "eval_split"),
        ("image", "min_pixels"), ("image", "max_pixels"), ("model", "id"))) and not cfg.eval.do_sample
    if not same:
        return None
    records = {r["row_id"]: r for r in map(json.loads, path.read_text().splitlines())}
    if not all(row in records for row in row_ids):
        return None
    chosen = [records[row] for row in row_ids]
    return compute_metrics([r["prediction"] for r in chosen], [r["target"] for r in chosen],
                           cfg.data.label_field)


def _qlora_metrics(cfg: JobConfig, sources: Sources, verifier: Verifier, adapter: Path, unmerged: dict
                   ) -> tuple[dict, str]:
    """Step 3: the trained model's scores on the verified rows, and where they come from."""
    if not cfg.model.load_in_4bit:
        return unmerged, "base + adapter (SFT_LOAD_IN_4BIT=false: the trained model is the unquantized base + adapter)"
    stored = _stored_post_metrics(cfg, adapter, verifier.out, verifier.row_ids, sources)
    if stored is not None:
        log.info("export: QLoRA scores from the run's post-eval of this adapter (eval/post_predictions.jsonl)")
        return stored, "eval/post_predictions.jsonl (the run's post-eval of this adapter on these rows)"
    model = merge.apply_adapter(load_model(cfg.model, sources.model_path), adapter)
    metrics = verifier.score("qlora", model)
    model = None
    merge.release()
    return metrics, "evaluated: 4-bit base + adapter (eval/export_qlora_predictions.jsonl)"


def _write_report(out: Path, report: dict, merged_dir: Path | None = None) -> None:
    outputs.write_json(out / "eval" / REPORT, report)
    if merged_dir is not None:
        outputs.write_json(merged_dir / REPORT, report)


def _publish(cfg: JobConfig, out: Path, report: dict, run_id: str) -> None:
    """The adapter push's gate (SFT_PUSH_MIN_METRIC, SFT_PUSH_REQUIRE_IMPROVEMENT on the run's metrics.json, else on
    the trained model's scores here) and the drop gate; then the push, the upload, and exit 4 when refused."""
    hub, repo = cfg.hub, cfg.export.repo_id
    stored = _read_json(out / "metrics.json") or {}
    gate_metrics = stored if stored.get("post") else {"pre": None, "post": report["metrics"]["qlora"]}
    gated = bool(repo or hub.min_metric)
    passed, reason = gate_decision(gate_metrics, hub.min_metric, hub.require_improvement) if gated else (
        True, "no gate")
    if not report["drop_gate"]["passed"]:
        passed, reason = False, report["drop_gate"]["reason"]
    report["publish"] = {"gate": {"passed": passed, "reason": reason}, "pushed_to": None}
    _write_report(out, report, out / MERGED)
    if passed and repo:
        report["publish"]["pushed_to"] = push_adapter(out / MERGED, repo, hub.private, run_id,
                                                      setting="SFT_EXPORT_REPO_ID", what="export")
        _write_report(out, report, out / MERGED)
    if cfg.storage.checkpoint_uri:
        remote = RemoteCheckpoints(cfg.storage.checkpoint_uri, run_id, keep=cfg.train.save_total_limit)
        names = tuple(n for n in (*outputs.FINAL_ARTIFACTS, MERGED) if (out / n).exists())
        step = (stored.get("train") or {}).get("global_step")
        log.info("final artifacts with merged/ uploaded to %s", remote.upload_final(out, names, step))
    if not passed:
        raise GateRefused(f"export refused: {reason}; merged model and report kept in {out / MERGED}")


def _checked(cfg: JobConfig) -> tuple[Path, str]:
    """The cheap checks (exit 2 before anything heavy): paths, the adapter, the output dir, Hub access."""
    check_inputs(cfg, "export")
    if cfg.export.repo_id:
        user = check_push_access(cfg.export.repo_id, "SFT_EXPORT_REPO_ID")
        log.info("Hub: push the merged model as %s to %s", user, cfg.export.repo_id)
    out = Path(cfg.train.output_dir)
    return out, _run_id(cfg.train.run_id, out)


def run_export(cfg: JobConfig, *, after_run: bool = False) -> dict[str, Any]:
    """Export `SFT_EVAL_ADAPTER` (default $SFT_OUTPUT_DIR/adapter); returns the report. `after_run`: called by `run`
    (SFT_EXPORT=true), where an up-to-date export of the same adapter is not redone."""
    out, run_id = _checked(cfg)
    adapter = export_adapter(cfg.eval.adapter, cfg.train.output_dir)
    adapter_sha = file_sha256(adapter / "adapter_model.safetensors")
    if after_run and up_to_date(_read_json(out / MERGED / REPORT), adapter_sha, cfg.export.repo_id):
        log.info("export: %s is up to date (this adapter, verified%s)", out / MERGED,
                 ", pushed" if cfg.export.repo_id else "")
        return json.loads((out / MERGED / REPORT).read_text())
    # The s3:// sources mirrored (the loaders read the local copies, the report names the configured ones).
    inputs = open_inputs(cfg, "export", roles=("eval",), report_name=PREFLIGHT_REPORT)
    sources = inputs.sources
    skipped_rows("export", inputs, out / PREFLIGHT_REPORT)
    verifier = Verifier(cfg, inputs.processor, _verified_rows(inputs.preflight.eval_dataset, cfg.export.verify_rows),
                        inputs.eval_collator, out)
    staging = merge.staging_dir(out)
    try:
        unmerged, merged, eq = _merge_and_verify(cfg.model, cfg.eval, sources.model_path, verifier, adapter,
                                                 staging)
        scalars = {"unmerged": outputs.scalar_metrics(unmerged), "merged": outputs.scalar_metrics(merged)}
        report_args = dict(run_id=run_id, adapter=adapter, adapter_sha256=adapter_sha,
                           base_model=sources.model_id,
                           dtype=eq["dtype"], device="cuda" if has_cuda() else "cpu", row_ids=verifier.row_ids,
                           eq=eq, max_drop=cfg.export.max_drop, versions=outputs.package_versions(),
                           prompt=_prompt_format(cfg.data, cfg.eval),
                           serve=_serve_commands(cfg, sources, adapter, out, run_id))
        if not eq["passed"]:
            _write_report(out, build_report(metrics={**scalars, "qlora": None}, qlora_source="not evaluated",
                                            **report_args))
            raise MergeMismatch(mismatch_message(eq))
        qlora, source = _qlora_metrics(cfg, sources, verifier, adapter, unmerged)
        report = build_report(metrics={**scalars, "qlora": outputs.scalar_metrics(qlora)}, qlora_source=source,
                              **report_args)
        _card(cfg, sources, out, report, staging)
        outputs.write_json(staging / REPORT, report)
        merge.install(staging, out / MERGED)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _summary(report, out)
    _publish(cfg, out, report, run_id)
    return report


def _prompt_format(data: DataConfig, eval_cfg: EvalConfig) -> dict:
    """How the model was trained and verified to be prompted (README, "Serve the merged model")."""
    return {"system": data.system_prompt or None,
            "user": "the image, then the query; a non-empty caption appended as '\\nCAPTION: <caption>'",
            "max_new_tokens": eval_cfg.max_new_tokens, "do_sample": eval_cfg.do_sample}


def _serve_commands(cfg: JobConfig, sources: Sources, adapter: Path, out: Path, run_id: str) -> dict[str, str]:
    """vLLM's server lines for the merged model (SFT_EXPORT_REPO_ID when it is pushed there) and for the base + this
    adapter, with the rank and the pixel bounds the adapter's own files record (job/serving.py)."""
    model_len = serving.max_model_len(cfg.train.max_length, cfg.eval.max_new_tokens)
    pixels = serving.saved_pixel_bounds(adapter) or serving.pixel_bounds(cfg.image.min_pixels, cfg.image.max_pixels)
    rank = (_read_json(adapter / "adapter_config.json") or {}).get("r") or cfg.lora.r
    return {
        "vllm_merged": serving.vllm_merged(cfg.export.repo_id or str(out / MERGED), run_id, model_len=model_len),
        "vllm_adapter": serving.vllm_adapter(sources.model_id, str(adapter), run_id, revision=cfg.model.revision,
                                             lora_rank=rank, pixels=pixels, model_len=model_len,
                                             max_new_tokens=cfg.eval.max_new_tokens),
    }


def _card(cfg: JobConfig, sources: Sources, out: Path, report: dict, staging: Path) -> None:
    meta = _read_json(out / "training_meta.json") or {}
    lineage = {"base_model": report["base_model"], "base_model_revision": (meta.get("base_model") or {}).get(
        "revision") or cfg.model.revision, "dataset_uri": sources.dataset_uri,
        "git_sha": outputs.git_sha(), "image_digest": cfg.lineage.image_digest}
    pre = (_read_json(out / "metrics.json") or {}).get("pre")
    same_rows = pre is not None and pre.get("n") == report["rows"]  # the run's pre-eval scored the whole split
    build_merged_card(cfg, report, lineage, pre if same_rows else None).save(staging / "README.md")


def _summary(report: dict, out: Path) -> None:
    eq, cost = report["equivalence"], report["merge_cost"]
    print(f"export: merged vs base + adapter ({eq['dtype']}): {eq['identical']}/{eq['rows']} predictions identical, "
          f"max |logit diff| {eq['max_abs_logit_diff']}", flush=True)
    print("export: merged - QLoRA: " + " ".join(
        f"{k}={v['delta']:+.4f}" for k, v in cost.items() if v["delta"] is not None)
        + f"; drop gate: {report['drop_gate']['reason']}", flush=True)
    print(f"export: {out / MERGED} ({REPORT}, README.md)", flush=True)


def main(cfg: JobConfig) -> dict:
    with PreemptionGuard(cfg.train.preempt_grace_s):  # SIGTERM/SIGINT: Preempted, exit 143 (README, Exit codes)
        return run_export(cfg)

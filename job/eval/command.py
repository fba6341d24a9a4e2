"""`qwen3-sft eval`: score the base model, or the base model plus an adapter, on the eval split.

Which model is scored (job.preflight.early.eval_adapter): SFT_EVAL_ADAPTER=<dir> that adapter (a path that is not an
adapter directory is exit 2); SFT_EVAL_ADAPTER=none the base model; unset $SFT_OUTPUT_DIR/adapter when a run saved
one, else the base model. The eval split goes through the same preflight as `run` (SFT_BAD_ROWS,
SFT_MAX_BAD_FRACTION); skipped rows are printed and listed in eval/standalone_preflight_report.json. Scoring mode's
label set comes from the targets of the training split, as in `run` (none when the source has no training split:
SFT_EVAL_MODE=auto then generates only).
"""

from __future__ import annotations

import logging
from pathlib import Path

from job import outputs
from job.cards import ModelCards
from job.collators.qwen3_collator import build_collators
from job.config.schema import JobConfig, build_cfg
from job.data.loaders import load_train_dataset
from job.errors import DataError
from job.eval.generate import evaluate_qwen3
from job.eval.score import LabelSet, resolve_mode
from job.model import load_model
from job.preflight.early import check_inputs, eval_adapter, load_processor_checked
from job.preflight.run import run_preflight
from job.storage.sources import localize
from job.train.preemption import PreemptionGuard

log = logging.getLogger("job.eval.command")
PREFLIGHT_REPORT = "eval/standalone_preflight_report.json"


def run_eval(cfg: JobConfig) -> dict:
    check_inputs(cfg, "eval")
    out = Path(cfg.train.output_dir)
    adapter = eval_adapter(cfg)
    sources = localize(cfg)  # s3:// and Hub sources, mirrored into the same cache as `run` uses
    cfg = sources.local(cfg)
    processor = load_processor_checked(cfg, sources.model_id)
    checked = run_preflight(cfg, processor, roles=("eval",), report_name=PREFLIGHT_REPORT)
    skipped = checked.report["splits"]["eval"]["skipped_row_ids"]
    if skipped:
        print(f"eval: skipped {len(skipped)} bad row(s) (SFT_BAD_ROWS=skip, see {out / PREFLIGHT_REPORT}): "
              + ", ".join(skipped), flush=True)
    _, eval_collator = build_collators(cfg, processor)
    label_set = _label_set(cfg)
    model = load_model(cfg)
    if adapter is not None:
        from peft import PeftModel

        log.info("eval: loading adapter %s", adapter)
        model = PeftModel.from_pretrained(model, str(adapter))
    else:
        log.info("eval: scoring the base model (SFT_EVAL_ADAPTER=none, or unset with no %s)", out / "adapter")
    metrics = evaluate_qwen3(model, processor, checked.eval_dataset, eval_collator, cfg, label_set)
    outputs.write_predictions(out / "eval" / "standalone_predictions.jsonl", metrics["predictions"])
    scalars = outputs.scalar_metrics(metrics)
    outputs.write_json(out / "eval" / "standalone_metrics.json", scalars)  # the same keys as post_metrics.json
    print(f"eval ({adapter or 'base model'}): " + outputs.headline(scalars), flush=True)
    return scalars


def _label_set(cfg: JobConfig) -> LabelSet | None:
    """The training split's label set (its targets only: no image is read), checked against SFT_EVAL_MODE before
    the weights load."""
    try:
        label_set = LabelSet.from_targets(list(load_train_dataset(cfg)[cfg.data.target_key]), cfg.data.label_field)
    except DataError as exc:
        log.info("eval: no training split to take the label set from (%s)", str(exc).splitlines()[0])
        label_set = None
    resolve_mode(cfg.eval.mode, label_set)
    return label_set


def main(env: dict | None = None) -> dict:
    cfg = build_cfg(ModelCards().qwen3_vl_8b_instruct, env)
    with PreemptionGuard(cfg.train.preempt_grace_s):  # SIGTERM/SIGINT: Preempted, exit 143 (README, Exit codes)
        return run_eval(cfg)

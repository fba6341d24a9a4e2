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
from job.config.schema import JobConfig
from job.eval.generate import evaluate_qwen3
from job.inputs import prepare_inputs, skipped_rows
from job.model import load_model
from job.preflight.early import eval_adapter
from job.train.preemption import PreemptionGuard

log = logging.getLogger("job.eval.command")
PREFLIGHT_REPORT = "eval/standalone_preflight_report.json"


def run_eval(cfg: JobConfig) -> dict:
    inputs = prepare_inputs(cfg, "eval", roles=("eval",), report_name=PREFLIGHT_REPORT)
    out = Path(cfg.train.output_dir)
    adapter = eval_adapter(cfg.eval.adapter, cfg.train.output_dir)
    skipped_rows("eval", inputs, out / PREFLIGHT_REPORT)
    model = load_model(cfg.model, inputs.sources.model_path)
    if adapter is not None:
        from peft import PeftModel

        log.info("eval: loading adapter %s", adapter)
        model = PeftModel.from_pretrained(model, str(adapter))
    else:
        log.info("eval: scoring the base model (SFT_EVAL_ADAPTER=none, or unset with no %s)", out / "adapter")
    metrics = evaluate_qwen3(model, inputs.processor, inputs.preflight.eval_dataset, inputs.eval_collator, cfg,
                             inputs.label_set)
    outputs.write_predictions(out / "eval" / "standalone_predictions.jsonl", metrics["predictions"])
    scalars = outputs.scalar_metrics(metrics)
    outputs.write_json(out / "eval" / "standalone_metrics.json", scalars)  # the same keys as post_metrics.json
    print(f"eval ({adapter or 'base model'}): " + outputs.headline(scalars), flush=True)
    return scalars


def main(cfg: JobConfig) -> dict:
    with PreemptionGuard(cfg.train.preempt_grace_s):  # SIGTERM/SIGINT: Preempted, exit 143 (README, Exit codes)
        return run_eval(cfg)

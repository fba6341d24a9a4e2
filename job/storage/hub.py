"""Quality gate, model card and the Hub push (one commit per run, so a re-run ends in one consistent revision)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from job.config import JobConfig
from job.errors import TransientError, UserError
from job.utils.redact import redact

log = logging.getLogger(__name__)
GATE_METRICS = ("accuracy", "macro_f1", "json_parse_rate", "exact_match")


def parse_min_metric(spec: str | None) -> tuple[str, float] | None:
    if not spec:
        return None
    name, _, value = spec.partition(":")
    return name.strip(), float(value)


def gate_decision(metrics: dict, spec: str | None, require_improvement: bool) -> tuple[bool, str]:
    """(passed, reason). The gate metric is the threshold's metric, or macro_f1 when only improvement is required."""
    threshold = parse_min_metric(spec)
    name = threshold[0] if threshold else "macro_f1"
    post = (metrics.get("post") or {}).get(name)
    pre = (metrics.get("pre") or {}).get(name)
    if post is None:
        return False, f"no post-eval {name} to gate on (SFT_EVAL_POST must be true when a gate is set)"
    if threshold and post < threshold[1]:
        return False, f"post {name}={post:.4f} is below SFT_PUSH_MIN_METRIC {threshold[1]}"
    if require_improvement and pre is not None and post < pre:
        return False, f"post {name}={post:.4f} is below pre {name}={pre:.4f} (SFT_PUSH_REQUIRE_IMPROVEMENT=true)"
    return True, f"post {name}={post:.4f} passed" + (f" (>= {threshold[1]})" if threshold else "")


def build_model_card(cfg: JobConfig, run_id: str, metrics: dict, lineage: dict):
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    post = metrics.get("post") or {}
    # A Hub dataset by its repo id (what the Hub links), with the commit that was trained on.
    dataset = lineage.get("dataset_repo_id") or lineage.get("dataset_uri") or "local"
    commit = lineage.get("dataset_commit")
    results = [EvalResult(task_type="image-text-to-text", dataset_type=str(dataset), dataset_name="sarcasm eval split",
                          dataset_split=cfg.data.eval_split, dataset_revision=commit, dataset_config=cfg.data.config,
                          metric_type=k, metric_value=float(post[k]))
               for k in GATE_METRICS if isinstance(post.get(k), (int, float))]
    data = ModelCardData(
        base_model=lineage["base_model"], library_name="peft", pipeline_tag="image-text-to-text",
        # `datasets:` keeps the bare repo id, which the Hub links ("owner/name@sha" would link nowhere); the commit
        # goes beside it (dataset_revision) and into each eval result's dataset.revision.
        datasets=[dataset] if lineage.get("dataset_is_hub") else None, dataset_revision=commit,
        tags=list(cfg.card.tags),
        model_name=run_id, eval_results=results or None, base_model_revision=lineage.get("base_model_revision"),
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_card_body(cfg, run_id, metrics, lineage)}")


def _card_body(cfg: JobConfig, run_id: str, metrics: dict, lineage: dict) -> str:
    pre, post = metrics.get("pre") or {}, metrics.get("post") or {}
    rows = "\n".join(f"| {k} | {pre.get(k, '-')} | {post.get(k, '-')} |" for k in (*GATE_METRICS, "n"))
    train_cfg = json.dumps(
        redact(cfg.model_dump(mode="json", include={"train", "lora", "image"})), indent=2, sort_keys=True
    )
    return f"""# {run_id}: QLoRA adapter for {lineage['base_model']}

Multimodal sarcasm detection: an image, a query and an optional caption in, a JSON verdict out.

## Evaluation (pre = base model, post = with this adapter)

| metric | pre | post |
|---|---|---|
{rows}

## Lineage

- base model: `{lineage['base_model']}` revision `{lineage.get('base_model_revision')}`
- dataset: `{lineage.get('dataset_uri')}` revision/ETags `{lineage.get('dataset_version')}`
- data fingerprint (sha256): `{lineage.get('fingerprint')}`
{_eval_data_lines(lineage)}
- code: git `{lineage.get('git_sha')}`, image `{lineage.get('image_digest')}`

## Training config

```json
{train_cfg}
```

## How to load

```python
from peft import PeftModel
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

base = Qwen3VLForConditionalGeneration.from_pretrained("{lineage['base_model']}")
model = PeftModel.from_pretrained(base, "<this repo or directory>")
processor = AutoProcessor.from_pretrained("<this repo or directory>")
```
"""


def _eval_data_lines(lineage: dict) -> str:
    """Where the eval rows came from and how many of them are also training rows (preflight's count)."""
    holdout = lineage.get("eval_holdout")
    lines = [f"- eval rows: held out of the dataset's one split (SFT_EVAL_HOLDOUT={holdout}, by SFT_SEED and a hash "
             "of each row)" if holdout is not None else "- eval rows: the dataset's own eval split"]
    overlap = lineage.get("eval_overlap")
    if overlap and overlap["rows"]:
        lines.append(f"- eval rows identical to training rows: {overlap['rows']} of {overlap['of']} "
                     f"(SFT_MAX_EVAL_OVERLAP={overlap['limit']}); their scores measure memorisation")
    return "\n".join(lines)


def _hub_errors(what: str, exc: Exception, setting: str = "SFT_HUB_REPO_ID") -> Exception:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    if isinstance(exc, OfflineModeIsEnabled):
        return UserError(f"Hub {what}: HF_HUB_OFFLINE=1 but {setting} asks for a push; unset one of them")
    if isinstance(exc, RepositoryNotFoundError):
        return UserError(f"Hub {what}: repository not found or no access; check {setting} and HF_TOKEN")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, HfHubHTTPError) and status in (401, 403, 404):
        return UserError(f"Hub {what}: HTTP {status}; check HF_TOKEN has write access to {setting}")
    return TransientError(f"Hub {what}: {type(exc).__name__}: {exc}")


def check_push_access(repo_id: str, setting: str = "SFT_HUB_REPO_ID") -> str:
    """whoami before training (or before an export loads a model): a bad token must not cost a GPU run. Returns the
    user name. `setting` is the variable that named the repo (SFT_HUB_REPO_ID, SFT_EXPORT_REPO_ID)."""
    from huggingface_hub import HfApi

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(f"{setting}={repo_id} needs the Hub, but HF_HUB_OFFLINE=1")
    if not os.environ.get("HF_TOKEN"):
        raise UserError(f"{setting}={repo_id} needs HF_TOKEN with write access")
    try:
        return HfApi().whoami()["name"]
    except Exception as exc:  # noqa: BLE001 - mapped to user/transient
        raise _hub_errors("whoami", exc, setting) from None


def push_adapter(adapter_dir: Path, repo_id: str, private: bool, run_id: str, *, setting: str = "SFT_HUB_REPO_ID",
                 what: str = "run") -> str:
    """create_repo(exist_ok) + one upload_folder commit of a directory (the adapter, or the merged model with
    setting="SFT_EXPORT_REPO_ID", what="export"); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(adapter_dir), repo_id=repo_id, repo_type="model",
                                 commit_message=f"qwen3-sft {what} {run_id}")
    except Exception as exc:  # noqa: BLE001 - mapped to user/transient
        raise _hub_errors(f"push to {repo_id}", exc, setting) from None
    return str(getattr(info, "commit_url", info))

"""The export's proof, as data: merged vs unmerged equivalence, the cost of merging against the trained QLoRA model,
the drop gate, `export_report.json` and the merged model's card. Pure functions (no model, no I/O but the card's
rendering), tested in the fast tier.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from job.config.schema import JobConfig
from job.metric_table import CORE_METRICS
from job.storage.hub import base_model_line
from job.storage.sources import hub_model_id

# Greedy predictions of the merged model must equal those of base + adapter (same dtype) on this share of rows.
# fp32: merging is exact up to summation order, so every row. bf16: W + BA is rounded to bf16 once per weight,
# which can flip a near-tie argmax on a rare row.
REQUIRED_IDENTICAL = {"float32": 1.0}
REQUIRED_IDENTICAL_DEFAULT = 0.99
DROP_GATE_METRICS = ("accuracy", "macro_f1")
MAX_MISMATCHES_LISTED = 50


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def equivalence(unmerged: list[dict], merged: list[dict], dtype: str, max_logit_diff: float | None) -> dict[str, Any]:
    """Row by row: are the merged model's greedy predictions those of base + adapter? `passed` is the verdict."""
    by_row = {r["row_id"]: r["prediction"] for r in merged}
    mismatched = [r["row_id"] for r in unmerged if by_row.get(r["row_id"]) != r["prediction"]]
    rows = len(unmerged)
    identical = rows - len(mismatched)
    required = REQUIRED_IDENTICAL.get(dtype, REQUIRED_IDENTICAL_DEFAULT)
    rate = identical / rows if rows else 1.0
    return {
        "dtype": dtype, "rows": rows, "identical": identical, "identical_rate": rate, "required_rate": required,
        "mismatched_rows": mismatched[:MAX_MISMATCHES_LISTED], "mismatched_count": len(mismatched),
        "max_abs_logit_diff": max_logit_diff,
        "logits_compared": "each prompt's next-token logits (the first generated token), full vocabulary",
        "passed": rows > 0 and rate >= required,
    }


def mismatch_message(eq: dict) -> str:
    """Why a failed equivalence is a bug (exit 1), naming the rows."""
    listed = ", ".join(eq["mismatched_rows"])
    more = eq["mismatched_count"] - len(eq["mismatched_rows"])
    return (f"export: the merged model's greedy predictions differ from base + adapter ({eq['dtype']}) on "
            f"{eq['mismatched_count']} of {eq['rows']} rows ({eq['identical_rate']:.2%} identical, "
            f"{eq['required_rate']:.0%} required; max |logit diff| {eq['max_abs_logit_diff']}): {listed}"
            + (f" and {more} more" if more > 0 else "") + "; merging must not change the model: this is a bug")


def merge_cost(qlora: dict | None, merged: dict) -> dict[str, dict[str, float | None]]:
    """Metric by metric: the trained QLoRA model (4-bit base + adapter), the merged model, merged - qlora."""
    cost: dict[str, dict[str, float | None]] = {}
    for name in CORE_METRICS:
        q = (qlora or {}).get(name)
        m = merged.get(name)
        cost[name] = {"qlora": q, "merged": m, "delta": None if q is None or m is None else m - q}
    return cost


def drop_decision(cost: dict[str, dict[str, float | None]], max_drop: float) -> tuple[bool, str]:
    """(passed, reason): refused when accuracy or macro-F1 of the merged model is more than max_drop below the
    trained QLoRA model's. No QLoRA metrics (SFT_LOAD_IN_4BIT=false: the trained model is base + adapter) pass."""
    drops = []
    for name in DROP_GATE_METRICS:
        delta = cost[name]["delta"]
        if delta is not None and -delta > max_drop + 1e-12:
            drops.append(f"{name} {cost[name]['qlora']:.4f} -> {cost[name]['merged']:.4f} (drop {-delta:.4f})")
    if drops:
        return False, f"merging costs more than SFT_EXPORT_MAX_DROP={max_drop}: " + "; ".join(drops)
    if all(cost[name]["delta"] is None for name in DROP_GATE_METRICS):
        return True, "no QLoRA model to compare (trained without 4-bit): the merged model is base + adapter"
    worst = max(0.0, *(-(cost[name]["delta"] or 0.0) for name in DROP_GATE_METRICS))
    return True, f"largest drop {worst:.4f} <= SFT_EXPORT_MAX_DROP={max_drop}"


def build_report(*, run_id: str, adapter: Path, adapter_sha256: str, base_model: str, dtype: str, device: str,
                 row_ids: list[str], eq: dict, metrics: dict[str, dict | None], qlora_source: str,
                 max_drop: float, versions: dict, prompt: dict | None = None,
                 serve: dict[str, str] | None = None) -> dict[str, Any]:
    cost = merge_cost(metrics.get("qlora"), metrics["merged"] or {})
    passed, reason = drop_decision(cost, max_drop)
    return {
        "run_id": run_id, "base_model": base_model, "adapter": {"path": str(adapter), "sha256": adapter_sha256},
        "dtype": dtype, "device": device, "prompt": prompt, "serve": serve, "rows": len(row_ids), "row_ids": row_ids,
        "equivalence": eq, "metrics": metrics, "qlora_source": qlora_source, "merge_cost": cost,
        "drop_gate": {"metrics": list(DROP_GATE_METRICS), "max_drop": max_drop, "passed": passed, "reason": reason},
        "publish": {"gate": None, "pushed_to": None}, "versions": versions,
    }


def up_to_date(report: dict | None, adapter_sha256: str, repo_id: str | None) -> bool:
    """Whether a finished export of this very adapter (passed, and pushed where a repo is set) can stand."""
    if not report or (report.get("adapter") or {}).get("sha256") != adapter_sha256:
        return False
    if not (report.get("equivalence") or {}).get("passed") or not (report.get("drop_gate") or {}).get("passed"):
        return False
    pushed = (report.get("publish") or {}).get("pushed_to")
    return not repo_id or bool(pushed and f"/{repo_id}/" in f"{pushed}/")


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def build_merged_card(cfg: JobConfig, report: dict, lineage: dict, pre: dict | None):
    """The merged model's card: base model and relation, the eval table, the proof and how to prompt it."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    merged = report["metrics"]["merged"] or {}
    results = [EvalResult(task_type="image-text-to-text", dataset_type=str(lineage.get("dataset_uri") or "local"),
                          dataset_name="sarcasm eval split", dataset_split=cfg.data.eval_split, metric_type=k,
                          metric_value=float(merged[k]))
               for k in CORE_METRICS if isinstance(merged.get(k), (int, float))]
    on_hub = hub_model_id(lineage["base_model"])  # a local or s3:// base is no Hub base_model (base_model_line)
    data = ModelCardData(
        base_model=on_hub, base_model_relation="merge" if on_hub else None, library_name="transformers",
        pipeline_tag="image-text-to-text", tags=[*cfg.card.tags, "merged-lora"], model_name=report["run_id"],
        eval_results=results or None, base_model_revision=lineage.get("base_model_revision") if on_hub else None,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_card_body(cfg, report, lineage, pre or {})}")


def _card_body(cfg: JobConfig, report: dict, lineage: dict, pre: dict) -> str:
    cost, eq = report["merge_cost"], report["equivalence"]
    rows = "\n".join(f"| {k} | {_fmt(pre.get(k))} | {_fmt(cost[k]['qlora'])} | {_fmt(cost[k]['merged'])} | "
                     f"{_fmt(cost[k]['delta'])} |" for k in CORE_METRICS)
    system = cfg.data.system_prompt
    query = "the query" if cfg.data.query_text is None else \
        f"the query {json.dumps(cfg.data.query_text, ensure_ascii=False)} (SFT_QUERY_TEXT: every row's)"
    return f"""# {report['run_id']}: {lineage['base_model']} with its QLoRA adapter merged

Multimodal sarcasm detection: an image, a query and an optional caption in, a JSON verdict out. This is the base
model with the LoRA adapter `{report['adapter']['path']}` (sha256 `{report['adapter']['sha256'][:16]}...`) merged
into its {report['dtype']} weights: no PEFT needed to serve it.

## Evaluation ({report['rows']} rows of the `{cfg.data.eval_split}` split, greedy)

| metric | base model (pre) | trained QLoRA (4-bit base + adapter) | merged (this model) | merged - QLoRA |
|---|---|---|---|---|
{rows}

Drop gate (accuracy, macro F1; `SFT_EXPORT_MAX_DROP={report['drop_gate']['max_drop']}`):
{'passed' if report['drop_gate']['passed'] else 'REFUSED'}: {report['drop_gate']['reason']}.

## Proof of the merge

Merged vs base + adapter, both {eq['dtype']}: greedy predictions identical on {eq['identical']} of {eq['rows']}
rows (required {eq['required_rate']:.0%}); max |logit difference| {eq['max_abs_logit_diff']}
over {eq['logits_compared']}.
Details in `export_report.json`.

## Prompt format (as trained)

- system message: {json.dumps(system) if system else '(none)'}
- user message: the image, then {query}; a non-empty caption is appended as `\\nCAPTION: <caption>`
- generation prompt from the chat template; greedy, `max_new_tokens={cfg.eval.max_new_tokens}`; the answer is
  one JSON object such as `{{"{cfg.data.label_field}": "sarcastic"}}`

{_serve_section(report.get("serve"))}## Lineage

{base_model_line(lineage['base_model'], lineage.get('base_model_revision'))}
- dataset: `{lineage.get('dataset_uri')}`; code: git `{lineage.get('git_sha')}`, image `{lineage.get('image_digest')}`
"""


def _serve_section(serve: dict[str, str] | None) -> str:
    """vLLM's server line for this model (export_report.json's `serve`): greedy with no temperature in the request."""
    if not serve:
        return ""
    return f"""## Serve with vLLM

Greedy, `max_tokens` and the trained pixel bounds come from this model's own files, so a request without sampling
settings gets the verified answers (the OpenAI-compatible chat API; the prompt format above):

```bash
{serve['vllm_merged']}
```

"""


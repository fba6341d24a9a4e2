"""Where the run's results go and what describes them: storage, the Hub and its push gate, export, lineage and the
model card. How to add a setting: job/config/sections/__init__.py."""

from __future__ import annotations

from typing import Any

from pydantic import field_validator

from job.cards import ModelSpec
from job.config.sections.base import NOT_MEASURED, Section
from job.config.settings import setting
from job.metric_table import EVAL_MODE_METRICS, EVAL_MODES, GATE_METRICS

_REPO = r"^[A-Za-z0-9][\w.-]*/[\w.-]+$"  # a Hub repo id


class StorageConfig(Section):
    checkpoint_uri: str | None = setting(
        None, env="checkpoint_uri", pattern=r"^s3://[^/]+(/.*)?$", examples=["s3://my-bucket/qwen3-sft"],
        doc="Unset: local checkpoints only. Mirror checkpoints to `{uri}/{run_id}/checkpoint-N/`, uploaded on a "
            "background thread while training continues; `COMPLETED` is written last and the newest "
            "`SFT_SAVE_TOTAL_LIMIT` complete ones are kept. The bucket is write-probed before training. On start the "
            "newest complete remote checkpoint is downloaded unless it is already complete locally, so a fresh pod "
            "resumes from it. At the end `{uri}/{run_id}/final/` is replaced by exactly the final artifacts: "
            "`adapter/`, `eval/`, `report/`, `metrics.json`, `training_meta.json`, `preflight_report.json` and "
            "`run_stamp.json` (and `merged/` after an export), each object written once, `COMPLETED` last; nothing "
            "else of `SFT_OUTPUT_DIR` (not `checkpoints/`, `best/`, `wandb/`, what `SFT_RESUME=never` moved aside).")
    cache_dir: str | None = setting(
        None, env="cache_dir", examples=["/cache/qwen3-sft"],
        doc="Unset: `$HF_HOME/qwen3-sft`, else `~/.cache/qwen3-sft`. Where `s3://` datasets and models are mirrored. "
            "A mirror holds exactly the prefix's current objects: unchanged objects (same size and ETag) are not "
            "downloaded again, and files of objects that left the prefix are removed (a dataset re-exported from 2 "
            "shards to 1 is read as 1). Its bookkeeping (`.s3-manifest.json`) is never data. An object key that would "
            "land outside the mirror (a `..` or `.` segment, `//`, a leading `/`) is exit 2 naming the key, before "
            "anything is written; checkpoint restores are checked the same way. The lineage's dataset version is the "
            "digest of the ETags mirrored.")
    # parallel transfers per file (boto3's TransferConfig.max_concurrency)
    s3_concurrency: int = setting(
        16, env="s3_concurrency", ge=1, le=256, examples=["16"],
        doc="Threads per S3 file transfer (boto3 `max_concurrency`).")

    @field_validator("checkpoint_uri")
    @classmethod
    def _no_trailing_slash(cls, value: str | None) -> str | None:
        """s3://bucket/prefix/ and s3://bucket/prefix name the same place; run ids are appended with a '/'."""
        return value.rstrip("/") if value else None


class HubConfig(Section):
    repo_id: str | None = setting(
        None, env="hub_repo_id", pattern=_REPO, examples=["my-org/qwen3-vl-sarcasm-lora"],
        doc="Unset: no push. Push `adapter/` to this Hub model repo in one commit, when the gate passes. After "
            "preflight, before any weights load, the push is checked: `HF_TOKEN` is set and valid (`whoami`), it may "
            "write (not a read-only token; a fine-grained one has `repo.write` on the repo or its namespace), the "
            "namespace is the token's user or an organisation where the user is `contributor`, `write` or `admin`, "
            "and the repo exists or the push creates it. A failed check is exit 2 naming the setting (3 when the Hub "
            "is down), as is `HF_HUB_OFFLINE=1`.")
    private: bool = setting(
        True, env="hub_private", examples=["true"],
        doc="Create the Hub repo as private (only matters when it does not exist yet).")
    min_metric: str | None = setting(
        None, env="push_min_metric", pattern=rf"^({'|'.join(GATE_METRICS)}):(0(\.\d+)?|1(\.0+)?)$",
        examples=["macro_f1:0.70"],
        doc="Gate: the post-eval metric must be at least the value. Needs `SFT_EVAL_POST=true`. The metric must be "
            "one the `SFT_EVAL_MODE` measures, else exit 2 at config time naming both settings: `json_parse_rate` and "
            "`exact_match` need generation (not `score`), `roc_auc` needs scoring (not `generate`; under `auto`, a "
            "label set in the training targets and two gold labels in the eval split, checked before any weights "
            "load).")
    require_improvement: bool = setting(
        True, env="push_require_improvement", examples=["true"],
        doc="Gate: the post-eval metric (the one in `SFT_PUSH_MIN_METRIC`, else `macro_f1`) must not be below the "
            "pre-eval one (skipped when there is no pre-eval).")

    @staticmethod
    def rules(s: Any, card: ModelSpec) -> list[str]:
        problems = []
        if s.push_min_metric and not s.eval_post:
            problems.append("SFT_PUSH_MIN_METRIC needs the post-eval: set SFT_EVAL_POST=true or unset the gate")
        gate = s.push_min_metric.partition(":")[0] if s.push_min_metric else None
        if gate and gate not in EVAL_MODE_METRICS[s.eval_mode]:
            modes = [m for m in EVAL_MODES if gate in EVAL_MODE_METRICS[m]]
            can = [m for m in GATE_METRICS if m in EVAL_MODE_METRICS[s.eval_mode]]
            problems.append(f"SFT_PUSH_MIN_METRIC={s.push_min_metric} gates on {gate}, and SFT_EVAL_MODE="
                            f"{s.eval_mode} {NOT_MEASURED[s.eval_mode]}, so the gate could only refuse after "
                            f"training: use SFT_EVAL_MODE={' or '.join(modes)}, or gate on {', '.join(can)}")
        return problems


class ExportConfig(Section):
    """qwen3-sft export / SFT_EXPORT: the adapter merged into the unquantized base (job/export/)."""

    enabled: bool = setting(
        False, env="export", examples=["false"],
        doc="At the end of `run`, once the gate passed, run `export` (below) on the run's adapter. A rerun skips an "
            "export of the same adapter that already passed (and was pushed, with `SFT_EXPORT_REPO_ID`).")
    verify_rows: int | None = setting(
        None, env="export_verify_rows", ge=1, examples=["200"],
        doc="Unset: the whole eval split, after `SFT_EVAL_SUBSET`. Verify the merge on the first N rows of the eval "
            "split.")
    max_drop: float = setting(
        0.01, env="export_max_drop", ge=0, le=1, examples=["0.01"],
        doc="Export gate: refuse (exit 4, artifacts kept) when the merged model's accuracy or macro-F1 is more than "
            "this below the trained QLoRA model's.")
    repo_id: str | None = setting(
        None, env="export_repo_id", pattern=_REPO, examples=["my-org/qwen3-vl-sarcasm"],
        doc="Unset: no push. Push `merged/` to this Hub model repo in one commit, when the gates pass. Token "
            "handling, gate and errors as `SFT_HUB_REPO_ID` (the token, its write access and the repo checked after "
            "preflight, before any model loads; `SFT_HUB_PRIVATE` applies); must differ from `SFT_HUB_REPO_ID`.")

    @staticmethod
    def rules(s: Any, card: ModelSpec) -> list[str]:
        if s.export_repo_id and s.hub_repo_id and s.export_repo_id.lower() == s.hub_repo_id.lower():
            return [f"SFT_EXPORT_REPO_ID and SFT_HUB_REPO_ID are both {s.hub_repo_id!r}: the merged model and the "
                    "adapter need their own repos (a repo with adapter_config.json loads as an adapter); name another "
                    "repo"]
        return []


class LineageConfig(Section):
    image_digest: str | None = setting(
        None, env="image_digest", examples=["sha256:0123abcd..."],
        doc="Container image digest (e.g. `sha256:...`), recorded in `training_meta.json` and the model card.")


class CardConfig(Section):
    tags: tuple[str, ...] = setting(card="tags")
    # how the model card, its tags and the eval dataset name describe the task
    task_name: str = setting(
        "sarcasm", env="task_name", min_length=1, max_length=64, examples=["sarcasm", "colour"],
        doc="The task's name in the model card: its eval dataset name (`<name> eval split`) and task tag "
            "(`sarcasm-detection` for the default, else `<name>-classification`). The system prompt does not change "
            "with it (`SFT_SYSTEM_PROMPT`).")
    task_description: str = setting(
        "Multimodal sarcasm detection: an image, a query and an optional caption in, a JSON verdict out.",
        env="task_description", min_length=1, examples=["Colour classification of product photos, a JSON label out."],
        doc="The model card's first line under its title.")

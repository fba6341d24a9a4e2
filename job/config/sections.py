"""The sections of the job's configuration, each field declared once: its type, range, default, example and the
`SFT_*` variable that sets it (`setting`, job/config/settings.py), with the cross-field rules of the section beside
it (`rules`: every problem as one message naming the variables, checked on the validated environment).

A section builds itself from the validated variables and the model card (`from_settings`): the variable's value,
the card's where a card-backed variable is unset, and a few values the section derives (`_derived`). Sections are
frozen and hold tuples, not lists; `extra="forbid"` makes a misspelt key an error. What a field means, for a user,
is documented in docs/configuration.md (its tables are kept equal to these fields by tests/config/).
"""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, field_validator

from job.cards import ModelSpec
from job.config.settings import (
    effective_save_steps,
    env_name,
    meta,
    setting,
)
from job.metric_table import BEST_METRICS, EVAL_MODE_METRICS, EVAL_MODES, GATE_METRICS, PRIMARY, BestMetric
from job.prompts import Queries

# What an SFT_EVAL_MODE leaves out, for the rules that need a metric it does not measure (job/metric_table.py).
NOT_MEASURED = {"generate": "turns scoring off (no label probabilities)",
                "score": "generates no verdict (nothing to parse or match)"}
_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # a run id, a launch id
_REPO = r"^[A-Za-z0-9][\w.-]*/[\w.-]+$"  # a Hub repo id


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def from_settings(cls, s: Any, card: ModelSpec) -> Self:
        """Each field from its variable, else (card-backed and unset or empty) from the card; then `_derived`."""
        values = {}
        for name, info in cls.model_fields.items():
            found = meta(info)
            value = getattr(s, found["env"]) if found["env"] else None
            if (value is None or value == "") and found["card"]:
                value = getattr(card, found["card"])
            values[name] = value
        return cls.model_validate(cls._derived(values, s))

    @classmethod
    def _derived(cls, values: dict[str, Any], s: Any) -> dict[str, Any]:
        return values

    @staticmethod
    def rules(s: Any, card: ModelSpec) -> list[str]:
        """The problems of the rules that involve more than one variable (each has its raise-test)."""
        return []


def share_or_count(value: int | float) -> int | float:
    """SFT_EVAL_HOLDOUT: a share of the rows (0 < x < 1) or a row count (>= 1)."""
    if (isinstance(value, int) and value >= 1) or (isinstance(value, float) and 0 < value < 1):
        return value
    raise ValueError("must be a share of the rows (0 < x < 1, e.g. 0.1) or a row count (an integer >= 1)")


def label_name_list(value: Any) -> Any:
    """SFT_LABEL_NAMES (comma separated): at least one name, each once (index i of a label column is the i-th)."""
    names = [m.strip() for m in value.split(",")] if isinstance(value, str) else value
    if value is None:
        return value
    if not names or any(not name for name in names):
        raise ValueError("must name every class, comma separated, none empty (e.g. non-sarcastic,sarcastic)")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"names {', '.join(repeated)} more than once: each class needs its own name")
    return value


def module_names(value: Any) -> Any:
    """SFT_LORA_TARGET_MODULES (comma separated) names at least one module."""
    names = [m for m in value.split(",") if m.strip()] if isinstance(value, str) else value
    if value is not None and not names:
        raise ValueError("must name at least one module, comma separated")
    return value


class ModelConfig(_Section):
    id: str = setting(env="model_id", card="model_id", examples=["Qwen/Qwen3-VL-8B-Instruct", "/models/qwen3-vl-8b"])
    revision: str | None = setting(env="model_revision", card="revision", examples=["main", "0123abcd"])
    trust_remote_code: bool = setting(False, env="trust_remote_code", examples=["false"])
    load_in_4bit: bool = setting(True, env="load_in_4bit", examples=["true"])
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = setting(
        "auto", env="attn_implementation", examples=["sdpa"])
    quant_skip_modules: tuple[str, ...] = setting(card="quant_skip_modules")
    gradient_checkpointing: bool = setting(True, env="gradient_checkpointing", examples=["true"])
    # Liger's fused kernels (RMSNorm, SwiGLU, fused linear cross-entropy): "auto" = on with CUDA and liger-kernel.
    use_liger: Literal["auto", "true", "false"] = setting("auto", env="use_liger", examples=["auto"])


class DataConfig(_Section):
    uri: str | None = setting(None, env="dataset_uri", examples=["/data/sarcasm", "s3://bucket/sarcasm", "org/sarcasm"])
    revision: str | None = setting(None, env="dataset_revision", examples=["main"])
    config: str | None = setting(None, env="dataset_config", examples=["default"])
    train_split: str = setting("train", env="train_split", min_length=1, examples=["train"])
    eval_split: str = setting("validation", env="eval_split", min_length=1, examples=["validation"])
    train_subset: int | None = setting(None, env="train_subset", ge=1, examples=["1000"])
    eval_subset: int | None = setting(None, env="eval_subset", ge=1, examples=["200"])
    image_key: str = setting("image", env="image_key", min_length=1, examples=["image"])
    query_key: str = setting("query", env="query_key", min_length=1, examples=["query"])
    caption_key: str = setting("caption", env="caption_key", min_length=1, examples=["caption"])
    target_key: str = setting("target_json", env="target_key", min_length=1, examples=["target_json", "text_label"])
    label_field: str = setting("label", env="label_field", min_length=1, examples=["label"])
    system_prompt: str = setting(env="system_prompt", examples=["You are a sarcasm detector."])  # _derived
    # preflight: what to do with rows that fail the checks (job/preflight/run.py)
    bad_rows: Literal["fail", "skip"] = setting("fail", env="bad_rows", examples=["fail", "skip"])
    max_bad_fraction: float = setting(0.01, env="max_bad_fraction", ge=0, le=1, examples=["0.01"])
    # a source with one split: the share (0 < x < 1) or number (>= 1) of its rows held out for eval
    eval_holdout: int | float = setting(0.1, env="eval_holdout", examples=["0.1", "200"])
    # eval rows identical to training rows above this share fail preflight (the gate would measure memorisation)
    max_eval_overlap: float = setting(0.01, env="max_eval_overlap", ge=0, le=1, examples=["0.01"])
    # preflight warns about a label with fewer training rows than this (0: never), and about a largest/smallest
    # training-label ratio above SFT_MAX_CLASS_RATIO
    min_class_rows: int = setting(10, env="min_class_rows", ge=0, examples=["10"])
    max_class_ratio: float = setting(20.0, env="max_class_ratio", ge=1, examples=["20"])
    # (#35, appended: the JSON form keeps its order) the public datasets' shape (job/data/labels.py). json: the target
    # column holds the verdict; label: a class label, and the verdict is {SFT_LABEL_FIELD: its name}
    target_format: Literal["json", "label"] = setting("json", env="target_format", examples=["json", "label"])
    # SFT_TARGET_FORMAT=label: the name of each class index of a plain integer column (comma separated)
    label_names: tuple[str, ...] | None = setting(None, env="label_names", flat="str",
                                                  examples=["non-sarcastic,sarcastic"])
    # the user question of every row, for data without a query column
    query_text: str | None = setting(None, env="query_text", min_length=1,
                                     examples=["Is this post sarcastic? Answer in JSON."])

    _holdout = field_validator("eval_holdout")(share_or_count)
    _names = field_validator("label_names")(label_name_list)

    @field_validator("label_names", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        """SFT_LABEL_NAMES is comma separated; surrounding spaces are dropped (an empty name is an error)."""
        return tuple(name.strip() for name in value.split(",")) if isinstance(value, str) else value

    @classmethod
    def _derived(cls, values: dict[str, Any], s: Any) -> dict[str, Any]:
        # An empty SFT_SYSTEM_PROMPT is a choice (no system turn), so only None falls back to the default prompt.
        prompt = values["system_prompt"]
        return {**values, "system_prompt": prompt if prompt is not None else Queries().SYSTEM_PROMPT}

    @staticmethod
    def rules(s: Any, card: ModelSpec) -> list[str]:
        problems = []
        if s.train_split == s.eval_split:
            problems.append(f"SFT_TRAIN_SPLIT and SFT_EVAL_SPLIT are both {s.train_split!r}: evaluating on the "
                            "training split hides overfitting; use a held-out split (e.g. SFT_EVAL_SPLIT=validation)")
        if s.label_names is not None and s.target_format != "label":
            problems.append("SFT_LABEL_NAMES names the classes of a label column and only applies with "
                            "SFT_TARGET_FORMAT=label: set SFT_TARGET_FORMAT=label, or unset SFT_LABEL_NAMES")
        if s.query_text is not None and not s.query_text.strip():
            problems.append("SFT_QUERY_TEXT is blank: write the question every row is asked, or unset it")
        if s.query_text is not None and "query_key" in s.model_fields_set:
            problems.append(f"SFT_QUERY_TEXT asks every row the same question and SFT_QUERY_KEY={s.query_key!r} "
                            "names a query column: set one of them")
        return problems


class ImageConfig(_Section):
    min_pixels: int = setting(env="image_min_pixels", card="image_min_pixels", ge=1024, examples=["65536"])
    max_pixels: int = setting(env="image_max_pixels", card="image_max_pixels", ge=1024, le=4096 * 4096,
                              examples=["1048576"])

    @staticmethod
    def rules(s: Any, card: ModelSpec) -> list[str]:
        problems = []
        min_px = s.image_min_pixels or card.image_min_pixels
        max_px = s.image_max_pixels or card.image_max_pixels
        max_length = s.max_length or card.max_length
        if min_px > max_px:
            problems.append(
                f"SFT_IMAGE_MIN_PIXELS={min_px} is larger than SFT_IMAGE_MAX_PIXELS={max_px}: min must be <= max")
        visual_tokens_at_cap = max_px // card.pixels_per_visual_token
        if visual_tokens_at_cap + 32 > max_length:
            problems.append(
                f"SFT_MAX_LENGTH={max_length} cannot hold one image at SFT_IMAGE_MAX_PIXELS={max_px} "
                f"({visual_tokens_at_cap} visual tokens) plus the prompt: raise SFT_MAX_LENGTH or lower the pixel cap")
        return problems


class TrainConfig(_Section):
    output_dir: str = setting("outputs", env="output_dir", min_length=1, examples=["/workspace/outputs"])
    run_id: str | None = setting(None, env="run_id", pattern=_ID, examples=["sarcasm-2026-11-25"])
    seed: int = setting(42, env="seed", ge=0, examples=["42"])
    max_steps: int = setting(-1, env="max_steps", ge=-1, examples=["500", "-1 (train SFT_NUM_EPOCHS epochs)"])
    num_epochs: float = setting(1.0, env="num_epochs", gt=0, le=1000, examples=["1", "2.5"])
    save_steps: int = setting(50, env="save_steps", ge=1, examples=["50"])  # _derived: effective_save_steps
    save_total_limit: int = setting(3, env="save_total_limit", ge=1, examples=["3"])
    learning_rate: float = setting(env="learning_rate", card="learning_rate", gt=0, le=1, examples=["2e-4"])
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = setting(
        "cosine", env="lr_scheduler_type", examples=["cosine"])
    warmup_ratio: float = setting(0.03, env="warmup_ratio", ge=0, lt=1, examples=["0.03"])
    weight_decay: float = setting(0.0, env="weight_decay", ge=0, lt=1, examples=["0.0"])
    max_grad_norm: float = setting(1.0, env="max_grad_norm", gt=0, examples=["1.0"])
    per_device_batch_size: int = setting(2, env="per_device_batch_size", ge=1, le=512, examples=["2"])
    grad_accum: int = setting(8, env="grad_accum", ge=1, le=4096, examples=["8"])
    max_length: int = setting(env="max_length", card="max_length", ge=64, le=262144, examples=["2048"])
    logging_steps: int = setting(10, env="logging_steps", ge=1, examples=["10"])
    dataloader_num_workers: int = setting(2, env="dataloader_num_workers", ge=0, le=64, examples=["2"])
    # batches of rows with similar token counts (lengths from preflight): far less padding than random batches
    group_by_length: bool = setting(True, env="group_by_length", examples=["true"])
    # seconds between SIGTERM and the forced exit (Kubernetes' grace period minus a margin)
    preempt_grace_s: float = setting(25.0, env="preempt_grace_s", gt=0, le=3600, examples=["25"])
    # processes per node for `run` (job/train/launch.py): unset = one per visible CUDA device; 1 = no launcher
    nproc_per_node: int | None = setting(None, env="nproc_per_node", ge=1, le=1024,
                                         examples=["8", "2 (on the CPU: gloo)", "1"])
    # how the exit code leaves the process: `kubeflow` moves retryable 1 and 3 to 129 and 131 (PyTorchJob ExitCode)
    exit_codes: Literal["standard", "kubeflow"] = setting("standard", env="exit_codes",
                                                          examples=["standard", "kubeflow"])
    # what to do with COMPLETED checkpoints in SFT_OUTPUT_DIR / SFT_CHECKPOINT_URI (job/train/resume.py)
    resume: Literal["auto", "never", "require"] = setting("auto", env="resume", examples=["auto", "never", "require"])
    # one launch of the job, shared by its retries (k8s/job.yaml: the Job's uid): with SFT_RESUME=never, a retried pod
    # continues the run its launch's first pod started instead of starting it again (job/train/rerun.py)
    launch_id: str | None = setting(None, env="launch_id", pattern=_ID,
                                    examples=["0b7c8f0e-3a52-4c1f-9d7e-2f1a6c9b4e11"])

    @classmethod
    def _derived(cls, values: dict[str, Any], s: Any) -> dict[str, Any]:
        return {**values, "save_steps": effective_save_steps(s)}

    @staticmethod
    def rules(s: Any, card: ModelSpec) -> list[str]:
        # Only when both were set: SFT_MAX_STEPS=5 alone saves every min(50, 5) steps (effective_save_steps).
        if {"max_steps", "save_steps"} <= s.model_fields_set and s.max_steps > 0 and s.save_steps > s.max_steps:
            return [f"SFT_SAVE_STEPS={s.save_steps} exceeds SFT_MAX_STEPS={s.max_steps}: no resumable checkpoint "
                    "would be written before the end; lower SFT_SAVE_STEPS"]
        return []


class LoraConfig(_Section):
    r: int = setting(env="lora_r", card="lora_r", ge=1, le=1024, examples=["16"])
    # int | float, not float: the card's alpha is an int (dumped as 32) and SFT_LORA_ALPHA a float (64.0); the JSON
    # form keeps each as it was.
    alpha: int | float = setting(env="lora_alpha", card="lora_alpha", flat="float", gt=0, examples=["32"])
    dropout: float = setting(env="lora_dropout", card="lora_dropout", ge=0, lt=1, examples=["0.05"])
    target_modules: tuple[str, ...] = setting(env="lora_target_modules", card="lora_target_modules", flat="str",
                                              examples=["q_proj,k_proj,v_proj,o_proj"])
    scope_regex: str = setting(card="lora_scope_regex")

    _names = field_validator("target_modules")(module_names)

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_module_list(cls, value: Any) -> Any:
        """SFT_LORA_TARGET_MODULES is comma separated; blanks and surrounding spaces are dropped."""
        if isinstance(value, str):
            return tuple(m.strip() for m in value.split(",") if m.strip())
        return value


class EvalConfig(_Section):
    max_new_tokens: int = setting(env="eval_max_new_tokens", card="eval_max_new_tokens", ge=1, le=8192,
                                  examples=["256"])
    batch_size: int = setting(env="eval_batch_size", card="eval_batch_size", ge=1, le=512, examples=["8"])
    do_sample: bool = setting(False, env="eval_do_sample", examples=["false"])
    temperature: float = setting(0.7, env="eval_temperature", ge=0, le=10, examples=["0.7"])
    pre: bool = setting(True, env="eval_pre", examples=["true"])
    post: bool = setting(True, env="eval_post", examples=["true"])
    adapter: str | None = setting(None, env="eval_adapter", examples=["outputs/adapter"])
    stop_tokens: tuple[str, ...] = setting(card="stop_tokens")
    # generate: trimmed decoding; score: each label's answer scored (probabilities, no generation); both; auto =
    # both when the training split gives the label set, else generate (job/eval/score.py resolves it)
    mode: Literal["auto", "generate", "score", "both"] = setting("auto", env="eval_mode", examples=["both", "generate"])
    # every N optimizer steps, score SFT_EVAL_DURING_TRAIN_ROWS eval rows; the best step's adapter is the one kept
    steps: int | None = setting(None, env="eval_steps", ge=1, examples=["50"])
    during_train_rows: int = setting(128, env="eval_during_train_rows", ge=1, examples=["128"])
    best_metric: BestMetric = setting(PRIMARY, env="best_metric", examples=["macro_f1", "log_loss"])

    @staticmethod
    def rules(s: Any, card: ModelSpec) -> list[str]:
        problems = []
        if s.eval_do_sample and s.eval_temperature <= 0:
            problems.append("SFT_EVAL_DO_SAMPLE=true needs SFT_EVAL_TEMPERATURE > 0 (e.g. 0.7), or set "
                            "SFT_EVAL_DO_SAMPLE=false")
        unused = sorted({"best_metric", "eval_during_train_rows"} & s.model_fields_set) if s.eval_steps is None else []
        if unused:
            problems.append(f"{', '.join(env_name(f) for f in unused)} only apply with SFT_EVAL_STEPS (eval during "
                            "training): set SFT_EVAL_STEPS=N or unset them")
        # The eval during training scores (SFT_BEST_METRIC is one of BEST_METRICS): the mode must measure them.
        if s.eval_steps is not None and not set(BEST_METRICS) <= set(EVAL_MODE_METRICS[s.eval_mode]):
            best = f" and SFT_BEST_METRIC={s.best_metric}" if "best_metric" in s.model_fields_set else ""
            problems.append(f"SFT_EVAL_STEPS{best} score{'' if best else 's'} the labels during training, and "
                            f"SFT_EVAL_MODE={s.eval_mode} {NOT_MEASURED[s.eval_mode]}: use SFT_EVAL_MODE=auto, "
                            "score or both, or unset SFT_EVAL_STEPS")
        return problems


class WandbConfig(_Section):
    enabled: bool = setting(True, env="wandb_enabled", examples=["true"])


class StorageConfig(_Section):
    checkpoint_uri: str | None = setting(None, env="checkpoint_uri", pattern=r"^s3://[^/]+(/.*)?$",
                                         examples=["s3://my-bucket/qwen3-sft"])
    cache_dir: str | None = setting(None, env="cache_dir", examples=["/cache/qwen3-sft"])
    # parallel transfers per file (boto3's TransferConfig.max_concurrency)
    s3_concurrency: int = setting(16, env="s3_concurrency", ge=1, le=256, examples=["16"])

    @field_validator("checkpoint_uri")
    @classmethod
    def _no_trailing_slash(cls, value: str | None) -> str | None:
        """s3://bucket/prefix/ and s3://bucket/prefix name the same place; run ids are appended with a '/'."""
        return value.rstrip("/") if value else None


class HubConfig(_Section):
    repo_id: str | None = setting(None, env="hub_repo_id", pattern=_REPO, examples=["my-org/qwen3-vl-sarcasm-lora"])
    private: bool = setting(True, env="hub_private", examples=["true"])
    min_metric: str | None = setting(None, env="push_min_metric",
                                     pattern=rf"^({'|'.join(GATE_METRICS)}):(0(\.\d+)?|1(\.0+)?)$",
                                     examples=["macro_f1:0.70"])
    require_improvement: bool = setting(True, env="push_require_improvement", examples=["true"])

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


class ExportConfig(_Section):
    """qwen3-sft export / SFT_EXPORT: the adapter merged into the unquantized base (job/export/)."""

    enabled: bool = setting(False, env="export", examples=["false"])
    verify_rows: int | None = setting(None, env="export_verify_rows", ge=1, examples=["200"])
    max_drop: float = setting(0.01, env="export_max_drop", ge=0, le=1, examples=["0.01"])
    repo_id: str | None = setting(None, env="export_repo_id", pattern=_REPO, examples=["my-org/qwen3-vl-sarcasm"])

    @staticmethod
    def rules(s: Any, card: ModelSpec) -> list[str]:
        if s.export_repo_id and s.hub_repo_id and s.export_repo_id.lower() == s.hub_repo_id.lower():
            return [f"SFT_EXPORT_REPO_ID and SFT_HUB_REPO_ID are both {s.hub_repo_id!r}: the merged model and the "
                    "adapter need their own repos (a repo with adapter_config.json loads as an adapter); name another "
                    "repo"]
        return []


class LineageConfig(_Section):
    image_digest: str | None = setting(None, env="image_digest", examples=["sha256:0123abcd..."])


class CardConfig(_Section):
    tags: tuple[str, ...] = setting(card="tags")
    # how the model card, its tags and the eval dataset name describe the task
    task_name: str = setting("sarcasm", env="task_name", min_length=1, max_length=64, examples=["sarcasm", "colour"])
    task_description: str = setting(
        "Multimodal sarcasm detection: an image, a query and an optional caption in, a JSON verdict out.",
        env="task_description", min_length=1,
        examples=["Colour classification of product photos, a JSON label out."])

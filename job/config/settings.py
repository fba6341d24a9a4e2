"""The `SFT_*` environment variables, validated by pydantic-settings (`load_settings`).

Every problem in the environment is collected and raised once as a `ConfigError` (exit 2): type and range errors,
cross-field rules and unknown `SFT_*` names (with a "did you mean"). `job.config.schema` turns the validated
`Settings` and a model card into the typed `JobConfig` the job reads.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from job.cards import ModelSpec
from job.errors import ConfigError
from job.metric_table import BEST_METRICS, EVAL_MODE_METRICS, EVAL_MODES, GATE_METRICS, PRIMARY, BestMetric

ENV_PREFIX = "SFT_"
# What each SFT_EVAL_MODE measures, what SFT_PUSH_MIN_METRIC may gate on and SFT_BEST_METRIC may pick: the metric
# table (job/metric_table.py). A scoring metric under auto is checked once the label set is known, before any weights
# load (job/train/prepare.py check_gate_measurable). The eval during training (SFT_EVAL_STEPS) always scores.
_NOT_MEASURED = {"generate": "turns scoring off (no label probabilities)",
                 "score": "generates no verdict (nothing to parse or match)"}
# Standard variables that keep their own names. Their values are secrets: never logged, never stored.


class Settings(BaseSettings):
    """Every `SFT_*` variable. None means "use the model card's default"."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, case_sensitive=False, extra="ignore")

    # model
    model_id: str | None = Field(None, examples=["Qwen/Qwen3-VL-8B-Instruct", "/models/qwen3-vl-8b"])
    model_revision: str | None = Field(None, examples=["main", "0123abcd"])
    trust_remote_code: bool = Field(False, examples=["false"])
    load_in_4bit: bool = Field(True, examples=["true"])
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field("auto", examples=["sdpa"])
    gradient_checkpointing: bool = Field(True, examples=["true"])
    # Liger's fused kernels (RMSNorm, SwiGLU, fused linear cross-entropy): "auto" = on with CUDA and liger-kernel.
    use_liger: Literal["auto", "true", "false"] = Field("auto", examples=["auto"])
    # data
    dataset_uri: str | None = Field(None, examples=["/data/sarcasm", "s3://bucket/sarcasm", "org/sarcasm"])
    dataset_revision: str | None = Field(None, examples=["main"])
    dataset_config: str | None = Field(None, examples=["default"])
    train_split: str = Field("train", min_length=1, examples=["train"])
    eval_split: str = Field("validation", min_length=1, examples=["validation"])
    train_subset: int | None = Field(None, ge=1, examples=["1000"])
    eval_subset: int | None = Field(None, ge=1, examples=["200"])
    image_key: str = Field("image", min_length=1, examples=["image"])
    query_key: str = Field("query", min_length=1, examples=["query"])
    caption_key: str = Field("caption", min_length=1, examples=["caption"])
    target_key: str = Field("target_json", min_length=1, examples=["target_json"])
    label_field: str = Field("label", min_length=1, examples=["label"])
    system_prompt: str | None = Field(None, examples=["You are a sarcasm detector."])
    image_min_pixels: int | None = Field(None, ge=1024, examples=["65536"])
    image_max_pixels: int | None = Field(None, ge=1024, le=4096 * 4096, examples=["1048576"])
    # preflight: what to do with rows that fail the checks (job/preflight/run.py)
    bad_rows: Literal["fail", "skip"] = Field("fail", examples=["fail", "skip"])
    max_bad_fraction: float = Field(0.01, ge=0, le=1, examples=["0.01"])
    # a source with one split: the share (0 < x < 1) or number (>= 1) of its rows held out for eval
    eval_holdout: int | float = Field(0.1, examples=["0.1", "200"])
    # eval rows identical to training rows above this share fail preflight (the gate would measure memorisation)
    max_eval_overlap: float = Field(0.01, ge=0, le=1, examples=["0.01"])
    # preflight warns about a label with fewer training rows than this (0: never), and about a largest/smallest
    # training-label ratio above SFT_MAX_CLASS_RATIO
    min_class_rows: int = Field(10, ge=0, examples=["10"])
    max_class_ratio: float = Field(20.0, ge=1, examples=["20"])
    # run and output
    output_dir: str = Field("outputs", min_length=1, examples=["/workspace/outputs"])
    run_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", examples=["sarcasm-2026-11-25"])
    seed: int = Field(42, ge=0, examples=["42"])
    # processes per node for `run` (job/train/launch.py): unset = one per visible CUDA device; 1 = no launcher
    nproc_per_node: int | None = Field(None, ge=1, le=1024, examples=["8", "2 (on the CPU: gloo)", "1"])
    # how the exit code leaves the process: `kubeflow` moves retryable 1 and 3 to 129 and 131 (PyTorchJob ExitCode)
    exit_codes: Literal["standard", "kubeflow"] = Field("standard", examples=["standard", "kubeflow"])
    # training
    max_steps: int = Field(-1, ge=-1, examples=["500", "-1 (train SFT_NUM_EPOCHS epochs)"])
    num_epochs: float = Field(1.0, gt=0, le=1000, examples=["1", "2.5"])
    save_steps: int = Field(50, ge=1, examples=["50"])
    save_total_limit: int = Field(3, ge=1, examples=["3"])
    learning_rate: float | None = Field(None, gt=0, le=1, examples=["2e-4"])
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", examples=["cosine"]
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, examples=["0.03"])
    weight_decay: float = Field(0.0, ge=0, lt=1, examples=["0.0"])
    max_grad_norm: float = Field(1.0, gt=0, examples=["1.0"])
    per_device_batch_size: int = Field(2, ge=1, le=512, examples=["2"])
    grad_accum: int = Field(8, ge=1, le=4096, examples=["8"])
    max_length: int | None = Field(None, ge=64, le=262144, examples=["2048"])
    logging_steps: int = Field(10, ge=1, examples=["10"])
    dataloader_num_workers: int = Field(2, ge=0, le=64, examples=["2"])
    # batches of rows with similar token counts (lengths from preflight): far less padding than random batches
    group_by_length: bool = Field(True, examples=["true"])
    # seconds between SIGTERM and the forced exit (Kubernetes' grace period minus a margin)
    preempt_grace_s: float = Field(25.0, gt=0, le=3600, examples=["25"])
    # what to do with COMPLETED checkpoints in SFT_OUTPUT_DIR / SFT_CHECKPOINT_URI (job/train/resume.py)
    resume: Literal["auto", "never", "require"] = Field("auto", examples=["auto", "never", "require"])
    # one launch of the job, shared by its retries (k8s/job.yaml: the Job's uid): with SFT_RESUME=never, a retried pod
    # continues the run its launch's first pod started instead of starting it again (job/train/rerun.py)
    launch_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
                                  examples=["0b7c8f0e-3a52-4c1f-9d7e-2f1a6c9b4e11"])
    # LoRA
    lora_r: int | None = Field(None, ge=1, le=1024, examples=["16"])
    lora_alpha: float | None = Field(None, gt=0, examples=["32"])
    lora_dropout: float | None = Field(None, ge=0, lt=1, examples=["0.05"])
    lora_target_modules: str | None = Field(None, examples=["q_proj,k_proj,v_proj,o_proj"])
    # eval
    eval_max_new_tokens: int | None = Field(None, ge=1, le=8192, examples=["256"])
    eval_batch_size: int | None = Field(None, ge=1, le=512, examples=["8"])
    eval_do_sample: bool = Field(False, examples=["false"])
    eval_temperature: float = Field(0.7, ge=0, le=10, examples=["0.7"])
    eval_pre: bool = Field(True, examples=["true"])
    eval_post: bool = Field(True, examples=["true"])
    eval_adapter: str | None = Field(None, examples=["outputs/adapter"])
    # generate: trimmed decoding; score: each label's answer scored (probabilities, no generation); both; auto =
    # both when the training split gives the label set, else generate (job/eval/score.py)
    eval_mode: Literal["auto", "generate", "score", "both"] = Field("auto", examples=["both", "generate"])
    # every N optimizer steps, score SFT_EVAL_DURING_TRAIN_ROWS eval rows; the best step's adapter is the one kept
    eval_steps: int | None = Field(None, ge=1, examples=["50"])
    eval_during_train_rows: int = Field(128, ge=1, examples=["128"])
    best_metric: BestMetric = Field(PRIMARY, examples=["macro_f1", "log_loss"])
    # integrations
    wandb_enabled: bool = Field(True, examples=["true"])
    # storage and publishing
    checkpoint_uri: str | None = Field(None, pattern=r"^s3://[^/]+(/.*)?$", examples=["s3://my-bucket/qwen3-sft"])
    cache_dir: str | None = Field(None, examples=["/cache/qwen3-sft"])
    s3_concurrency: int = Field(16, ge=1, le=256, examples=["16"])
    hub_repo_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", examples=["my-org/qwen3-vl-sarcasm-lora"]
    )
    hub_private: bool = Field(True, examples=["true"])
    push_min_metric: str | None = Field(
        None,
        pattern=rf"^({'|'.join(GATE_METRICS)}):(0(\.\d+)?|1(\.0+)?)$",
        examples=["macro_f1:0.70"],
    )
    push_require_improvement: bool = Field(True, examples=["true"])
    image_digest: str | None = Field(None, examples=["sha256:0123abcd..."])
    # how the model card, its tags and the eval dataset name describe the task
    task_name: str = Field("sarcasm", min_length=1, max_length=64, examples=["sarcasm", "colour"])
    task_description: str = Field(
        "Multimodal sarcasm detection: an image, a query and an optional caption in, a JSON verdict out.",
        min_length=1, examples=["Colour classification of product photos, a JSON label out."],
    )
    # export: the adapter merged into the base (job/export/), its proof and its push
    export: bool = Field(False, examples=["false"])
    export_verify_rows: int | None = Field(None, ge=1, examples=["200"])
    export_max_drop: float = Field(0.01, ge=0, le=1, examples=["0.01"])
    export_repo_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", examples=["my-org/qwen3-vl-sarcasm"]
    )

    @field_validator("eval_holdout")
    @classmethod
    def _holdout_share_or_count(cls, value: int | float) -> int | float:
        if (isinstance(value, int) and value >= 1) or (isinstance(value, float) and 0 < value < 1):
            return value
        raise ValueError("must be a share of the rows (0 < x < 1, e.g. 0.1) or a row count (an integer >= 1)")

    @field_validator("lora_target_modules")
    @classmethod
    def _non_empty_module_list(cls, value: str | None) -> str | None:
        if value is not None and not [m for m in value.split(",") if m.strip()]:
            raise ValueError("must name at least one module, comma separated")
        return value


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


KNOWN_ENV_VARS = tuple(sorted(env_name(f) for f in Settings.model_fields))


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' env source, reading a given mapping instead of os.environ (tests, dry runs)."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]):
        self._mapping = dict(env)
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._mapping, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


def _settings_from(env: Mapping[str, str]) -> Settings:
    class _Scoped(Settings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, **_sources):
            return (init_settings, _MappingEnvSource(settings_cls, env))

    return _Scoped()


def _unknown_var_problems(env: Mapping[str, str]) -> list[str]:
    problems = []
    for name in sorted(k for k in env if k.upper().startswith(ENV_PREFIX)):
        if name.upper() in KNOWN_ENV_VARS:
            continue
        close = difflib.get_close_matches(name.upper(), KNOWN_ENV_VARS, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else f"; known names: see README (e.g. {KNOWN_ENV_VARS[0]})"
        problems.append(f"{name}: unknown setting{hint}")
    return problems


def _field_problems(exc: ValidationError, env: Mapping[str, str]) -> list[str]:
    upper_env = {k.upper(): v for k, v in env.items()}
    problems = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        name = env_name(field)
        info = Settings.model_fields.get(field)
        examples = ", ".join(map(str, (info.examples or []) if info else []))
        value = upper_env.get(name, err.get("input"))
        example = f" (example: {name}={examples.split(', ')[0]})" if examples else ""
        problems.append(f"{name}={value!r}: {err['msg']}{example}")
    return problems


def cross_field_problems(s: Settings, card: ModelSpec) -> list[str]:
    """Rules that involve more than one variable. Each has its own raise-test in tests/config/test_config.py."""
    problems = []
    min_px = s.image_min_pixels or card.image_min_pixels
    max_px = s.image_max_pixels or card.image_max_pixels
    max_length = s.max_length or card.max_length
    if min_px > max_px:
        problems.append(
            f"SFT_IMAGE_MIN_PIXELS={min_px} is larger than SFT_IMAGE_MAX_PIXELS={max_px}: min must be <= max"
        )
    visual_tokens_at_cap = max_px // card.pixels_per_visual_token
    if visual_tokens_at_cap + 32 > max_length:
        problems.append(
            f"SFT_MAX_LENGTH={max_length} cannot hold one image at SFT_IMAGE_MAX_PIXELS={max_px} "
            f"({visual_tokens_at_cap} visual tokens) plus the prompt: raise SFT_MAX_LENGTH or lower the pixel cap"
        )
    if s.train_split == s.eval_split:
        problems.append(
            f"SFT_TRAIN_SPLIT and SFT_EVAL_SPLIT are both {s.train_split!r}: evaluating on the training split "
            "hides overfitting; use a held-out split (e.g. SFT_EVAL_SPLIT=validation)"
        )
    if s.eval_do_sample and s.eval_temperature <= 0:
        problems.append(
            "SFT_EVAL_DO_SAMPLE=true needs SFT_EVAL_TEMPERATURE > 0 (e.g. 0.7), or set SFT_EVAL_DO_SAMPLE=false"
        )
    # Only when both were set: SFT_MAX_STEPS=5 alone saves every min(50, 5) steps (effective_save_steps).
    if {"max_steps", "save_steps"} <= s.model_fields_set and s.max_steps > 0 and s.save_steps > s.max_steps:
        problems.append(
            f"SFT_SAVE_STEPS={s.save_steps} exceeds SFT_MAX_STEPS={s.max_steps}: no resumable checkpoint would be "
            "written before the end; lower SFT_SAVE_STEPS"
        )
    unused = sorted({"best_metric", "eval_during_train_rows"} & s.model_fields_set) if s.eval_steps is None else []
    if unused:
        problems.append(f"{', '.join(env_name(f) for f in unused)} only apply with SFT_EVAL_STEPS (eval during "
                        "training): set SFT_EVAL_STEPS=N or unset them")
    # The eval during training scores (SFT_BEST_METRIC is one of BEST_METRICS): the mode must measure them.
    if s.eval_steps is not None and not set(BEST_METRICS) <= set(EVAL_MODE_METRICS[s.eval_mode]):
        best = f" and SFT_BEST_METRIC={s.best_metric}" if "best_metric" in s.model_fields_set else ""
        problems.append(f"SFT_EVAL_STEPS{best} score{'' if best else 's'} the labels during training, and "
                        f"SFT_EVAL_MODE={s.eval_mode} {_NOT_MEASURED[s.eval_mode]}: use SFT_EVAL_MODE=auto, score or "
                        "both, or unset SFT_EVAL_STEPS")
    if s.push_min_metric and not s.eval_post:
        problems.append("SFT_PUSH_MIN_METRIC needs the post-eval: set SFT_EVAL_POST=true or unset the gate")
    gate = s.push_min_metric.partition(":")[0] if s.push_min_metric else None
    if gate and gate not in EVAL_MODE_METRICS[s.eval_mode]:
        modes = [m for m in EVAL_MODES if gate in EVAL_MODE_METRICS[m]]
        can = [m for m in GATE_METRICS if m in EVAL_MODE_METRICS[s.eval_mode]]
        problems.append(f"SFT_PUSH_MIN_METRIC={s.push_min_metric} gates on {gate}, and SFT_EVAL_MODE={s.eval_mode} "
                        f"{_NOT_MEASURED[s.eval_mode]}, so the gate could only refuse after training: use "
                        f"SFT_EVAL_MODE={' or '.join(modes)}, or gate on {', '.join(can)}")
    if s.export_repo_id and s.hub_repo_id and s.export_repo_id.lower() == s.hub_repo_id.lower():
        problems.append(
            f"SFT_EXPORT_REPO_ID and SFT_HUB_REPO_ID are both {s.hub_repo_id!r}: the merged model and the adapter "
            "need their own repos (a repo with adapter_config.json loads as an adapter); name another repo"
        )
    return problems


def load_settings(card: ModelSpec, env: Mapping[str, str] | None = None) -> Settings:
    """Validate the environment; raise one ConfigError listing every problem."""
    env = dict(os.environ if env is None else env)
    problems = _unknown_var_problems(env)
    try:
        settings = _settings_from(env)
    except ValidationError as exc:
        raise ConfigError(problems + _field_problems(exc, env)) from None
    problems += cross_field_problems(settings, card)
    if problems:
        raise ConfigError(problems)
    return settings


def effective_save_steps(s: Settings) -> int:
    """The save interval follows a short run: a default SFT_SAVE_STEPS larger than SFT_MAX_STEPS becomes it."""
    return min(s.save_steps, s.max_steps) if s.max_steps > 0 else s.save_steps

"""The typed, immutable job configuration: one frozen pydantic model per concern, built from `Settings` + a card.

`build_cfg(ModelCards().qwen3_vl_8b_instruct)` returns a `JobConfig`, read as `cfg.train.max_length`,
`cfg.lora.r`, ... Each section builds itself from the validated settings and the model card (`from_settings`),
with the card's default wherever a setting is unset; normalising validators sit beside their fields.

Sections hold tuples, not lists, so a config cannot change after it is built; a changed copy is
`cfg.replace(train={"max_steps": 5})`. `cfg.model_dump(mode="json")` is the JSON form the `config` command prints
and training_meta.json, W&B and the resume fingerprint store: the same keys, in the same order, as the nested dict
build_cfg returned before 0.2 (tests/config/test_config.py locks it).

Only what the user configured lives here. What a later step learns (the local mirror of an s3:// source) is
`job.storage.sources.Sources`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, field_validator

from job.cards import ModelSpec
from job.config.settings import Settings, effective_save_steps, load_settings
from job.prompts import Queries


class _Section(BaseModel):
    # extra="forbid": a misspelt key in replace() is an error, not a silently ignored setting.
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(_Section):
    id: str
    revision: str | None
    trust_remote_code: bool
    load_in_4bit: bool
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"]
    quant_skip_modules: tuple[str, ...]
    gradient_checkpointing: bool
    use_liger: Literal["auto", "true", "false"]

    @classmethod
    def from_settings(cls, s: Settings, card: ModelSpec) -> Self:
        return cls(id=s.model_id or card.model_id, revision=s.model_revision or card.revision,
                   trust_remote_code=s.trust_remote_code, load_in_4bit=s.load_in_4bit,
                   attn_implementation=s.attn_implementation, quant_skip_modules=card.quant_skip_modules,
                   gradient_checkpointing=s.gradient_checkpointing, use_liger=s.use_liger)


class DataConfig(_Section):
    uri: str | None
    revision: str | None
    config: str | None
    train_split: str
    eval_split: str
    train_subset: int | None
    eval_subset: int | None
    image_key: str
    query_key: str
    caption_key: str
    target_key: str
    label_field: str
    system_prompt: str
    bad_rows: Literal["fail", "skip"]
    max_bad_fraction: float
    eval_holdout: int | float  # a source with one split: the share (< 1) or row count (>= 1) held out for eval
    max_eval_overlap: float
    min_class_rows: int  # preflight's small-class warning (0: off)
    max_class_ratio: float  # preflight's imbalance warning: largest/smallest training label

    @classmethod
    def from_settings(cls, s: Settings, card: ModelSpec) -> Self:
        # An empty SFT_SYSTEM_PROMPT is a choice (no system turn), so only None falls back to the default prompt.
        prompt = s.system_prompt if s.system_prompt is not None else Queries().SYSTEM_PROMPT
        return cls(uri=s.dataset_uri, revision=s.dataset_revision, config=s.dataset_config,
                   train_split=s.train_split, eval_split=s.eval_split, train_subset=s.train_subset,
                   eval_subset=s.eval_subset, image_key=s.image_key, query_key=s.query_key,
                   caption_key=s.caption_key, target_key=s.target_key, label_field=s.label_field,
                   system_prompt=prompt, bad_rows=s.bad_rows, max_bad_fraction=s.max_bad_fraction,
                   eval_holdout=s.eval_holdout, max_eval_overlap=s.max_eval_overlap,
                   min_class_rows=s.min_class_rows, max_class_ratio=s.max_class_ratio)


class ImageConfig(_Section):
    min_pixels: int
    max_pixels: int

    @classmethod
    def from_settings(cls, s: Settings, card: ModelSpec) -> Self:
        return cls(min_pixels=s.image_min_pixels or card.image_min_pixels,
                   max_pixels=s.image_max_pixels or card.image_max_pixels)


class TrainConfig(_Section):
    output_dir: str
    run_id: str | None
    seed: int
    max_steps: int
    num_epochs: float
    save_steps: int
    save_total_limit: int
    learning_rate: float
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"]
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    per_device_batch_size: int
    grad_accum: int
    max_length: int
    logging_steps: int
    dataloader_num_workers: int
    group_by_length: bool
    preempt_grace_s: float
    nproc_per_node: int | None  # `run`'s processes on this node (job/train/launch.py); None = one per CUDA device
    exit_codes: Literal["standard", "kubeflow"]
    resume: Literal["auto", "never", "require"]
    launch_id: str | None  # SFT_LAUNCH_ID: a Kubernetes Job's uid; its retries share it (SFT_RESUME=never)

    @classmethod
    def from_settings(cls, s: Settings, card: ModelSpec) -> Self:
        return cls(output_dir=s.output_dir, run_id=s.run_id, seed=s.seed, max_steps=s.max_steps,
                   num_epochs=s.num_epochs, save_steps=effective_save_steps(s), save_total_limit=s.save_total_limit,
                   learning_rate=s.learning_rate or card.learning_rate, lr_scheduler_type=s.lr_scheduler_type,
                   warmup_ratio=s.warmup_ratio, weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm,
                   per_device_batch_size=s.per_device_batch_size, grad_accum=s.grad_accum,
                   max_length=s.max_length or card.max_length, logging_steps=s.logging_steps,
                   dataloader_num_workers=s.dataloader_num_workers, group_by_length=s.group_by_length,
                   preempt_grace_s=s.preempt_grace_s, nproc_per_node=s.nproc_per_node, exit_codes=s.exit_codes,
                   resume=s.resume, launch_id=s.launch_id)


class LoraConfig(_Section):
    r: int
    # int | float, not float: the card's alpha is an int (dumped as 32) and SFT_LORA_ALPHA a float (64.0); the JSON
    # form keeps each as it was.
    alpha: int | float
    dropout: float
    target_modules: tuple[str, ...]
    scope_regex: str

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_module_list(cls, value: Any) -> Any:
        """SFT_LORA_TARGET_MODULES is comma separated; blanks and surrounding spaces are dropped."""
        if isinstance(value, str):
            return tuple(m.strip() for m in value.split(",") if m.strip())
        return value

    @classmethod
    def from_settings(cls, s: Settings, card: ModelSpec) -> Self:
        return cls.model_validate({
            "r": s.lora_r or card.lora_r, "alpha": s.lora_alpha or card.lora_alpha,
            "dropout": s.lora_dropout if s.lora_dropout is not None else card.lora_dropout,
            "target_modules": s.lora_target_modules or card.lora_target_modules, "scope_regex": card.lora_scope_regex,
        })


class EvalConfig(_Section):
    max_new_tokens: int
    batch_size: int
    do_sample: bool
    temperature: float
    pre: bool
    post: bool
    adapter: str | None
    stop_tokens: tuple[str, ...]
    mode: Literal["auto", "generate", "score", "both"]  # job/eval/score.py resolves auto
    steps: int | None  # eval during training every N steps (None: off)
    during_train_rows: int
    best_metric: Literal["macro_f1", "accuracy", "weighted_f1", "roc_auc", "log_loss", "ece"]

    @classmethod
    def from_settings(cls, s: Settings, card: ModelSpec) -> Self:
        return cls(max_new_tokens=s.eval_max_new_tokens or card.eval_max_new_tokens,
                   batch_size=s.eval_batch_size or card.eval_batch_size, do_sample=s.eval_do_sample,
                   temperature=s.eval_temperature, pre=s.eval_pre, post=s.eval_post, adapter=s.eval_adapter,
                   stop_tokens=card.stop_tokens, mode=s.eval_mode, steps=s.eval_steps,
                   during_train_rows=s.eval_during_train_rows, best_metric=s.best_metric)


class WandbConfig(_Section):
    enabled: bool


class StorageConfig(_Section):
    checkpoint_uri: str | None
    cache_dir: str | None
    s3_concurrency: int  # parallel transfers per file (boto3's TransferConfig.max_concurrency)

    @field_validator("checkpoint_uri")
    @classmethod
    def _no_trailing_slash(cls, value: str | None) -> str | None:
        """s3://bucket/prefix/ and s3://bucket/prefix name the same place; run ids are appended with a '/'."""
        return value.rstrip("/") if value else None


class HubConfig(_Section):
    repo_id: str | None
    private: bool
    min_metric: str | None
    require_improvement: bool


class ExportConfig(_Section):
    """qwen3-sft export / SFT_EXPORT: the adapter merged into the unquantized base (job/export/)."""

    enabled: bool
    verify_rows: int | None
    max_drop: float
    repo_id: str | None


class LineageConfig(_Section):
    image_digest: str | None


class CardConfig(_Section):
    tags: tuple[str, ...]
    task_name: str  # SFT_TASK_NAME: the card's title, a tag and the eval dataset's name
    task_description: str


class JobConfig(_Section):
    """The whole configuration. Field order is the JSON order (see the module docstring)."""

    model: ModelConfig
    data: DataConfig
    image: ImageConfig
    train: TrainConfig
    lora: LoraConfig
    eval: EvalConfig
    wandb: WandbConfig
    storage: StorageConfig
    hub: HubConfig
    export: ExportConfig
    lineage: LineageConfig
    card: CardConfig

    @classmethod
    def from_settings(cls, s: Settings, card: ModelSpec) -> Self:
        return cls(
            model=ModelConfig.from_settings(s, card), data=DataConfig.from_settings(s, card),
            image=ImageConfig.from_settings(s, card), train=TrainConfig.from_settings(s, card),
            lora=LoraConfig.from_settings(s, card), eval=EvalConfig.from_settings(s, card),
            wandb=WandbConfig(enabled=s.wandb_enabled),
            storage=StorageConfig(checkpoint_uri=s.checkpoint_uri, cache_dir=s.cache_dir,
                                  s3_concurrency=s.s3_concurrency),
            hub=HubConfig(repo_id=s.hub_repo_id, private=s.hub_private, min_metric=s.push_min_metric,
                          require_improvement=s.push_require_improvement),
            export=ExportConfig(enabled=s.export, verify_rows=s.export_verify_rows, max_drop=s.export_max_drop,
                                repo_id=s.export_repo_id),
            lineage=LineageConfig(image_digest=s.image_digest), card=CardConfig(
                tags=card.tags, task_name=s.task_name, task_description=s.task_description),
        )

    def replace(self, **changes: Mapping[str, Any]) -> JobConfig:
        """A copy with some fields of some sections changed, validated like a built config:
        `cfg.replace(train={"max_steps": 5}, eval={"batch_size": 1})`."""
        sections = {}
        for name, update in changes.items():
            section = getattr(self, name)
            sections[name] = type(section).model_validate({**section.model_dump(), **update})
        return self.model_copy(update=sections)


def build_cfg(card: ModelSpec, env: Mapping[str, str] | None = None) -> JobConfig:
    """The configuration the job reads: the card's defaults overlaid with the validated environment (os.environ when
    env is None). Raises one ConfigError listing every problem."""
    return JobConfig.from_settings(load_settings(card, env), card)


# A worker started by `run`'s launcher (job/train/launch.py) finds its parent's config here, as JSON (the
# `model_dump_json` form): it takes that config as it is instead of parsing SFT_* again, so no rank can drift.
CONFIG_ENV = "QWEN3_SFT_CONFIG"


def process_cfg(card: ModelSpec, env: Mapping[str, str] | None = None) -> JobConfig:
    """The one config of this process, built once by the entry point (job/cli.py) and passed down: the launcher's
    serialized config in a worker it started, else the card overlaid with the SFT_* environment (`build_cfg`)."""
    env = os.environ if env is None else env
    serialized = env.get(CONFIG_ENV)
    if serialized:
        return JobConfig.model_validate_json(serialized)
    return build_cfg(card, env)

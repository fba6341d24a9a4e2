"""The typed, immutable job configuration (`JobConfig`, one frozen section per concern) and the flat `Settings` of
every `SFT_*` variable, both from the one declaration of each field in job/config/sections/.

`build_cfg(ModelCards().qwen3_vl_8b_instruct)` returns a `JobConfig`, read as `cfg.train.max_length`, `cfg.lora.r`,
... A changed copy is `cfg.replace(train={"max_steps": 5})`. `cfg.model_dump(mode="json")` is the JSON form the
`config` command prints and training_meta.json, W&B and the resume fingerprint store: the same keys, in the same
order, as the nested dict build_cfg returned before 0.2 (tests/config/test_config.py locks it). It is also how `run`'s
launcher hands its workers their config (`CONFIG_ENV`, `process_cfg`).

Only what the user configured lives here. What a later step learns (the local mirror of an s3:// source) is
`job.storage.sources.Sources`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Self

from pydantic import ValidationError, create_model, field_validator

from job.cards import ModelSpec
from job.config.sections.base import Section
from job.config.sections.data import DataConfig, ImageConfig, label_name_list, share_or_count
from job.config.sections.eval import EvalConfig
from job.config.sections.model import LoraConfig, ModelConfig, module_names
from job.config.sections.outputs import CardConfig, ExportConfig, HubConfig, LineageConfig, StorageConfig
from job.config.sections.train import TrainConfig, WandbConfig
from job.config.settings import FlatSettings, env_name, field_problems, flat_fields, settings_from, unknown_var_problems
from job.errors import ConfigError


class JobConfig(Section):
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
    def sections(cls) -> list[type[Section]]:
        return [info.annotation for info in cls.model_fields.values()]  # type: ignore[misc]

    @classmethod
    def from_settings(cls, s: Any, card: ModelSpec) -> Self:
        return cls(**{name: section.from_settings(s, card)
                      for name, section in zip(cls.model_fields, cls.sections(), strict=True)})

    def replace(self, **changes: Mapping[str, Any]) -> JobConfig:
        """A copy with some fields of some sections changed, each changed section validated as a built one is (types,
        ranges, normalising validators): `cfg.replace(train={"max_steps": 5}, eval={"batch_size": 1})`. The
        cross-field rules are the environment's (`load_settings`): a copy is not checked against them."""
        sections = {}
        for name, update in changes.items():
            section = getattr(self, name)
            sections[name] = type(section).model_validate({**section.model_dump(), **update})
        return self.model_copy(update=sections)


# Every SFT_* variable, derived from the sections: SFT_ + the field name upper-cased (pydantic-settings' env_prefix).
Settings: type[FlatSettings] = create_model(  # type: ignore[call-overload]
    "Settings", __base__=FlatSettings, __doc__="Every `SFT_*` variable. None means \"use the model card's default\".",
    __validators__={"_holdout": field_validator("eval_holdout")(share_or_count),
                    "_modules": field_validator("lora_target_modules")(module_names),
                    "_label_names": field_validator("label_names")(label_name_list)},
    **flat_fields(JobConfig.sections()))
KNOWN_ENV_VARS = tuple(sorted(env_name(f) for f in Settings.model_fields))


def cross_field_problems(s: Any, card: ModelSpec) -> list[str]:
    """The rules that involve more than one variable, each beside its section (`rules`), in the sections' order."""
    return [problem for section in JobConfig.sections() for problem in section.rules(s, card)]


def load_settings(card: ModelSpec, env: Mapping[str, str] | None = None) -> Any:
    """Validate the environment; raise one ConfigError listing every problem."""
    env = dict(os.environ if env is None else env)
    problems = unknown_var_problems(env, KNOWN_ENV_VARS)
    try:
        settings = settings_from(Settings, env)
    except ValidationError as exc:
        raise ConfigError(problems + field_problems(exc, env, Settings)) from None
    problems += cross_field_problems(settings, card)
    if problems:
        raise ConfigError(problems)
    return settings


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

"""Job configuration: each setting declared once in its section (`sections`), the `SFT_*` variables derived from them
and validated all at once (`settings`), the typed `JobConfig` built from them over a model card (`schema`), and the
settings tables of docs/configuration.md (`docs`).

`build_cfg(ModelCards().qwen3_vl_8b_instruct)` returns a frozen `JobConfig`, read as `cfg.train.max_length`.
Every name importable from `job.config` before it became a package still is.
"""

from __future__ import annotations

from job.config.schema import (
    CONFIG_ENV,
    KNOWN_ENV_VARS,
    JobConfig,
    Settings,
    build_cfg,
    cross_field_problems,
    load_settings,
    process_cfg,
)
from job.config.sections import (
    CardConfig,
    DataConfig,
    EvalConfig,
    ExportConfig,
    HubConfig,
    ImageConfig,
    LineageConfig,
    LoraConfig,
    ModelConfig,
    StorageConfig,
    TrainConfig,
    WandbConfig,
)
from job.config.settings import (
    ENV_PREFIX,
    PUSH_GATE_METRICS,
    SCORED_GATE_METRICS,
    SECRET_ENV_VARS,
    effective_save_steps,
    env_name,
)

__all__ = [
    "CONFIG_ENV",
    "ENV_PREFIX",
    "KNOWN_ENV_VARS",
    "PUSH_GATE_METRICS",
    "SCORED_GATE_METRICS",
    "SECRET_ENV_VARS",
    "CardConfig",
    "DataConfig",
    "EvalConfig",
    "ExportConfig",
    "HubConfig",
    "ImageConfig",
    "JobConfig",
    "LineageConfig",
    "LoraConfig",
    "ModelConfig",
    "Settings",
    "StorageConfig",
    "TrainConfig",
    "WandbConfig",
    "build_cfg",
    "cross_field_problems",
    "effective_save_steps",
    "env_name",
    "load_settings",
    "process_cfg",
]

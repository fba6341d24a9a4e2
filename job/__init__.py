"""qwen3-sft: QLoRA supervised fine-tuning of Qwen3-VL-8B-Instruct for multimodal sarcasm detection.

The public API: the names users of `gemma3sft` (the Gemma 3 training script this job was ported from; not in this
repository) know, plus the pieces other code builds on. They load on first use (PEP 562), so `import job` and
`qwen3-sft config` stay fast (no torch import):

    from job import ModelCards, build_cfg, build_collators, evaluate_qwen3
    cfg = build_cfg(ModelCards().qwen3_vl_8b_instruct)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "ModelCards": "job.cards",
    "Queries": "job.prompts",
    "build_cfg": "job.config.schema",
    "Qwen3VisionSFTCollator": "job.collators.qwen3_collator",
    "build_collators": "job.collators.qwen3_collator",
    "load_train_dataset": "job.data.loaders",
    "load_local_split": "job.data.loaders",
    "_load_eval_dataset": "job.data.loaders",
    "_select_subset": "job.data.loaders",
    "evaluate_qwen3": "job.eval.generate",
    "LogCallback": "job.train.callbacks",
    "_count_trainable_params": "job.model",
    "log_run_metadata": "job.outputs",
}
__all__ = [  # the keys of _EXPORTS, written out for linters and type checkers (a test keeps the two equal)
    "LogCallback", "ModelCards", "Queries", "Qwen3VisionSFTCollator", "__version__", "_count_trainable_params",
    "_load_eval_dataset", "_select_subset", "build_cfg", "build_collators", "evaluate_qwen3", "load_local_split",
    "load_train_dataset", "log_run_metadata",
]

if TYPE_CHECKING:
    from job.cards import ModelCards
    from job.collators.qwen3_collator import Qwen3VisionSFTCollator, build_collators
    from job.config.schema import build_cfg
    from job.data.loaders import _load_eval_dataset, _select_subset, load_local_split, load_train_dataset
    from job.eval.generate import evaluate_qwen3
    from job.model import _count_trainable_params
    from job.outputs import log_run_metadata
    from job.prompts import Queries
    from job.train.callbacks import LogCallback


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'job' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

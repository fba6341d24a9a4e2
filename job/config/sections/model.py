"""The model and LoRA sections: what is loaded and how it is adapted.
How to add a setting: job/config/sections/__init__.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator

from job.config.sections.base import Section
from job.config.settings import setting


def module_names(value: Any) -> Any:
    """SFT_LORA_TARGET_MODULES (comma separated) names at least one module."""
    names = [m for m in value.split(",") if m.strip()] if isinstance(value, str) else value
    if value is not None and not names:
        raise ValueError("must name at least one module, comma separated")
    return value


class ModelConfig(Section):
    id: str = setting(
        env="model_id", card="model_id", examples=["Qwen/Qwen3-VL-8B-Instruct", "/models/qwen3-vl-8b"],
        doc="Hub repo id, local directory or `s3://` prefix (mirrored into `SFT_CACHE_DIR` by `run`) of the base "
            "model and its processor. A value is a Hub id only if it has the form `owner/name` (or `hf://owner/name`) "
            "and no such local path exists; anything else is a local path, and a missing one is exit 2.")
    revision: str | None = setting(
        env="model_revision", card="revision", examples=["main", "0123abcd"],
        doc="Unset: the repo's default branch. Hub branch, tag or commit for model and processor.")
    trust_remote_code: bool = setting(
        False, env="trust_remote_code", examples=["false"], doc="Passed to `from_pretrained` for processor and model.")
    load_in_4bit: bool = setting(
        True, env="load_in_4bit", examples=["true"],
        doc="QLoRA: NF4 with double quantization, compute dtype bf16 where the GPU supports it, else fp32. `false` "
            "trains LoRA on the unquantized model.")
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = setting(
        "auto", env="attn_implementation", examples=["sdpa"],
        doc="`auto`: flash_attention_2 when CUDA and `flash_attn` are available, else sdpa. A flash_attention_2 that "
            "is unavailable or fails to load falls back to sdpa with a warning.")
    quant_skip_modules: tuple[str, ...] = setting(card="quant_skip_modules")
    gradient_checkpointing: bool = setting(
        True, env="gradient_checkpointing", examples=["true"], doc="Non-reentrant gradient checkpointing.")
    # Liger's fused kernels (RMSNorm, SwiGLU, fused linear cross-entropy): "auto" = on with CUDA and liger-kernel.
    use_liger: Literal["auto", "true", "false"] = setting(
        "auto", env="use_liger", examples=["auto"],
        doc="Liger kernels for Qwen3-VL (`apply_liger_kernel_to_qwen3_vl`: RMSNorm, SwiGLU, fused linear "
            "cross-entropy, which never materializes the 151,936-wide logits). `auto` turns them on only with CUDA "
            "and `liger-kernel` installed (the image's `gpu` extra); they are always off on the CPU.")


class LoraConfig(Section):
    r: int = setting(env="lora_r", card="lora_r", ge=1, le=1024, examples=["16"], doc="LoRA rank.")
    # int | float, not float: the card's alpha is an int (dumped as 32) and SFT_LORA_ALPHA a float (64.0); the JSON
    # form keeps each as it was.
    alpha: int | float = setting(
        env="lora_alpha", card="lora_alpha", flat="float", gt=0, examples=["32"], doc="LoRA alpha.")
    dropout: float = setting(
        env="lora_dropout", card="lora_dropout", ge=0, lt=1, examples=["0.05"], doc="LoRA dropout.")
    target_modules: tuple[str, ...] = setting(
        env="lora_target_modules", card="lora_target_modules", flat="str", examples=["q_proj,k_proj,v_proj,o_proj"],
        doc="Projection names, matched only inside the language model's layers. A list that matches no layer is an "
            "error (exit 2).")
    scope_regex: str = setting(card="lora_scope_regex")

    _names = field_validator("target_modules")(module_names)

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_module_list(cls, value: Any) -> Any:
        """SFT_LORA_TARGET_MODULES is comma separated; blanks and surrounding spaces are dropped."""
        if isinstance(value, str):
            return tuple(m.strip() for m in value.split(",") if m.strip())
        return value

"""Processor, 4-bit model and LoRA: everything between a model id and a trainable PEFT model.

Each function takes the config sections it reads (`cfg.model`, `cfg.image`, `cfg.lora`) and, where it reads the
model's files, the path to read them from beside them: `Sources.model_path` (job/storage/sources.py), the local copy
of an s3:// model or else SFT_MODEL_ID itself.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from typing import Any

import torch

from job import patch_embed
from job.config.sections.data import ImageConfig
from job.config.sections.model import LoraConfig, ModelConfig
from job.errors import ConfigError

log = logging.getLogger(__name__)


def has_cuda() -> bool:
    return torch.cuda.is_available()


def compute_dtype() -> torch.dtype:
    """bf16 where the GPU supports it; fp32 on the CPU (bf16 matmuls there are slow and not needed)."""
    return torch.bfloat16 if has_cuda() and torch.cuda.is_bf16_supported() else torch.float32


def load_processor(model: ModelConfig, image: ImageConfig, path: str):
    """The processor of model, read from path (`Sources.model_path`: the local copy of an s3:// model, else
    SFT_MODEL_ID itself), with SFT_IMAGE_MIN_PIXELS/SFT_IMAGE_MAX_PIXELS (image) as its resize bounds."""
    from transformers import AutoProcessor

    log.info("loading processor %s", path)
    processor = AutoProcessor.from_pretrained(
        path, revision=model.revision, trust_remote_code=model.trust_remote_code,
        # The pixel bounds as transformers >= 5.23 takes them (min_pixels=/max_pixels= are deprecated there and warn on
        # every processor call); the same resize: identical image_grid_thw and pixel_values for the same images.
        size={"shortest_edge": image.min_pixels, "longest_edge": image.max_pixels},
    )
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right"  # training; the eval collator asks for left padding per call
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def quantization_config(model: ModelConfig):
    if not model.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(),
        llm_int8_skip_modules=list(model.quant_skip_modules),
    )


def resolve_attn_implementation(requested: str) -> str:
    """flash_attention_2 when asked for (or auto) and usable here; otherwise sdpa. eager only on request."""
    if requested in ("sdpa", "eager"):
        return requested
    if has_cuda() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if requested == "flash_attention_2":
        log.warning("flash_attention_2 requested but flash-attn/CUDA is not available here; using sdpa")
    return "sdpa"


def device_map() -> dict[str, Any] | None:
    if not has_cuda():
        return None
    import os

    # One full replica per process: DDP with QLoRA cannot shard a 4-bit model across devices.
    return {"": int(os.environ.get("LOCAL_RANK", 0))}


def from_pretrained_with_attn(cls, source: str, requested_attn: str, **kwargs):
    """cls.from_pretrained with the resolved attention; a flash_attention_2 that fails to load falls back to sdpa.
    Returns (model, the attention implementation used)."""
    attn = resolve_attn_implementation(requested_attn)
    try:
        return cls.from_pretrained(source, attn_implementation=attn, **kwargs), attn
    except (ImportError, ValueError, RuntimeError) as exc:
        if attn != "flash_attention_2":
            raise
        log.warning("flash_attention_2 failed to load (%s); falling back to sdpa", str(exc).splitlines()[0][:160])
        return cls.from_pretrained(source, attn_implementation="sdpa", **kwargs), "sdpa"


def load_model(model_cfg: ModelConfig, path: str):
    """The base model of model_cfg (`cfg.model`), read from path (`Sources.model_path`: the local copy of an s3://
    model, else SFT_MODEL_ID itself)."""
    from transformers import Qwen3VLForConditionalGeneration

    log.info("loading model weights %s", model_cfg.id)
    model, attn = from_pretrained_with_attn(
        Qwen3VLForConditionalGeneration, path, model_cfg.attn_implementation,
        revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code, dtype=compute_dtype(),
        quantization_config=quantization_config(model_cfg), device_map=device_map(),
    )
    model.config.use_cache = False  # the KV cache is useless (and warns) under gradient checkpointing
    keep_4bit_layout_unpacked(model)
    gemm = patch_embed.as_gemm(model)  # never a Conv3d kernel for the vision patches (job/patch_embed.py)
    patch_embed.slow_conv_warning(torch.__version__, gemm)
    log.info("model %s loaded: attn=%s 4bit=%s dtype=%s patch embedding as GEMM=%s", model_cfg.id, attn,
             model_cfg.load_in_4bit, compute_dtype(), bool(gemm))
    return model


def keep_4bit_layout_unpacked(model) -> int:
    """Turn off bitsandbytes' packed CPU inference layout on every 4-bit layer; returns how many were turned off.

    Why (bitsandbytes 0.50.2, torch 2.14.1, measured on an AMD EPYC with avx512_bf16): on such a CPU,
    `Linear4bit.forward` in eval mode without grad repacks its weight in place (a `Params4bit` of shape (2048, 1)
    becomes (64, 32)) for a fused bf16 kernel and flags `quant_state.packing_format_for_cpu`. Every later forward,
    training included, then goes through `bitsandbytes::gemv_4bit`, which has no autograd formula: no gradient flows
    back through the frozen 4-bit layers, so after pre-eval the grad norm was about half of the dequantized-fp32
    reference (0.81 vs 1.50). Saving converts back, but lossily (absmax rounded to bf16, double quantization redone),
    so a resumed run differed from an uninterrupted one. With the flag off every forward uses the one unpacked layout,
    and a training step equals the dequantized reference after generation, a save and a load
    (`tests/train/test_qlora_gradients.py`). The cost: CPU-only generation on avx512_bf16 CPUs loses the fused kernel
    (CUDA never takes this path). Upstream: `Linear4bit.support_avx512bf16_for_cpu`, set from `has_avx512bf16()`.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes: nothing is 4-bit
        return 0
    layers = [module for module in model.modules() if isinstance(module, Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


# Liger kernels used with Qwen3-VL. Not its fused linear cross-entropy: TRL's SFTTrainer already replaces the LM head
# and loss with its own fused, chunked one (the full logits are never materialized) by patching model.forward, which
# Liger's FLCE would also replace (TRL refuses the combination). Liger's plain cross-entropy is moot for the same
# reason. `swiglu` is passed where the installed liger-kernel applies it to Qwen3-VL (newer versions ignore it).
LIGER_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                 "fused_linear_cross_entropy": False}
LIGER_FIX = "pip install liger-kernel (or install the image's gpu extra: pip install '.[gpu]')"


def _liger_import_error() -> str | None:
    """None when liger_kernel.transformers imports here; otherwise why not."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed"
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken Triton/torch pairing raises anything from ImportError to OSError
        first_line = (str(exc).splitlines() or [""])[0][:160]
        return f"liger_kernel does not import ({type(exc).__name__}: {first_line})"
    return None


def liger_wanted(model_cfg: ModelConfig) -> bool:
    """Whether Liger's Triton kernels are applied (SFT_USE_LIGER = auto | true | false).

    auto: on only with CUDA and an importable liger-kernel. true: on CPU it is skipped with a warning (Triton kernels
    need a GPU, and the CPU demo and tests must keep running); with CUDA but no usable liger-kernel it is a
    ConfigError, because someone asked for a speed-up the image cannot give. false: off.
    """
    setting = model_cfg.use_liger
    if setting == "false":
        return False
    if not has_cuda():
        if setting == "true":
            log.warning("SFT_USE_LIGER=true but there is no CUDA device: Liger's Triton kernels need a GPU; "
                        "training without them")
        return False
    problem = _liger_import_error()
    if problem is None:
        return True
    if setting == "true":
        raise ConfigError([f"SFT_USE_LIGER=true but {problem}: {LIGER_FIX}, or set SFT_USE_LIGER=auto"])
    log.info("Liger kernels off (SFT_USE_LIGER=auto): %s", problem)
    return False


def apply_liger(model_cfg: ModelConfig, model) -> bool:
    """Apply Liger's kernels for Qwen3-VL when `liger_wanted(model_cfg)`; returns whether they were applied.

    Call it on the loaded model, before or after LoRA (a PEFT model is unwrapped): the RMSNorm modules of that
    instance are patched in place and RoPE is patched in the Qwen3-VL modeling module.
    """
    if not liger_wanted(model_cfg):
        return False
    from liger_kernel.transformers import apply_liger_kernel_to_qwen3_vl

    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    accepted = inspect.signature(apply_liger_kernel_to_qwen3_vl).parameters
    kernels = {name: on for name, on in LIGER_KERNELS.items() if name in accepted}
    apply_liger_kernel_to_qwen3_vl(**kernels, model=target)
    log.info("Liger kernels applied to Qwen3-VL: %s", ", ".join(name for name, on in kernels.items() if on))
    return True


def lora_target_regex(lora: LoraConfig) -> str:
    """Full-match regex for PEFT: the named projections inside the language model only (never the ViT)."""
    names = "|".join(sorted(set(lora.target_modules)))
    return rf".*{lora.scope_regex}(?:{names})"


def apply_lora(model, model_cfg: ModelConfig, lora: LoraConfig):
    """LoRA (the lora section, `cfg.lora`) on the model's language-model projections, after PEFT's k-bit
    preparation for a 4-bit model (model_cfg: SFT_LOAD_IN_4BIT, SFT_GRADIENT_CHECKPOINTING)."""
    import peft  # its LoraConfig is PEFT's, the section's type is job.config.sections.LoraConfig

    gc = model_cfg.gradient_checkpointing
    if model_cfg.load_in_4bit:
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    peft_config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora_target_regex(lora), bias="none", task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, peft_config)
    matched = sum(1 for name, _ in model.named_modules() if name.endswith("lora_A"))
    if matched == 0:
        raise ConfigError(
            [f"SFT_LORA_TARGET_MODULES={','.join(lora.target_modules)!r}: matches no language-model layer"]
        )
    return model


def trainable_model(model_cfg: ModelConfig, lora: LoraConfig, path: str):
    """The model `run` trains (and a finished run's checkpoint is evaluated on): the base (read from path, as
    load_model) with LoRA, and Liger's kernels where SFT_USE_LIGER turns them on (CUDA and liger-kernel; never on
    the CPU)."""
    model = apply_lora(load_model(model_cfg, path), model_cfg, lora)
    apply_liger(model_cfg, model)
    return model


def keep_trainable_params_fp32(model) -> None:
    """Cast LoRA weights back to fp32 after SFTTrainer.__init__.

    TRL's SFTTrainer casts trainable parameters to bf16 even with bf16=False, so optimizer updates land on bf16
    weights: tiny updates round away, checkpoints hold bf16 adapters and a resumed run drifts from an uninterrupted
    one (measured 1.3e-3 on the adapter). Master weights in fp32 (as QLoRA intends) make resume bit-exact.
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def _count_trainable_params(model) -> dict[str, float]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    stats = {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}
    print(f"trainable params: {trainable:,} / {total:,} ({stats['percent']:.4f}%)", flush=True)
    return stats

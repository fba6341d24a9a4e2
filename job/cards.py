"""Model cards: the per-model defaults the flow starts from (`ModelCards().qwen3_vl_8b_instruct`)."""

from __future__ import annotations

from dataclasses import dataclass, field

# The language model's projections. The vision tower is frozen and kept out of both LoRA and 4-bit
# quantization: quantizing a ViT this small saves little memory and costs accuracy.
QWEN3_LM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelSpec:
    model_id: str
    revision: str | None
    lora_target_modules: tuple[str, ...]
    # Module-name prefixes bitsandbytes must leave in full precision. transformers 5 matches these from the
    # start of the full module name ("model.visual" skips "model.visual.blocks.0.attn.qkv"; a bare "visual"
    # would match nothing and the ViT would silently be quantized).
    quant_skip_modules: tuple[str, ...]
    # The regex that scopes LoRA to the language model (the ViT also has linear layers called *proj*).
    lora_scope_regex: str
    image_min_pixels: int
    image_max_pixels: int
    pixels_per_visual_token: int
    max_length: int
    eval_max_new_tokens: int
    eval_batch_size: int
    learning_rate: float
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    stop_tokens: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>")
    tags: tuple[str, ...] = field(default=("qwen3-vl", "qlora", "sft", "sarcasm-detection"))


@dataclass(frozen=True)
class ModelCards:
    qwen3_vl_8b_instruct: ModelSpec = ModelSpec(
        model_id="Qwen/Qwen3-VL-8B-Instruct",
        revision=None,
        lora_target_modules=QWEN3_LM_LORA_TARGETS,
        quant_skip_modules=("model.visual", "lm_head"),
        lora_scope_regex=r"model\.language_model\.layers\.\d+\.(?:self_attn|mlp)\.",
        # The model accepts 256^2..4096^2 pixels, i.e. up to 16k visual tokens for one photo: a single 4k image
        # would OOM a 24 GB card. 1024^2 px caps an image at 1024 visual tokens (one per 32x32 px).
        image_min_pixels=256 * 256,
        image_max_pixels=1024 * 1024,
        pixels_per_visual_token=32 * 32,
        max_length=2048,
        # A verdict such as {"label": "not_sarcastic", "rationale": "..."} fits comfortably in 256 tokens;
        # generation stops earlier at <|im_end|>, so the bound only matters for a model that rambles.
        eval_max_new_tokens=256,
        eval_batch_size=8,
        learning_rate=2e-4,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.05,
    )

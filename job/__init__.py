"""qwen3-sft: QLoRA supervised fine-tuning of Qwen3-VL-8B-Instruct for multimodal sarcasm detection."""

__version__ = "0.1.0"

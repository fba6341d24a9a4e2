"""Prompt text shared by training and eval (the name `Queries` is kept from `gemma3sft`, the
Gemma 3 training script this job was ported from)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Queries:
    SYSTEM_PROMPT: str = (
        "You are a sarcasm detector for social media posts. Look at the image, the user's question and the "
        "caption, then answer with a single JSON object and nothing else."
    )
    DEFAULT_QUERY: str = 'Is this post sarcastic? Answer in JSON: {"label": "sarcastic"} or {"label": "not_sarcastic"}.'

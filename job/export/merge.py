"""The model side of `export`: the base in full precision, the adapter applied and merged, the merged model written.

Never merges into 4-bit weights: the base is loaded without a quantization config (bf16 on a GPU that supports it,
fp32 on the CPU) and a merge refuses a model holding any bitsandbytes 4-bit layer. The merged model is written into a
staging directory next to `merged/` and renamed into place only when everything in it is written (`install`).
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import shutil
from pathlib import Path

import torch

from job.config.schema import JobConfig
from job.config.sections.eval import EvalConfig
from job.eval.generate import generation_kwargs
from job.model import compute_dtype, device_map, from_pretrained_with_attn, has_cuda

log = logging.getLogger("job.export")
MAX_SHARD_SIZE = "5GB"  # the Hub's and vLLM's usual shard size: 8B in bf16 is 4 shards
STAGING_PREFIX = ".merged.tmp-"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def export_dtype() -> torch.dtype:
    """bf16 on a GPU that supports it, else fp32 (the CPU): the dtype the base is loaded, merged and saved in."""
    return compute_dtype()


def load_base(cfg: JobConfig, source: str | None = None):
    """The base model, unquantized, in export_dtype(); read from source when given (`Sources.model_path`)."""
    from transformers import Qwen3VLForConditionalGeneration

    model_cfg = cfg.model
    log.info("loading model weights %s (%s, not quantized: the merge base)", model_cfg.id, export_dtype())
    model, _ = from_pretrained_with_attn(
        Qwen3VLForConditionalGeneration, source or model_cfg.id, model_cfg.attn_implementation,
        revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code, dtype=export_dtype(),
        device_map=device_map(),
    )
    return model.eval()


def load_merged(cfg: JobConfig, path: Path):
    """A written merged model, loaded the way a user loads it: AutoModelForImageTextToText from its config.json."""
    from transformers import AutoModelForImageTextToText

    log.info("loading model weights %s (the merged model as written)", path)
    model, _ = from_pretrained_with_attn(AutoModelForImageTextToText, str(path), cfg.model.attn_implementation,
                                         dtype=export_dtype(), device_map=device_map())
    return model.eval()


def quantized_layers(model) -> list[str]:
    try:
        from bitsandbytes.nn import Linear4bit, Linear8bitLt
    except ImportError:
        return []
    return [name for name, module in model.named_modules() if isinstance(module, (Linear4bit, Linear8bitLt))]


def apply_adapter(base, adapter: Path):
    from peft import PeftModel

    log.info("export: loading adapter %s", adapter)
    return PeftModel.from_pretrained(base, str(adapter)).eval()


def merge(peft_model):
    """merge_and_unload: W <- W + scale * B @ A in W's dtype, the LoRA modules removed."""
    quantized = quantized_layers(peft_model)
    if quantized:
        raise RuntimeError(f"export: refusing to merge into quantized weights ({len(quantized)} layers, e.g. "
                           f"{quantized[0]}): the merge base must be loaded unquantized")
    return peft_model.merge_and_unload().eval()


def generation_config(model, processor, eval_cfg: EvalConfig):
    """The base's generation config with the decoding the export verified: greedy (or SFT_EVAL_DO_SAMPLE's sampling),
    max_new_tokens and the stop tokens of eval. vLLM and SGLang read it as their default sampling parameters."""
    config = copy.deepcopy(model.generation_config)
    config.update(**generation_kwargs(processor, eval_cfg))
    if not config.do_sample:
        config.update(temperature=None, top_p=None, top_k=None)
    return config


def save(model, processor, eval_cfg: EvalConfig, target: Path) -> list[str]:
    """safetensors shards, config.json (its architectures: the class transformers loads), generation_config.json,
    and the processor (the training pixel bounds, the chat template; left padding, as batched generation needs)."""
    model.config.use_cache = True
    text_config = getattr(model.config, "text_config", None)
    if text_config is not None:
        text_config.use_cache = True
    model.generation_config = generation_config(model, processor, eval_cfg)
    model.save_pretrained(target, max_shard_size=MAX_SHARD_SIZE)
    served = copy.deepcopy(processor)
    served.tokenizer.padding_side = "left"
    served.save_pretrained(target)
    for path in target.iterdir():  # safetensors writes 0600 files; whoever serves the model must read them
        if path.is_file():
            path.chmod(0o644)
    return sorted(p.name for p in target.iterdir())


def release() -> None:
    """Give back the memory of models the caller no longer references (CUDA's cache included)."""
    gc.collect()
    if has_cuda():
        torch.cuda.empty_cache()


def staging_dir(out: Path) -> Path:
    """A fresh staging directory for merged/ (leftovers of an interrupted export are removed first)."""
    for stale in out.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    path = out / f"{STAGING_PREFIX}{os.getpid()}"
    path.mkdir(parents=True)
    return path


def install(staging: Path, final: Path) -> None:
    """Rename the finished staging directory to `final`, replacing an earlier export: a reader sees the old
    directory or the new one, never a half-written one."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)

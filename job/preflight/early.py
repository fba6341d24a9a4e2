"""The cheap checks, run before anything slow (downloads, processor, preflight, model weights).

Order (README "Exit codes"): config (job.config, when the cfg is built) -> local paths that must exist
(`check_inputs`) -> the output directory is creatable and writable -> Hub repos exist and are readable (one
metadata request each; `check_hub_repos`, called by `check_inputs`) -> the LoRA target modules
exist in the model's architecture, built from config.json on the meta device without weights
(`check_lora_targets`) -> the processor loads (`load_processor_checked`). Every failure is exit 2 with a message
that names the setting; a download failure is classified by job.errors (2 for 401/403/404 and gated repos, 3 for
network failures that outlived the retries).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Literal

from job.config.schema import JobConfig
from job.config.sections.data import DataConfig, ImageConfig
from job.config.sections.model import LoraConfig, ModelConfig
from job.errors import ConfigError, classified
from job.model import load_processor, lora_target_regex
from job.storage.s3 import S3Uri
from job.storage.sources import hub_dataset_id, hub_model_id, source_kind
from job.utils.library_errors import hub_offline

log = logging.getLogger("job.checks")

Command = Literal["run", "preflight", "eval", "export"]
# SFT_EVAL_ADAPTER=none scores the base model on purpose (any other value must be an adapter directory).
BASE_MODEL = "none"


def _cwd_note(value: str) -> str:
    return "" if os.path.isabs(value) else f" (relative to the working directory {os.getcwd()})"


def _missing(name: str, value: str, what: str) -> str:
    return f"{name}={value!r}: no such {what}{_cwd_note(value)}"


def _unreadable(path: Path) -> str | None:
    """Why path cannot be read (a file that cannot be opened, a directory that cannot be listed), or None."""
    try:
        if path.is_dir():
            with os.scandir(path) as entries:
                next(entries, None)
        else:
            with path.open("rb") as handle:
                handle.read(1)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def _s3_problem(name: str, value: str) -> str | None:
    try:
        S3Uri.parse(value)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - UserError from S3Uri.parse: a malformed URI
        return f"{name}={value!r}: {exc} (example: s3://my-bucket/sarcasm)"
    return None


def dataset_problems(uri: str | None) -> list[str]:
    name = "SFT_DATASET_URI"
    if not uri:
        return [f"{name} is not set: point it at a local path, s3://bucket/prefix or a Hub dataset id (owner/name)"]
    kind = source_kind(uri, "dataset")
    if kind == "s3":
        return [p for p in [_s3_problem(name, uri)] if p]
    if kind == "hub":
        return []
    path = Path(uri)
    if not path.exists():
        return [_missing(name, uri, "local path") + "; a Hub dataset id has the form owner/name"]
    if (why := _unreadable(path)) is not None:
        return [f"{name}={uri!r}: cannot be read ({why})"]
    return []


def model_problems(model_id: str) -> list[str]:
    name = "SFT_MODEL_ID"
    kind = source_kind(model_id, "model")
    if kind == "s3":
        return [p for p in [_s3_problem(name, model_id)] if p]
    if kind == "hub":
        return []
    path = Path(model_id)
    if not path.exists():
        return [_missing(name, model_id, "local model directory") + "; a Hub model id has the form owner/name"]
    if not (path / "config.json").is_file():
        return [f"{name}={model_id!r}: not a model directory (no config.json in it)"]
    return []


def eval_adapter(value: str | None, output_dir: str) -> Path | None:
    """The adapter `eval` scores (value: SFT_EVAL_ADAPTER, `cfg.eval.adapter`), or None for the base model.

    SFT_EVAL_ADAPTER=none: the base model. Unset: $SFT_OUTPUT_DIR/adapter when a run saved one there, else the base
    model. Any other value must be an adapter directory; a typo is an error, never a silent base-model score.
    """
    if value is None:
        default = Path(output_dir) / "adapter"
        return default if (default / "adapter_config.json").is_file() else None
    if value.strip().lower() == BASE_MODEL:
        return None
    return Path(value)


def adapter_problems(value: str | None, output_dir: str) -> list[str]:
    adapter = eval_adapter(value, output_dir)
    if value is None or adapter is None:
        return []
    name, hint = "SFT_EVAL_ADAPTER", f"; set SFT_EVAL_ADAPTER={BASE_MODEL} to score the base model"
    if not adapter.exists():
        return [_missing(name, value, "adapter directory") + hint]
    if not (adapter / "adapter_config.json").is_file():
        return [f"{name}={value!r}: not an adapter directory (no adapter_config.json in it){hint}"]
    return []


def export_adapter(value: str | None, output_dir: str) -> Path:
    """The adapter `export` merges: SFT_EVAL_ADAPTER (value), else $SFT_OUTPUT_DIR/adapter (there is no base-model
    export)."""
    return Path(output_dir) / "adapter" if value is None else Path(value)


def export_adapter_problems(value: str | None, output_dir: str) -> list[str]:
    if value is not None and value.strip().lower() == BASE_MODEL:
        return [f"SFT_EVAL_ADAPTER={value!r}: export merges an adapter into the base model; point SFT_EVAL_ADAPTER "
                "at an adapter directory, or unset it for $SFT_OUTPUT_DIR/adapter"]
    adapter = export_adapter(value, output_dir)
    name, shown = ("SFT_EVAL_ADAPTER", value) if value is not None else ("SFT_OUTPUT_DIR", output_dir)
    fix = "; run the job first (it saves adapter/ there) or set SFT_EVAL_ADAPTER to an adapter directory"
    if not adapter.is_dir():
        return [f"{name}={shown!r}: no adapter directory {str(adapter)!r}{_cwd_note(str(adapter))}{fix}"]
    missing = [f for f in ("adapter_config.json", "adapter_model.safetensors") if not (adapter / f).is_file()]
    if missing:
        return [f"{name}={shown!r}: {str(adapter)!r} is not a saved adapter ({', '.join(missing)} missing){fix}"]
    return []


def output_dir_problems(output_dir: str) -> list[str]:
    """Create SFT_OUTPUT_DIR and write (then remove) a probe file in it: what every later write needs."""
    name, path = "SFT_OUTPUT_DIR", Path(output_dir)
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            return [f"{name}={output_dir!r}: {parent} is a file, not a directory"]
        if parent.exists():
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as exc:
        return [f"{name}={output_dir!r}: not writable ({exc.strerror or type(exc).__name__}); "
                "point it at a directory this user can write"]
    return []


def check_inputs(cfg: JobConfig, command: Command) -> None:
    """Local paths and the output directory: no network, no model code. Raises one ConfigError listing all."""
    problems = dataset_problems(cfg.data.uri) + model_problems(cfg.model.id)
    if command == "eval":
        problems += adapter_problems(cfg.eval.adapter, cfg.train.output_dir)
    if command == "export":
        problems += export_adapter_problems(cfg.eval.adapter, cfg.train.output_dir)
    problems += output_dir_problems(cfg.train.output_dir)
    if problems:
        raise ConfigError(problems)
    check_hub_repos(cfg.model, cfg.data)
    log.info("checks: paths, Hub repos and %s are usable", cfg.train.output_dir)


def check_hub_repos(model: ModelConfig, data: DataConfig) -> None:
    """One metadata request per Hub repo (no files): a typo, a private or gated repo fails here, not after minutes
    of downloads. With HF_HUB_OFFLINE=1 the model must already be in the local cache."""
    from huggingface_hub import HfApi, try_to_load_from_cache

    repos = (("model", "SFT_MODEL_ID", hub_model_id(model.id), model.revision),
             ("dataset", "SFT_DATASET_URI", hub_dataset_id(data.uri), data.revision))
    for kind, name, repo, revision in repos:
        if repo is None:
            continue
        context = f"{name}={repo!r} (no such local path, so it names a Hub {kind})"
        if hub_offline():
            if kind == "model" and not isinstance(try_to_load_from_cache(repo, "config.json", revision=revision), str):
                raise ConfigError([f"{context}: HF_HUB_OFFLINE=1 and it is not in the local cache; "
                                   "fix the path, download it first, or unset HF_HUB_OFFLINE"])
            continue  # a cached Hub dataset is found (or not) by the loader
        try:
            HfApi().repo_info(repo, repo_type=kind, revision=revision)
        except Exception as exc:  # classified: 401/403/404 -> 2, network -> 3, else a bug
            error = classified(exc, context)
            if error is None:
                raise
            raise error from exc


def _model_context(model_id: str) -> str:
    if hub_model_id(model_id) is not None:
        return f"SFT_MODEL_ID={model_id!r} (no such local path, so it was fetched as a Hub model)"
    return f"SFT_MODEL_ID={model_id!r}"


def check_lora_targets(model: ModelConfig, lora: LoraConfig, model_path: str) -> None:
    """Each SFT_LORA_TARGET_MODULES name must match a module inside the language model, as PEFT will match it.

    The architecture comes from config.json (read at model_path, `Sources.model_path`), instantiated on the meta
    device: no weights are read or allocated. Errors name the SFT_MODEL_ID the user set (model.id).
    """
    import torch
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    try:
        config = AutoConfig.from_pretrained(model_path, revision=model.revision,
                                            trust_remote_code=model.trust_remote_code)
    except Exception as exc:  # classified: 401/403/404 -> 2, network -> 3, else a bug
        error = classified(exc, _model_context(model.id))
        if error is None:
            raise
        raise error from exc
    with torch.device("meta"):
        skeleton = Qwen3VLForConditionalGeneration._from_config(config)
    names = [name for name, _ in skeleton.named_modules()]
    pattern = re.compile(lora_target_regex(lora))
    if any(pattern.fullmatch(name) for name in names):
        unmatched = [t for t in lora.target_modules
                     if not any(pattern.fullmatch(n) and n.endswith("." + t) for n in names)]
    else:
        unmatched = list(lora.target_modules)
    if not unmatched:
        return
    scope = re.compile(rf".*{lora.scope_regex}")
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if scope.match(n) and "." in n})
    hints = []
    for target in unmatched:
        close = difflib.get_close_matches(target, leaves, n=1)
        hints.append(f"{target!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ConfigError(
        [
            f"SFT_LORA_TARGET_MODULES={','.join(lora.target_modules)!r}: "
            f"{', '.join(hints)} matches no language-model layer of {config.model_type}; "
            f"its layers have {', '.join(x for x in leaves if x.endswith('proj')) or ', '.join(leaves[:12])}"
        ]
    )


def load_processor_checked(model: ModelConfig, image: ImageConfig, model_path: str):
    """load_processor, with a download or access failure classified and naming the SFT_MODEL_ID the user set
    (model.id), as in check_lora_targets."""
    try:
        return load_processor(model, image, model_path)
    except Exception as exc:  # classified: 401/403/404 -> 2, network -> 3, else a bug
        error = classified(exc, _model_context(model.id))
        if error is None:
            raise
        raise error from exc

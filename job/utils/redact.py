"""Keeping secrets out of logs, metadata, W&B config and model cards."""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

# The environment variables whose values never reach a log, metadata, W&B or a card.
SECRET_ENV_VARS = ("HF_TOKEN", "WANDB_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

REDACTED = "***redacted***"
# Keys that *end* in a secret-ish word (hf_token, wandb_api_key, aws_secret_access_key); "max_new_tokens" is not one.
_SECRET_KEY = re.compile(
    r"(?:^|_)(?:token|secret|password|passwd|api_key|access_key|access_key_id|credentials?)$", re.IGNORECASE
)


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    source = os.environ if env is None else env
    # Very short values would redact ordinary words; real tokens and keys are long.
    return [v for k in SECRET_ENV_VARS if len(v := source.get(k, "") or "") >= 6]


def scrub(text: str, secrets: list[str] | None = None) -> str:
    for value in secrets if secrets is not None else secret_values():
        text = text.replace(value, REDACTED)
    return text


def redact(obj: Any, secrets: list[str] | None = None) -> Any:
    """A copy of obj with secret-looking keys blanked and any known secret value scrubbed from strings."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, dict):
        return {
            k: (REDACTED if _SECRET_KEY.search(str(k)) and v not in (None, "") else redact(v, secrets))
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, secrets) for v in obj)
    if isinstance(obj, str):
        return scrub(obj, secrets)
    return obj


class SecretFilter(logging.Filter):
    """Scrubs secret values from every log record, whatever logger emitted it."""

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = secret_values()
        if secrets:
            record.msg = scrub(record.getMessage(), secrets)
            record.args = None
            # log.exception(...) and stack_info=True carry text outside msg: format it now and scrub it too.
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = scrub(record.exc_text, secrets)
            if record.stack_info:
                record.stack_info = scrub(record.stack_info, secrets)
        return True


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger()
    if not any(isinstance(f, SecretFilter) for h in root.handlers for f in h.filters):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler.addFilter(SecretFilter())
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("httpx", "urllib3", "botocore", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for name, prefix in THIRD_PARTY_LOG_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))
    ignore_third_party_warnings()


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


# Log records of libraries that say nothing the user can act on: (logger, message prefix), each with why.
THIRD_PARTY_LOG_NOISE = (
    # bitsandbytes 0.50.2, at import on a CPU with avx512_bf16: it looks for an optional CPU kernel that the `kernels`
    # package would download from the Hub at run time (never possible offline, never used on a GPU), then uses its
    # own CPU kernel. The 4-bit path the job trains on is set by keep_4bit_layout_unpacked (job/model.py).
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)


# Warnings raised inside libraries we call, about their own internals; nothing in this job can change them.
# (message regex, category), each with why. tests/conftest.py applies them to every test.
THIRD_PARTY_WARNINGS = (
    # peft 0.21 and trl 1.16 read model.is_gradient_checkpointing, which transformers 5.24 deprecated in favour of
    # is_activation_checkpointing; our own code uses the new names.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
    # peft 0.21's prepare_model_for_kbit_training calls model.gradient_checkpointing_enable (same deprecation).
    (r"`gradient_checkpointing_enable` is deprecated", FutureWarning),
    # wandb 0.31: every logged wandb.Table (the confusion matrices, job/utils/tracking.py) is staged in a run-table
    # artifact whose anonymous TemporaryDirectory (Artifact.new_file) wandb never cleans, so each one warns at
    # interpreter exit. Only anonymous directories ('tmp' + 8 characters): the job's own are named (qwen3-sft-...).
    (r"Implicitly cleaning up <TemporaryDirectory '[^']*/tmp[a-z0-9_]{8}'>", ResourceWarning),
)


def ignore_third_party_warnings() -> None:
    for message, category in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)

"""job/config/ (settings.py, schema.py): SFT_* env vars validated by pydantic-settings and overlaid on the model card.

Fast: no model, no network. Every test passes an explicit `env` mapping unless it is testing the
os.environ fallback, and an autouse fixture strips SFT_* from the real environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, count_configs
from pydantic import ValidationError

from job import cli
from job.cards import ModelCards
from job.config.schema import (
    CONFIG_ENV,
    KNOWN_ENV_VARS,
    JobConfig,
    Settings,
    build_cfg,
    cross_field_problems,
    load_settings,
)
from job.config.settings import ENV_PREFIX, env_name
from job.errors import ConfigError, ExitCode
from job.prompts import Queries
from job.utils.redact import SECRET_ENV_VARS

CARD = ModelCards().qwen3_vl_8b_instruct


@pytest.fixture(autouse=True)
def _no_sft_env(monkeypatch):
    """Tests must not see SFT_* variables from the shell that runs pytest."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def _flatten(cfg: JobConfig | dict, prefix: tuple = ()) -> dict[tuple, object]:
    out = {}
    for key, value in (cfg.model_dump(mode="json") if isinstance(cfg, JobConfig) else cfg).items():
        if isinstance(value, dict):
            out.update(_flatten(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def _raises(env: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build_cfg(CARD, env=env)
    return info.value


# --------------------------------------------------------------------------------------------- defaults


def test_empty_env_gives_card_defaults():
    cfg = build_cfg(CARD, env={})
    assert cfg.model.id == "Qwen/Qwen3-VL-8B-Instruct"
    assert cfg.model.revision is None
    assert cfg.model.load_in_4bit is True
    assert cfg.model.attn_implementation == "auto"
    assert "model.visual" in cfg.model.quant_skip_modules
    assert "lm_head" in cfg.model.quant_skip_modules
    assert cfg.eval.max_new_tokens == 256
    assert cfg.eval.do_sample is False
    assert cfg.eval.batch_size == 8
    assert cfg.eval.stop_tokens == ("<|im_end|>", "<|endoftext|>")
    assert cfg.data.label_field == "label"
    assert cfg.data.train_split == "train"
    assert cfg.data.eval_split == "validation"
    assert cfg.data.system_prompt == Queries().SYSTEM_PROMPT
    assert cfg.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                       "down_proj")
    assert cfg.lora.r == 16
    assert cfg.lora.alpha == 32
    assert cfg.lora.dropout == 0.05
    assert cfg.lora.scope_regex == CARD.lora_scope_regex
    assert cfg.image.max_pixels == 1048576
    assert cfg.image.min_pixels == 256 * 256
    assert cfg.train.max_steps == -1
    assert cfg.train.learning_rate == 2e-4
    assert cfg.train.max_length == 2048
    assert cfg.wandb.enabled is True
    assert cfg.card.tags == CARD.tags


def test_cfg_is_json_serialisable_and_fresh_each_call():
    first = build_cfg(CARD, env={})
    json.dumps(first.model_dump(mode="json"))  # the `config` command and W&B both serialise it
    # Immutable: nothing one reader does can change what another reads (before 0.2 each call gave fresh lists).
    with pytest.raises(ValidationError):
        first.lora.r = 8
    with pytest.raises(AttributeError):
        first.lora.target_modules.append("lm_head")
    second = build_cfg(CARD, env={})
    assert second == first and second is not first
    assert second.model.quant_skip_modules == ("model.visual", "lm_head")


def test_load_settings_leaves_card_backed_fields_none():
    s = load_settings(CARD, env={})
    assert isinstance(s, Settings)
    assert s.model_id is None and s.learning_rate is None and s.lora_r is None and s.system_prompt is None
    assert s.max_steps == -1 and s.train_split == "train"


def test_known_env_vars_match_settings_fields():
    assert set(KNOWN_ENV_VARS) == {f"SFT_{f.upper()}" for f in Settings.model_fields}
    assert env_name("max_steps") == "SFT_MAX_STEPS"


# ----------------------------------------------------------------------------------------- env overlay

# (env, {path in cfg: expected value}); every path NOT listed must keep its default.
OVERLAY_CASES = [
    ({"SFT_MODEL_ID": "/models/qwen3-vl-8b"}, {("model", "id"): "/models/qwen3-vl-8b"}),
    ({"SFT_MODEL_REVISION": "0123abcd"}, {("model", "revision"): "0123abcd"}),
    ({"SFT_TRUST_REMOTE_CODE": "true"}, {("model", "trust_remote_code"): True}),
    ({"SFT_LOAD_IN_4BIT": "false"}, {("model", "load_in_4bit"): False}),
    ({"SFT_ATTN_IMPLEMENTATION": "sdpa"}, {("model", "attn_implementation"): "sdpa"}),
    ({"SFT_USE_LIGER": "false"}, {("model", "use_liger"): "false"}),
    ({"SFT_GROUP_BY_LENGTH": "false"}, {("train", "group_by_length"): False}),
    ({"SFT_PREEMPT_GRACE_S": "50"}, {("train", "preempt_grace_s"): 50.0}),
    ({"SFT_NPROC_PER_NODE": "2"}, {("train", "nproc_per_node"): 2}),
    ({"SFT_EXIT_CODES": "kubeflow"}, {("train", "exit_codes"): "kubeflow"}),
    ({"SFT_RESUME": "never"}, {("train", "resume"): "never"}),
    ({"SFT_LAUNCH_ID": "0b7c8f0e-3a52-4c1f-9d7e-2f1a6c9b4e11"},
     {("train", "launch_id"): "0b7c8f0e-3a52-4c1f-9d7e-2f1a6c9b4e11"}),
    ({"SFT_GRADIENT_CHECKPOINTING": "0"}, {("model", "gradient_checkpointing"): False}),
    ({"SFT_DATASET_URI": "s3://bucket/sarcasm"}, {("data", "uri"): "s3://bucket/sarcasm"}),
    ({"SFT_DATASET_REVISION": "v2"}, {("data", "revision"): "v2"}),
    ({"SFT_DATASET_CONFIG": "default"}, {("data", "config"): "default"}),
    ({"SFT_TRAIN_SPLIT": "train_clean"}, {("data", "train_split"): "train_clean"}),
    ({"SFT_EVAL_SPLIT": "test"}, {("data", "eval_split"): "test"}),
    ({"SFT_TRAIN_SUBSET": "1000"}, {("data", "train_subset"): 1000}),
    ({"SFT_EVAL_SUBSET": "200"}, {("data", "eval_subset"): 200}),
    ({"SFT_IMAGE_KEY": "img"}, {("data", "image_key"): "img"}),
    ({"SFT_QUERY_KEY": "question"}, {("data", "query_key"): "question"}),
    ({"SFT_CAPTION_KEY": "text"}, {("data", "caption_key"): "text"}),
    ({"SFT_TARGET_KEY": "answer"}, {("data", "target_key"): "answer"}),
    ({"SFT_LABEL_FIELD": "verdict"}, {("data", "label_field"): "verdict"}),
    ({"SFT_TARGET_FORMAT": "label"}, {("data", "target_format"): "label"}),
    # Only with SFT_TARGET_FORMAT=label (test_label_names_need_the_label_format); spaces around a name are dropped.
    ({"SFT_LABEL_NAMES": "non-sarcastic, sarcastic", "SFT_TARGET_FORMAT": "label"},
     {("data", "label_names"): ["non-sarcastic", "sarcastic"], ("data", "target_format"): "label"}),
    ({"SFT_QUERY_TEXT": "Is this post sarcastic?"}, {("data", "query_text"): "Is this post sarcastic?"}),
    ({"SFT_SYSTEM_PROMPT": "Be terse."}, {("data", "system_prompt"): "Be terse."}),
    # An explicitly empty prompt means "no system message", not "use the default".
    ({"SFT_SYSTEM_PROMPT": ""}, {("data", "system_prompt"): ""}),
    ({"SFT_IMAGE_MIN_PIXELS": "4096"}, {("image", "min_pixels"): 4096}),
    ({"SFT_IMAGE_MAX_PIXELS": "262144"}, {("image", "max_pixels"): 262144}),
    ({"SFT_OUTPUT_DIR": "/workspace/outputs"}, {("train", "output_dir"): "/workspace/outputs"}),
    ({"SFT_RUN_ID": "sarcasm-2026-11-25"}, {("train", "run_id"): "sarcasm-2026-11-25"}),
    ({"SFT_SEED": "7"}, {("train", "seed"): 7}),
    ({"SFT_MAX_STEPS": "500"}, {("train", "max_steps"): 500}),
    ({"SFT_NUM_EPOCHS": "2.5"}, {("train", "num_epochs"): 2.5}),
    ({"SFT_SAVE_STEPS": "25"}, {("train", "save_steps"): 25}),
    ({"SFT_SAVE_TOTAL_LIMIT": "1"}, {("train", "save_total_limit"): 1}),
    ({"SFT_LEARNING_RATE": "1e-4"}, {("train", "learning_rate"): 1e-4}),
    ({"SFT_LR_SCHEDULER_TYPE": "linear"}, {("train", "lr_scheduler_type"): "linear"}),
    ({"SFT_WARMUP_RATIO": "0.1"}, {("train", "warmup_ratio"): 0.1}),
    ({"SFT_WEIGHT_DECAY": "0.01"}, {("train", "weight_decay"): 0.01}),
    ({"SFT_MAX_GRAD_NORM": "0.5"}, {("train", "max_grad_norm"): 0.5}),
    ({"SFT_PER_DEVICE_BATCH_SIZE": "4"}, {("train", "per_device_batch_size"): 4}),
    ({"SFT_PER_DEVICE_BATCH_SIZE": "auto"}, {("train", "per_device_batch_size"): "auto"}),
    ({"SFT_GRAD_ACCUM": "2"}, {("train", "grad_accum"): 2}),
    ({"SFT_MAX_LENGTH": "4096"}, {("train", "max_length"): 4096}),
    ({"SFT_LOGGING_STEPS": "5"}, {("train", "logging_steps"): 5}),
    ({"SFT_DATALOADER_NUM_WORKERS": "0"}, {("train", "dataloader_num_workers"): 0}),
    ({"SFT_LORA_R": "32"}, {("lora", "r"): 32}),
    ({"SFT_LORA_ALPHA": "64"}, {("lora", "alpha"): 64}),
    # 0 is a real value, not "unset": it must not fall back to the card's 0.05.
    ({"SFT_LORA_DROPOUT": "0"}, {("lora", "dropout"): 0.0}),
    ({"SFT_LORA_TARGET_MODULES": "q_proj, v_proj"}, {("lora", "target_modules"): ["q_proj", "v_proj"]}),
    ({"SFT_EVAL_MAX_NEW_TOKENS": "64"}, {("eval", "max_new_tokens"): 64}),
    ({"SFT_EVAL_BATCH_SIZE": "2"}, {("eval", "batch_size"): 2}),
    ({"SFT_EVAL_DO_SAMPLE": "true"}, {("eval", "do_sample"): True}),
    ({"SFT_EVAL_TEMPERATURE": "0"}, {("eval", "temperature"): 0.0}),
    ({"SFT_EVAL_PRE": "false"}, {("eval", "pre"): False}),
    ({"SFT_EVAL_POST": "no"}, {("eval", "post"): False}),
    ({"SFT_EVAL_ADAPTER": "outputs/adapter"}, {("eval", "adapter"): "outputs/adapter"}),
    ({"SFT_EVAL_MODE": "score"}, {("eval", "mode"): "score"}),
    ({"SFT_EVAL_STEPS": "25"}, {("eval", "steps"): 25}),
    # These two apply only with SFT_EVAL_STEPS (test_during_train_settings_need_eval_steps).
    ({"SFT_EVAL_DURING_TRAIN_ROWS": "64", "SFT_EVAL_STEPS": "25"},
     {("eval", "during_train_rows"): 64, ("eval", "steps"): 25}),
    ({"SFT_BEST_METRIC": "log_loss", "SFT_EVAL_STEPS": "25"},
     {("eval", "best_metric"): "log_loss", ("eval", "steps"): 25}),
    ({"SFT_MIN_CLASS_ROWS": "0"}, {("data", "min_class_rows"): 0}),
    ({"SFT_MAX_CLASS_RATIO": "5"}, {("data", "max_class_ratio"): 5.0}),
    ({"SFT_TASK_NAME": "colour"}, {("card", "task_name"): "colour"}),
    ({"SFT_TASK_DESCRIPTION": "Colours."}, {("card", "task_description"): "Colours."}),
    ({"SFT_WANDB_ENABLED": "false"}, {("wandb", "enabled"): False}),
    ({"SFT_CHECKPOINT_URI": "s3://bucket/runs/"}, {("storage", "checkpoint_uri"): "s3://bucket/runs"}),
    ({"SFT_CACHE_DIR": "/cache/x"}, {("storage", "cache_dir"): "/cache/x"}),
    ({"SFT_S3_CONCURRENCY": "4"}, {("storage", "s3_concurrency"): 4}),
    ({"SFT_HUB_REPO_ID": "org/adapter"}, {("hub", "repo_id"): "org/adapter"}),
    ({"SFT_HUB_PRIVATE": "false"}, {("hub", "private"): False}),
    ({"SFT_PUSH_MIN_METRIC": "macro_f1:0.7"}, {("hub", "min_metric"): "macro_f1:0.7"}),
    ({"SFT_PUSH_REQUIRE_IMPROVEMENT": "false"}, {("hub", "require_improvement"): False}),
    ({"SFT_IMAGE_DIGEST": "sha256:abc"}, {("lineage", "image_digest"): "sha256:abc"}),
    ({"SFT_EXPORT": "true"}, {("export", "enabled"): True}),
    ({"SFT_EXPORT_VERIFY_ROWS": "200"}, {("export", "verify_rows"): 200}),
    ({"SFT_EXPORT_MAX_DROP": "0.02"}, {("export", "max_drop"): 0.02}),
    ({"SFT_EXPORT_REPO_ID": "org/merged"}, {("export", "repo_id"): "org/merged"}),
    ({"SFT_BAD_ROWS": "skip"}, {("data", "bad_rows"): "skip"}),
    ({"SFT_MAX_BAD_FRACTION": "0.05"}, {("data", "max_bad_fraction"): 0.05}),
    ({"SFT_EVAL_HOLDOUT": "0.2"}, {("data", "eval_holdout"): 0.2}),
    ({"SFT_EVAL_HOLDOUT": "200"}, {("data", "eval_holdout"): 200}),
    ({"SFT_MAX_EVAL_OVERLAP": "0"}, {("data", "max_eval_overlap"): 0.0}),
]


@pytest.mark.parametrize("value", ["0", "0.0", "-3", "1.5", "all"])
def test_eval_holdout_is_a_share_below_one_or_a_row_count(value):
    with pytest.raises(ConfigError, match="SFT_EVAL_HOLDOUT"):
        build_cfg(CARD, {"SFT_EVAL_HOLDOUT": value})


@pytest.mark.parametrize(
    ("env", "expected"), OVERLAY_CASES, ids=[next(iter(e)) + "=" + next(iter(e.values())) for e, _ in OVERLAY_CASES]
)
def test_env_var_sets_exactly_its_key(env, expected):
    default = _flatten(build_cfg(CARD, env={}))
    got = _flatten(build_cfg(CARD, env=env))
    for path, value in expected.items():
        assert got[path] == value, path
        if isinstance(value, bool):
            assert got[path] is value, path  # a real bool, not the string "false"
    changed = {p for p in default if default[p] != got[p]}
    assert changed == {p for p in expected if default[p] != expected[p]}


def test_overlay_cases_cover_every_setting():
    covered = {name for env, _ in OVERLAY_CASES for name in env}
    assert covered == set(KNOWN_ENV_VARS), f"missing overlay tests for: {sorted(set(KNOWN_ENV_VARS) - covered)}"


def test_max_steps_with_save_steps_overlay():
    cfg = build_cfg(CARD, env={"SFT_MAX_STEPS": "7", "SFT_SAVE_STEPS": "5"})
    assert cfg.train.max_steps == 7
    assert cfg.train.save_steps == 5


def test_max_steps_zero_is_allowed():
    """Field is ge=-1, so 0 passes validation and the save_steps rule only applies to max_steps > 0."""
    assert build_cfg(CARD, env={"SFT_MAX_STEPS": "0"}).train.max_steps == 0


def test_target_modules_list_drops_blanks_and_whitespace():
    cfg = build_cfg(CARD, env={"SFT_LORA_TARGET_MODULES": " q_proj,, v_proj ,"})
    assert cfg.lora.target_modules == ("q_proj", "v_proj")


@pytest.mark.parametrize(("raw", "expected"), [("true", True), ("1", True), ("yes", True), ("ON", True),
                                               ("false", False), ("0", False), ("no", False), ("Off", False)])
def test_boolean_spellings(raw, expected):
    assert build_cfg(CARD, env={"SFT_LOAD_IN_4BIT": raw}).model.load_in_4bit is expected


def test_env_names_are_case_insensitive():
    """Settings uses case_sensitive=False and the unknown-name check upper-cases, so any case works."""
    cfg = build_cfg(CARD, env={"sft_max_steps": "100", "Sft_Lora_R": "8", "sFt_ATTN_implementation": "eager"})
    assert cfg.train.max_steps == 100
    assert cfg.lora.r == 8
    assert cfg.model.attn_implementation == "eager"


def test_lowercase_name_errors_use_canonical_name_and_value():
    err = _raises({"sft_max_steps": "abc"})
    assert len(err.problems) == 1
    assert err.problems[0].startswith("SFT_MAX_STEPS='abc'")


def test_lowercase_unknown_name_is_still_caught():
    err = _raises({"sft_learnig_rate": "1e-4"})
    assert "did you mean SFT_LEARNING_RATE" in str(err)


def test_values_are_case_sensitive_for_choices():
    """Names are case-insensitive; the Literal values are not."""
    err = _raises({"SFT_ATTN_IMPLEMENTATION": "SDPA"})
    assert "SFT_ATTN_IMPLEMENTATION='SDPA'" in err.problems[0]


# ------------------------------------------------------------------------------------ field rule errors

# (variable, bad value, fragment of pydantic's message)
FIELD_ERRORS = [
    ("SFT_MAX_STEPS", "abc", "valid integer"),
    ("SFT_MAX_STEPS", "-5", "greater than or equal to -1"),
    ("SFT_MAX_STEPS", "1.5", "valid integer"),
    ("SFT_NUM_EPOCHS", "0", "greater than 0"),
    ("SFT_NUM_EPOCHS", "1001", "less than or equal to 1000"),
    ("SFT_SAVE_STEPS", "0", "greater than or equal to 1"),
    ("SFT_SAVE_TOTAL_LIMIT", "0", "greater than or equal to 1"),
    ("SFT_LEARNING_RATE", "0", "greater than 0"),
    ("SFT_LEARNING_RATE", "-1e-4", "greater than 0"),
    ("SFT_LEARNING_RATE", "2", "less than or equal to 1"),
    ("SFT_LEARNING_RATE", "fast", "valid number"),
    ("SFT_LR_SCHEDULER_TYPE", "step", "'cosine'"),
    ("SFT_WARMUP_RATIO", "1", "less than 1"),
    ("SFT_WARMUP_RATIO", "-0.1", "greater than or equal to 0"),
    ("SFT_WEIGHT_DECAY", "1", "less than 1"),
    ("SFT_MAX_GRAD_NORM", "0", "greater than 0"),
    ("SFT_PER_DEVICE_BATCH_SIZE", "0", "greater than or equal to 1"),
    ("SFT_PER_DEVICE_BATCH_SIZE", "513", "less than or equal to 512"),
    ("SFT_PER_DEVICE_BATCH_SIZE", "max", "or Input should be 'auto'"),  # the word it takes, in one problem
    ("SFT_GRAD_ACCUM", "0", "greater than or equal to 1"),
    ("SFT_MAX_LENGTH", "63", "greater than or equal to 64"),
    ("SFT_MAX_LENGTH", "262145", "less than or equal to 262144"),
    ("SFT_LOGGING_STEPS", "0", "greater than or equal to 1"),
    ("SFT_DATALOADER_NUM_WORKERS", "-1", "greater than or equal to 0"),
    ("SFT_DATALOADER_NUM_WORKERS", "65", "less than or equal to 64"),
    ("SFT_SEED", "-1", "greater than or equal to 0"),
    ("SFT_LORA_R", "0", "greater than or equal to 1"),
    ("SFT_LORA_R", "1025", "less than or equal to 1024"),
    ("SFT_LORA_ALPHA", "0", "greater than 0"),
    ("SFT_LORA_DROPOUT", "1", "less than 1"),
    ("SFT_LORA_DROPOUT", "-0.1", "greater than or equal to 0"),
    ("SFT_LORA_TARGET_MODULES", ",", "at least one module"),
    ("SFT_LORA_TARGET_MODULES", " , ", "at least one module"),
    ("SFT_ATTN_IMPLEMENTATION", "flash", "'sdpa'"),
    ("SFT_LOAD_IN_4BIT", "maybe", "valid boolean"),
    ("SFT_TRUST_REMOTE_CODE", "maybe", "valid boolean"),
    ("SFT_EVAL_DO_SAMPLE", "maybe", "valid boolean"),
    ("SFT_RUN_ID", "team/run-1", "pattern"),
    ("SFT_RUN_ID", "-leading-dash", "pattern"),
    ("SFT_RUN_ID", "r" * 129, "pattern"),
    ("SFT_IMAGE_MIN_PIXELS", "10", "greater than or equal to 1024"),
    ("SFT_IMAGE_MAX_PIXELS", "1000", "greater than or equal to 1024"),
    ("SFT_IMAGE_MAX_PIXELS", str(4096 * 4096 + 1), "less than or equal to 16777216"),
    ("SFT_EVAL_BATCH_SIZE", "0", "greater than or equal to 1"),
    ("SFT_EVAL_BATCH_SIZE", "513", "less than or equal to 512"),
    ("SFT_EVAL_MAX_NEW_TOKENS", "0", "greater than or equal to 1"),
    ("SFT_EVAL_MAX_NEW_TOKENS", "8193", "less than or equal to 8192"),
    ("SFT_EVAL_TEMPERATURE", "-0.1", "greater than or equal to 0"),
    ("SFT_EVAL_TEMPERATURE", "11", "less than or equal to 10"),
    ("SFT_TRAIN_SUBSET", "0", "greater than or equal to 1"),
    ("SFT_TRAIN_SUBSET", "", "valid integer"),  # empty is not "unset" for an int
    ("SFT_EVAL_SUBSET", "0", "greater than or equal to 1"),
    ("SFT_TRAIN_SPLIT", "", "at least 1 character"),
    ("SFT_EVAL_SPLIT", "", "at least 1 character"),
    ("SFT_LABEL_FIELD", "", "at least 1 character"),
    ("SFT_TARGET_FORMAT", "classlabel", "'json' or 'label'"),
    ("SFT_QUERY_TEXT", "", "at least 1 character"),
    ("SFT_IMAGE_KEY", "", "at least 1 character"),
    ("SFT_OUTPUT_DIR", "", "at least 1 character"),
]


@pytest.mark.parametrize(
    ("name", "value", "fragment"), FIELD_ERRORS, ids=[f"{n}={v[:12]!r}" for n, v, _ in FIELD_ERRORS]
)
def test_field_rule_raises_with_name_value_and_example(name, value, fragment):
    err = _raises({name: value})
    assert err.exit_code == ExitCode.USER
    assert len(err.problems) == 1, err.problems
    problem = err.problems[0]
    assert problem.startswith(f"{name}={value!r}: "), problem
    assert fragment in problem
    assert f"(example: {name}=" in problem
    assert name in str(err) and repr(value) in str(err)


def test_error_example_is_the_fields_first_example():
    err = _raises({"SFT_MAX_STEPS": "abc"})
    assert err.problems == [
        "SFT_MAX_STEPS='abc': Input should be a valid integer, unable to parse string as an integer "
        "(example: SFT_MAX_STEPS=500)"
    ]
    assert str(err) == "invalid configuration:\n  - " + err.problems[0]


def test_every_setting_has_an_example():
    """Error messages append the first example; a field without one would give a message without a fix."""
    missing = [name for name, info in Settings.model_fields.items() if not info.examples]
    assert missing == []


# ----------------------------------------------------------------------------------- cross-field rules


def test_defaults_have_no_cross_field_problems():
    assert cross_field_problems(load_settings(CARD, env={}), CARD) == []


def test_min_pixels_above_max_pixels():
    err = _raises({"SFT_IMAGE_MIN_PIXELS": "2000000"})
    assert err.problems == [
        "SFT_IMAGE_MIN_PIXELS=2000000 is larger than SFT_IMAGE_MAX_PIXELS=1048576: min must be <= max"
    ]


def test_max_pixels_below_card_min_pixels():
    """The rule compares the effective values: an env max below the card's min (65536) is caught too."""
    err = _raises({"SFT_IMAGE_MAX_PIXELS": "50000"})
    assert len(err.problems) == 1
    assert "SFT_IMAGE_MIN_PIXELS=65536 is larger than SFT_IMAGE_MAX_PIXELS=50000" in err.problems[0]


def test_min_equal_max_pixels_is_fine():
    cfg = build_cfg(CARD, env={"SFT_IMAGE_MIN_PIXELS": "65536", "SFT_IMAGE_MAX_PIXELS": "65536"})
    assert cfg.image.model_dump() == {"min_pixels": 65536, "max_pixels": 65536}


def test_max_length_cannot_hold_an_image_at_the_cap():
    err = _raises({"SFT_MAX_LENGTH": "512"})
    assert len(err.problems) == 1
    problem = err.problems[0]
    assert "SFT_MAX_LENGTH=512 cannot hold one image at SFT_IMAGE_MAX_PIXELS=1048576" in problem
    assert "(1024 visual tokens)" in problem
    assert "raise SFT_MAX_LENGTH or lower the pixel cap" in problem


def test_max_length_rule_uses_raised_pixel_cap():
    err = _raises({"SFT_IMAGE_MAX_PIXELS": str(4096 * 4096)})  # 16384 visual tokens vs card max_length 2048
    assert len(err.problems) == 1
    assert (
        "SFT_MAX_LENGTH=2048 cannot hold one image at SFT_IMAGE_MAX_PIXELS=16777216 (16384 visual tokens)"
        in err.problems[0]
    )


def test_max_length_boundary():
    """1024 visual tokens + 32 prompt tokens: 1056 fits, 1055 does not."""
    assert build_cfg(CARD, env={"SFT_MAX_LENGTH": "1056"}).train.max_length == 1056
    assert "SFT_MAX_LENGTH=1055" in _raises({"SFT_MAX_LENGTH": "1055"}).problems[0]


def test_train_split_equal_to_eval_split():
    err = _raises({"SFT_EVAL_SPLIT": "train"})
    assert len(err.problems) == 1
    assert "SFT_TRAIN_SPLIT and SFT_EVAL_SPLIT are both 'train'" in err.problems[0]
    assert "held-out split" in err.problems[0]


@pytest.mark.parametrize(("value", "problem"), [
    ("a,,b", "must name every class, comma separated, none empty (e.g. non-sarcastic,sarcastic)"),
    ("yes, no,yes", "names yes more than once: each class needs its own name"),
])
def test_label_names_are_distinct_and_non_empty(value, problem):
    err = _raises({"SFT_TARGET_FORMAT": "label", "SFT_LABEL_NAMES": value})
    assert err.problems == [f"SFT_LABEL_NAMES={value!r}: Value error, {problem} (example: "
                            "SFT_LABEL_NAMES=non-sarcastic,sarcastic)"]


def test_label_names_need_the_label_format():
    err = _raises({"SFT_LABEL_NAMES": "non-sarcastic,sarcastic"})
    assert err.problems == ["SFT_LABEL_NAMES names the classes of a label column and only applies with "
                            "SFT_TARGET_FORMAT=label: set SFT_TARGET_FORMAT=label, or unset SFT_LABEL_NAMES"]


def test_query_text_is_not_blank_and_not_beside_a_query_key():
    err = _raises({"SFT_QUERY_TEXT": "  ", "SFT_QUERY_KEY": "question"})
    assert err.problems == [
        "SFT_QUERY_TEXT is blank: write the question every row is asked, or unset it",
        "SFT_QUERY_TEXT asks every row the same question and SFT_QUERY_KEY='question' names a query column: set "
        "one of them"]


def test_do_sample_needs_positive_temperature():
    err = _raises({"SFT_EVAL_DO_SAMPLE": "true", "SFT_EVAL_TEMPERATURE": "0"})
    assert err.problems == [
        "SFT_EVAL_DO_SAMPLE=true needs SFT_EVAL_TEMPERATURE > 0 (e.g. 0.7), or set SFT_EVAL_DO_SAMPLE=false"
    ]


def test_temperature_zero_is_fine_for_greedy():
    assert build_cfg(CARD, env={"SFT_EVAL_TEMPERATURE": "0"}).eval.temperature == 0.0


def test_save_steps_above_max_steps():
    # Only when both are set: a default SFT_SAVE_STEPS follows the short run instead (tests/test_exit_codes.py).
    err = _raises({"SFT_MAX_STEPS": "10", "SFT_SAVE_STEPS": "50"})
    assert len(err.problems) == 1
    assert "SFT_SAVE_STEPS=50 exceeds SFT_MAX_STEPS=10" in err.problems[0]
    assert "lower SFT_SAVE_STEPS" in err.problems[0]


@pytest.mark.parametrize("max_steps", ["-1", "0", "50"])
def test_save_steps_rule_only_when_max_steps_is_smaller(max_steps):
    assert build_cfg(CARD, env={"SFT_MAX_STEPS": max_steps}).train.max_steps == int(max_steps)


def test_all_cross_field_problems_reported_together():
    env = {
        "SFT_IMAGE_MIN_PIXELS": "2000000",
        "SFT_MAX_LENGTH": "512",
        "SFT_EVAL_SPLIT": "train",
        "SFT_EVAL_DO_SAMPLE": "true",
        "SFT_EVAL_TEMPERATURE": "0",
        "SFT_MAX_STEPS": "10",
        "SFT_SAVE_STEPS": "50",
        "SFT_LEARNIG_RATE": "1e-4",
    }
    err = _raises(env)
    assert len(err.problems) == 6, err.problems
    text = str(err)
    for fragment in ("is larger than", "cannot hold one image", "are both 'train'", "SFT_EVAL_DO_SAMPLE=true needs",
                     "exceeds SFT_MAX_STEPS=10", "did you mean SFT_LEARNING_RATE"):
        assert fragment in text


# ------------------------------------------------------------------------------------------ unknown vars


@pytest.mark.parametrize(("typo", "suggestion"), [
    ("SFT_LEARNIG_RATE", "SFT_LEARNING_RATE"),
    ("SFT_MAX_STEP", "SFT_MAX_STEPS"),
    ("SFT_EVAL_MAX_NEW_TOKEN", "SFT_EVAL_MAX_NEW_TOKENS"),
    ("SFT_LORA_TARGETS_MODULES", "SFT_LORA_TARGET_MODULES"),
])
def test_unknown_var_did_you_mean(typo, suggestion):
    err = _raises({typo: "1"})
    assert err.problems == [f"{typo}: unknown setting; did you mean {suggestion}?"]


def test_unrelated_unknown_var():
    err = _raises({"SFT_FOO": "1"})
    assert len(err.problems) == 1
    assert err.problems[0].startswith("SFT_FOO: unknown setting")
    assert "did you mean" not in err.problems[0]
    assert "known names" in err.problems[0]


def test_unknown_var_alongside_valid_ones_still_fails():
    err = _raises({"SFT_MAX_STEPS": "100", "SFT_LORA_R": "8", "SFT_FOO": "1"})
    assert len(err.problems) == 1 and "SFT_FOO" in err.problems[0]


def test_non_sft_vars_are_ignored():
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/root",
        "HF_TOKEN": "hf_supersecret123",
        "WANDB_API_KEY": "0123456789abcdef",
        "MY_SFT_THING": "x",  # contains SFT_ but does not start with it
        "SFTX": "x",
        "SFT_LORA_R": "8",
    }
    cfg = build_cfg(CARD, env=env)
    assert cfg.lora.r == 8
    dumped = json.dumps(cfg.model_dump(mode="json"))
    assert "hf_supersecret123" not in dumped and "0123456789abcdef" not in dumped


def test_secret_env_vars_are_not_sft_settings():
    assert not any(name.startswith(ENV_PREFIX) for name in SECRET_ENV_VARS)
    assert "HF_TOKEN" in SECRET_ENV_VARS


def test_problems_collected_at_once():
    env = {
        "SFT_MAX_STEPS": "abc",
        "SFT_LEARNING_RATE": "0",
        "SFT_ATTN_IMPLEMENTATION": "flash",
        "SFT_FOO": "1",
        "PATH": "/usr/bin",
    }
    err = _raises(env)
    assert len(err.problems) == 4, err.problems
    joined = "\n".join(err.problems)
    for name in ("SFT_MAX_STEPS='abc'", "SFT_LEARNING_RATE='0'", "SFT_ATTN_IMPLEMENTATION='flash'", "SFT_FOO: unknown"):
        assert name in joined
    assert str(err).count("\n  - ") == 4


def test_env_mapping_is_not_mutated():
    env = {"SFT_LORA_R": "8", "PATH": "/bin"}
    build_cfg(CARD, env=env)
    assert env == {"SFT_LORA_R": "8", "PATH": "/bin"}


# ---------------------------------------------------------------------------------- os.environ fallback


def test_env_none_reads_os_environ(monkeypatch):
    monkeypatch.setenv("SFT_LORA_R", "32")
    monkeypatch.setenv("SFT_SYSTEM_PROMPT", "")
    cfg = build_cfg(CARD)
    assert cfg.lora.r == 32
    assert cfg.data.system_prompt == ""
    assert build_cfg(CARD, env=None).lora.r == 32


def test_env_none_validates_os_environ(monkeypatch):
    monkeypatch.setenv("SFT_LEARNIG_RATE", "1e-4")
    with pytest.raises(ConfigError, match="did you mean SFT_LEARNING_RATE"):
        build_cfg(CARD)


def test_explicit_env_ignores_os_environ(monkeypatch):
    monkeypatch.setenv("SFT_LORA_R", "abc")
    assert build_cfg(CARD, env={}).lora.r == 16


# --------------------------------------------------------------------------------------------------- CLI


def _cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX) and k not in SECRET_ENV_VARS}
    env.update(extra)
    return env


def _run_config(**extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "job", "config"],
        cwd=REPO, env=_cli_env(**extra), capture_output=True, text=True, timeout=120,
    )


@pytest.mark.slow
def test_cli_config_prints_effective_config_without_secrets():
    proc = _run_config(SFT_MAX_STEPS="7", SFT_SAVE_STEPS="5", HF_TOKEN="hf_supersecret123")
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    assert cfg["train"]["max_steps"] == 7
    assert cfg["train"]["save_steps"] == 5
    # redaction must not blank ordinary "*tokens" keys
    assert cfg["eval"]["max_new_tokens"] == 256
    assert cfg["eval"]["stop_tokens"] == ["<|im_end|>", "<|endoftext|>"]
    assert "hf_supersecret123" not in proc.stdout
    assert "hf_supersecret123" not in proc.stderr


@pytest.mark.slow
def test_cli_config_bad_value_exits_2_without_traceback():
    proc = _run_config(SFT_MAX_STEPS="-5", HF_TOKEN="hf_supersecret123")
    assert proc.returncode == ExitCode.USER == 2
    assert "SFT_MAX_STEPS" in proc.stderr
    assert "'-5'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


@pytest.mark.slow
def test_cli_config_scrubs_secret_echoed_in_error():
    """A bad value that happens to contain the token is echoed in the message; the CLI must scrub it."""
    proc = _run_config(SFT_RUN_ID="hf_supersecret123/oops", HF_TOKEN="hf_supersecret123")
    assert proc.returncode == 2
    assert "SFT_RUN_ID" in proc.stderr
    assert "hf_supersecret123" not in proc.stderr
    assert "***redacted***" in proc.stderr


@pytest.mark.parametrize(("name", "value"), [
    ("SFT_CHECKPOINT_URI", "gs://bucket/x"),
    ("SFT_HUB_REPO_ID", "no-slash"),
    ("SFT_PUSH_MIN_METRIC", "f1:0.7"),
    ("SFT_PUSH_MIN_METRIC", "macro_f1:1.5"),
    ("SFT_S3_CONCURRENCY", "0"),
])
def test_storage_settings_reject_bad_values(name, value):
    with pytest.raises(ConfigError) as info:
        build_cfg(CARD, env={name: value})
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith(f"{name}={value!r}: ")


def test_gate_needs_post_eval():
    with pytest.raises(ConfigError, match="SFT_PUSH_MIN_METRIC needs the post-eval"):
        build_cfg(CARD, env={"SFT_PUSH_MIN_METRIC": "macro_f1:0.7", "SFT_EVAL_POST": "false"})


def test_during_train_settings_need_eval_steps():
    with pytest.raises(ConfigError) as info:
        build_cfg(CARD, env={"SFT_BEST_METRIC": "log_loss", "SFT_EVAL_DURING_TRAIN_ROWS": "64"})
    assert info.value.problems == ["SFT_BEST_METRIC, SFT_EVAL_DURING_TRAIN_ROWS only apply with SFT_EVAL_STEPS (eval "
                                   "during training): set SFT_EVAL_STEPS=N or unset them"]
    with pytest.raises(ConfigError, match="SFT_EVAL_MODE=generate turns scoring off"):
        build_cfg(CARD, env={"SFT_EVAL_STEPS": "5", "SFT_EVAL_MODE": "generate"})


def test_export_repo_is_not_the_adapter_repo():
    with pytest.raises(ConfigError, match="SFT_EXPORT_REPO_ID and SFT_HUB_REPO_ID are both 'org/x'"):
        build_cfg(CARD, env={"SFT_EXPORT_REPO_ID": "org/x", "SFT_HUB_REPO_ID": "org/x"})


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "preflight", "eval", "export"])
def test_a_config_mistake_exits_2_before_torch_is_imported(command):
    """Fail early and cheap: the SFT_* environment is validated before a command imports the training stack."""
    code = f"import sys, job.cli; rc = job.cli.main([{command!r}]); print(rc, 'torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_cli_env(SFT_MAX_STEPS="abc"),
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "False"], proc.stderr[-2000:]
    assert "SFT_MAX_STEPS" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------- one config per process


@pytest.mark.usefixtures("root_handlers_restored")
def test_the_cli_builds_the_config_once_and_passes_it_down(monkeypatch, capsys):
    """The entry point parses SFT_* once and constructs the one JobConfig its command uses: no second parse for
    the exit-code style, no rebuild inside the command."""
    monkeypatch.setenv("SFT_MAX_STEPS", "7")
    counts = count_configs(monkeypatch)
    assert cli.main(["config"]) == 0
    assert counts == {"parsed": 1, "refused": 0, "built": 1}
    assert json.loads(capsys.readouterr().out)["train"]["max_steps"] == 7
    # An invalid environment is parsed once too: exit 2, and nothing is built from it.
    monkeypatch.setenv("SFT_EXIT_CODES", "kubeflow")
    monkeypatch.setenv("SFT_LORA_RANK", "8")
    counts = count_configs(monkeypatch)
    assert cli.main(["config"]) == 2
    assert counts == {"parsed": 1, "refused": 1, "built": 0}
    assert "did you mean SFT_LORA_R?" in capsys.readouterr().err


@pytest.mark.usefixtures("root_handlers_restored")
def test_a_launched_worker_takes_its_parents_config_as_it_is(monkeypatch, capsys):
    """A worker of `run`'s launcher reads the parent's serialized config (CONFIG_ENV), never the SFT_* environment:
    the environment here is even invalid, and the worker's config is exactly the parent's."""
    parent = build_cfg(CARD, {"SFT_LORA_ALPHA": "64", "SFT_EVAL_HOLDOUT": "200", "SFT_LORA_TARGET_MODULES": "q_proj"})
    monkeypatch.setenv(CONFIG_ENV, parent.model_dump_json())
    monkeypatch.setenv("SFT_LORA_RANK", "8")
    monkeypatch.setenv("LOCAL_RANK", "0")
    counts = count_configs(monkeypatch)
    assert cli.main(["config"]) == 0
    assert counts == {"parsed": 0, "refused": 0, "built": 1}
    assert capsys.readouterr().out == json.dumps(parent.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


@pytest.mark.usefixtures("root_handlers_restored")
def test_config_explain_prints_each_setting_with_its_meaning(monkeypatch, capsys):
    """`qwen3-sft config --explain`: every SFT_* variable once, its effective value (secrets scrubbed), its type and
    default, and its meaning: the same fields the docs tables come from."""
    monkeypatch.setenv("SFT_LORA_R", "8")
    monkeypatch.setenv("HF_TOKEN", "hf_supersecret123")
    monkeypatch.setenv("SFT_IMAGE_DIGEST", "sha256:hf_supersecret123")
    assert cli.main(["config", "--explain"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert sorted(line.split(" = ")[0] for line in lines if line.startswith("SFT_")) == list(KNOWN_ENV_VARS)
    assert [line for line in lines if line.startswith("# ")] == [
        "# Model", "# Data", "# Image", "# Run and training", "# LoRA", "# Evaluation", "# Weights & Biases",
        "# Storage", "# Hub and the push gate", "# Export", "# Lineage", "# Model card"]
    at = lines.index("SFT_LORA_R = 8")
    assert lines[at + 1:at + 4] == ["    int, [1, 1024]; default card: `16`", "    LoRA rank.", "SFT_LORA_ALPHA = 32"]
    at = lines.index("SFT_EVAL_MAX_NEW_TOKENS = 256")
    assert lines[at + 1:at + 3] == ["    int, [1, 8192]; default card: `256`", "    Generation bound; generation "
                                    "normally stops earlier at `<|im_end|>` or `<|endoftext|>`."]
    at = lines.index("SFT_BAD_ROWS = \"fail\"")
    assert lines[at + 1:at + 4] == [
        "    `fail` | `skip`; default `fail`",
        "    Rows that fail the preflight checks: `fail` stops the job (exit 2); `skip` drops them from training and "
        "eval. A",
        "    split that cannot be parsed at all always fails."]  # wrapped at 120 columns
    assert "hf_supersecret123" not in out and 'SFT_IMAGE_DIGEST = "sha256:***redacted***"' in lines

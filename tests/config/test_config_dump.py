"""The JSON form of the config is locked: `qwen3-sft config`, training_meta.json, the W&B run and the model card
print what build_cfg's nested dict gave before the config became typed (0.1.0), byte for byte.

The two dicts below were printed by that code (job/config.py at 60250fd) for the empty environment and for
OVERRIDES; key order included (W&B keeps it). Sections added since then are inserted where the config puts them
(`export`, 0.2: SFT_EXPORT*, before `lineage`; `train.nproc_per_node` and `train.exit_codes`, 0.2, before
`train.resume`; 0.3 appends `data.min_class_rows`, `data.max_class_ratio`, `eval.mode`, `eval.steps`,
`eval.during_train_rows`, `eval.best_metric`, `card.task_name` and `card.task_description` to their sections, and
`train.launch_id` (#31)); #35 appends `data.target_format`, `data.label_names` and `data.query_text`; no existing key
moves or changes.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from helpers import REPO

from job.cards import ModelCards
from job.cli import _cmd_config, build_parser
from job.config import docs
from job.config.docs import HEADER, settings_tables, with_tables
from job.config.schema import KNOWN_ENV_VARS, build_cfg
from job.config.settings import ENV_PREFIX, setting
from job.storage.sources import Sources

CARD = ModelCards().qwen3_vl_8b_instruct
OVERRIDES = {
    "SFT_MODEL_ID": "org/model", "SFT_DATASET_URI": "s3://bucket/data/", "SFT_MAX_STEPS": "5",
    "SFT_LORA_ALPHA": "64", "SFT_LORA_TARGET_MODULES": " q_proj,, v_proj ,", "SFT_LEARNING_RATE": "1e-4",
    "SFT_CHECKPOINT_URI": "s3://ckpt/run/", "SFT_HUB_REPO_ID": "org/adapter", "SFT_PUSH_MIN_METRIC": "macro_f1:0.7",
    "SFT_SYSTEM_PROMPT": "", "SFT_NUM_EPOCHS": "2", "SFT_IMAGE_MAX_PIXELS": "524288", "SFT_S3_CONCURRENCY": "4",
    "SFT_WANDB_ENABLED": "false", "SFT_IMAGE_DIGEST": "sha256:abc",
}

DEFAULT = {'model': {'id': 'Qwen/Qwen3-VL-8B-Instruct',
               'revision': None,
               'trust_remote_code': False,
               'load_in_4bit': True,
               'attn_implementation': 'auto',
               'quant_skip_modules': ['model.visual', 'lm_head'],
               'gradient_checkpointing': True,
               'use_liger': 'auto'},
     'data': {'uri': None,
              'revision': None,
              'config': None,
              'train_split': 'train',
              'eval_split': 'validation',
              'train_subset': None,
              'eval_subset': None,
              'image_key': 'image',
              'query_key': 'query',
              'caption_key': 'caption',
              'target_key': 'target_json',
              'label_field': 'label',
              'system_prompt': "You are a sarcasm detector for social media posts. Look at the image, the user's "
                               'question and the caption, then answer with a single JSON object and nothing else.',
              'bad_rows': 'fail',
              'max_bad_fraction': 0.01,
              'eval_holdout': 0.1,
              'max_eval_overlap': 0.01,
              'min_class_rows': 10,
              'max_class_ratio': 20.0,
              'target_format': 'json',
              'label_names': None,
              'query_text': None},
     'image': {'min_pixels': 65536, 'max_pixels': 1048576},
     'train': {'output_dir': 'outputs',
               'run_id': None,
               'seed': 42,
               'max_steps': -1,
               'num_epochs': 1.0,
               'save_steps': 50,
               'save_total_limit': 3,
               'learning_rate': 0.0002,
               'lr_scheduler_type': 'cosine',
               'warmup_ratio': 0.03,
               'weight_decay': 0.0,
               'max_grad_norm': 1.0,
               'per_device_batch_size': 2,
               'grad_accum': 8,
               'max_length': 2048,
               'logging_steps': 10,
               'dataloader_num_workers': 2,
               'group_by_length': True,
               'preempt_grace_s': 25.0,
               'nproc_per_node': None,
               'exit_codes': 'standard',
               'resume': 'auto',
               'launch_id': None},
     'lora': {'r': 16,
              'alpha': 32,
              'dropout': 0.05,
              'target_modules': ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
              'scope_regex': 'model\\.language_model\\.layers\\.\\d+\\.(?:self_attn|mlp)\\.'},
     'eval': {'max_new_tokens': 256,
              'batch_size': 8,
              'do_sample': False,
              'temperature': 0.7,
              'pre': True,
              'post': True,
              'adapter': None,
              'stop_tokens': ['<|im_end|>', '<|endoftext|>'],
              'mode': 'auto',
              'steps': None,
              'during_train_rows': 128,
              'best_metric': 'macro_f1'},
     'wandb': {'enabled': True},
     'storage': {'checkpoint_uri': None, 'cache_dir': None, 's3_concurrency': 16},
     'hub': {'repo_id': None, 'private': True, 'min_metric': None, 'require_improvement': True},
     'export': {'enabled': False, 'verify_rows': None, 'max_drop': 0.01, 'repo_id': None},
     'lineage': {'image_digest': None},
     'card': {'tags': ['qwen3-vl', 'qlora', 'sft', 'sarcasm-detection'],
              'task_name': 'sarcasm',
              'task_description': 'Multimodal sarcasm detection: an image, a query and an optional caption in, a '
                                  'JSON verdict out.'}}

WITH_OVERRIDES = {'model': {'id': 'org/model',
               'revision': None,
               'trust_remote_code': False,
               'load_in_4bit': True,
               'attn_implementation': 'auto',
               'quant_skip_modules': ['model.visual', 'lm_head'],
               'gradient_checkpointing': True,
               'use_liger': 'auto'},
     'data': {'uri': 's3://bucket/data/',
              'revision': None,
              'config': None,
              'train_split': 'train',
              'eval_split': 'validation',
              'train_subset': None,
              'eval_subset': None,
              'image_key': 'image',
              'query_key': 'query',
              'caption_key': 'caption',
              'target_key': 'target_json',
              'label_field': 'label',
              'system_prompt': '',
              'bad_rows': 'fail',
              'max_bad_fraction': 0.01,
              'eval_holdout': 0.1,
              'max_eval_overlap': 0.01,
              'min_class_rows': 10,
              'max_class_ratio': 20.0,
              'target_format': 'json',
              'label_names': None,
              'query_text': None},
     'image': {'min_pixels': 65536, 'max_pixels': 524288},
     'train': {'output_dir': 'outputs',
               'run_id': None,
               'seed': 42,
               'max_steps': 5,
               'num_epochs': 2.0,
               'save_steps': 5,
               'save_total_limit': 3,
               'learning_rate': 0.0001,
               'lr_scheduler_type': 'cosine',
               'warmup_ratio': 0.03,
               'weight_decay': 0.0,
               'max_grad_norm': 1.0,
               'per_device_batch_size': 2,
               'grad_accum': 8,
               'max_length': 2048,
               'logging_steps': 10,
               'dataloader_num_workers': 2,
               'group_by_length': True,
               'preempt_grace_s': 25.0,
               'nproc_per_node': None,
               'exit_codes': 'standard',
               'resume': 'auto',
               'launch_id': None},
     'lora': {'r': 16,
              'alpha': 64.0,
              'dropout': 0.05,
              'target_modules': ['q_proj', 'v_proj'],
              'scope_regex': 'model\\.language_model\\.layers\\.\\d+\\.(?:self_attn|mlp)\\.'},
     'eval': {'max_new_tokens': 256,
              'batch_size': 8,
              'do_sample': False,
              'temperature': 0.7,
              'pre': True,
              'post': True,
              'adapter': None,
              'stop_tokens': ['<|im_end|>', '<|endoftext|>'],
              'mode': 'auto',
              'steps': None,
              'during_train_rows': 128,
              'best_metric': 'macro_f1'},
     'wandb': {'enabled': False},
     'storage': {'checkpoint_uri': 's3://ckpt/run', 'cache_dir': None, 's3_concurrency': 4},
     'hub': {'repo_id': 'org/adapter', 'private': True, 'min_metric': 'macro_f1:0.7', 'require_improvement': True},
     'export': {'enabled': False, 'verify_rows': None, 'max_drop': 0.01, 'repo_id': None},
     'lineage': {'image_digest': 'sha256:abc'},
     'card': {'tags': ['qwen3-vl', 'qlora', 'sft', 'sarcasm-detection'],
              'task_name': 'sarcasm',
              'task_description': 'Multimodal sarcasm detection: an image, a query and an optional caption in, a '
                                  'JSON verdict out.'}}

CASES = [({}, DEFAULT), (OVERRIDES, WITH_OVERRIDES)]


@pytest.fixture(autouse=True)
def _no_sft_env(monkeypatch):
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(("env", "expected"), CASES, ids=["default", "overrides"])
def test_the_dump_is_the_old_dict(env, expected):
    dumped = build_cfg(CARD, env).model_dump(mode="json")
    assert dumped == expected
    assert json.dumps(dumped) == json.dumps(expected)  # key order, ints vs floats (alpha 32 vs 64.0), lists


@pytest.mark.parametrize(("env", "expected"), CASES, ids=["default", "overrides"])
def test_the_config_command_prints_the_old_dict(env, expected, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # the command's body with the config main() builds: main() would also set up logging for the process
    assert _cmd_config(build_parser().parse_args(["config"]), build_cfg(CARD)) == 0
    assert capsys.readouterr().out == json.dumps(expected, indent=2, sort_keys=True) + "\n"


def test_the_stored_config_keeps_the_mirror_and_the_source():
    """training_meta.json's "config" and the W&B config: the local copies in data.uri and model.id, what was
    configured in data.source_uri and model.source (appended last, as localize() used to add them)."""
    cfg = build_cfg(CARD, OVERRIDES)
    sources = Sources("s3://bucket/data/", "org/model", "/cache/datasets/bucket/data", "org/model")
    expected = json.loads(json.dumps(WITH_OVERRIDES))
    expected["data"]["uri"] = "/cache/datasets/bucket/data"
    expected["data"]["source_uri"] = "s3://bucket/data/"
    expected["model"]["source"] = "org/model"
    record = sources.config_record(cfg)
    assert json.dumps(record) == json.dumps(expected)


# ------------------------------------------------------------------------------- docs/configuration.md


def _doc_tables(text: str) -> dict[str, list[list[str]]]:
    """Each `## Title` of the page followed by a settings table -> its rows, as cells (a `\\|` stays in its cell)."""
    tables: dict[str, list[list[str]]] = {}
    for block in text.split("\n## ")[1:]:
        title, _, body = block.partition("\n")
        lines = body.strip().splitlines()
        if tuple(lines[:2]) != HEADER:
            continue
        rows = []
        for line in lines[2:]:
            if not line.startswith("| "):
                break
            rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])])
        tables[title] = rows
    return tables


def test_the_docs_settings_tables_are_the_schemas():
    """docs/configuration.md's settings tables are exactly the generated ones, every column (the meaning is each
    field's doc): every setting once, in its section's table, nothing else; and the page is what `make docs` writes."""
    page = (REPO / "docs" / "configuration.md").read_text()
    tables = _doc_tables(page)
    assert {title: [tuple(row) for row in rows] for title, rows in tables.items()} == settings_tables(CARD)
    assert with_tables(page, CARD) == page
    listed = [row[0].strip("`") for rows in tables.values() for row in rows]
    assert sorted(listed) == list(KNOWN_ENV_VARS) and len(listed) == 84
    assert all(len(row) == 4 and row[3] for rows in tables.values() for row in rows)


def test_make_docs_rewrites_a_drifted_page(tmp_path):
    """Not vacuous: a changed meaning, a missing row and an unknown row are put right by `--write`, the prose around
    the tables kept; a page without a section's table is an error naming it."""
    page = (REPO / "docs" / "configuration.md").read_text()
    lora = "| `SFT_LORA_R` | int, [1, 1024] | card: `16` | LoRA rank. |\n"
    seed = "| `SFT_SEED` | int >= 0 | `42` | `transformers.set_seed`, the data order seed and the subset selection. |\n"
    assert lora in page and seed in page
    drifted = page.replace(lora, "| `SFT_LORA_R` | int | `8` | The rank. |\n| `SFT_LORA_RANK` | int | `8` | x |\n")
    drifted = drifted.replace(seed, "")
    target = tmp_path / "configuration.md"
    target.write_text(drifted)
    assert _doc_tables(drifted) != settings_tables(CARD)
    assert docs.main(["--write", str(target)]) == 0
    assert target.read_text() == page
    no_export = page.replace("## Export\n", "## Exporting\n")
    with pytest.raises(ValueError, match=r"no settings table under ## Export \("):
        with_tables(no_export, CARD)


def test_the_table_cells_say_what_a_reader_expects():
    """The rendering itself, against literals: a range, a choice, a card default, a derived value, a pattern."""
    rows = {row[0]: row[1:3] for rows in settings_tables(CARD).values() for row in rows}
    assert rows["`SFT_PER_DEVICE_BATCH_SIZE`"] == ("int, [1, 512] or `auto`", "`2`")  # a range or a word
    assert rows["`SFT_WARMUP_RATIO`"] == ("float, [0, 1)", "`0.03`")
    assert rows["`SFT_MAX_GRAD_NORM`"] == ("float > 0", "`1.0`")
    assert rows["`SFT_BAD_ROWS`"] == ("`fail` \\| `skip`", "`fail`")
    assert rows["`SFT_LORA_R`"] == ("int, [1, 1024]", "card: `16`")
    assert rows["`SFT_LORA_TARGET_MODULES`"] == (
        "comma-separated names", "card: `q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj`")
    assert rows["`SFT_SYSTEM_PROMPT`"] == ("str", "derived")
    assert rows["`SFT_TASK_NAME`"] == ("str, 1..64 chars", "`sarcasm`")
    assert rows["`SFT_EVAL_HOLDOUT`"] == ("float or int", "`0.1`")
    assert rows["`SFT_CHECKPOINT_URI`"] == ("str, `^s3://[^/]+(/.*)?$`", "none")


def test_the_meaning_cells_are_the_fields_docs():
    """The meaning as written in the field, a pipe escaped inside its cell, a link relative to docs/ kept."""
    meaning = {row[0]: row[3] for rows in settings_tables(CARD).values() for row in rows}
    assert meaning["`SFT_LORA_R`"] == "LoRA rank."
    assert meaning["`SFT_EVAL_MAX_NEW_TOKENS`"] == (
        "Generation bound; generation normally stops earlier at `<\\|im_end\\|>` or `<\\|endoftext\\|>`.")
    assert meaning["`SFT_PREEMPT_GRACE_S`"] == (
        "Time budget after SIGTERM/SIGINT to finish the step, save, upload and exit 143. Keep it below the pod's "
        "`terminationGracePeriodSeconds`. See [Preemption and resume](operations.md#preemption-and-resume).")


def test_a_setting_without_a_meaning_is_refused():
    """A new variable needs its doc (its row's Meaning); a field that is no variable (the card's) needs none."""
    with pytest.raises(TypeError, match=r"^SFT_NEW_THING: a setting says what it means \(doc=...\)$"):
        setting(1, env="new_thing", ge=0)
    assert setting(card="tags").description is None

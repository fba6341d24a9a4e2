"""evaluate_qwen3: left-padded batched generation equals per-sample generation, trimming, and the metrics."""

from __future__ import annotations

import json

import pytest
import torch

from job.cards import ModelCards
from job.collators.qwen3_collator import Qwen3VisionSFTCollator
from job.config import build_cfg
from job.data.loaders import load_local_split
from job.eval.generate import compute_metrics, evaluate_qwen3, generation_kwargs, parse_verdict
from job.model import load_model


@pytest.fixture(scope="module")
def cfg(tiny_assets):
    model_dir, data_dir = tiny_assets
    return build_cfg(ModelCards().qwen3_vl_8b_instruct, {
        "SFT_MODEL_ID": str(model_dir), "SFT_DATASET_URI": str(data_dir), "SFT_MAX_LENGTH": "512",
        "SFT_IMAGE_MIN_PIXELS": "4096", "SFT_IMAGE_MAX_PIXELS": "16384", "SFT_EVAL_MAX_NEW_TOKENS": "12",
    })


@pytest.fixture(scope="module")
def model(cfg):
    """The job's own loader: 4-bit NF4 through bitsandbytes, exactly as in a run."""
    return load_model(cfg).eval()


@pytest.fixture(scope="module")
def eval_rows(tiny_assets):
    ds = load_local_split(str(tiny_assets[1]), "validation")
    # Rows of different prompt lengths (captions differ, some are null) so left padding really happens.
    return ds.select(range(6))


def test_vision_tower_and_lm_head_are_not_quantized(model):
    import bitsandbytes as bnb

    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized, "the language model must be 4-bit"
    assert not [n for n in quantized if ".visual." in n or n.endswith("lm_head")], quantized


def test_batched_generation_equals_single(model, processor, cfg, eval_rows):
    collator = Qwen3VisionSFTCollator(processor, training=False, max_length=512)
    batched = evaluate_qwen3(model, processor, eval_rows, collator, cfg.replace(eval={"batch_size": 6}))
    single = evaluate_qwen3(model, processor, eval_rows, collator, cfg.replace(eval={"batch_size": 1}))
    assert [r["prediction"] for r in batched["predictions"]] == [r["prediction"] for r in single["predictions"]]
    assert batched["n"] == 6


def test_trimming_returns_only_new_tokens(model, processor, cfg, eval_rows):
    collator = Qwen3VisionSFTCollator(processor, training=False, max_length=512)
    row = eval_rows[0]
    batch = collator([row])
    with torch.no_grad():
        out = model.generate(**batch, **generation_kwargs(processor, cfg.eval))
    expected = processor.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True,
                                          clean_up_tokenization_spaces=False)
    got = evaluate_qwen3(model, processor, eval_rows.select([0]), collator, cfg)["predictions"][0]["prediction"]
    assert got == expected
    assert "CAPTION" not in got and "assistant" not in got  # no prompt text leaks into the prediction
    assert len(processor.tokenizer.encode(got, add_special_tokens=False)) <= cfg.eval.max_new_tokens


def test_eval_errors_are_wrapped(model, processor, cfg, eval_rows):
    bad = eval_rows.select([0]).map(lambda r: {"query": ""})
    with pytest.raises(RuntimeError, match=r"evaluate_qwen3 failed: .*field 'query'"):
        evaluate_qwen3(model, processor, bad, Qwen3VisionSFTCollator(processor, training=False), cfg)


def test_parse_verdict_handles_prose_and_fences():
    assert parse_verdict('{"label": "sarcastic"}') == {"label": "sarcastic"}
    assert parse_verdict('Sure! ```json\n{"label": "x"}\n```') == {"label": "x"}
    assert parse_verdict("not json") is None
    assert parse_verdict("[1, 2]") is None


def test_compute_metrics_values():
    preds = ['{"label": "sarcastic"}', '{"label": "sarcastic"}', "garbage", '{"label": "not_sarcastic", "x": 1}']
    targets = [
        '{"label": "sarcastic"}',
        {"label": "not_sarcastic"},
        '{"label": "not_sarcastic"}',
        '{"label": "not_sarcastic"}',
    ]
    m = compute_metrics(preds, targets, "label")
    assert m["n"] == 4
    assert m["accuracy"] == pytest.approx(2 / 4)
    assert m["json_parse_rate"] == pytest.approx(3 / 4)
    assert m["exact_match"] == pytest.approx(1 / 4)
    # sarcastic: tp=1 fp=1 fn=0 -> 2/3 ; not_sarcastic: tp=1 fp=0 fn=2 -> 2/4
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert [r["correct"] for r in m["predictions"]] == [True, False, False, True]
    assert m["predictions"][2]["pred_label"] is None
    json.dumps(m)  # serialisable as written to eval/*.jsonl


def test_generation_kwargs_greedy_and_stops(processor):
    defaults = build_cfg(ModelCards().qwen3_vl_8b_instruct, {}).eval  # 256 new tokens, greedy, the card's stops
    kw = generation_kwargs(processor, defaults.model_copy(update={"max_new_tokens": 7}))
    assert kw["max_new_tokens"] == 7 and kw["do_sample"] is False and kw["temperature"] is None
    assert kw["eos_token_id"] == [
        processor.tokenizer.convert_tokens_to_ids("<|im_end|>"),
        processor.tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    ]
    sampled = generation_kwargs(processor, defaults.model_copy(update={"do_sample": True, "temperature": 0.5}))
    assert sampled["temperature"] == 0.5 and sampled["max_new_tokens"] == 256

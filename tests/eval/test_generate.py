"""evaluate_qwen3: left-padded batched generation equals per-sample generation, trimming, and the metrics."""

from __future__ import annotations

import json

import pytest
import torch

from job.cards import ModelCards
from job.collators.qwen3_collator import Qwen3VisionSFTCollator
from job.config.schema import build_cfg
from job.data.loaders import load_local_split
from job.data.rows import parse_verdict
from job.errors import DataError
from job.eval.generate import compute_metrics, evaluate_qwen3, generation_kwargs, score_labels
from job.eval.score import LabelSet, answer_log_probs
from job.model import load_model
from job.outputs import headline


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
    return load_model(cfg.model, cfg.model.id).eval()


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
    # At most max_new_tokens generated tokens. Counted as generated: re-encoding the decoded text is no count (the
    # random tiny model's 12 tokens of mixed scripts re-encode as 13).
    assert out.shape[1] - batch["input_ids"].shape[1] <= cfg.eval.max_new_tokens


def test_eval_errors_are_wrapped(model, processor, cfg, eval_rows):
    bad = eval_rows.select([0]).map(lambda r: {"query": ""})
    with pytest.raises(RuntimeError, match=r"evaluate_qwen3 failed: .*field 'query'"):
        evaluate_qwen3(model, processor, bad, Qwen3VisionSFTCollator(processor, training=False), cfg)


def test_parse_verdict_handles_prose_and_fences():
    """Lenient (generated text): the first JSON object in prose or a fence."""
    assert parse_verdict('{"label": "sarcastic"}', lenient=True) == {"label": "sarcastic"}
    assert parse_verdict('Sure! ```json\n{"label": "x"}\n```', lenient=True) == {"label": "x"}
    assert parse_verdict("not json", lenient=True) is None
    assert parse_verdict("[1, 2]", lenient=True) is None


def test_parse_verdict_strict_takes_the_whole_target_only():
    """Strict (a row's target_json): a JSON object or its text, whole; what training and the label set read."""
    assert parse_verdict('{"label": "sarcastic"}') == {"label": "sarcastic"}
    assert parse_verdict({"label": 1}) == {"label": 1}
    assert parse_verdict('Sure! ```json\n{"label": "x"}\n```') is None
    assert parse_verdict("[1, 2]") is None
    assert parse_verdict("") is None and parse_verdict(None) is None and parse_verdict(3) is None


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


def test_per_class_metrics_expose_a_majority_class_answer():
    """#19's case: an imbalanced set where the model answers the majority class for every row. Accuracy looks
    fine, the per-class numbers and the confusion matrix show what happened."""
    golds = ["red"] * 8 + ["blue"] * 3 + ["green"] * 1
    preds = ['{"label": "red"}'] * 11 + ["no json here"]
    m = compute_metrics(preds, [{"label": g} for g in golds], "label")
    assert m["accuracy"] == pytest.approx(8 / 12)
    assert m["per_class"]["red"] == {"precision": pytest.approx(8 / 11), "recall": 1.0,
                                     "f1": pytest.approx(16 / 19), "support": 8}
    assert m["per_class"]["blue"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 3}
    assert m["per_class"]["green"]["support"] == 1
    assert m["macro_f1"] == pytest.approx(sum(c["f1"] for c in m["per_class"].values()) / 3)
    assert m["weighted_f1"] == pytest.approx(8 / 12 * 16 / 19)
    cm = m["confusion_matrix"]
    assert cm["labels"] == ["blue", "green", "red"] and cm["columns"] == ["blue", "green", "red", "unparsed"]
    assert cm["matrix"] == [[0, 0, 3, 0], [0, 0, 0, 1], [0, 0, 8, 0]]
    assert sum(map(sum, cm["matrix"])) == m["n"]


def test_a_label_only_the_model_answered_gets_a_row_and_column():
    m = compute_metrics(['{"label": "maybe"}', '{"label": "yes"}'], ['{"label": "yes"}', '{"label": "yes"}'], "label")
    assert m["confusion_matrix"]["labels"] == ["maybe", "yes"]
    assert m["confusion_matrix"]["matrix"] == [[0, 0, 0], [1, 1, 0]]
    assert m["per_class"]["maybe"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # macro F1 stays over the gold labels (as before): only "yes", f1 = 2/3
    assert m["macro_f1"] == pytest.approx(2 / 3)


def test_the_printed_headline_has_the_numbers_only():
    m = compute_metrics(['{"label": "a"}'], ['{"label": "a"}'], "label")
    assert headline({k: v for k, v in m.items() if k != "predictions"}) == (
        "n=1 accuracy=1 macro_f1=1 json_parse_rate=1 exact_match=1 weighted_f1=1")


# -- scoring mode (job/eval/score.py) ----------------------------------------------------------------------------
def _prompt_batch(collator, rows) -> dict:
    batch = collator(rows)
    batch.pop("token_type_ids", None)
    return batch


def test_scored_log_probs_equal_the_training_loss_of_each_answer(model, processor, eval_rows):
    """Scoring and training agree on what an answer costs: a label's scored log-probability (left-padded prompts,
    one prefill, each answer continued from its KV cache) equals minus the training collator's summed token loss for
    the row whose target is that label (one plain forward, right padded, labels on the answer and <|im_end|> only)."""
    label_set = LabelSet.from_targets(list(eval_rows["target_json"]), "label")
    assert label_set is not None and label_set.scored == "full" and len(label_set.labels) == 2
    rows = [eval_rows[i] for i in range(len(eval_rows))]
    scored = answer_log_probs(model, _prompt_batch(Qwen3VisionSFTCollator(processor, training=False), rows),
                              label_set.answer_ids(processor.tokenizer))
    train_collator = Qwen3VisionSFTCollator(processor, training=True)
    for j, label in enumerate(label_set.labels):
        batch = train_collator([{**r, "target_json": label_set.prediction_text(label)} for r in rows])
        labels = batch.pop("labels")
        with torch.no_grad():
            logits = model(**batch).logits.double()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = labels[:, 1:]
        kept = targets != -100
        token_lp = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * kept
        assert kept.sum(dim=1).tolist() == [len(label_set.answer_ids(processor.tokenizer)[j])] * len(rows)
        # Measured: at most 1.7e-6 apart: the scorer's float32 log-normaliser (1.2e-7 with a float64 one) and left
        # vs right padding's fp32 reduction order. Positions off by 3 in the cached continuation: 0.1 apart.
        torch.testing.assert_close(scored[:, j], token_lp.sum(dim=1), atol=1e-5, rtol=0)


def test_scoring_batched_equals_single_and_rows_sum_to_one(model, processor, cfg, eval_rows):
    label_set = LabelSet.from_targets(list(eval_rows["target_json"]), "label")
    collator = Qwen3VisionSFTCollator(processor, training=False)
    batched = score_labels(model, eval_rows, collator, label_set, batch_size=6)
    single = score_labels(model, eval_rows, collator, label_set, batch_size=1)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.sum(dim=1), torch.ones(len(eval_rows), dtype=batched.dtype))


def test_both_mode_adds_probabilities_beside_generation(model, processor, cfg, eval_rows):
    label_set = LabelSet.from_targets(list(eval_rows["target_json"]), "label")
    collator = Qwen3VisionSFTCollator(processor, training=False)
    both = evaluate_qwen3(model, processor, eval_rows, collator, cfg, label_set)
    generated = evaluate_qwen3(model, processor, eval_rows, collator, cfg)  # auto without a label set: generate
    assert both["eval_mode"] == "both" and generated["eval_mode"] == "generate" and "roc_auc" not in generated
    # Generation is unchanged by scoring beside it.
    assert [r["prediction"] for r in both["predictions"]] == [r["prediction"] for r in generated["predictions"]]
    for record in both["predictions"]:
        assert set(record["label_probs"]) == set(label_set.labels)
        assert abs(sum(record["label_probs"].values()) - 1) < 1e-9
        assert record["score_label"] == max(record["label_probs"], key=record["label_probs"].get)
    parsed = [r for r in both["predictions"] if r["pred_label"] is not None]
    agreement = sum(r["score_label"] == r["pred_label"] for r in parsed) / len(parsed) if parsed else None
    assert both["score_agreement"] == agreement
    assert 0 <= both["ece"] <= 1 and both["log_loss"] > 0 and both["score_rows"] == len(eval_rows)
    assert sum(b["count"] for b in both["calibration"]["bins"]) == len(eval_rows)
    print(f"argmax agrees with generation on {agreement} of {len(parsed)} parsed rows (untrained tiny model)")


def test_score_mode_generates_nothing_and_predicts_the_argmax(model, processor, cfg, eval_rows):
    label_set = LabelSet.from_targets(list(eval_rows["target_json"]), "label")
    collator = Qwen3VisionSFTCollator(processor, training=False)
    scored = evaluate_qwen3(model, processor, eval_rows, collator, cfg.replace(eval={"mode": "score"}), label_set)
    assert scored["eval_mode"] == "score" and scored["json_parse_rate"] is None and scored["exact_match"] is None
    assert [r["pred_label"] for r in scored["predictions"]] == [r["score_label"] for r in scored["predictions"]]
    assert scored["accuracy"] == scored["score_accuracy"] and scored["macro_f1"] == scored["score_macro_f1"]
    with pytest.raises(DataError, match="SFT_EVAL_MODE=score needs the label set"):
        evaluate_qwen3(model, processor, eval_rows, collator, cfg.replace(eval={"mode": "score"}))


def test_prefix_answers_tokenize_as_the_start_of_the_trained_answer(processor):
    """Targets with more keys than the label: the scored prefix `{"label": "x",` is exactly the first tokens of the
    trained answer (a tokenization that merged across the cut would score tokens the model never writes)."""
    targets = ['{"label": "sarcastic", "why": "the caption praises a flat tyre"}', {"label": 3, "why": "count"}]
    label_set = LabelSet.from_targets(targets, "label")
    assert label_set is not None and label_set.scored == "prefix" and label_set.labels == ("3", "sarcastic")
    tokenizer = processor.tokenizer
    for target, ids in zip((targets[1], targets[0]), label_set.answer_ids(tokenizer), strict=True):
        verdict = target if isinstance(target, dict) else json.loads(target)
        full = tokenizer.encode(json.dumps(verdict, ensure_ascii=False) + "<|im_end|>", add_special_tokens=False)
        assert full[: len(ids)] == ids
    assert LabelSet.from_targets(['{"why": "x", "label": "a"}'], "label") is None  # label not first: not scorable

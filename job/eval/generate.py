"""`evaluate_qwen3`: batched, left-padded generation with trimmed decoding and, in scoring mode, each label's
probability (job/eval/score.py); the verdicts' classification metrics (job/eval/metrics.py)."""

from __future__ import annotations

from typing import Any

import torch

from job.config.schema import JobConfig
from job.config.sections.eval import EvalConfig
from job.data.rows import parse_verdict
from job.errors import DataError
from job.eval.metrics import INVALID, macro_f1, per_class_report, probability_metrics
from job.eval.score import LabelSet, answer_log_probs, argmax_labels, label_probabilities, resolve_mode


def gold_label(target: Any, label_field: str) -> str:
    """A row's gold label as every metric compares it: the target parsed as JSON, its label field as text."""
    return str((parse_verdict(target, lenient=True) or {}).get(label_field, INVALID))


def compute_metrics(predictions: list[str], targets: list[Any], label_field: str) -> dict[str, Any]:
    """Scalar metrics plus the per-row records. Labels are compared after parsing both sides as JSON."""
    rows, golds, preds = [], [], []
    parsed_count = exact = 0
    for prediction, target in zip(predictions, targets, strict=True):
        pred_obj, gold_obj = parse_verdict(prediction, lenient=True), parse_verdict(target, lenient=True)
        gold = gold_label(gold_obj, label_field)
        pred = str(pred_obj.get(label_field, INVALID)) if pred_obj is not None else INVALID
        parsed_count += pred_obj is not None
        exact += pred_obj is not None and pred_obj == gold_obj
        golds.append(gold)
        preds.append(pred)
        rows.append({"prediction": prediction, "target": gold_obj if gold_obj is not None else target,
                     "pred_label": None if pred == INVALID else pred, "gold_label": gold, "correct": pred == gold})
    n = len(rows)
    return {
        "n": n,
        "accuracy": sum(g == p for g, p in zip(golds, preds, strict=True)) / n if n else 0.0,
        "macro_f1": macro_f1(golds, preds),
        "json_parse_rate": parsed_count / n if n else 0.0,
        "exact_match": exact / n if n else 0.0,
        **per_class_report(golds, preds),
        "predictions": rows,
    }


def stop_token_ids(processor, stop_tokens: list[str]) -> list[int]:
    tokenizer = processor.tokenizer
    ids = [tokenizer.convert_tokens_to_ids(t) for t in stop_tokens]
    return [i for i in ids if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id] or [tokenizer.eos_token_id]


def generation_kwargs(processor, eval_cfg: EvalConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_new_tokens": eval_cfg.max_new_tokens,
        "do_sample": eval_cfg.do_sample,
        "eos_token_id": stop_token_ids(processor, list(eval_cfg.stop_tokens)),
        "pad_token_id": processor.tokenizer.pad_token_id,
    }
    if kwargs["do_sample"]:
        kwargs["temperature"] = eval_cfg.temperature
    else:  # greedy: clear sampling knobs a checkpoint's generation_config may carry, so HF does not warn
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def _batches(model, eval_dataset, eval_collator, batch_size: int):
    """The eval collator's batches (left-padded prompts ending in the generation prompt) on the model's device."""
    device = next(model.parameters()).device
    for start in range(0, len(eval_dataset), batch_size):
        rows = [eval_dataset[i] for i in range(start, min(start + batch_size, len(eval_dataset)))]
        batch = eval_collator(rows)
        batch.pop("token_type_ids", None)
        yield {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


@torch.no_grad()
def generate_batches(model, processor, eval_dataset, eval_collator, eval_cfg: EvalConfig) -> list[str]:
    """Decoded continuations, one per row, in dataset order."""
    kwargs = generation_kwargs(processor, eval_cfg)
    texts: list[str] = []
    for batch in _batches(model, eval_dataset, eval_collator, eval_cfg.batch_size):
        output = model.generate(**batch, **kwargs)
        # Left padding puts every prompt flush against the generated tokens: trimming the padded prompt
        # width from each row leaves exactly that row's new tokens.
        prompt_width = batch["input_ids"].shape[1]
        texts.extend(processor.batch_decode(
            [out[prompt_width:] for out in output], skip_special_tokens=True, clean_up_tokenization_spaces=False,
        ))
    return texts


@torch.no_grad()
def next_token_logits(model, eval_dataset, eval_collator, batch_size: int) -> torch.Tensor:
    """[rows, vocab] fp32 on the CPU: each prompt's logits for the first generated token, in dataset order.

    The prompts are the eval collator's (left padded, so the last position of every row is its generation start);
    `logits_to_keep=1` computes the LM head at that position only (151,936 logits per row, not per token).
    """
    was_training = model.training
    model.eval()
    try:
        chunks = [model(**batch, logits_to_keep=1, use_cache=False).logits[:, -1, :].float().cpu()
                  for batch in _batches(model, eval_dataset, eval_collator, batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0)


@torch.no_grad()
def score_labels(model, eval_dataset, eval_collator, label_set: LabelSet, batch_size: int) -> torch.Tensor:
    """[rows, labels]: each row's probability of each label's answer (rows sum to 1), in dataset order."""
    answers = label_set.answer_ids(eval_collator.processor.tokenizer)
    was_training = model.training
    model.eval()
    try:
        chunks = [answer_log_probs(model, batch, answers)
                  for batch in _batches(model, eval_dataset, eval_collator, batch_size)]
    finally:
        model.train(was_training)
    return label_probabilities(torch.cat(chunks)) if chunks else torch.empty(0, len(answers))


def evaluate_qwen3(model, processor, eval_dataset, eval_collator, cfg: JobConfig,
                   label_set: LabelSet | None = None) -> dict[str, Any]:
    """Generate a verdict for every eval row and score it against `target_json`.

    Returns `accuracy`, `macro_f1`, `json_parse_rate`, `exact_match`, `n`, the per-class report and `predictions`
    (one record per row with at least `prediction` and `target`). With a label set (the training split's) and
    SFT_EVAL_MODE both or score (auto: both), each record also has `label_probs` and the metrics the scoring-mode
    keys (job.eval.metrics.probability_metrics). Score-only mode generates nothing: the argmax label is the
    prediction, so json_parse_rate and exact_match are not measured (None).
    """
    try:
        mode = resolve_mode(cfg.eval.mode, label_set)
        was_training = model.training
        model.eval()
        try:
            predictions = (generate_batches(model, processor, eval_dataset, eval_collator, cfg.eval)
                           if mode != "score" else None)
            probs = (score_labels(model, eval_dataset, eval_collator, label_set, cfg.eval.batch_size)
                     if label_set is not None and mode != "generate" else None)
        finally:
            model.train(was_training)
        # Column reads: indexing rows would decode every image a second time.
        targets = list(eval_dataset[cfg.data.target_key])
        row_ids = list(eval_dataset["row_id"]) if "row_id" in eval_dataset.column_names else range(len(targets))
        if predictions is None and label_set is not None and probs is not None:
            predictions = [label_set.prediction_text(label) for label in argmax_labels(label_set, probs)]
        metrics = compute_metrics(predictions or [], targets, cfg.data.label_field)
        metrics["eval_mode"] = mode
        if label_set is not None and probs is not None:
            _add_probabilities(metrics, label_set, probs, generated=mode == "both")
        if mode == "score":
            metrics.update(json_parse_rate=None, exact_match=None)
        for record, row_id in zip(metrics["predictions"], row_ids, strict=True):
            record["row_id"] = str(row_id)
        return metrics
    except DataError:
        raise
    except Exception as exc:
        raise RuntimeError(f"evaluate_qwen3 failed: {exc}") from exc


def _add_probabilities(metrics: dict, label_set: LabelSet, probs: torch.Tensor, generated: bool) -> None:
    records = metrics["predictions"]
    rows = probs.tolist()
    golds = [r["gold_label"] for r in records]
    metrics.update(probability_metrics(label_set.labels, rows, golds,
                                       [r["pred_label"] for r in records] if generated else None))
    for record, row, label in zip(records, rows, argmax_labels(label_set, probs), strict=True):
        record["label_probs"] = dict(zip(label_set.labels, row, strict=True))
        record["score_label"] = label

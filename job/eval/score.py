"""Scoring mode: the probability of each label's answer given the prompt, and the metrics a classifier is judged by.

Beside trimmed-decode generation (`evaluate_qwen3`), each eval row's prompt is scored against every label's answer
text as the model was trained to write it: `log p(answer tokens | prompt)`, then a softmax over the label set. That
gives ROC-AUC (binary, or macro one-vs-rest), log-loss, expected calibration error (10 equal-width bins), the argmax
prediction, and its agreement with generation.

One prefill per batch of rows, whatever the number of labels: the prompt (the vision tower included) runs once with
the KV cache on and `logits_to_keep=1` (its last position predicts every answer's first token); each label then
continues from that cache with its answer tokens but the last (a few text tokens, no vision), and the cache is cropped
back to the prompt before the next label. Qwen3-VL's multimodal (M-RoPE) positions are passed explicitly, computed
once per batch by the model's `get_rope_index` over the prompt plus the longest answer, i.e. exactly the positions a
plain forward of prompt + answer computes for itself: the positions the model would build for a cached continuation
come from state it keeps between calls (`rope_deltas`), built differently in `generate` and in a plain forward, and a
scorer relying on either is one transformers release from silently wrong probabilities. The scores are locked to a
plain, cache-free forward by the tests (each label's score equals minus the training collator's loss of that answer)
and measured by benchmarks/eval.py (the scoring cost against generation and against a forward per label).

The answer template comes from the training targets (`LabelSet.from_targets`): when every target is the label field
alone, the scored text is the whole answer, `{"label": "red"}<|im_end|>` ("full"); when targets carry more keys and
the label comes first, it is the answer up to and including the label value and its comma, `{"label": "red",`
("prefix": the probability of starting the answer with that label). A label field after other keys cannot be scored
(those keys' values differ per row): scoring is then off, and SFT_EVAL_MODE=score or both is a DataError (exit 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import torch

from job.collators.qwen3_collator import END_OF_TURN
from job.data.rows import parse_verdict
from job.errors import DataError


@dataclass(frozen=True)
class LabelSet:
    """The labels of the training split, sorted, and the answer text scored for each.

    >>> LabelSet.from_targets(['{"label": "b"}', {"label": "a"}], "label").answers
    {'a': '{"label": "a"}<|im_end|>', 'b': '{"label": "b"}<|im_end|>'}
    >>> LabelSet.from_targets(['{"label": "a", "why": "x"}'], "label").answers
    {'a': '{"label": "a",'}
    """

    field: str
    labels: tuple[str, ...]
    answers: dict[str, str]
    scored: Literal["full", "prefix"]
    values: dict[str, Any]  # label (as compared, a str) -> the value as the targets hold it (e.g. an int)

    @classmethod
    def from_targets(cls, targets: list[Any], field: str) -> LabelSet | None:
        """None when there is no label to score, or the label field is not the first key of every target."""
        values: dict[str, Any] = {}
        label_only = True
        for target in targets:
            verdict = parse_verdict(target)
            if verdict is None or field not in verdict:
                continue  # preflight rejected (or skipped) such rows; they are not trained on
            if next(iter(verdict)) != field:
                return None
            label_only = label_only and len(verdict) == 1
            values.setdefault(str(verdict[field]), verdict[field])
        if not values:
            return None
        labels = tuple(sorted(values))
        # json.dumps as job.data.rows.target_text renders a training target (the text the model learned to write).
        whole = {label: json.dumps({field: values[label]}, ensure_ascii=False) for label in labels}
        answers = {label: text + END_OF_TURN if label_only else text[:-1] + "," for label, text in whole.items()}
        return cls(field, labels, answers, "full" if label_only else "prefix", values)

    def to_json(self) -> dict:
        return {"field": self.field, "labels": list(self.labels), "answers": self.answers, "scored": self.scored}

    def answer_ids(self, tokenizer) -> list[list[int]]:
        """Each label's scored tokens, in `labels` order: the answer as the chat template tokenizes it (the text after
        `<|im_start|>assistant\\n` starts a new pre-token, so the answer tokenizes alone as it does in the chat)."""
        return [tokenizer.encode(self.answers[label], add_special_tokens=False) for label in self.labels]

    def prediction_text(self, label: str) -> str:
        """The verdict the argmax stands for, as JSON (what score-only mode records as the prediction)."""
        return json.dumps({self.field: self.values[label]}, ensure_ascii=False)


def resolve_mode(mode: str, label_set: LabelSet | None) -> Literal["generate", "score", "both"]:
    """SFT_EVAL_MODE with `auto` resolved: both when the training split gave a label set, else generate."""
    if mode == "auto":
        return "both" if label_set is not None else "generate"
    if label_set is None and mode in ("score", "both"):
        raise DataError(
            f"SFT_EVAL_MODE={mode} needs the label set of the training split, and there is none to score: the "
            "training split is missing, or its targets put the label field after other keys (each row's other "
            "values would be scored too); use SFT_EVAL_MODE=generate, or put the label field first")
    return mode  # type: ignore[return-value]


def with_answer(batch: dict, ids: list[int]) -> dict:
    """The left-padded prompt batch with one answer appended to every row (all rows end at the same position)."""
    input_ids = batch["input_ids"]
    answer = torch.tensor(ids, dtype=input_ids.dtype, device=input_ids.device).expand(input_ids.shape[0], -1)
    out = dict(batch)
    out["input_ids"] = torch.cat([input_ids, answer], dim=1)
    out["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(answer)], dim=1)
    if "mm_token_type_ids" in batch:  # the answer is text (type 0)
        out["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(answer)], dim=1)
    return out


def _rope_positions(model, batch: dict) -> torch.Tensor:
    """[3, rows, width] M-RoPE positions of a left-padded batch, as Qwen3VLModel.forward computes them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel, or the model
    positions, _ = base.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=batch.get("image_grid_thw"),
        video_grid_thw=batch.get("video_grid_thw"), attention_mask=batch["attention_mask"])
    return positions


def token_log_probs(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """[rows]: the sum over positions of log p(ids[position]) under logits [rows, positions, vocab], as float64.

    The log-normaliser is a float32 logsumexp, not a float64 log_softmax: on the CPU the latter's copy of
    [rows, positions, 151,936] logits took 3.4x longer (0.134 vs 0.039 s for 8 rows x 10 positions, one thread; it
    was most of the tiny model's scoring time), for at most 3.2e-6 nats of difference over 10 positions.
    """
    logits = logits.float()
    target = torch.tensor(ids, device=logits.device).expand(logits.shape[0], -1)
    picked = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return (picked.double() - torch.logsumexp(logits, dim=-1).double()).sum(dim=-1)


@torch.no_grad()
def answer_log_probs(model, batch: dict, answers: list[list[int]]) -> torch.Tensor:
    """[rows, labels] float64: `sum log p(answer token | prompt, earlier answer tokens)` for each label's answer."""
    width = batch["input_ids"].shape[1]
    positions = _rope_positions(model, with_answer(batch, max(answers, key=len)))
    prefill = model(**batch, position_ids=positions[:, :, :width], logits_to_keep=1, use_cache=True)
    cache = prefill.cache
    first = prefill.logits[:, -1:, :]  # its last position predicts every answer's first token
    columns = []
    for ids in answers:
        score = token_log_probs(first, ids[:1])
        if len(ids) > 1:
            fed = with_answer(batch, ids[:-1])
            logits = model(input_ids=fed["input_ids"][:, width:], attention_mask=fed["attention_mask"],
                           position_ids=positions[:, :, width:width + len(ids) - 1], cache=cache,
                           use_cache=True).logits
            score = score + token_log_probs(logits, ids[1:])
            cache.crop(width - cache.get_seq_length())  # a negative count: drop this answer's tokens
        columns.append(score.cpu())
    return torch.stack(columns, dim=1)


def label_probabilities(log_probs: torch.Tensor) -> torch.Tensor:
    """Each row's softmax over the label set (rows sum to 1)."""
    return torch.softmax(log_probs, dim=1)


def argmax_labels(label_set: LabelSet, probs: torch.Tensor) -> list[str]:
    return [label_set.labels[int(i)] for i in probs.argmax(dim=1).tolist()]

"""Scoring mode: the probability of each label's answer given the prompt, and the metrics a classifier is judged by.

Beside trimmed-decode generation (`evaluate_qwen3`), each eval row's prompt is scored against every label's answer
text as the model was trained to write it: `log p(answer tokens | prompt)` from one teacher-forced forward pass per
label and batch (the prompt plus the answer, `logits_to_keep` = the answer's length + 1, so the LM head runs on those
positions only), then a softmax over the label set. That gives ROC-AUC (binary, or macro one-vs-rest), log-loss,
expected calibration error (10 equal-width bins), the argmax prediction, and its agreement with generation.

Why not one prefill per row with the answers continued from its KV cache: Qwen3-VL's multimodal (M-RoPE) positions
of tokens continued from a cache are computed from state the model keeps between calls (`rope_deltas`), and
transformers 5.24 builds them differently in `generate` (4-row position ids) than in a plain forward; a scorer
written against either is one transformers release from silently wrong probabilities. The cost: each label repeats
the prompt's forward (the vision tower included), i.e. a binary task costs two prefills per row (measured with
benchmarks/ is still to do on a GPU).

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
            verdict = _verdict(target)
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


def _verdict(target: Any) -> dict | None:
    if isinstance(target, dict):
        return target
    try:
        parsed = json.loads(str(target))
    except (json.JSONDecodeError, TypeError):
        return None
    return parsed if isinstance(parsed, dict) else None


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


def _with_answer(batch: dict, ids: list[int]) -> dict:
    """The left-padded prompt batch with one answer appended to every row (all rows end at the same position)."""
    input_ids = batch["input_ids"]
    answer = torch.tensor(ids, dtype=input_ids.dtype, device=input_ids.device).expand(input_ids.shape[0], -1)
    out = dict(batch)
    out["input_ids"] = torch.cat([input_ids, answer], dim=1)
    out["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(answer)], dim=1)
    if "mm_token_type_ids" in batch:  # the answer is text (type 0)
        out["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(answer)], dim=1)
    return out


@torch.no_grad()
def answer_log_probs(model, batch: dict, answers: list[list[int]]) -> torch.Tensor:
    """[rows, labels] float64: `sum log p(answer token | prompt, earlier answer tokens)` for each label's answer."""
    columns = []
    for ids in answers:
        logits = model(**_with_answer(batch, ids), logits_to_keep=len(ids) + 1, use_cache=False).logits
        # Position -(m+1) (the prompt's last token) predicts the answer's first token, ..., -2 its last.
        log_probs = torch.log_softmax(logits[:, :-1, :].double(), dim=-1)
        target = torch.tensor(ids, device=log_probs.device).expand(log_probs.shape[0], -1)
        columns.append(log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1).sum(dim=-1).cpu())
    return torch.stack(columns, dim=1)


def label_probabilities(log_probs: torch.Tensor) -> torch.Tensor:
    """Each row's softmax over the label set (rows sum to 1)."""
    return torch.softmax(log_probs, dim=1)


def argmax_labels(label_set: LabelSet, probs: torch.Tensor) -> list[str]:
    return [label_set.labels[int(i)] for i in probs.argmax(dim=1).tolist()]

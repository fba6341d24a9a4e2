"""`Qwen3VisionSFTCollator`: chat-formats (image, query, caption, target) rows for Qwen3-VL and masks the labels.

Only the assistant answer is supervised: the target JSON and its closing `<|im_end|>`. The system prompt, the user
turn (with its visual tokens), the `<|im_start|>assistant\\n` header, the newline the chat template writes after
`<|im_end|>` and the padding are all -100. No row is ever truncated: a row longer than `max_length` is an error that
names it, because cutting a Qwen3-VL sequence either drops visual tokens (the model then fails with "Image features
and image tokens do not match") or drops the labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from job.config.sections.data import DataConfig
from job.data.rows import RowProblem, load_image, query_problem, row_name, target_text
from job.errors import DataError
from job.prompts import Queries

IGNORE_INDEX = -100
ASSISTANT_HEADER = "<|im_start|>assistant\n"
END_OF_TURN = "<|im_end|>"


@dataclass
class Qwen3VisionSFTCollator:
    """Collate dataset rows into a Qwen3-VL batch.

    Example (training; right padding, labels on the answer only):

    >>> collator = Qwen3VisionSFTCollator(processor, max_length=2048)
    >>> batch = collator([{"image": "cat.png", "query": "Sarcastic?", "caption": "Oh great",
    ...                    "target_json": '{"label": "sarcastic"}'}])
    >>> sorted(batch)
    ['attention_mask', 'image_grid_thw', 'input_ids', 'labels', 'mm_token_type_ids', 'pixel_values']
    >>> processor.tokenizer.decode(batch["input_ids"][0][batch["labels"][0] != -100])
    '{"label": "sarcastic"}<|im_end|>'

    With `training=False` it is the eval collator: the prompt only, ending in the generation prompt, left padded
    (batched generation with right padding continues from pad tokens and is wrong), and no labels.

    `system_prompt=None` uses `Queries().SYSTEM_PROMPT`; pass "" for no system message. `query_text` asks every row
    the same question (the rows then need no query column).
    """

    processor: Any
    training: bool = True
    max_length: int | None = None
    image_key: str = "image"
    query_key: str = "query"
    caption_key: str = "caption"
    target_key: str = "target_json"
    system_prompt: str | None = None
    query_text: str | None = None  # SFT_QUERY_TEXT: every row's query, for data without a query column
    _header_ids: list[int] = field(init=False, repr=False)
    _end_id: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.system_prompt is None:
            self.system_prompt = Queries().SYSTEM_PROMPT
        tokenizer = self.processor.tokenizer
        self._header_ids = tokenizer.encode(ASSISTANT_HEADER, add_special_tokens=False)
        self._end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        if len(self._header_ids) != 3 or self._end_id is None:
            raise ValueError(
                f"processor's tokenizer does not look like Qwen's ({ASSISTANT_HEADER!r} -> {self._header_ids}); "
                "load the processor of a Qwen3-VL checkpoint"
            )

    # -- text --------------------------------------------------------------------------------------------------
    def query(self, ex: dict) -> Any:
        """The row's query: SFT_QUERY_TEXT when set, else its query column's value (not yet checked)."""
        return self.query_text if self.query_text is not None else ex.get(self.query_key)

    def _user_text(self, ex: dict, row: str = "row") -> str:
        query = self.query(ex)
        RowProblem.raise_for(query_problem(query, self.query_key), row)
        text = str(query).strip()  # a str once query_problem passed it; str() only tells mypy so
        caption = ex.get(self.caption_key)
        if caption is not None and str(caption).strip():
            text += f"\nCAPTION: {str(caption).strip()}"
        return text

    def chat_text(self, ex: dict, row: str = "row") -> str:
        """One row's chat exactly as the processor receives it, the image still a single `<|image_pad|>`: the system
        prompt (unless ""), the user turn (image, query, caption), then the verdict and `<|im_end|>` when training or
        the generation prompt when not. Preflight's token estimate tokenizes this very text (job/data/checks.py).

        Raises the DataError (naming `row`) of a bad query, or of a bad target when training.

        >>> Qwen3VisionSFTCollator(processor, training=False, system_prompt="").chat_text({"query": "Sarcastic?"})
        '<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>Sarcastic?<|im_end|>\\n<|im_start|>assistant\\n'
        """
        messages: list[dict] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        user_text = self._user_text(ex, row)
        messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text}]})
        if not self.training:
            return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        answer = target_text(ex.get(self.target_key), row, self.target_key)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return self.processor.apply_chat_template(messages, tokenize=False)

    def _render(self, ex: dict, index: int) -> tuple[str, Any]:
        row = row_name(ex, index)
        image = load_image(ex.get(self.image_key), row, self.image_key)  # the image's rules first, then the text's
        return self.chat_text(ex, row), image

    def supervised_span(self, ids: list[int]) -> tuple[int, int] | None:
        """Where the labels of one row's ids (unpadded) are kept: `answer_span` with this tokenizer's assistant
        header and `<|im_end|>`. Preflight counts a row's supervised tokens with it before any batch is built.
        """
        return answer_span(ids, self._header_ids, self._end_id)

    # -- batch -------------------------------------------------------------------------------------------------
    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        try:
            return self._collate(examples)
        except Exception as exc:
            raise RuntimeError(f"Qwen3 collate failed: {exc}") from exc

    def _collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("empty batch")
        texts, images = zip(*(self._render(ex, i) for i, ex in enumerate(examples)), strict=True)
        batch = self.processor(
            text=list(texts), images=list(images), return_tensors="pt", padding=True,
            padding_side="right" if self.training else "left",
        )
        batch.pop("token_type_ids", None)  # text-only artefact; mm_token_type_ids is kept: the model uses it
        self._check_lengths(batch, examples)
        if self.training:
            batch["labels"] = answer_only_labels(
                batch["input_ids"], batch["attention_mask"], self._header_ids, self._end_id
            )
            self._check_supervised(batch["labels"], examples)
        return dict(batch)

    def _check_lengths(self, batch, examples: list[dict]) -> None:
        if self.max_length is None:
            return
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        too_long = [
            (row_name(ex, i), n) for i, (ex, n) in enumerate(zip(examples, lengths, strict=True)) if n > self.max_length
        ]
        if too_long:
            rows = ", ".join(f"{r} ({n} tokens)" for r, n in too_long)
            raise DataError(
                f"{rows} exceed SFT_MAX_LENGTH={self.max_length}; rows are never truncated (that would cut visual "
                "tokens or labels): raise SFT_MAX_LENGTH or lower SFT_IMAGE_MAX_PIXELS"
            )

    @staticmethod
    def _check_supervised(labels: torch.Tensor, examples: list[dict]) -> None:
        counts = (labels != IGNORE_INDEX).sum(dim=1).tolist()
        empty = [row_name(ex, i) for i, ex in enumerate(examples) if lacks_answer(counts[i])]
        if empty:
            raise DataError(f"{', '.join(empty)}: no supervised tokens after masking; the target answer is empty")


def lacks_answer(supervised_tokens: int) -> bool:
    """The supervised-token rule, for the collator (a batch's labels) and preflight (a row's ids, job/data/checks.py):
    a row trains on at least one answer token besides the closing `<|im_end|>`, else it teaches nothing."""
    return supervised_tokens <= 1


def _last_occurrence(ids: list[int], pattern: list[int]) -> int:
    width = len(pattern)
    for start in range(len(ids) - width, -1, -1):
        if ids[start : start + width] == pattern:
            return start
    return -1


def answer_span(ids: list[int], header_ids: list[int], end_id: int) -> tuple[int, int] | None:
    """`(start, end)`: the slice of one row's ids (padding removed) that is supervised, from right after the last
    assistant header through the first `end_id` (`<|im_end|>`) after it, or to the end when there is none; None when
    the ids hold no assistant header.

        >>> answer_span([7, 1, 2, 3, 40, 41, 9, 5], header_ids=[1, 2, 3], end_id=9)
        (4, 7)
    """
    start = _last_occurrence(ids, header_ids)
    if start < 0:
        return None
    answer_start = start + len(header_ids)
    try:
        return answer_start, ids.index(end_id, answer_start) + 1
    except ValueError:
        return answer_start, len(ids)


def answer_only_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, header_ids: list[int], end_id: int
) -> torch.Tensor:
    """Labels that keep exactly the final assistant answer and its `<|im_end|>`; everything else is -100.

    The prompt length comes from the already-expanded ids (the last `<|im_start|>assistant\\n` in each row), so the
    processor runs once per batch. Padding is found through the attention mask rather than the pad id, which stays
    right even when pad_token == eos_token.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i in range(input_ids.shape[0]):
        positions = attention_mask[i].bool().nonzero().flatten()
        span = answer_span(input_ids[i, positions].tolist(), header_ids, end_id)
        if span is None:
            raise ValueError(f"row {i}: no assistant turn found in the rendered chat")
        keep = positions[span[0] : span[1]]
        labels[i, keep] = input_ids[i, keep]
    return labels


def prompt_lengths_by_reprocessing(collator: Qwen3VisionSFTCollator, examples: list[dict]) -> list[int]:
    """The first collator's method: run the processor a second time on each prompt + image and count its tokens.

    Kept as the reference that tests and benchmarks/collator.py compare the single-pass labels against.
    """
    prompt = Qwen3VisionSFTCollator(**{**_init_fields(collator), "training": False})
    lengths = []
    for i, ex in enumerate(examples):
        text, image = prompt._render(ex, i)
        lengths.append(int(collator.processor(text=[text], images=[image], return_tensors="pt")["input_ids"].shape[1]))
    return lengths


def _init_fields(collator: Qwen3VisionSFTCollator) -> dict:
    return {
        "processor": collator.processor, "training": collator.training, "max_length": collator.max_length,
        "image_key": collator.image_key, "query_key": collator.query_key, "caption_key": collator.caption_key,
        "target_key": collator.target_key, "system_prompt": collator.system_prompt, "query_text": collator.query_text,
    }


def build_collators(data: DataConfig, max_length: int, processor
                    ) -> tuple[Qwen3VisionSFTCollator, Qwen3VisionSFTCollator]:
    """The training collator (labels on the answer only) and the eval collator (prompt only), from the data section
    (`cfg.data`: the column keys, the system prompt) and SFT_MAX_LENGTH (`cfg.train.max_length`)."""
    common = dict(
        processor=processor, max_length=max_length, image_key=data.image_key,
        query_key=data.query_key, caption_key=data.caption_key, target_key=data.target_key,
        system_prompt=data.system_prompt, query_text=data.query_text,
    )
    return Qwen3VisionSFTCollator(training=True, **common), Qwen3VisionSFTCollator(training=False, **common)

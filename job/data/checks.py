"""Per-row data checks for `qwen3-sft preflight`: schema, image, target, token length and supervision.

`RowChecker.check(row, index)` looks at one row and returns a small `RowResult` (no decoded image is kept), so the
preflight can stream any number of rows through worker processes in bounded memory. The rules themselves (query,
caption, control tokens, target, label, image) live in job/data/rows.py, shared with the collator; this module collects
what they find, and adds the rules that need the tokenizer or the image processor.

The token length is computed cheaply instead of running the processor on every row: the collator's own chat text
(`Qwen3VisionSFTCollator.chat_text`) is tokenized, and the single `<|image_pad|>` placeholder is replaced by the number
of visual tokens the image processor will produce for that image size (`visual_token_count`, which runs the same
`smart_resize` as the real preprocessing). tests/preflight/test_preflight.py
checks that this equals the collator's count.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from job.collators.qwen3_collator import Qwen3VisionSFTCollator, lacks_answer
from job.data.labels import LabelColumn
from job.data.rows import (
    RowProblem,
    caption_problem,
    control_token_problem,
    decode_image,
    image_source,
    label_or_problem,
    query_problem,
    verdict_or_problem,
)

# An image above this many pixels is rejected before it is decoded. It is PIL's own DecompressionBombWarning
# threshold (the default Image.MAX_IMAGE_PIXELS, ~9459x9459): decoding it takes >= 268 MB as RGB per worker, and the
# processor would shrink it to SFT_IMAGE_MAX_PIXELS anyway. PIL itself only raises at twice this size.
MAX_DECODE_PIXELS = 89_478_485


@dataclass
class Issue:
    kind: str
    field: str
    message: str
    fix: str


@dataclass
class RowResult:
    """What the preflight keeps per row: a few numbers, the label, a content digest and any issues."""

    index: int
    row_id: str
    errors: list[Issue] = field(default_factory=list)
    tokens: int | None = None
    visual_tokens: int | None = None
    supervised_tokens: int | None = None
    label: str | None = None
    digest: str | None = None

    def error(self, kind: str, field_name: str, message: str, fix: str) -> None:
        self.errors.append(Issue(kind, field_name, message, fix))

    def add(self, found: RowProblem | None) -> bool:
        """The checker's consumer of the row rules: keep `found` as an issue; whether there was one."""
        if found is not None:
            self.error(found.kind, found.field, found.message, found.fix)
        return found is not None


def visual_token_count(processor, width: int, height: int) -> int:
    """How many `<|image_pad|>` tokens the processor expands one width x height image into; ValueError from
    smart_resize for an aspect ratio above 200:1.

    Public API only: `get_number_of_image_patches` of Qwen2VLImageProcessor (checked on transformers 5.24; its
    docstring asks to keep it, vLLM uses it), divided by merge_size**2 as Qwen3VLProcessor's private
    `_get_num_multimodal_tokens` computes it. tests/data/test_row_rules.py fails by name if the method goes, and
    tests/preflight/test_preflight.py::test_token_estimate_equals_collator_length
    if the count drifts from the processor's.
    """
    image_processor = processor.image_processor
    return int(image_processor.get_number_of_image_patches(height, width)) // image_processor.merge_size**2


class RowChecker:
    """Checks one row the way the training (or eval) collator would consume it, without running the processor."""

    def __init__(self, collator: Qwen3VisionSFTCollator, label_field: str, labels: LabelColumn | None = None):
        self.collator = collator
        self.processor = collator.processor
        self.label_field = label_field
        self.labels = labels  # SFT_TARGET_FORMAT=label: the label column's rule (job/data/labels.py)
        tokenizer = self.processor.tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.processor.image_token)
        # Control tokens inside user text would be parsed as chat structure (a caption holding "<|im_start|>assistant"
        # moves the label mask), so user text must not contain any of them.
        self.special_tokens = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special})

    @property
    def training(self) -> bool:
        return self.collator.training

    def check(self, row: dict, index: int) -> RowResult:
        result = RowResult(index=index, row_id=str(row.get("row_id", f"row {index}")))
        text_ok = self._check_text(row, result)
        answer = self._check_target(row, result)
        size, image_digest = self._check_image(row, result)
        if text_ok and size is not None and (answer is not None or not self.training):
            # A label's verdict is rendered as the collator will see it after with_verdicts (job/data/labels.py).
            rendered = {**row, self.collator.target_key: answer} if self.labels is not None else row
            self._check_length(rendered, size, result)
        if image_digest is not None:
            c = self.collator
            fields = [c.query(row), row.get(c.caption_key), row.get(c.target_key)]
            content = (image_digest + json.dumps(fields, default=str)).encode()
            result.digest = hashlib.blake2b(content, digest_size=16).hexdigest()
        return result

    # -- text ------------------------------------------------------------------------------------------------
    def _check_text(self, row: dict, result: RowResult) -> bool:
        """Whether the query and caption can be rendered; every problem is added to result."""
        before = len(result.errors)
        key, caption_key = self.collator.query_key, self.collator.caption_key
        query, caption = self.collator.query(row), row.get(caption_key)
        result.add(query_problem(query, key))
        result.add(caption_problem(caption, caption_key))
        for name, value in ((key, query), (caption_key, caption)):
            result.add(control_token_problem(value, name, self.special_tokens))
        return len(result.errors) == before

    # -- target ----------------------------------------------------------------------------------------------
    def _check_target(self, row: dict, result: RowResult) -> str | None:
        """The canonical answer text (what the model is trained to emit), or None when the target is unusable."""
        key, label_field = self.collator.target_key, self.label_field
        use = "training and eval scoring" if self.training else "eval scoring"
        if self.labels is not None:
            verdict = self.labels.verdict(row.get(key))
        else:
            verdict = verdict_or_problem(row.get(key), key, label_field=label_field, use=use)
        if isinstance(verdict, RowProblem):
            result.add(verdict)
            return None
        label = label_or_problem(verdict, key, label_field)
        if isinstance(label, RowProblem):
            result.add(label)
            return None
        result.label = label
        answer = json.dumps(verdict, ensure_ascii=False)  # exactly rows.target_text, without parsing twice
        if result.add(control_token_problem(answer, key, self.special_tokens, verdict=True)):
            return None
        return answer

    # -- image -----------------------------------------------------------------------------------------------
    def _check_image(self, row: dict, result: RowResult) -> tuple[tuple[int, int] | None, str | None]:
        """(RGB width, height) after a full decode, and a digest of the image bytes; (None, ...) on any problem."""
        key = self.collator.image_key
        source = image_source(row.get(key), key, result.row_id)
        if isinstance(source, RowProblem):
            result.add(source)
            return None, None
        digest = _digest(source)
        image = decode_image(source, key, max_pixels=MAX_DECODE_PIXELS)
        if isinstance(image, RowProblem):
            result.add(image)
            return None, digest
        return image.size, digest

    # -- tokens ----------------------------------------------------------------------------------------------
    def _check_length(self, row: dict, size: tuple[int, int], result: RowResult) -> None:
        width, height = size
        try:
            visual = visual_token_count(self.processor, width, height)
        except ValueError as exc:  # smart_resize refuses aspect ratios above 200:1
            result.error("image_aspect_ratio", self.collator.image_key, f"is {width}x{height}: {exc}",
                         "crop or pad the image to an aspect ratio below 200:1")
            return
        ids = self._token_ids(row, result.row_id)
        pads = ids.count(self.image_token_id)
        result.visual_tokens = int(visual)
        result.tokens = len(ids) - pads + pads * int(visual)
        limit = self.collator.max_length
        if limit is not None and result.tokens > limit:
            result.error(
                "too_long",
                "row",
                f"has {result.tokens} tokens ({visual} visual + {result.tokens - visual} text) "
                f"> SFT_MAX_LENGTH={limit}; rows are never truncated",
                "raise SFT_MAX_LENGTH, lower SFT_IMAGE_MAX_PIXELS or shorten the text",
            )
        if self.training:
            self._check_supervised(ids, result)

    def _token_ids(self, row: dict, row_id: str) -> list[int]:
        """The collator's own chat text for the row, tokenized as the processor tokenizes it."""
        return self.processor.tokenizer(self.collator.chat_text(row, row_id))["input_ids"]

    def _check_supervised(self, ids: list[int], result: RowResult) -> None:
        """Count what answer_only_labels keeps: from after the last assistant header through the first <|im_end|>."""
        span = self.collator.supervised_span(ids)
        result.supervised_tokens = end = span[1] - span[0] if span is not None else 0
        if lacks_answer(end):  # only <|im_end|> (or nothing) would be supervised
            result.error("no_supervised_tokens", self.collator.target_key,
                         "leaves no answer tokens to train on after masking", "give the row a non-empty verdict")


def _digest(source: Any) -> str:
    """A digest of the image's bytes: the file's, the dataset's encoded bytes, or a PIL image's pixels."""
    if isinstance(source, Image.Image):
        return hashlib.blake2b(source.tobytes(), digest_size=16).hexdigest()
    if isinstance(source, io.BytesIO):
        return hashlib.blake2b(source.getvalue(), digest_size=16).hexdigest()
    with open(source, "rb") as handle:
        return hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=16)).hexdigest()

"""Per-row data checks for `qwen3-sft preflight`: schema, image, target, token length and supervision.

`RowChecker.check(row, index)` looks at one row and returns a small `RowResult` (no decoded image is kept), so the
preflight can stream any number of rows through worker processes in bounded memory.

The token length is computed cheaply instead of running the processor on every row: the text is rendered with the
collator's own chat formatting and tokenized, and the single `<|image_pad|>` placeholder is replaced by the number
of visual tokens the image processor will produce for that image size (`_get_num_multimodal_tokens`, which runs the
same `smart_resize` as the real preprocessing). tests/test_preflight.py checks that this equals the collator's count.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job.collators.qwen3_collator import Qwen3VisionSFTCollator, _last_occurrence
from job.data.rows import to_rgb

# An image above this many pixels is rejected before it is decoded. It is PIL's own DecompressionBombWarning
# threshold (the default Image.MAX_IMAGE_PIXELS, ~9459x9459): decoding it takes >= 268 MB as RGB per worker, and the
# processor would shrink it to SFT_IMAGE_MAX_PIXELS anyway. PIL itself only raises at twice this size.
MAX_DECODE_PIXELS = 89_478_485
_JSONL_ROW = re.compile(r"^[^\[]+\.jsonl?:\d+$")  # row ids of JSONL rows ("train.jsonl:17"); others are "train[17]"
REENCODE_FIX = "re-export the image as PNG or JPEG (e.g. with PIL: Image.open(p).convert('RGB').save(p2))"


class ImageTooLarge(ValueError):
    """The image's header says it is larger than MAX_DECODE_PIXELS; it is never decoded."""


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


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:60]


class RowChecker:
    """Checks one row the way the training (or eval) collator would consume it, without running the processor."""

    def __init__(self, collator: Qwen3VisionSFTCollator, label_field: str):
        self.collator = collator
        self.processor = collator.processor
        self.label_field = label_field
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
            self._check_length(row, answer, size, result)
        if image_digest is not None:
            c = self.collator
            fields = [row.get(c.query_key), row.get(c.caption_key), row.get(c.target_key)]
            content = (image_digest + json.dumps(fields, default=str)).encode()
            result.digest = hashlib.blake2b(content, digest_size=16).hexdigest()
        return result

    # -- text ------------------------------------------------------------------------------------------------
    def _check_text(self, row: dict, result: RowResult) -> bool:
        """Whether the query and caption can be rendered; every problem is added to result."""
        before = len(result.errors)
        key, caption_key = self.collator.query_key, self.collator.caption_key
        query, caption = row.get(key), row.get(caption_key)
        if query is None:
            result.error("missing_field", key, "is missing",
                         f"add a non-empty '{key}' string to every row (or set SFT_QUERY_KEY)")
        elif not isinstance(query, str):
            result.error(
                "bad_type", key, f"is {_describe(query)}, expected a string", "store the query as a JSON string"
            )
        elif not query.strip():
            result.error("empty_query", key, "is empty", "write the question the model should answer")
        if caption is not None and not isinstance(caption, str):
            result.error("bad_type", caption_key, f"is {_describe(caption)}, expected a string or null",
                         "store the caption as a JSON string or null")
        for name, value in ((key, query), (caption_key, caption)):
            found = [t for t in self.special_tokens if isinstance(value, str) and t in value]
            if found:
                result.error(
                    "special_token_in_text",
                    name,
                    f"contains the control token(s) {found}, which would corrupt the chat format",
                    "remove them from the text",
                )
        return len(result.errors) == before

    # -- target ----------------------------------------------------------------------------------------------
    def _check_target(self, row: dict, result: RowResult) -> str | None:
        """The canonical answer text (what the model is trained to emit), or None when the target is unusable."""
        key, label_field = self.collator.target_key, self.label_field
        value = row.get(key)
        use = "training and eval scoring" if self.training else "eval scoring"
        example = f'{{"{label_field}": "sarcastic"}}'
        if value is None or (isinstance(value, str) and not value.strip()):
            result.error("missing_field", key, f"is missing or empty; {use} needs a JSON verdict",
                         f"add a verdict such as {example}")
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                result.error("target_not_json", key, f"is not valid JSON ({exc.msg}): {value[:60]!r}",
                             f"write a JSON object such as {example}")
                return None
        if not isinstance(value, dict):
            result.error("target_not_object", key, f"is {_describe(value)}, expected a JSON object",
                         f"write a JSON object such as {example}")
            return None
        label = value.get(label_field)
        if label is None or label == "":
            result.error(
                "target_missing_label",
                key,
                f"has no '{label_field}' value (keys: {sorted(value)[:8]})",
                f'add "{label_field}" to every verdict, or set SFT_LABEL_FIELD to the key that holds the label',
            )
            return None
        # str() as the eval metrics compare labels (str(gold) == str(pred)).
        result.label = label if isinstance(label, str) else str(label)
        answer = json.dumps(value, ensure_ascii=False)  # exactly rows.target_text, without parsing twice
        found = [t for t in self.special_tokens if t in answer]
        if found:  # an <|im_end|> inside the answer would end the supervised span early
            result.error(
                "special_token_in_text", key, f"contains the control token(s) {found}", "remove them from the verdict"
            )
            return None
        return answer

    # -- image -----------------------------------------------------------------------------------------------
    def _check_image(self, row: dict, result: RowResult) -> tuple[tuple[int, int] | None, str | None]:
        """(RGB width, height) after a full decode, and a digest of the image bytes; (None, ...) on any problem."""
        key = self.collator.image_key
        source, digest = self._image_source(row.get(key), key, result)
        if source is None:
            return None, digest
        try:
            size = self._decode(source)
        except ImageTooLarge as exc:
            result.error("image_too_large", key, str(exc),
                         "downscale the image (the model sees at most SFT_IMAGE_MAX_PIXELS pixels anyway)")
            return None, digest
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files (OSError, SyntaxError, struct.error)
            result.error(
                "image_unreadable", key, f"cannot be decoded ({type(exc).__name__}: {exc})"[:300], REENCODE_FIX
            )
            return None, digest
        return size, digest

    @staticmethod
    def _image_source(value: Any, key: str, result: RowResult) -> tuple[Any, str | None]:
        """An openable source (path, BytesIO or PIL image) and a digest of its bytes."""
        from PIL import Image

        if value is None or value == "" or (isinstance(value, dict) and not (value.get("bytes") or value.get("path"))):
            result.error("missing_field", key, "is missing",
                         f"give every row an image in '{key}' (or set SFT_IMAGE_KEY to the column that holds it)")
            return None, None
        if isinstance(value, Image.Image):
            return value, hashlib.blake2b(value.tobytes(), digest_size=16).hexdigest()
        if isinstance(value, dict) and value.get("bytes"):
            return io.BytesIO(value["bytes"]), hashlib.blake2b(value["bytes"], digest_size=16).hexdigest()
        path = value.get("path") if isinstance(value, dict) else value
        if not isinstance(path, (str, Path)):
            result.error("bad_type", key, f"is {_describe(value)}, expected an image path",
                         "store the image as a path string")
            return None, None
        if not Path(path).is_file():
            # JSONL paths arrive resolved against the JSONL file (loaders.py); parquet/Arrow paths are used as stored.
            where = ("relative to the JSONL file" if _JSONL_ROW.match(result.row_id)
                     else "as stored: absolute, or relative to the working directory")
            result.error("image_missing_file", key, f"file {str(path)!r} does not exist",
                         f"fix the path ({where}) or add the file")
            return None, None
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
        return str(path), digest

    @staticmethod
    def _decode(source: Any) -> tuple[int, int]:
        """Decode fully (a truncated file only fails here, not at open) and convert to RGB; return its size."""
        from PIL import Image

        if isinstance(source, Image.Image):
            _bomb_check(*source.size)
            return to_rgb(source, "row", "image").size
        with warnings.catch_warnings():
            # Our own limit (below PIL's error threshold) decides; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                opened = Image.open(source)
            except Image.DecompressionBombError:
                raise ImageTooLarge("is a decompression bomb (PIL refuses to open it)") from None
        with opened:
            _bomb_check(*opened.size)
            opened.load()
            return to_rgb(opened, "row", "image").size

    # -- tokens ----------------------------------------------------------------------------------------------
    def _check_length(self, row: dict, answer: str | None, size: tuple[int, int], result: RowResult) -> None:
        width, height = size
        try:
            visual = self.processor._get_num_multimodal_tokens(image_sizes=[[height, width]]).num_image_tokens[0]
        except ValueError as exc:  # smart_resize refuses aspect ratios above 200:1
            result.error("image_aspect_ratio", self.collator.image_key, f"is {width}x{height}: {exc}",
                         "crop or pad the image to an aspect ratio below 200:1")
            return
        ids = self._token_ids(row, answer, result.row_id)
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

    def _token_ids(self, row: dict, answer: str | None, row_id: str) -> list[int]:
        """The rendered chat exactly as the collator renders it, tokenized as the processor tokenizes it."""
        c = self.collator
        messages = c._user_message(c._user_text(row, row_id))
        if self.training:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=not self.training)
        return self.processor.tokenizer(text)["input_ids"]

    def _check_supervised(self, ids: list[int], result: RowResult) -> None:
        """Count what answer_only_labels keeps: from after the last assistant header through the first <|im_end|>."""
        header = self.collator._header_ids
        start = _last_occurrence(ids, header)
        answer = ids[start + len(header):] if start >= 0 else []
        end = answer.index(self.collator._end_id) + 1 if self.collator._end_id in answer else len(answer)
        result.supervised_tokens = end
        if end <= 1:  # only <|im_end|> (or nothing) would be supervised
            result.error("no_supervised_tokens", self.collator.target_key,
                         "leaves no answer tokens to train on after masking", "give the row a non-empty verdict")


def _bomb_check(width: int, height: int) -> None:
    if width * height > MAX_DECODE_PIXELS:
        raise ImageTooLarge(
            f"is {width}x{height} = {width * height:,} px, above the {MAX_DECODE_PIXELS:,} px decompression-bomb limit"
        )

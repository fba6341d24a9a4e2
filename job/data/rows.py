"""A row as the model sees it (an RGB image, the user text, the target verdict) and the rules a row must meet.

Each rule is written once, here, as a function that returns a `RowProblem` (None, or the parsed value, when the row
meets it). It has two consumers: the collator raises the first problem as a DataError (`load_image`, `parse_target`,
`RowProblem.raise_for`), and preflight's row checker (job/data/checks.py) collects every problem as an issue of its
report. The two have always worded a problem differently (preflight's words come with a kind and a longer fix), and
both wordings are kept as they were, so a problem carries both, side by side in its rule; tests/data/test_row_rules.py
pins them and checks that the two consumers agree.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.errors import DataError

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_JSONL_ROW = re.compile(r"^[^\[]+\.jsonl?:\d+$")  # row ids of JSONL rows ("train.jsonl:17"); others are "train[17]"
REENCODE_FIX = "re-export the image as PNG or JPEG (e.g. with PIL: Image.open(p).convert('RGB').save(p2))"
_RESAVE = "re-save it as PNG or JPEG"
_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


@dataclass(frozen=True)
class RowProblem:
    """One rule a row breaks, in the words of both consumers.

    `kind`, `field`, `message` and `fix` are the issue preflight reports (preflight_report.json); `error` and
    `error_fix` are what the collator raises, `DataError.for_row(row, field, error, error_fix)`. `error` is None for
    a rule only preflight enforces: the collator can still build the batch (a caption that is not a string).

        >>> problem = query_problem("  ", "query")
        >>> problem.kind, problem.message, problem.fix
        ('empty_query', 'is empty', 'write the question the model should answer')
        >>> str(problem.as_error("train.jsonl:4"))
        "train.jsonl:4: field 'query' must be a non-empty string (got str '  ')"
    """

    kind: str
    field: str
    message: str
    fix: str
    error: str | None = None
    error_fix: str | None = None

    def as_error(self, row: str) -> DataError:
        """The collator's DataError for this problem in `row` (row, field and fix carried)."""
        if self.error is None:
            raise TypeError(f"{self.kind} on field {self.field!r} is a preflight-only rule: the collator has no words "
                            "for it")
        return DataError.for_row(row, self.field, self.error, fix=self.error_fix)

    @staticmethod
    def raise_for(found: RowProblem | None, row: str) -> None:
        """The collator's consumer: raise `found` as a DataError for `row`; nothing when the rule held."""
        if found is not None:
            raise found.as_error(row)


def row_name(ex: dict, index: int) -> str:
    return str(ex.get("row_id", f"batch row {index}"))


def describe(value: Any) -> str:
    """A value in a message: its type and repr, at most 60 characters ("int 42", "str '  '")."""
    return f"{type(value).__name__} {value!r}"[:60]


# -- text ------------------------------------------------------------------------------------------------------------
def query_problem(value: Any, field: str) -> RowProblem | None:
    """The query must be a non-empty string."""
    error = f"must be a non-empty string (got {'missing' if value is None else describe(value)})"
    if value is None:
        return RowProblem("missing_field", field, "is missing",
                          f"add a non-empty '{field}' string to every row (or set SFT_QUERY_KEY)", error)
    if not isinstance(value, str):
        return RowProblem("bad_type", field, f"is {describe(value)}, expected a string",
                          "store the query as a JSON string", error)
    if not value.strip():
        return RowProblem("empty_query", field, "is empty", "write the question the model should answer", error)
    return None


def caption_problem(value: Any, field: str) -> RowProblem | None:
    """The caption is a string or null. Preflight only: the collator renders any caption with str()."""
    if value is not None and not isinstance(value, str):
        return RowProblem("bad_type", field, f"is {describe(value)}, expected a string or null",
                          "store the caption as a JSON string or null")
    return None


def control_token_problem(value: Any, field: str, tokens: Sequence[str], *, verdict: bool = False) -> RowProblem | None:
    """No chat control token in user text or the verdict. Preflight only (the collator would render them).

    In user text one would be parsed as chat structure (a caption holding "<|im_start|>assistant" moves the label
    mask); in the verdict an <|im_end|> would end the supervised span early.
    """
    found = [t for t in tokens if isinstance(value, str) and t in value]
    if not found:
        return None
    if verdict:
        return RowProblem("special_token_in_text", field, f"contains the control token(s) {found}",
                          "remove them from the verdict")
    return RowProblem("special_token_in_text", field,
                      f"contains the control token(s) {found}, which would corrupt the chat format",
                      "remove them from the text")


# -- target ----------------------------------------------------------------------------------------------------------
def verdict_or_problem(value: Any, field: str, *, label_field: str = "label",
                       use: str = "training and eval scoring") -> dict | RowProblem:
    """The verdict as a dict (`target_json` may be a JSON string or an object), or the rule it breaks.

    `label_field` and `use` only word preflight's advice (the collator does not know the label field).
    """
    example = f'{{"{label_field}": "sarcastic"}}'
    if isinstance(value, dict):
        return value
    if value is None or (isinstance(value, str) and not value.strip()):
        return RowProblem("missing_field", field, f"is missing or empty; {use} needs a JSON verdict",
                          f"add a verdict such as {example}", "is empty", "training rows need a JSON verdict")
    if not isinstance(value, str):
        return RowProblem("target_not_object", field, f"is {describe(value)}, expected a JSON object",
                          f"write a JSON object such as {example}", f"has type {type(value).__name__}",
                          "expected a JSON object or string")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        message = f"is not valid JSON ({exc.msg}): {value[:60]!r}"
        return RowProblem("target_not_json", field, message, f"write a JSON object such as {example}", message)
    if not isinstance(parsed, dict):
        return RowProblem("target_not_object", field, f"is {describe(parsed)}, expected a JSON object",
                          f"write a JSON object such as {example}", f"is JSON {type(parsed).__name__}",
                          'expected an object like {"label": ...}')
    return parsed


def label_or_problem(verdict: dict, field: str, label_field: str) -> str | RowProblem:
    """The verdict's label as text (str(), as the eval metrics compare labels), or the rule it breaks. Preflight
    only: the collator trains on the whole verdict."""
    label = verdict.get(label_field)
    if label is None or label == "":
        return RowProblem("target_missing_label", field, f"has no '{label_field}' value (keys: {sorted(verdict)[:8]})",
                          f'add "{label_field}" to every verdict, or set SFT_LABEL_FIELD to the key that holds the '
                          "label")
    return label if isinstance(label, str) else str(label)


def parse_verdict(value: Any, *, lenient: bool = False) -> dict | None:
    """The one verdict parser: the verdict as a dict, or None when there is none.

    Strict (a row's `target_json`, a JSON object or its text, whole: the rule `verdict_or_problem` says what is
    wrong with it) or lenient, for text a model generated: the first JSON object in it (models sometimes wrap it in
    prose or a code fence); the eval reads the gold targets leniently too, as it always has.
    """
    if not lenient:
        found = verdict_or_problem(value, "target")
        return None if isinstance(found, RowProblem) else found
    if isinstance(value, dict) or value is None:
        return value
    text = str(value).strip()
    for candidate in (text, *(m.group(0) for m in _OBJECT.finditer(text))):
        try:
            parsed = json.loads(candidate)
        except (json.JSONDecodeError, TypeError):
            continue
        if isinstance(parsed, dict):
            return parsed
    return None


def parse_target(value: Any, row: str, field: str) -> dict:
    """The verdict as a dict; `target_json` may be a JSON string or an object. Raises the collator's DataError."""
    parsed = verdict_or_problem(value, field)
    if isinstance(parsed, RowProblem):
        raise parsed.as_error(row)
    return parsed


def target_text(value: Any, row: str, field: str) -> str:
    """The exact text the model is trained to emit: compact-but-readable canonical JSON of the verdict."""
    return json.dumps(parse_target(value, row, field), ensure_ascii=False)


# -- image -----------------------------------------------------------------------------------------------------------
def to_rgb(image):
    """Normalise any PIL image to RGB: EXIF rotation applied, alpha dropped, palette and 16-bit expanded.

    PIL's errors (a lazily loaded image may turn out truncated here) are left to `decode_image`.
    """
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        # convert("RGB") clips 16-bit values at 255 (an all-white image); rescale to 8 bits first.
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def image_source(value: Any, field: str, row: str) -> Any:
    """What PIL can open (a PIL image, a BytesIO or a path string) from a PIL image, a path or a `datasets.Image`
    dict ({'bytes': ..., 'path': ...}); else the RowProblem. `row` only words preflight's fix for a missing file."""
    from PIL import Image

    missing = ("is missing", f"give every row an image in '{field}' (or set SFT_IMAGE_KEY to the column that holds it)")
    if value is None or value == "":
        return RowProblem("missing_field", field, *missing, "is missing", "every row needs an image")
    bad_type = (f"has type {type(value).__name__}", "expected an image path or image")
    if isinstance(value, dict) and not (value.get("bytes") or value.get("path")):
        return RowProblem("missing_field", field, *missing, *bad_type)  # the collator has always called it a type
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes"):
        return io.BytesIO(value["bytes"])
    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, (str, Path)):
        return RowProblem("bad_type", field, f"is {describe(value)}, expected an image path",
                          "store the image as a path string", *bad_type)
    if not Path(path).is_file():
        # JSONL paths arrive resolved against the JSONL file (loaders.py), parquet/Arrow paths against the dataset.
        where = "relative to the JSONL file" if _JSONL_ROW.match(row) else "relative to the dataset directory"
        message = f"file {str(path)!r} does not exist"
        return RowProblem("image_missing_file", field, message, f"fix the path ({where}) or add the file", message)
    return str(path)


def _too_large(field: str, message: str, error: str) -> RowProblem:
    return RowProblem("image_too_large", field, message,
                      "downscale the image (the model sees at most SFT_IMAGE_MAX_PIXELS pixels anyway)",
                      f"is too large to decode safely ({error})", "downscale it")


def decode_image(source: Any, field: str, *, max_pixels: int | None = None) -> Any:
    """The RGB image, fully decoded (a truncated file fails here, not lazily inside the processor), or the
    RowProblem. `max_pixels`: refuse a larger image from its header, before decoding it (preflight's bound)."""
    from PIL import Image

    def over(width: int, height: int) -> RowProblem | None:
        if max_pixels is None or width * height <= max_pixels:
            return None
        message = f"is {width}x{height} = {width * height:,} px, above the {max_pixels:,} px decompression-bomb limit"
        return _too_large(field, message, message)

    if isinstance(source, Image.Image):
        try:
            problem = over(*source.size)
            return problem if problem is not None else to_rgb(source)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad data (OSError, SyntaxError, struct.error)
            return RowProblem("image_unreadable", field, f"cannot be decoded ({type(exc).__name__}: {exc})"[:300],
                              REENCODE_FIX, f"image cannot be decoded ({exc})", _RESAVE)
    try:
        with warnings.catch_warnings():
            if max_pixels is not None:  # our own bound (below PIL's error threshold) decides; PIL's warning is noise
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(source)
        with opened:
            problem = over(*opened.size)
            if problem is not None:
                return problem
            opened.load()
            return to_rgb(opened)
    except Image.DecompressionBombError as exc:  # not an OSError: without this it crashed as an internal error
        return _too_large(field, "is a decompression bomb (PIL refuses to open it)", str(exc))
    except Exception as exc:  # noqa: BLE001 - as above
        return RowProblem("image_unreadable", field, f"cannot be decoded ({type(exc).__name__}: {exc})"[:300],
                          REENCODE_FIX, f"is not a readable image ({type(exc).__name__}: {exc})", _RESAVE)


def load_image(value: Any, row: str, field: str):
    """The collator's image: RGB from a PIL image, a path or a `datasets.Image` dict; raises its DataError."""
    source = image_source(value, field, row)
    image = source if isinstance(source, RowProblem) else decode_image(source, field)
    if isinstance(image, RowProblem):
        raise image.as_error(row)
    return image

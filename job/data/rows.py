"""Turning one dataset row into what the model sees: an RGB image, the user text and the target verdict."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from job.errors import DataError

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def row_name(ex: dict, index: int) -> str:
    return str(ex.get("row_id", f"batch row {index}"))


def to_rgb(image, row: str, field: str):
    """Normalise any PIL image to RGB: EXIF rotation applied, alpha dropped, palette and 16-bit expanded."""
    from PIL import Image, ImageOps

    try:
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
    except OSError as exc:
        raise DataError.for_row(row, field, f"image cannot be decoded ({exc})",
                                fix="re-save it as PNG or JPEG") from None


def load_image(value: Any, row: str, field: str):
    """Accept a PIL image, a path, or a `datasets.Image` dict ({'bytes': ..., 'path': ...}); return RGB."""
    from PIL import Image, UnidentifiedImageError

    if value is None or value == "":
        raise DataError.for_row(row, field, "is missing", fix="every row needs an image")
    if isinstance(value, Image.Image):
        return to_rgb(value, row, field)
    source: Any
    if isinstance(value, dict) and value.get("bytes"):
        source = io.BytesIO(value["bytes"])
    elif isinstance(value, dict) and value.get("path"):
        source = value["path"]
    elif isinstance(value, (str, Path)):
        source = str(value)
    else:
        raise DataError.for_row(row, field, f"has type {type(value).__name__}", fix="expected an image path or image")
    if isinstance(source, str) and not Path(source).is_file():
        raise DataError.for_row(row, field, f"file {source!r} does not exist")
    try:
        with Image.open(source) as opened:
            opened.load()  # decode fully now, not lazily inside the processor
            return to_rgb(opened, row, field)
    except Image.DecompressionBombError as exc:  # not an OSError: without this it crashed as an internal error
        raise DataError.for_row(row, field, f"is too large to decode safely ({exc})", fix="downscale it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError.for_row(row, field, f"is not a readable image ({type(exc).__name__}: {exc})",
                                fix="re-save it as PNG or JPEG") from None


def parse_target(value: Any, row: str, field: str) -> dict:
    """The verdict as a dict; `target_json` may be a JSON string or an object."""
    if isinstance(value, dict):
        return value
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError.for_row(row, field, "is empty", fix="training rows need a JSON verdict")
    if not isinstance(value, str):
        raise DataError.for_row(row, field, f"has type {type(value).__name__}", fix="expected a JSON object or string")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise DataError.for_row(row, field, f"is not valid JSON ({exc.msg}): {value[:60]!r}") from None
    if not isinstance(parsed, dict):
        raise DataError.for_row(row, field, f"is JSON {type(parsed).__name__}",
                                fix='expected an object like {"label": ...}')
    return parsed


def target_text(value: Any, row: str, field: str) -> str:
    """The exact text the model is trained to emit: compact-but-readable canonical JSON of the verdict."""
    return json.dumps(parse_target(value, row, field), ensure_ascii=False)

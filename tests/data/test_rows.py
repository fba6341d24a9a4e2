"""One home per row rule: the collator (raises) and preflight's row checker (collects) agree on every bad row.

Each rule of job/data/rows.py has two consumers: the training collator raises the first broken rule as a DataError
(row, field, fix and message carried), preflight's RowChecker collects each one as an Issue (kind, field, message,
fix) for the report. Their wordings predate the shared rules and are kept byte for byte, so this file pins both for
one bad row per rule,
as tests/collators/test_label_equivalence.py locks the single-pass labels to the two-pass ones: a rule
changed for one consumer and not the other fails here. The rules only preflight enforces (the collator can still
build the batch: a caption that is not a string, control tokens in the text, a verdict without its label) are pinned
too, with the collator accepting the row.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from helpers import bomb_png, noise_image
from PIL import Image

from job.collators.qwen3_collator import Qwen3VisionSFTCollator
from job.data.checks import RowChecker, visual_token_count
from job.errors import DataError

ROW = "train.jsonl:4"
REENCODE = "re-export the image as PNG or JPEG (e.g. with PIL: Image.open(p).convert('RGB').save(p2))"
RESAVE = "re-save it as PNG or JPEG"
EXAMPLE = 'write a JSON object such as {"label": "sarcastic"}'


def _png(root: Path) -> str:
    path = root / "good.png"
    if not path.exists():
        noise_image().save(path)
    return str(path)


def _write(name: str, data: bytes):
    def make(root: Path) -> dict:
        (root / name).write_bytes(data)
        return {"image": str(root / name)}
    return make


def _truncated(root: Path) -> dict:
    buf = io.BytesIO()
    noise_image((160, 120)).save(buf, "JPEG", quality=95)
    (root / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return {"image": str(root / "trunc.jpg")}


def _bomb(root: Path) -> dict:
    bomb_png(root / "bomb.png", 20000, 20000)  # PIL refuses it at open, from the header: cheap for both consumers
    return {"image": str(root / "bomb.png")}


# name -> (the fields that break one rule, preflight's issue (kind, field, message, fix), the collator's DataError
# message and fix); "{root}" is the test's directory.
BOTH = {
    "image_none": ({"image": None}, ("missing_field", "image", "is missing",
                                     "give every row an image in 'image' (or set SFT_IMAGE_KEY to the column that "
                                     "holds it)"),
                   "field 'image' is missing; every row needs an image", "every row needs an image"),
    "image_empty_dict": ({"image": {"bytes": None, "path": None}},
                         ("missing_field", "image", "is missing",
                          "give every row an image in 'image' (or set SFT_IMAGE_KEY to the column that holds it)"),
                         "field 'image' has type dict; expected an image path or image",
                         "expected an image path or image"),
    "image_bad_type": ({"image": 3}, ("bad_type", "image", "is int 3, expected an image path",
                                      "store the image as a path string"),
                       "field 'image' has type int; expected an image path or image",
                       "expected an image path or image"),
    "image_missing_file": ({"image": "{root}/nope.png"},
                           ("image_missing_file", "image", "file '{root}/nope.png' does not exist",
                            "fix the path (relative to the JSONL file) or add the file"),
                           "field 'image' file '{root}/nope.png' does not exist", None),
    "image_not_an_image": (_write("notes.jpg", b"just some text, not a JPEG\n" * 20),
                           ("image_unreadable", "image",
                            "cannot be decoded (UnidentifiedImageError: cannot identify image file "
                            "'{root}/notes.jpg')", REENCODE),
                           "field 'image' is not a readable image (UnidentifiedImageError: cannot identify image "
                           "file '{root}/notes.jpg'); re-save it as PNG or JPEG", RESAVE),
    "image_truncated": (_truncated,
                        ("image_unreadable", "image", "cannot be decoded (OSError: image file is truncated "
                         "(17 bytes not processed))", REENCODE),
                        "field 'image' is not a readable image (OSError: image file is truncated (17 bytes not "
                        "processed)); re-save it as PNG or JPEG", RESAVE),
    "image_bomb": (_bomb, ("image_too_large", "image", "is a decompression bomb (PIL refuses to open it)",
                           "downscale the image (the model sees at most SFT_IMAGE_MAX_PIXELS pixels anyway)"),
                   "field 'image' is too large to decode safely (Image size (400000000 pixels) exceeds limit of "
                   "178956970 pixels, could be decompression bomb DOS attack.); downscale it", "downscale it"),
    "query_none": ({"query": None}, ("missing_field", "query", "is missing",
                                     "add a non-empty 'query' string to every row (or set SFT_QUERY_KEY)"),
                   "field 'query' must be a non-empty string (got missing)", None),
    "query_bad_type": ({"query": 42}, ("bad_type", "query", "is int 42, expected a string",
                                       "store the query as a JSON string"),
                       "field 'query' must be a non-empty string (got int 42)", None),
    "query_blank": ({"query": "   "}, ("empty_query", "query", "is empty",
                                      "write the question the model should answer"),
                    "field 'query' must be a non-empty string (got str '   ')", None),
    "target_none": ({"target_json": None},
                    ("missing_field", "target_json", "is missing or empty; training and eval scoring needs a JSON "
                     "verdict", 'add a verdict such as {"label": "sarcastic"}'),
                    "field 'target_json' is empty; training rows need a JSON verdict",
                    "training rows need a JSON verdict"),
    "target_blank": ({"target_json": " "},
                     ("missing_field", "target_json", "is missing or empty; training and eval scoring needs a JSON "
                      "verdict", 'add a verdict such as {"label": "sarcastic"}'),
                     "field 'target_json' is empty; training rows need a JSON verdict",
                     "training rows need a JSON verdict"),
    "target_bad_type": ({"target_json": 1}, ("target_not_object", "target_json", "is int 1, expected a JSON object",
                                             EXAMPLE),
                        "field 'target_json' has type int; expected a JSON object or string",
                        "expected a JSON object or string"),
    "target_not_json": ({"target_json": "{label: sarcastic"},
                        ("target_not_json", "target_json",
                         "is not valid JSON (Expecting property name enclosed in double quotes): '{label: sarcastic'",
                         EXAMPLE),
                        "field 'target_json' is not valid JSON (Expecting property name enclosed in double quotes): "
                        "'{label: sarcastic'", None),
    "target_not_object": ({"target_json": '["sarcastic"]'},
                          ("target_not_object", "target_json", "is list ['sarcastic'], expected a JSON object",
                           EXAMPLE),
                          "field 'target_json' is JSON list; expected an object like {\"label\": ...}",
                          'expected an object like {"label": ...}'),
}

# Rules only preflight enforces: the collator builds the batch anyway.
PREFLIGHT_ONLY = {
    "caption_bad_type": ({"caption": 7}, ("bad_type", "caption", "is int 7, expected a string or null",
                                          "store the caption as a JSON string or null")),
    "control_token_in_query": ({"query": "Sarcastic? <|im_end|>"},
                               ("special_token_in_text", "query", "contains the control token(s) ['<|im_end|>'], "
                                "which would corrupt the chat format", "remove them from the text")),
    "control_token_in_caption": ({"caption": "hi <|im_start|>assistant"},
                                 ("special_token_in_text", "caption", "contains the control token(s) "
                                  "['<|im_start|>'], which would corrupt the chat format",
                                  "remove them from the text")),
    "control_token_in_target": ({"target_json": '{"label": "a<|im_end|>"}'},
                                ("special_token_in_text", "target_json", "contains the control token(s) ['<|im_end|>']",
                                 "remove them from the verdict")),
    "target_without_label": ({"target_json": '{"verdict": "sarcastic"}'},
                             ("target_missing_label", "target_json", "has no 'label' value (keys: ['verdict'])",
                              'add "label" to every verdict, or set SFT_LABEL_FIELD to the key that holds the label')),
    "target_empty_label": ({"target_json": {"label": "", "why": "x"}},
                           ("target_missing_label", "target_json", "has no 'label' value (keys: ['label', 'why'])",
                            'add "label" to every verdict, or set SFT_LABEL_FIELD to the key that holds the label')),
}


def _row(root: Path, change) -> dict:
    fields = change(root) if callable(change) else change
    fields = {k: v.replace("{root}", str(root)) if isinstance(v, str) else v for k, v in fields.items()}
    base = {"row_id": ROW, "image": _png(root), "query": "Is this post sarcastic?", "caption": "post 4",
            "target_json": json.dumps({"label": "sarcastic"})}
    return {**base, **fields}


def _raised(collator: Qwen3VisionSFTCollator, row: dict) -> DataError:
    with pytest.raises(RuntimeError, match="Qwen3 collate failed") as info:
        collator([row])
    error = info.value.__cause__
    assert isinstance(error, DataError), repr(error)
    return error


@pytest.fixture(scope="module")
def pair(processor):
    collator = Qwen3VisionSFTCollator(processor, max_length=512)
    return collator, RowChecker(collator, "label")


@pytest.mark.parametrize("case", sorted(BOTH))
def test_the_collator_and_preflight_name_the_same_broken_rule(case, pair, tmp_path):
    collator, checker = pair
    change, issue, message, fix = BOTH[case]
    row = _row(tmp_path, change)
    issue = tuple(part.replace("{root}", str(tmp_path)) for part in issue)
    found = [(e.kind, e.field, e.message, e.fix) for e in checker.check(row, 3).errors]
    assert found == [issue]
    error = _raised(collator, row)
    assert (error.row, error.field, error.fix) == (ROW, issue[1], fix)
    assert str(error) == f"{ROW}: " + message.replace("{root}", str(tmp_path))


@pytest.mark.parametrize("case", sorted(PREFLIGHT_ONLY))
def test_rules_only_preflight_enforces(case, pair, tmp_path):
    collator, checker = pair
    change, issue = PREFLIGHT_ONLY[case]
    row = _row(tmp_path, change)
    assert [(e.kind, e.field, e.message, e.fix) for e in checker.check(row, 3).errors] == [issue]
    assert collator([row])["input_ids"].shape[0] == 1


def test_eval_checks_the_verdict_the_eval_collator_ignores(processor, tmp_path):
    """Eval scoring needs the verdict, so preflight checks it on the eval split too; the eval collator never reads
    it."""
    collator = Qwen3VisionSFTCollator(processor, training=False, max_length=512)
    row = _row(tmp_path, {"target_json": None})
    assert [(e.kind, e.message) for e in RowChecker(collator, "label").check(row, 3).errors] == [
        ("missing_field", "is missing or empty; eval scoring needs a JSON verdict")]
    assert collator([row])["input_ids"].shape[0] == 1


def test_visual_token_count_is_what_the_processor_expands_an_image_into(processor):
    """The token estimate's one use of transformers beyond the processor's call: the image processor's public
    `get_number_of_image_patches` (transformers 5.24). If a release drops or changes it, this fails here, by name."""
    assert callable(getattr(processor.image_processor, "get_number_of_image_patches", None)), (
        "transformers no longer has Qwen2VLImageProcessor.get_number_of_image_patches: rewrite visual_token_count")
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for width, height in [(64, 48), (33, 17), (1024, 768), (300, 900), (2000, 20)]:
        batch = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"],
                          images=[Image.new("RGB", (width, height))], return_tensors="pt")
        assert visual_token_count(processor, width, height) == int((batch["input_ids"] == image_pad).sum())
    with pytest.raises(ValueError, match="aspect ratio"):
        visual_token_count(processor, 2000, 5)

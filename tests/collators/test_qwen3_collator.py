"""Exact label positions from Qwen3VisionSFTCollator on real tokenized examples.

Also runs as a script and fails loudly: `python tests/collators/test_qwen3_collator.py`.
"""

from __future__ import annotations

import json
import sys

import pytest
from PIL import Image

from job.collators.qwen3_collator import (
    IGNORE_INDEX,
    Qwen3VisionSFTCollator,
    lacks_answer,
    prompt_lengths_by_reprocessing,
)
from job.prompts import Queries

ROWS = [
    {"row_id": "r0", "image": Image.new("RGB", (64, 64), (200, 30, 30)), "query": "Is this sarcastic?",
     "caption": "Oh great, another Monday", "target_json": '{"label": "sarcastic"}'},
    {"row_id": "r1", "image": Image.new("RGB", (160, 96), (30, 30, 200)), "query": "  Classify this post.  ",
     "caption": None, "target_json": {"label": "not_sarcastic", "why": "sincere"}},
    {"row_id": "r2", "image": Image.new("L", (120, 200), 128), "query": "Sarcastique ? 皮肉ですか？",  # noqa: RUF001 - Japanese
     "caption": "Génial… encore de la pluie ☔️🙃", "target_json": '{"label": "sarcastic", "note": "ünïcødé ☔"}'},
    {"row_id": "r3", "image": Image.new("RGBA", (300, 40), (0, 255, 0, 128)), "query": "Sarcastic?",
     "caption": "", "target_json": '{"label":"not_sarcastic"}'},
]


def _answer_ids(processor, target) -> list[int]:
    answer = json.dumps(target if isinstance(target, dict) else json.loads(target), ensure_ascii=False)
    return processor.tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)


def check_exact_labels(processor, system_prompt, rows=ROWS) -> None:
    collator = Qwen3VisionSFTCollator(processor, system_prompt=system_prompt, max_length=1024)
    batch = collator(rows)
    assert "token_type_ids" not in batch and "mm_token_type_ids" in batch, sorted(batch)
    prompt_lengths = prompt_lengths_by_reprocessing(collator, rows)
    for i, row in enumerate(rows):
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        expected = _answer_ids(processor, row["target_json"])
        supervised = (labels != IGNORE_INDEX).nonzero().flatten()
        # Exactly the answer and its <|im_end|>, contiguous, starting right after the two-pass prompt length ...
        assert labels[supervised].tolist() == expected, (row["row_id"], labels[supervised].tolist(), expected)
        assert supervised.tolist() == list(range(prompt_lengths[i], prompt_lengths[i] + len(expected))), row["row_id"]
        # ... followed only by the template's trailing newline and right padding, both masked.
        length = int(mask.sum())
        assert processor.tokenizer.decode(ids[supervised[-1] + 1 : length]) == "\n"
        assert (mask[length:] == 0).all() and (labels[length:] == IGNORE_INDEX).all()
        assert labels[supervised].eq(ids[supervised]).all()


def test_labels_exact_with_system_prompt(processor):
    check_exact_labels(processor, system_prompt=None)


def test_labels_exact_without_system_prompt(processor):
    check_exact_labels(processor, system_prompt="")
    text = Qwen3VisionSFTCollator(processor, system_prompt="")._render(ROWS[0], 0)[0]
    assert "<|im_start|>system" not in text


def test_rendered_prompt_matches_qwen_template(processor):
    collator = Qwen3VisionSFTCollator(processor, training=False)
    text, _ = collator._render(ROWS[0], 0)
    assert text == (
        f"<|im_start|>system\n{Queries().SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Is this sarcastic?\nCAPTION: Oh great, another Monday<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_user_text_strips_query_and_skips_empty_caption(processor):
    collator = Qwen3VisionSFTCollator(processor)
    assert collator._user_text(ROWS[1]) == "Classify this post."
    assert collator._user_text(ROWS[3]) == "Sarcastic?"
    assert collator._user_text(ROWS[0]) == "Is this sarcastic?\nCAPTION: Oh great, another Monday"


def test_visual_tokens_match_grid(processor):
    batch = Qwen3VisionSFTCollator(processor)(ROWS)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    per_row = (batch["input_ids"] == image_pad).sum(dim=1)
    expected = batch["image_grid_thw"].prod(dim=1) // processor.image_processor.merge_size**2
    assert per_row.tolist() == expected.tolist()
    assert (batch["mm_token_type_ids"].bool() == (batch["input_ids"] == image_pad)).all()


def test_eval_collator_left_pads_prompt_only(processor):
    batch = Qwen3VisionSFTCollator(processor, training=False)(ROWS)
    assert "labels" not in batch
    mask = batch["attention_mask"]
    assert (mask[:, -1] == 1).all(), "left padding: every row ends on a real token"
    assert (mask[:, 0] == 0).any(), "rows of different lengths must be padded on the left"
    header = processor.tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert all(row[-3:].tolist() == header for row in batch["input_ids"])
    assert processor.tokenizer.padding_side == "right", "the eval collator must not flip the shared tokenizer"


@pytest.mark.parametrize("field,value,needle", [
    ("image", None, "field 'image' is missing"),
    ("target_json", "", "field 'target_json' is empty"),
    ("target_json", "{not json", "field 'target_json' is not valid JSON"),
    ("query", "   ", "field 'query' must be a non-empty string"),
    ("query", 42, "field 'query' must be a non-empty string"),
])
def test_bad_rows_raise_naming_row_and_field(processor, field, value, needle):
    row = {**ROWS[0], field: value, "row_id": "train.jsonl:7"}
    with pytest.raises(RuntimeError, match="Qwen3 collate failed") as info:
        Qwen3VisionSFTCollator(processor)([row])
    assert isinstance(info.value.__cause__, ValueError)
    assert "train.jsonl:7" in str(info.value) and needle in str(info.value)


def test_empty_target_is_fine_for_eval(processor):
    batch = Qwen3VisionSFTCollator(processor, training=False)([{**ROWS[0], "target_json": None}])
    assert batch["input_ids"].shape[0] == 1


def test_too_long_row_is_an_error_not_truncated(processor):
    collator = Qwen3VisionSFTCollator(processor, max_length=40)
    with pytest.raises(RuntimeError, match=r"r0 \(\d+ tokens\) exceed SFT_MAX_LENGTH=40"):
        collator([ROWS[0]])


def test_pad_equal_to_eos_still_supervises_im_end(processor):
    """Masking padding by attention mask (not pad id) keeps <|im_end|> supervised even when pad == eos."""
    tok = processor.tokenizer
    old = tok.pad_token
    tok.pad_token = "<|im_end|>"
    try:
        batch = Qwen3VisionSFTCollator(processor)(ROWS[:2])
    finally:
        tok.pad_token = old
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for row in batch["labels"]:
        assert row[row != IGNORE_INDEX][-1].item() == im_end


def _script_main() -> int:
    import tempfile

    from transformers import AutoProcessor

    from job.demo.tiny import build_tiny_processor

    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_processor().save_pretrained(tmp)
        proc = AutoProcessor.from_pretrained(tmp, min_pixels=4096, max_pixels=16384)
    check_exact_labels(proc, system_prompt=None)
    check_exact_labels(proc, system_prompt="")
    batch = Qwen3VisionSFTCollator(proc)(ROWS)
    for i in range(len(ROWS)):
        kept = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX]
        print(f"{ROWS[i]['row_id']}: supervised {len(kept)} tokens -> {proc.tokenizer.decode(kept)!r}")
    print("collator OK")
    return 0


if __name__ == "__main__":
    sys.exit(_script_main())


def test_the_supervised_token_rule_wants_an_answer_besides_im_end():
    """One rule for the collator and preflight: nothing supervised, or only the closing <|im_end|>, is no answer."""
    assert [lacks_answer(n) for n in (0, 1, 2, 40)] == [True, True, False, False]

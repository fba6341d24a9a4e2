"""Single-pass labels == the seed's two-pass labels on many varied rows.

The single-pass collator finds the answer in the already-expanded ids; the seed ran the processor a second time on
each prompt + image to learn the prompt length. On 60 rows of varied image sizes and aspect ratios (so the number of
visual tokens varies), modes, captions (none, empty, unicode, multi-line), system prompts (default, none, custom) and
answers (short, nested, unicode, long), both must supervise exactly the same positions with the same ids: the answer
and its <|im_end|>, nothing else.
"""

from __future__ import annotations

import json
import random

import torch
from PIL import Image

from job.collators.qwen3_collator import IGNORE_INDEX, Qwen3VisionSFTCollator, prompt_lengths_by_reprocessing

# Aspect ratios up to 175:1 (Qwen's smart_resize refuses >= 200:1; preflight rejects those rows).
SIZES = [(64, 64), (1, 1), (4, 700), (700, 4), (640, 480), (480, 640), (1600, 1200), (1200, 1600), (1000, 20),
         (20, 1000), (333, 777), (97, 131), (2048, 64), (256, 255), (5, 5)]
MODES = ["RGB", "L", "RGBA", "P", "CMYK", "I;16"]
QUERIES = ["Is this sarcastic?", "  Classify this post.  ", "Sarcastique ? 皮肉ですか？ ¿Sarcasmo?",  # noqa: RUF001 - Japanese
           "Answer in JSON.\nUse the key \"label\".", "assistant\nIs it?", "Think step by step. " * 10]
CAPTIONS = [None, "", "   ", "Oh great, another Monday", "Génial… encore de la pluie ☔️🙃", "line one\nline two\n",
            "😀" * 40, "The assistant said: sure", "Тонкий сарказм, ага.", "a" * 300]  # noqa: RUF001 - Russian
ANSWERS = [
    {"label": "sarcastic"},
    {"label": "not_sarcastic"},
    '{"label":"sarcastic"}',
    {"label": "sarcastic", "note": "ünïcødé ☔ 皮肉"},
    {"label": "not_sarcastic", "scores": {"a": 0.25, "b": [1, 2, 3]}},
    {"label": "sarcastic", "rationale": "The caption praises an obviously bad situation. " * 12},
    {"label": "not_sarcastic", "rationale": 'line\nbreaks\tand "quotes" and \\ backslashes'},
    {"label": 1},
    {"label": None, "other": True},
]
SYSTEM_PROMPTS = [None, "", "Tu es un détecteur de sarcasme. 你是讽刺检测器。"]


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        size, mode = SIZES[i % len(SIZES)], MODES[i % len(MODES)]
        image = Image.new("RGB", size, (rng.randrange(256), rng.randrange(256), rng.randrange(256))).convert(mode)
        rows.append({"row_id": f"eq-{i}", "image": image, "query": rng.choice(QUERIES),
                     "caption": rng.choice(CAPTIONS), "target_json": rng.choice(ANSWERS)})
    return rows


def _answer_ids(processor, target) -> list[int]:
    answer = json.dumps(target if isinstance(target, dict) else json.loads(target), ensure_ascii=False)
    return processor.tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)


def test_single_pass_labels_equal_two_pass_labels(processor):
    rows = _rows(63)
    collators = [Qwen3VisionSFTCollator(processor, system_prompt=p) for p in SYSTEM_PROMPTS]
    checked = 0
    for n, start in enumerate(range(0, len(rows), 7)):  # batches of 7 with different right padding
        collator = collators[n % len(collators)]  # default, no and a custom system prompt, 3 batches each
        batch_rows = rows[start : start + 7]
        batch = collator(batch_rows)
        prompt_lengths = prompt_lengths_by_reprocessing(collator, batch_rows)
        for i, row in enumerate(batch_rows):
            ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
            expected = _answer_ids(processor, row["target_json"])
            start_pos = prompt_lengths[i]
            two_pass = torch.full_like(labels, IGNORE_INDEX)
            two_pass[start_pos : start_pos + len(expected)] = ids[start_pos : start_pos + len(expected)]
            assert torch.equal(labels, two_pass), row["row_id"]
            assert labels[labels != IGNORE_INDEX].tolist() == expected, row["row_id"]
            assert int(mask.sum()) == start_pos + len(expected) + 1  # + the template's trailing "\n"
            checked += 1
    assert checked == 63

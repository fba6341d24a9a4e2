"""Collator throughput: the seed's two-pass labels vs our single pass vs the bare processor call (the floor).

    python -m benchmarks.collator [--assets DIR] [--quick] [--rows N] [--batch-size B] [--repeat R]

Variants, on the same rows (in-memory RGB images of mixed sizes up to 1600x1200, varied text) and batches:
  (a) seed, two pass: render the chats, run the processor on the batch, then run the processor again on every
      prompt + image to learn its length, and mask the labels by that length (the image is processed twice);
  (b) ours: `Qwen3VisionSFTCollator(training=True)`: one processor call; labels from the expanded ids;
  (c) floor: `processor(text=..., images=...)` on the already-rendered texts and already-converted images.
Goals: b/a >= 1.3 (speed-up over the seed) and time(b)/time(c) <= 1.15 (our overhead over the floor).
Each is measured with the job card's pixel cap (1024^2 px) and without a cap (Qwen3-VL's own 4096^2 px).
The script also checks (not a timing) that (a) and (b) produce identical input_ids and labels.
The processor is the real Qwen3VLProcessor (job.demo.tiny); image processing costs what it costs for the 8B model.
Times are CPU times of this process with 1 torch thread (what a DataLoader worker uses), best of --repeat runs,
variants interleaved: robust on a shared machine where wall time swings with other jobs.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from benchmarks.common import best_time, draw_image, load_average, machine, mixed_image_sizes, tiny_assets

CAP = 1024 * 1024  # the job card's SFT_IMAGE_MAX_PIXELS
NO_CAP = 4096 * 4096  # Qwen3-VL's preprocessor_config longest_edge
QUERIES = [
    "Is this post sarcastic? Answer in JSON.",
    "Classify the post as sarcastic or not_sarcastic. Reply with JSON only, with a short rationale.",
    "Sarcastique ? Réponds en JSON. 皮肉ですか？",  # noqa: RUF001 - Japanese text, its own question mark
]
CAPTIONS = [None, "", "Oh great, another Monday", "Wow. Just wow. Best customer service ever 🙃🙃🙃",
            "Dinner with my family tonight, the kids cooked and it was genuinely lovely " * 3]


def make_rows(n: int, seed: int = 0, max_side: int = 1600) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i, size in enumerate(mixed_image_sizes(n, seed=seed, max_side=max_side)):
        label = rng.choice(["sarcastic", "not_sarcastic"])
        target = {"label": label}
        if rng.random() < 0.5:
            target["rationale"] = "the caption praises something obviously bad " * rng.randint(1, 6)
        rows.append({"row_id": f"bench-{i}", "image": draw_image(size, seed + i), "query": rng.choice(QUERIES),
                     "caption": rng.choice(CAPTIONS), "target_json": target})
    return rows


def load_processor_capped(model_dir: Path, max_pixels: int):
    """The job's own `load_processor` (min/max pixels passed as it passes them), for the tiny assets' processor."""
    from job.cards import ModelCards
    from job.config.schema import build_cfg
    from job.model import load_processor

    cfg = build_cfg(ModelCards().qwen3_vl_8b_instruct, {
        "SFT_MODEL_ID": str(model_dir), "SFT_IMAGE_MAX_PIXELS": str(max_pixels),
        "SFT_MAX_LENGTH": str(max_pixels // 1024 + 512),
    })
    return load_processor(cfg.model, cfg.image, cfg.model.id)


def seed_two_pass(collator, rows: list[dict]) -> dict:
    """The seed's collator: processor on the full chats, then on each prompt again; labels masked by prompt length."""
    import torch

    from job.collators.qwen3_collator import IGNORE_INDEX, prompt_lengths_by_reprocessing

    texts, images = zip(*(collator._render(row, i) for i, row in enumerate(rows)), strict=True)
    batch = collator.processor(text=list(texts), images=list(images), return_tensors="pt", padding=True,
                               padding_side="right")
    batch.pop("token_type_ids", None)
    prompt_lengths = prompt_lengths_by_reprocessing(collator, rows)
    end_id = collator._end_id
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    for i, start in enumerate(prompt_lengths):
        ids = batch["input_ids"][i]
        length = int(batch["attention_mask"][i].sum())
        ends = (ids[start:length] == end_id).nonzero().flatten()
        stop = start + int(ends[0]) + 1 if len(ends) else length  # the answer through its <|im_end|>
        labels[i, start:stop] = ids[start:stop]
    batch["labels"] = labels
    return dict(batch)


class SeedTwoPassCollator:
    """The seed's collator as a drop-in data collator (for benchmarks/gpu_step.py's baseline stack)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, rows: list[dict]) -> dict:
        return seed_two_pass(self.collator, rows)


def check_identical(collator, batches: list[list[dict]]) -> int:
    import torch

    checked = 0
    for rows in batches:
        ours, seed = collator(rows), seed_two_pass(collator, rows)
        for key in ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw"):
            if not torch.equal(ours[key], seed[key]):
                raise SystemExit(f"LABEL CHECK FAILED: {key} differs between the two-pass and single-pass collators "
                                 f"on rows {[r['row_id'] for r in rows]}")
        checked += len(rows)
    return checked


def run(model_dir: Path, max_pixels: int, rows: list[dict], batch_size: int, repeat: int) -> dict:
    from job.collators.qwen3_collator import Qwen3VisionSFTCollator

    processor = load_processor_capped(model_dir, max_pixels)
    collator = Qwen3VisionSFTCollator(processor, training=True)
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    checked = check_identical(collator, batches)
    rendered = [tuple(zip(*(collator._render(row, i) for i, row in enumerate(b)), strict=True)) for b in batches]

    def floor():
        for texts, images in rendered:
            processor(text=list(texts), images=list(images), return_tensors="pt", padding=True, padding_side="right")

    def ours():
        for b in batches:
            collator(b)

    def seed():
        for b in batches:
            seed_two_pass(collator, b)

    times = {"floor": [], "ours": [], "seed": []}
    for _ in range(repeat):  # interleaved, so a slow spell on a shared box hits every variant alike
        for name, fn in (("seed", seed), ("ours", ours), ("floor", floor)):
            times[name].append(best_time(fn, repeat=1, warmup=0))
    best = {name: min(values) for name, values in times.items()}
    tokens = sum(int(collator(b)["attention_mask"].sum()) for b in batches)
    return {"max_pixels": max_pixels, "rows": len(rows), "checked": checked, "tokens_per_row": tokens / len(rows),
            **{f"{k}_rows_s": len(rows) / v for k, v in best.items()}, "b_over_a": best["seed"] / best["ours"],
            "b_over_c_time": best["ours"] / best["floor"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", help="tiny model assets directory (built there if missing; default .cache/bench)")
    parser.add_argument("--quick", action="store_true",
                        help="8 small rows, capped only, one repeat (for tests: the label check, not the timings)")
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a DataLoader worker uses 1)")
    args = parser.parse_args(argv)
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; {load_average()}")
    model_dir, _ = tiny_assets(args.assets)
    n_rows, repeat = (8, 1) if args.quick else (args.rows, args.repeat)
    rows = make_rows(n_rows, max_side=480 if args.quick else 1600)
    sizes = [r["image"].size for r in rows]
    print(f"{n_rows} rows, batch size {args.batch_size}, images {min(w * h for w, h in sizes) / 1e6:.2f}.."
          f"{max(w * h for w, h in sizes) / 1e6:.2f} Mpx (largest {max(sizes, key=lambda s: s[0] * s[1])}), "
          f"best of {repeat} (CPU time of this process, {args.threads} torch thread(s))")
    caps = (CAP,) if args.quick else (CAP, NO_CAP)  # loading a processor takes ~4 s here; quick mode loads one
    results = [run(model_dir, cap, rows, args.batch_size, repeat) for cap in caps]
    print(f"\n{'pixel cap':>12} {'tok/row':>8} {'(a) seed':>10} {'(b) ours':>10} {'(c) floor':>10}   rows/s")
    for r in results:
        print(f"{r['max_pixels']:12d} {r['tokens_per_row']:8.0f} {r['seed_rows_s']:10.2f} {r['ours_rows_s']:10.2f} "
              f"{r['floor_rows_s']:10.2f}")
    print()
    for r in results:
        cap = "capped 1024^2" if r["max_pixels"] == CAP else "uncapped 4096^2"
        print(f"LABELS identical (a) vs (b) [{cap}]: {r['checked']} rows")
        print(f"RESULT collator [{cap}] b/a speed-up={r['b_over_a']:.2f}x (goal >= 1.3 "
              f"{'met' if r['b_over_a'] >= 1.3 else 'NOT met'}) b/c time ratio={r['b_over_c_time']:.3f} "
              f"(goal <= 1.15 {'met' if r['b_over_c_time'] <= 1.15 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

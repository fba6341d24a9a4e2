"""Padding fraction of random batches vs LengthGroupedSampler batches (goal: <= 5% grouped at batch sizes 4 and 8).

    python -m benchmarks.padding [--assets DIR] [--quick]

Two length sets:
  * the demo dataset (job.demo.tiny), with the token estimate the preflight uses (job/data/checks.py: the collator's
    chat text tokenized + `visual_token_count` for the image size), at the job card's pixel range and at the
    `make demo` pixel range;
  * a long-tailed synthetic set typical of multimodal rows (benchmarks/common.py `skewed_lengths`: 64..1024 visual
    tokens from mixed image sizes plus 50..300 text tokens).
Padding fraction = pad tokens / all tokens processed, each batch right-padded to its longest row. The grouped figure
is the mean over 3 epochs (each epoch is a different order).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from benchmarks.common import machine, skewed_lengths, tiny_assets
from job.train.sampler import LengthGroupedSampler, padding_fraction

GOAL = 0.05
EPOCHS = 3


def demo_lengths(model_dir: Path, data_dir: Path, min_pixels: int, max_pixels: int) -> list[int]:
    """Token counts of the demo train split exactly as preflight estimates them (RowChecker._check_length)."""
    from transformers import AutoProcessor

    from job.collators.qwen3_collator import Qwen3VisionSFTCollator
    from job.data.checks import RowChecker
    from job.data.loaders import load_local_split

    processor = AutoProcessor.from_pretrained(str(model_dir), min_pixels=min_pixels, max_pixels=max_pixels)
    checker = RowChecker(Qwen3VisionSFTCollator(processor, training=True), label_field="label")
    rows = load_local_split(str(data_dir), "train")
    lengths = []
    for i in range(len(rows)):
        result = checker.check(rows[i], i)
        if result.errors or result.tokens is None:
            raise SystemExit(f"demo row {i} failed the preflight checks: {result.errors}")
        lengths.append(result.tokens)
    return lengths


def compare(name: str, lengths: list[int], batch_sizes: list[int], megabatch_mult: int = 50) -> list[tuple]:
    results = []
    for batch_size in batch_sizes:
        shuffled = list(range(len(lengths)))
        random_pad = 0.0
        grouped_pad = 0.0
        sampler = LengthGroupedSampler(lengths, batch_size=batch_size, seed=0, megabatch_mult=megabatch_mult)
        for epoch in range(EPOCHS):
            random.Random(epoch).shuffle(shuffled)
            random_pad += padding_fraction(lengths, shuffled, batch_size) / EPOCHS
            sampler.set_epoch(epoch)
            grouped_pad += padding_fraction(lengths, list(sampler), batch_size) / EPOCHS
        results.append((name, batch_size, random_pad, grouped_pad))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", help="tiny model assets directory (built there if missing; default .cache/bench)")
    parser.add_argument("--quick", action="store_true", help="one demo pixel range, 2,000 synthetic rows (for tests)")
    args = parser.parse_args(argv)

    print(f"machine: {machine()}")
    model_dir, data_dir = tiny_assets(args.assets)
    n_synthetic = 2000 if args.quick else 20000
    rows = []
    ranges = [("demo, card pixels 256^2..1024^2", (256 * 256, 1024 * 1024)),
              ("demo, make-demo pixels 64^2..128^2", (4096, 16384))]
    for label, (lo, hi) in ranges[:1] if args.quick else ranges:  # a processor load costs seconds
        lengths = demo_lengths(model_dir, data_dir, lo, hi)
        print(f"{label}: {len(lengths)} rows, tokens min {min(lengths)} median {sorted(lengths)[len(lengths) // 2]} "
              f"max {max(lengths)}")
        rows += compare(label, lengths, [4, 8])
    skewed = skewed_lengths(n_synthetic, seed=0)
    print(f"synthetic long-tailed: {len(skewed)} rows, tokens min {min(skewed)} median "
          f"{sorted(skewed)[len(skewed) // 2]} max {max(skewed)}")
    rows += compare("synthetic long-tailed", skewed, [2, 4, 8, 16])

    print(f"\n{'length set':38} {'batch':>5} {'random':>8} {'grouped':>8}  goal grouped <= {GOAL:.0%}")
    failed = False
    for name, batch_size, random_pad, grouped_pad in rows:
        ok = grouped_pad <= GOAL
        failed |= not ok and batch_size in (4, 8)
        print(f"{name:38} {batch_size:5d} {random_pad:8.2%} {grouped_pad:8.2%}  {'met' if ok else 'NOT met'}")

    print("\nmegabatch_mult sweep (synthetic, batch 8): a larger megabatch pads less but mixes less")
    for mult in (5, 10, 25, 50, 100):
        (_, _, random_pad, grouped_pad), = compare("synthetic", skewed, [8], megabatch_mult=mult)
        print(f"  megabatch_mult={mult:<4d} grouped {grouped_pad:6.2%} (random {random_pad:.2%})")
    for name, batch_size, random_pad, grouped_pad in rows:
        if batch_size in (4, 8):
            print(f"RESULT padding [{name}] batch={batch_size} random={random_pad:.4f} grouped={grouped_pad:.4f} "
                  f"goal<=0.05 {'met' if grouped_pad <= GOAL else 'NOT met'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

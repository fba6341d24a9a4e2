"""Eval throughput: batched left-padded greedy generation (batch 16) vs one row at a time (batch 1).

    python -m benchmarks.eval [--assets DIR] [--quick] [--rows N] [--max-new-tokens T] [--no-4bit]

Runs the job's real eval path, `job.eval.generate.evaluate_qwen3`, on the tiny Qwen3-VL (loaded by the job's
`load_model`: 4-bit NF4 through bitsandbytes, as in a run) over the demo validation rows, once with
SFT_EVAL_BATCH_SIZE=1 and once with 16, and checks that every row's decoded prediction is identical.
Goal: >= 5x rows/s at batch 16 on the CPU. The goal is judged on this process's CPU time with 1 torch thread
(wall time is printed too): on a shared machine wall time swings with other jobs, CPU time much less.

The tiny model's weights are random, so it rarely emits <|im_end|>: most rows generate the full max_new_tokens of
arbitrary tokens. That is the worst case for batching (no row stops early) and makes the equality check strict: a
single differing greedy step anywhere in a row changes its decoded string. The script prints how many distinct
predictions there are, so a check that passes only because every output is empty is visible.
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks.common import load_average, machine, tiny_assets

GOAL = 5.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", help="tiny model assets directory (built there if missing; default .cache/bench)")
    parser.add_argument(
        "--quick", action="store_true", help="8 rows, batch 8, 4 new tokens (for tests; no timing goal)"
    )
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-4bit", action="store_true", help="fp32 weights instead of the job's 4-bit NF4")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable CPU times on a shared box)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)

    from job.cards import ModelCards
    from job.collators.qwen3_collator import build_collators
    from job.config import build_cfg
    from job.data.loaders import load_local_split
    from job.eval.generate import evaluate_qwen3
    from job.model import load_model, load_processor

    rows, new_tokens = (8, 4) if args.quick else (args.rows, args.max_new_tokens)
    if args.quick:
        args.batch_size = 8
    print(f"machine: {machine()}; {load_average()}")
    model_dir, data_dir = tiny_assets(args.assets)
    cfg = build_cfg(ModelCards().qwen3_vl_8b_instruct, {
        "SFT_MODEL_ID": str(model_dir), "SFT_DATASET_URI": str(data_dir), "SFT_MAX_LENGTH": "512",
        "SFT_IMAGE_MIN_PIXELS": "4096", "SFT_IMAGE_MAX_PIXELS": "16384", "SFT_EVAL_MAX_NEW_TOKENS": str(new_tokens),
        "SFT_LOAD_IN_4BIT": "false" if args.no_4bit else "true",
    })
    processor = load_processor(cfg)
    model = load_model(cfg).eval()
    _, eval_collator = build_collators(cfg, processor)
    dataset = load_local_split(str(data_dir), "validation")
    dataset = dataset.select(range(min(rows, len(dataset))))
    print(f"{len(dataset)} rows, max_new_tokens {new_tokens}, 4-bit {cfg.model.load_in_4bit}, "
          f"torch threads {torch.get_num_threads()}")

    results = {}
    for batch_size in (1, args.batch_size):
        run_cfg = cfg.replace(eval={"batch_size": batch_size})
        evaluate_qwen3(model, processor, dataset.select(range(min(2, len(dataset)))), eval_collator, run_cfg)  # warm
        wall, cpu = time.perf_counter(), time.process_time()
        metrics = evaluate_qwen3(model, processor, dataset, eval_collator, run_cfg)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        results[batch_size] = (wall, cpu, [r["prediction"] for r in metrics["predictions"]])
        print(f"batch {batch_size:3d}: {len(dataset) / wall:7.2f} rows/s wall ({wall:.2f} s), "
              f"{len(dataset) / cpu:7.2f} rows/s per CPU-second ({cpu:.2f} s)")

    single, batched = results[1][2], results[args.batch_size][2]
    differ = [i for i, (a, b) in enumerate(zip(single, batched, strict=True)) if a != b]
    lengths = [len(processor.tokenizer.encode(p, add_special_tokens=False)) for p in single]
    print(f"predictions: {len(set(single))} distinct of {len(single)}, {sum(lengths) / len(lengths):.1f} tokens on "
          f"average (max {max(lengths)}); e.g. {single[0][:60]!r}")
    for i in differ[:5]:
        print(f"  row {i} differs:\n    batch 1:  {single[i]!r}\n    batch {args.batch_size}: {batched[i]!r}")
    wall_speedup = results[1][0] / results[args.batch_size][0]
    speedup = results[1][1] / results[args.batch_size][1]
    print(f"OUTPUTS identical per row (batch 1 vs {args.batch_size}): {not differ} ({len(single) - len(differ)}/"
          f"{len(single)} rows equal)")
    print(f"RESULT eval batch={args.batch_size} vs 1 speed-up={speedup:.2f}x CPU time ({wall_speedup:.2f}x wall) "
          f"(goal >= {GOAL:g} {'met' if speedup >= GOAL else 'NOT met'})")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

"""Eval throughput: batched left-padded greedy generation (batch 16) vs one row at a time (batch 1), and scoring.

    python -m benchmarks.eval [--assets DIR] [--quick] [--rows N] [--max-new-tokens T] [--min-pixels P] [--no-4bit]

Runs the job's real eval path, `job.eval.generate.evaluate_qwen3`, on the tiny Qwen3-VL (loaded by the job's
`load_model`: 4-bit NF4 through bitsandbytes, as in a run) over the demo validation rows, once with
SFT_EVAL_BATCH_SIZE=1 and once with 16, and checks that every row's decoded prediction is identical.
Goal: >= 5x rows/s at batch 16 on the CPU. The goal is judged on this process's CPU time with 1 torch thread
(wall time is printed too): on a shared machine wall time swings with other jobs, CPU time much less.

The tiny model's weights are random, so it rarely emits <|im_end|>: most rows generate the full max_new_tokens of
arbitrary tokens. That is the worst case for batching (no row stops early) and makes the equality check strict: a
single differing greedy step anywhere in a row changes its decoded string. The script prints how many distinct
predictions there are, so a check that passes only because every output is empty is visible.

Scoring mode (`job.eval.score.answer_log_probs`: one prefill per batch, each label continued from the KV cache) is
then timed on the same batches against its baseline, a plain forward of prompt + answer per label (what the scores
are checked against in tests/eval/test_generate.py), for the data's two labels and for five labels, and against the
generation above. It fails when an answer's log-probability differs by more than 1e-4 nats, or a label probability
by more than 1e-5, between the two (measured on the CPU: identical to the bit; positions off by 3 give 0.1 nats).
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks.common import load_average, machine, tiny_assets

GOAL = 5.0
SCORE_TOLERANCE = 1e-5  # on each label probability
LOG_PROB_TOLERANCE = 1e-4  # nats, on each answer's log-probability (a near-0/1 probability hides a wrong score)
FIVE_LABELS = ("red", "blue", "green", "yellow", "purple")


def per_label_forward_log_probs(model, batch: dict, answers: list[list[int]]):
    """The baseline: [rows, labels] log p(answer | prompt) from one cache-free forward of prompt + answer per label."""
    import torch

    from job.eval.score import token_log_probs, with_answer

    columns = []
    with torch.no_grad():
        for ids in answers:
            logits = model(**with_answer(batch, ids), logits_to_keep=len(ids) + 1, use_cache=False).logits
            columns.append(token_log_probs(logits[:, :-1, :], ids))  # position -(m+1) predicts the first token
    return torch.stack(columns, dim=1)


def compare_scoring(model, processor, dataset, eval_collator, batch_size: int,
                    label_sets: dict) -> tuple[bool, dict[str, float]]:
    """Times ours vs the baseline per label set (CPU time, interleaved, best of 2): (all probabilities agree, ours'
    CPU seconds per label set)."""
    import torch

    from job.eval.score import answer_log_probs

    batches = []
    for start in range(0, len(dataset), batch_size):
        batch = eval_collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch.pop("token_type_ids", None)
        batches.append(batch)
    agree, ours_cpu = True, {}
    for name, label_set in label_sets.items():
        answers = label_set.answer_ids(processor.tokenizer)
        times: dict[str, float] = {}
        scores: dict[str, torch.Tensor] = {}
        for _ in range(2):
            for variant, fn in (("ours", answer_log_probs), ("baseline", per_label_forward_log_probs)):
                cpu = time.process_time()
                scores[variant] = torch.cat([fn(model, batch, answers) for batch in batches])
                times[variant] = min(times.get(variant, float("inf")), time.process_time() - cpu)
        probs = {variant: torch.softmax(log_probs, dim=1) for variant, log_probs in scores.items()}
        diff = float((probs["ours"] - probs["baseline"]).abs().max())
        log_diff = float((scores["ours"] - scores["baseline"]).abs().max())
        same = diff <= SCORE_TOLERANCE and log_diff <= LOG_PROB_TOLERANCE
        agree = agree and same
        tokens = sorted({len(a) for a in answers})
        print(f"scoring [{name}]: {len(answers)} labels, answers {tokens[0]}-{tokens[-1]} tokens, prompts "
              f"{batches[0]['input_ids'].shape[1]} tokens wide; ours {times['ours']:.2f} s, baseline "
              f"{times['baseline']:.2f} s CPU; max |log-prob diff| {log_diff:.1e}, |prob diff| {diff:.1e} "
              f"(probabilities {float(probs['ours'].min()):.2g}..{float(probs['ours'].max()):.2g})")
        print(f"RESULT score [{name}] ours vs per-label forward speed-up={times['baseline'] / times['ours']:.2f}x "
              f"CPU time; scores agree (within {LOG_PROB_TOLERANCE:g} nats, {SCORE_TOLERANCE:g} in probability): "
              f"{same}")
        ours_cpu[name] = times["ours"]
    return agree, ours_cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", help="tiny model assets directory (built there if missing; default .cache/bench)")
    parser.add_argument(
        "--quick", action="store_true", help="8 rows, batch 8, 4 new tokens (for tests; no timing goal)"
    )
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--min-pixels", type=int, default=4096,
                        help="SFT_IMAGE_MIN_PIXELS: e.g. 262144 upscales the demo images to 256 visual tokens (an "
                             "8B run's images give ~1,000), so the prompt's share of the cost is nearer a real one")
    parser.add_argument("--no-4bit", action="store_true", help="fp32 weights instead of the job's 4-bit NF4")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable CPU times on a shared box)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)

    from job.cards import ModelCards
    from job.collators.qwen3_collator import build_collators
    from job.config.schema import build_cfg
    from job.data.loaders import load_local_split
    from job.eval.generate import evaluate_qwen3
    from job.eval.score import LabelSet
    from job.model import load_model, load_processor

    rows, new_tokens = (8, 4) if args.quick else (args.rows, args.max_new_tokens)
    if args.quick:
        args.batch_size = 8
    print(f"machine: {machine()}; {load_average()}")
    model_dir, data_dir = tiny_assets(args.assets)
    cfg = build_cfg(ModelCards().qwen3_vl_8b_instruct, {
        "SFT_MODEL_ID": str(model_dir), "SFT_DATASET_URI": str(data_dir), "SFT_MAX_LENGTH": "512",
        "SFT_IMAGE_MIN_PIXELS": str(args.min_pixels),
        "SFT_IMAGE_MAX_PIXELS": str(max(16384, args.min_pixels)), "SFT_EVAL_MAX_NEW_TOKENS": str(new_tokens),
        "SFT_LOAD_IN_4BIT": "false" if args.no_4bit else "true",
    })
    processor = load_processor(cfg.model, cfg.image, cfg.model.id)
    model = load_model(cfg.model, cfg.model.id).eval()
    _, eval_collator = build_collators(cfg.data, cfg.train.max_length, processor)
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

    label_sets = {
        "data": LabelSet.from_targets(list(dataset["target_json"]), "label"),
        "5 labels": LabelSet.from_targets([{"label": c} for c in FIVE_LABELS], "label"),
    }
    agree, ours_cpu = compare_scoring(model, processor, dataset, eval_collator, args.batch_size, label_sets)
    generate_cpu = results[args.batch_size][1]
    for name, cpu in ours_cpu.items():
        print(f"RESULT score [{name}] vs generation ({new_tokens} new tokens) CPU time ratio={cpu / generate_cpu:.2f}")
    return 1 if differ or not agree else 0


if __name__ == "__main__":
    sys.exit(main())

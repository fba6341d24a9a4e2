"""The shared classification runs (#19, tests/runs.py): an imbalanced 5-class colour task with eval during
training and the best step's adapter, uninterrupted (colour_run) and SIGTERMed then resumed (colour_resumed); its data
shaped as the public datasets are (#35: a card configuration, a ClassLabel target, no query column)."""

from __future__ import annotations

import io
import signal
from pathlib import Path

from helpers import job_env, noise_image
from PIL import Image
from runs_processes import DEADLINE_S, Run, completed_steps, log_has, wait_until
from runs_reference import NO_WANDB, Chain
from runs_scheduler import Ctx

COLOURS = {"red": (200, 30, 30), "blue": (30, 40, 200), "green": (30, 170, 50), "yellow": (220, 210, 40),
           "purple": (130, 40, 160)}
# The imbalance (red 128, blue 34, green 24, yellow 11, purple 3) scaled down; eval keeps every colour.
COLOUR_TRAIN = {"red": 32, "blue": 9, "green": 6, "yellow": 3, "purple": 1}
COLOUR_EVAL = {"red": 5, "blue": 3, "green": 2, "yellow": 1, "purple": 1}
# Enough steps that the tiny model starts writing parseable verdicts (agreement with generation is measured on them).
COLOUR_STEPS, COLOUR_EVERY = 20, 5
COLOUR = dict(SFT_MAX_STEPS=str(COLOUR_STEPS), SFT_SAVE_STEPS="5", SFT_SAVE_TOTAL_LIMIT="10",
              SFT_EVAL_STEPS=str(COLOUR_EVERY), SFT_PER_DEVICE_BATCH_SIZE="4", SFT_LEARNING_RATE="1e-2",
              SFT_EVAL_DURING_TRAIN_ROWS="8", SFT_EVAL_SUBSET="12", SFT_TRAIN_SUBSET="51", SFT_EVAL_MAX_NEW_TOKENS="12",
              SFT_LORA_DROPOUT="0.1", SFT_RUN_ID="colour", SFT_TASK_NAME="colour", SFT_PREEMPT_GRACE_S="60",
              SFT_SYSTEM_PROMPT="You name the main colour of an image. Answer with a single JSON object.",
              SFT_TASK_DESCRIPTION="Main colour of an image (5 colours): an image and a query in, a JSON label out.",
              **NO_WANDB)


# The data as the public datasets hold it (#35): no query column (the question is SFT_QUERY_TEXT), the colour a
# ClassLabel (SFT_TARGET_FORMAT=label), the splits a configuration of the card (SFT_DATASET_CONFIG).
COLOUR_QUERY = "What is the main colour? Answer in JSON."
COLOUR_DATA = dict(SFT_DATASET_CONFIG="colours", SFT_TARGET_FORMAT="label", SFT_TARGET_KEY="colour",
                   SFT_QUERY_TEXT=COLOUR_QUERY)


def colour_data(ctx: Ctx) -> Path:
    """COLOUR_TRAIN / COLOUR_EVAL rows of noisy solid-colour images, written with `datasets` as push_to_hub writes
    them: parquet shards under colours/ (the images embedded, the colour a ClassLabel of COLOURS), and a card whose
    configuration `colours` names them per split by glob."""
    import datasets
    from huggingface_hub import DatasetCardData

    root = ctx.tmp / "data"
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "colour": datasets.ClassLabel(names=list(COLOURS))})
    for split, counts in (("train", COLOUR_TRAIN), ("validation", COLOUR_EVAL)):
        rows = []
        for i, label in enumerate(label for label, n in counts.items() for _ in range(n)):
            noise = noise_image((64, 64), seed=i + (1000 if split == "validation" else 0))
            buf = io.BytesIO()
            Image.blend(Image.new("RGB", (64, 64), COLOURS[label]), noise, 0.25).save(buf, "PNG")
            rows.append({"id": f"{split}-{i}", "image": {"bytes": buf.getvalue(), "path": None},
                         "colour": list(COLOURS).index(label)})
        (root / "colours").mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows, features=features).to_parquet(
            str(root / "colours" / f"{split}-00000-of-00001.parquet"))
    card = DatasetCardData(configs=[{"config_name": "colours", "data_files": [
        {"split": split, "path": f"colours/{split}-*"} for split in ("train", "validation")]}])
    (root / "README.md").write_text(f"---\n{card.to_yaml()}\n---\n")
    return root


def _colour_env(ctx: Ctx, tmp: Path) -> dict[str, str]:
    return job_env(tmp, ctx.tiny_assets, ctx.environ, **COLOUR, **COLOUR_DATA, SFT_CACHE_DIR=str(tmp / "cache"),
                   SFT_DATASET_URI=str(ctx.result("colour_data")))


def colour_run(ctx: Ctx) -> Run:
    """COLOUR uninterrupted: evals every COLOUR_EVERY steps; the adapter saved is the best step's."""
    env = _colour_env(ctx, ctx.tmp)
    with ctx.slots.hold(ctx.priority):
        return Run(ctx.tmp, env, ctx.start(ctx.tmp, env).wait(timeout=DEADLINE_S))


def colour_resumed(ctx: Ctx) -> Chain:
    """COLOUR stopped by SIGTERM in the step after step 4's log line (step 5, an eval step, or step 6), then resumed
    to the end. stages: sigterm (exit code, COMPLETED steps), final (exit code,)."""
    chain = Chain(ctx.tmp)
    env = _colour_env(ctx, ctx.tmp)
    with ctx.slots.hold(ctx.priority):
        proc = ctx.start(ctx.tmp, env)
        line = log_has(ctx.tmp / "log.txt", rf"step {COLOUR_EVERY - 1}/{COLOUR_STEPS} ")
        wait_until(lambda: (ctx.tmp / "log.txt").is_file() and line(), proc, "the log line of the step before an eval")
        proc.send_signal(signal.SIGTERM)
        chain.stages["sigterm"] = (proc.wait(timeout=120), completed_steps(chain.out))
    with ctx.slots.hold(ctx.priority):
        chain.stages["final"] = (ctx.start(ctx.tmp, env).wait(timeout=DEADLINE_S),)
    return chain

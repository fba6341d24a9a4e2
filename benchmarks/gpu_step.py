"""Training-step throughput at the real 8B architecture: the seed's stack vs ours, in one run on one GPU.

    python -m benchmarks.gpu_step [--steps 10] [--warmup 3] [--batch-size 4] [--rows 256] [--work-dir DIR]
    python -m benchmarks.gpu_step --dry-run      # CPU, tiny model, 2 steps: checks the plumbing (a test runs it)
    python -m benchmarks.gpu_step --json results.jsonl --liger-ab --memory-probe 4096 --auto-batch --patch-embed-ab
                                                               # benchmarks/device/run.sh (the last two: gpu_auto.py)

What it does (GPU):
  1. builds `Qwen3VLForConditionalGeneration` from the 8B config (job/assets/qwen3_vl/config-8b-instruct.json, the
     public Qwen/Qwen3-VL-8B-Instruct architecture, see SOURCE.md there) with random weights, on the GPU in bf16,
     and saves it once to --work-dir (~17 GB of safetensors) with the real Qwen3VLProcessor (job.demo.tiny's builder:
     the 8B uses this exact tokenizer and image processor);
  2. loads it exactly as the job does (`job.model.load_model`: 4-bit NF4, vision tower and lm_head in bf16,
     gradient checkpointing) and applies the job's LoRA (`apply_lora`);
  3. trains --warmup + --steps steps with the job's own trainer (`job.train.trainer.build_trainer`: TRL SFTTrainer
     with the job's SFTConfig) on synthetic rows, for two stacks and two data sets:
       baseline (the seed): two-pass collator, random batches, SDPA attention, no Liger;
       ours:                single-pass collator, length-grouped batches, FlashAttention-2 (when flash-attn is
                            installed), Liger kernels (when liger-kernel is installed);
       data "fixed": one 1024x768 image + ~150 text tokens per row; data "mixed": images of mixed sizes up to
                            1600x1200 + 50..300 text tokens.
     The baseline runs first: Liger patches are process-wide and cannot be undone.

Options for the device run (benchmarks/device/run.sh): --json FILE appends one JSON line per finished measurement
(so a run cut off by a timeout keeps what it measured); --liger-ab measures ours without Liger first, then with it
(Liger patches cannot be undone); --memory-probe N trains --probe-steps steps at batch 1 on one row of nearly N
tokens (an image at the card's pixel cap plus a caption that fills the rest) with the job's settings (gradient
checkpointing on) and reports the peak memory, before and after Liger with --liger-ab.

Printed per (stack, data): trained tokens/s (non-pad tokens through the model per second of wall time, data
loading included), median step time, padding fraction, peak GPU memory (torch.cuda.max_memory_allocated) and MFU.

MFU convention (model FLOPs, not hardware FLOPs): per non-pad token 4 * N_lm FLOPs, where N_lm is the language
model's matmul parameters (36 layers of attention + MLP projections, 6.95B; embeddings and the LM head excluded:
TRL's fused LM head only projects the supervised positions). 4 = 2 (forward) + 2 (backward through the
activations); the frozen 4-bit weights get no weight gradient, LoRA's own FLOPs (<1%) and attention's
quadratic term are left out, and gradient checkpointing's recomputed forward is not counted (it is overhead, not
useful work). Plus 2 * N_vis per vision patch for the frozen vision tower's forward (no backward: nothing before
it is trainable). Divided by the step time and the GPU's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s; override
with --peak-tflops).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import load_average, machine, mixed_image_sizes, tiny_assets
from benchmarks.gpu_auto import add_options, auto_micro_batch, measure_auto_batch, measure_vision

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
WORDS = ("oh great another monday wow love waiting line fantastic phone died again sure because traffic so much fun "
         "perfect weather picnic said no one thanks spam really sunny day park dinner family tonight new book arrived "
         "morning run lake fresh bread bakery team won match").split()


# -- the model -----------------------------------------------------------------------------------------------------
def build_random_8b(model_dir: Path) -> None:
    """Random-weight Qwen3-VL-8B in bf16, saved once with the real processor (skipped when already complete)."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from job.demo.tiny import build_tiny_processor, load_asset_json

    marker = model_dir / ".complete"
    if marker.exists():
        print(f"random 8B model: reusing {model_dir}")
        return
    started = time.monotonic()
    full = load_asset_json("config-8b-instruct.json")
    top = {k: v for k, v in full.items() if k not in ("text_config", "vision_config", "architectures")}
    config = Qwen3VLConfig(text_config=full["text_config"], vision_config=full["vision_config"], **top)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(model_dir, max_shard_size="5GB")
    build_tiny_processor().save_pretrained(model_dir)
    marker.write_text("ok\n")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    print(f"random 8B model: built and saved to {model_dir} in {time.monotonic() - started:.0f} s")


def lm_matmul_params(text_config) -> int:
    """Attention + MLP projection parameters of the language model (what 4 * N * tokens counts)."""
    h, heads, kv = text_config.hidden_size, text_config.num_attention_heads, text_config.num_key_value_heads
    head_dim = getattr(text_config, "head_dim", None) or h // heads
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2
    mlp = 3 * h * text_config.intermediate_size
    return text_config.num_hidden_layers * (attn + mlp)


def emit(path: str | None, record: dict) -> None:
    """Append one JSON line to --json (flushed at once: a timeout that kills the process keeps the lines)."""
    if not path:
        return
    clean = {k: (None if isinstance(v, float) and v != v else v) for k, v in record.items()}  # NaN is not JSON
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(clean, sort_keys=True) + "\n")


# -- the data ------------------------------------------------------------------------------------------------------
def smooth_image(size: tuple[int, int], seed: int):
    """A photo-like image (smooth colour fields plus a little grain): decodes and compresses like a photo."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    base = Image.fromarray(rng.integers(0, 256, size=(max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8), "RGB")
    image = np.asarray(base.resize((w, h), Image.BICUBIC), dtype=np.int16)
    image = image + rng.integers(-8, 9, size=image.shape, dtype=np.int16)
    return Image.fromarray(image.clip(0, 255).astype(np.uint8), "RGB")


def write_rows(root: Path, kind: str, n: int, seed: int, short_text: bool = False) -> list[dict]:
    """JPEG files plus rows: 'fixed' = 1024x768 + ~150 text tokens; 'mixed' = mixed sizes + 50..300 text tokens.

    short_text (the CPU dry run): captions of a few words; on a CPU the step time grows with the token count.
    """
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    sizes = [(1024, 768)] * n if kind == "fixed" else mixed_image_sizes(n, seed=seed)
    rows = []
    for i, size in enumerate(sizes):
        path = root / f"{kind}-{i:05d}.jpg"
        if not path.exists():
            smooth_image(size, seed * 100_003 + i).save(path, quality=90)
        # ~1.3 tokens per word; the chat template, system prompt and query add ~60 tokens.
        words = rng.randint(55, 90) if kind == "fixed" else int(min(240, max(0, rng.lognormvariate(3.6, 0.8))))
        if short_text:
            words //= 8
        caption = " ".join(rng.choice(WORDS) for _ in range(words)) or None
        label = rng.choice(["sarcastic", "not_sarcastic"])
        rows.append({"row_id": f"{kind}-{i}", "image": str(path), "caption": caption,
                     "query": "Is this post sarcastic? Answer in JSON.", "target_json": json.dumps({"label": label})})
    return rows


def to_dataset(rows: list[dict], collator, label_field: str):
    """The rows as the trainer sees them after preflight: a datasets.Dataset with the token-count column."""
    import datasets

    from job.data.checks import RowChecker

    try:
        from job.data.loaders import LENGTH_COLUMN
    except ImportError:  # pragma: no cover - older layout
        LENGTH_COLUMN = "sft_num_tokens"
    checker = RowChecker(collator, label_field)
    lengths, visual = [], []
    for i, row in enumerate(rows):
        result = checker.check(row, i)
        if result.errors:
            raise SystemExit(f"synthetic row {i} fails preflight: {result.errors}")
        lengths.append(result.tokens)
        visual.append(result.visual_tokens)
    ds = datasets.Dataset.from_list(rows).add_column(LENGTH_COLUMN, lengths)
    text = [t - v for t, v in zip(lengths, visual, strict=True)]
    print(f"  {len(rows)} rows: tokens median {statistics.median(lengths):.0f} (visual {min(visual)}..{max(visual)}, "
          f"text {min(text)}..{max(text)}, median {statistics.median(text):.0f})")
    return ds


def probe_rows(root: Path, collator, label_field: str, target: int, size: tuple[int, int], n: int) -> list[dict]:
    """n copies of one row of at most `target` tokens: one `size` image plus a caption long enough to fill the rest.

    Token counts come from the job's own RowChecker (text tokens + visual tokens), so the row is what preflight would
    measure; the caption length is solved from two probes (tokens are affine in the word count) and trimmed.
    """
    from job.data.checks import RowChecker

    checker = RowChecker(collator, label_field)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"probe-{size[0]}x{size[1]}.jpg"
    if not path.exists():
        smooth_image(size, 7).save(path, quality=90)
    rng = random.Random(7)
    words = [rng.choice(WORDS) for _ in range(20_000)]

    def row(n_words: int) -> dict:
        return {"row_id": "probe", "image": str(path), "caption": " ".join(words[:n_words]) or None,
                "query": "Is this post sarcastic? Answer in JSON.", "target_json": json.dumps({"label": "sarcastic"})}

    def tokens(n_words: int) -> int:
        result = checker.check(row(n_words), 0)
        if result.errors and not all(e.kind == "too_long" for e in result.errors):
            raise SystemExit(f"probe row fails preflight: {result.errors}")
        return result.tokens

    low, high = 10, 400
    t_low, t_high = tokens(low), tokens(high)
    slope = (t_high - t_low) / (high - low)
    n_words = max(0, low + int((target - t_low) / slope))
    for _ in range(20):
        t = tokens(n_words)
        if t <= target:
            break
        n_words -= max(1, int((t - target) / slope))
    print(f"  probe row: {t} tokens (target {target}): image {size[0]}x{size[1]}, caption {n_words} words")
    return [row(n_words) for _ in range(n)]


# -- measuring -----------------------------------------------------------------------------------------------------
class Meter:
    """Counts what goes through the model's backbone (a forward pre-hook) and times each optimizer step."""

    def __init__(self, backbone, cuda: bool):
        import torch

        self.cuda = cuda
        self.tokens = self.padded = self.patches = 0
        self.marks: list[tuple[float, int, int, int]] = []  # (time, tokens, padded, patches) at each step end
        self.started = (time.perf_counter(), 0, 0, 0)
        self._sync = torch.cuda.synchronize if cuda else (lambda: None)
        self._handle = backbone.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        ids, mask, grid = kwargs.get("input_ids"), kwargs.get("attention_mask"), kwargs.get("image_grid_thw")
        if ids is None or not module.training:
            return
        self.padded += ids.numel()
        self.tokens += int(mask.sum()) if mask is not None else ids.numel()
        if grid is not None:
            self.patches += int(grid.prod(dim=-1).sum())

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class _StepEnd(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                meter._sync()
                meter.started = (time.perf_counter(), meter.tokens, meter.padded, meter.patches)

            def on_step_end(self, args, state, control, **kwargs):
                meter._sync()
                meter.marks.append((time.perf_counter(), meter.tokens, meter.padded, meter.patches))

        return _StepEnd()

    def close(self) -> None:
        self._handle.remove()

    def summary(self, warmup: int) -> dict:
        """Figures over the steps after `warmup`: from the warm-up's last step end (or the train start) onwards."""
        start = self.marks[warmup - 1] if warmup > 0 else self.started
        measured = self.marks[warmup:]
        if not measured:
            raise SystemExit("not enough steps to measure: raise --steps")
        end = measured[-1]
        elapsed = end[0] - start[0]
        steps = [b[0] - a[0] for a, b in zip([start, *measured[:-1]], measured, strict=True)]
        tokens, padded, patches = end[1] - start[1], end[2] - start[2], end[3] - start[3]
        return {"steps": len(measured), "elapsed": elapsed, "step_s": statistics.median(steps), "tokens": tokens,
                "patches": patches, "tokens_s": tokens / elapsed, "pad": 1 - tokens / padded if padded else 0.0}


# -- the two stacks ------------------------------------------------------------------------------------------------
def run_stack(stack: str, data: str, cfg, model, processor, collator, dataset, args, out_dir: Path, n_lm, n_vis,
              peak_tflops, train_overrides: dict | None = None, warmup: int | None = None):
    import torch

    from job.train.preemption import PreemptionGuard
    from job.train.trainer import Checkpointing, TrainingData, build_trainer

    cuda = torch.cuda.is_available()
    stack_cfg = cfg.replace(train={"group_by_length": stack != "baseline", **(train_overrides or {})})
    saving = Checkpointing(out_dir / f"{stack}-{data}", PreemptionGuard(grace_s=60.0))
    trainer, _, _ = build_trainer(stack_cfg, model, TrainingData(processor, collator, dataset), saving,
                                  f"bench-{stack}-{data}", [])
    trainer.args.save_strategy = "no"  # a benchmark: no checkpoints
    searched = auto_micro_batch(stack_cfg, trainer, dataset, collator)
    sampler = type(trainer._get_train_sampler()).__name__
    meter = Meter(model.get_base_model().model, cuda)
    trainer.add_callback(meter.callback())
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.train()
    finally:
        meter.close()
    result = meter.summary(args.warmup if warmup is None else warmup)
    flops = 4 * n_lm * result["tokens"] + 2 * n_vis * result["patches"]
    result.update(stack=stack, data=data, sampler=sampler, **searched,
                  batch_size=trainer.args.per_device_train_batch_size,
                  grad_accum=trainer.args.gradient_accumulation_steps,
                  gradient_checkpointing=cfg.model.gradient_checkpointing,
                  peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
                  peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan"),
                  mfu=flops / result["elapsed"] / (peak_tflops * 1e12) if peak_tflops else None)
    del trainer
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny model, 2 steps (1 warm-up + 1 measured) per (stack, data): the same table")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per (stack, data)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (CUDA init, autotuning)")
    parser.add_argument("--batch-size", type=int, default=4, help="per-device batch size")
    parser.add_argument("--rows", type=int, default=256, help="rows per synthetic data set")
    parser.add_argument("--workers", type=int, default=None, help="dataloader workers (default: the job's)")
    parser.add_argument("--work-dir", default=None, help="model, images and outputs (default: a temp dir; the "
                        "~17 GB random model is reused when --work-dir is given again)")
    parser.add_argument("--assets", help="--dry-run: job.demo.tiny assets directory (default .cache/bench)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU, for MFU")
    parser.add_argument("--no-fa2", action="store_true", help="ours: keep sdpa (to isolate FlashAttention-2's share)")
    parser.add_argument("--no-liger", action="store_true", help="ours: no Liger kernels (to isolate their share)")
    parser.add_argument("--liger-ab", action="store_true",
                        help="where Liger applies: measure ours without it first (stack ours-noliger), then with it")
    parser.add_argument("--memory-probe", type=int, default=0, metavar="TOKENS",
                        help="peak memory of batch-1 steps on one row of about TOKENS tokens (0: off; the dry run "
                        "caps it at 160 tokens and --warmup + 1 steps)")
    parser.add_argument("--probe-steps", type=int, default=3,
                        help="--memory-probe: steps (the first is warm-up unless --warmup 0)")
    parser.add_argument("--json", default=None, metavar="FILE", help="append one JSON line per measurement")
    add_options(parser)
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("no CUDA device: run on a GPU, or pass --dry-run for the CPU plumbing check", file=sys.stderr)
        return 2
    if args.dry_run:  # 2 steps per (stack, data): 1 warm-up + 1 measured (--warmup 0: 1); 1 torch thread (CI boxes
        # are small)
        args.steps, args.warmup = 1, min(args.warmup, 1)
        args.rows, args.batch_size = min(args.rows, 8), min(args.batch_size, 2)
        torch.set_num_threads(1)
    print(f"machine: {machine()}; {load_average()}")
    if args.work_dir:
        return _run(args, Path(args.work_dir), cuda)
    with tempfile.TemporaryDirectory(prefix="gpu-step-") as tmp:
        return _run(args, Path(tmp), cuda)


def _run(args, work: Path, cuda: bool) -> int:
    import torch

    from benchmarks.collator import SeedTwoPassCollator
    from job.cards import ModelCards
    from job.collators.qwen3_collator import build_collators
    from job.config.schema import build_cfg
    from job.model import (
        apply_liger,
        apply_lora,
        liger_wanted,
        load_model,
        load_processor,
        resolve_attn_implementation,
    )

    if args.dry_run:
        model_dir, _ = tiny_assets(args.assets)
    else:
        model_dir = work / "qwen3-vl-8b-random"
        build_random_8b(model_dir)

    env = {
        "SFT_MODEL_ID": str(model_dir), "SFT_OUTPUT_DIR": str(work / "out"), "SFT_WANDB_ENABLED": "false",
        "SFT_PER_DEVICE_BATCH_SIZE": str(args.batch_size), "SFT_GRAD_ACCUM": "1",
        "SFT_MAX_STEPS": str(args.warmup + args.steps), "SFT_SAVE_STEPS": str(args.warmup + args.steps),
        "SFT_LOGGING_STEPS": "1000", "SFT_MAX_LENGTH": "4096", "SFT_WARMUP_RATIO": "0",
        "SFT_ATTN_IMPLEMENTATION": "sdpa",  # the baseline's; ours switches to flash_attention_2 when it can
    }
    if args.workers is not None:
        env["SFT_DATALOADER_NUM_WORKERS"] = str(args.workers)
    if args.dry_run:  # small images and no workers or checkpointing: seconds on a CPU
        env.update(SFT_IMAGE_MIN_PIXELS="4096", SFT_IMAGE_MAX_PIXELS="16384", SFT_DATALOADER_NUM_WORKERS="0",
                   SFT_GRADIENT_CHECKPOINTING="false")
    cfg = build_cfg(ModelCards().qwen3_vl_8b_instruct, env)
    processor = load_processor(cfg.model, cfg.image, cfg.model.id)
    collator, _ = build_collators(cfg.data, cfg.train.max_length, processor)
    print("data:")
    datasets_ = {}
    for n, kind in enumerate(("fixed", "mixed")):
        rows = write_rows(work / "images", kind, args.rows, seed=n, short_text=args.dry_run)
        datasets_[kind] = to_dataset(rows, collator, cfg.data.label_field)

    started = time.monotonic()
    model = apply_lora(load_model(cfg.model, cfg.model.id), cfg.model, cfg.lora)
    base = model.get_base_model()
    n_lm = lm_matmul_params(base.config.text_config)
    n_vis = sum(p.numel() for p in base.model.visual.parameters())
    print(f"model: loaded 4-bit={cfg.model.load_in_4bit} + LoRA in {time.monotonic() - started:.0f} s; "
          f"N_lm={n_lm / 1e6:,.1f}M (matmul), N_vis={n_vis / 1e6:,.1f}M")
    peak = args.peak_tflops
    if peak is None and cuda:
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)

    results = []

    def measure(stack: str, data: str, use_collator, ds, **kwargs) -> None:
        result = run_stack(stack, data, cfg, model, processor, use_collator, ds, args, work, n_lm, n_vis, peak,
                           **kwargs)
        result.update(kind="probe" if stack.startswith("probe") else "step", attn=state["attn"], liger=state["liger"],
                      dry_run=args.dry_run, gpu=torch.cuda.get_device_name(0) if cuda else None)
        results.append(result)
        emit(args.json, result)

    state = {"attn": "sdpa", "liger": False}  # what the next measurement runs with
    baseline_collator = SeedTwoPassCollator(collator)
    for data, ds in datasets_.items():
        measure("baseline", data, baseline_collator, ds)
    attn = "sdpa" if args.no_fa2 else resolve_attn_implementation("auto")
    if attn != base.config._attn_implementation:
        try:
            base.set_attn_implementation(attn)
        except Exception as exc:  # noqa: BLE001 - report and measure the rest rather than lose the GPU time
            print(f"ours: cannot switch to {attn} ({type(exc).__name__}: {exc}); staying on sdpa")
            attn = "sdpa"
    state["attn"] = attn
    liger_model = cfg.replace(model={"use_liger": "auto"}).model
    probe = _probe_dataset(args, cfg, collator, work) if args.memory_probe else None
    probe_warmup = min(1, args.warmup)
    probe_steps = probe_warmup + 1 if args.dry_run else max(probe_warmup + 1, args.probe_steps)
    probe_train = {"per_device_batch_size": 1, "max_steps": probe_steps}
    if args.liger_ab and not args.no_liger and liger_wanted(liger_model):
        for data, ds in datasets_.items():
            measure("ours-noliger", data, collator, ds)
        if probe is not None:
            measure("probe-noliger", probe[0], collator, probe[1], train_overrides=probe_train, warmup=probe_warmup)
    elif args.liger_ab:
        print("--liger-ab: Liger does not apply here (no CUDA or no liger-kernel): one 'ours' stack only")
    liger = False if args.no_liger else apply_liger(liger_model, model)
    state["liger"] = liger
    for data, ds in datasets_.items():
        measure("ours", data, collator, ds)
    if probe is not None:
        measure("probe", probe[0], collator, probe[1], train_overrides=probe_train, warmup=probe_warmup)
    if args.patch_embed_ab:
        measure_vision(model, collator, datasets_["fixed"], args)
    if args.auto_batch:
        measure_auto_batch(measure, results, datasets_["mixed"], collator, args)

    stacks = {
        "baseline": "two-pass collator, random batches, sdpa, no Liger",
        "ours": f"single-pass collator, grouped batches, {attn}, Liger {'on' if liger else 'off (not available)'}",
    }
    if any(r["stack"] == "ours-noliger" for r in results):
        stacks["ours-noliger"] = "as ours, Liger off"
    print("\nstacks: " + "; ".join(f"{name} = {text}" for name, text in stacks.items()))
    print(f"batch {args.batch_size}, {args.warmup} warm-up + {args.steps} measured steps, peak bf16 "
          f"{f'{peak:g} TFLOP/s' if peak else 'unknown (MFU n/a)'}"
          + ("  [DRY RUN: CPU, tiny model; not a measurement]" if args.dry_run else ""))
    print(f"{'stack':13} {'data':6} {'sampler':22} {'tokens/s':>10} {'step s':>8} {'pad':>6} {'peak GiB':>9} "
          f"{'MFU':>6}")
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"{r['stack']:13} {r['data']:6} {r['sampler']:22} {r['tokens_s']:10.1f} {r['step_s']:8.3f} "
              f"{r['pad']:6.1%} {r['peak_gib']:9.2f} {mfu:>6}")
    dry = " (dry run)" if args.dry_run else ""
    for data in datasets_:
        base_r = next(r for r in results if r["stack"] == "baseline" and r["data"] == data)
        for name in ("ours-noliger", "ours"):
            ours_r = next((r for r in results if r["stack"] == name and r["data"] == data), None)
            if ours_r is None:
                continue
            ratios = {"tokens_s": ours_r["tokens_s"] / base_r["tokens_s"],
                      "step_s": ours_r["step_s"] / base_r["step_s"],
                      "peak": ours_r["peak_gib"] / base_r["peak_gib"] if cuda else float("nan")}
            label = "ours/baseline" if name == "ours" else f"{name}/baseline"
            print(f"RESULT gpu_step [{data}] {label} tokens/s={ratios['tokens_s']:.2f}x "
                  f"step time ratio={ratios['step_s']:.2f} peak memory ratio={ratios['peak']:.2f}{dry}")
            emit(args.json, {"kind": "ratio", "stack": name, "data": data, "vs": "baseline", "dry_run": args.dry_run,
                             "tokens_s_ratio": ratios["tokens_s"], "step_s_ratio": ratios["step_s"],
                             "peak_ratio": ratios["peak"]})
    for r in results:
        if r["kind"] == "probe":
            print(f"RESULT gpu_step [probe {r['data']}] {r['stack']} batch 1, gradient checkpointing "
                  f"{'on' if r['gradient_checkpointing'] else 'off'}, Liger {'on' if r['liger'] else 'off'}: peak "
                  f"{r['peak_gib']:.2f} GiB allocated ({r['peak_gib'] * 2**30 / 1e9:.2f} GB), "
                  f"{r['peak_reserved_gib']:.2f} GiB reserved; step {r['step_s']:.3f} s{dry}")
    return 0


def _probe_dataset(args, cfg, collator, work: Path):
    """(name, dataset) of the memory probe: --probe-steps copies of one row of about --memory-probe tokens.

    The image is at the pixel cap (the card's 1024x1024 = 1024 visual tokens; 128x128 in the dry run), so the row
    is one the job would train at SFT_MAX_LENGTH=N; the caption fills the tokens the image leaves.
    """
    # The dry run's tiny model still has the 151,936-word LM head: a 500-token CPU step took 11 s, 160 tokens ~2 s.
    target = min(args.memory_probe, 160) if args.dry_run else args.memory_probe
    if target > cfg.train.max_length:
        raise SystemExit(f"--memory-probe {target} is over SFT_MAX_LENGTH={cfg.train.max_length}")
    side = 128 if args.dry_run else 1024
    print("memory probe data:")
    rows = probe_rows(work / "images", collator, cfg.data.label_field, target - 8, (side, side),
                      max(2, args.probe_steps))
    return f"{target}", to_dataset(rows, collator, cfg.data.label_field)


if __name__ == "__main__":
    sys.exit(main())

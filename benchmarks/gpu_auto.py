"""The GPU kit's measurements for issue #36, run by benchmarks/gpu_step.py (benchmarks/device/run.sh passes both):

--auto-batch: the micro-batch SFT_PER_DEVICE_BATCH_SIZE=auto picks on this GPU (job/train/micro_batch.py: its tries,
  their peak memory and seconds), then trained tokens/s at that size against batch 2 with the same effective batch
  (2 x --auto-accum rows per optimizer step; the accumulation makes up the rest), and the peak memory of both.
  Stacks "auto" and "batch2" on the mixed data set, ours (grouped batches); a ratio line auto/batch2.
--patch-embed-ab: the vision tower's forward on a batch of the fixed data set (1024x768 images), with the patch
  embedding as a GEMM (job/patch_embed.py, what the job runs) and with the Conv3d forward put back.
"""

from __future__ import annotations

from benchmarks.patch_embed import vision_forward_s


def add_options(parser) -> None:
    parser.add_argument("--auto-batch", action="store_true",
                        help="the micro-batch auto picks here, and tokens/s at it vs batch 2 (same effective batch)")
    parser.add_argument("--auto-accum", type=int, default=4,
                        help="--auto-batch: SFT_GRAD_ACCUM, so the effective batch is 2 x this rows per step")
    parser.add_argument("--patch-embed-ab", action="store_true",
                        help="the vision forward with the patch embedding as a GEMM and as the Conv3d")


def auto_micro_batch(cfg, trainer, dataset, collator) -> dict:
    """For a stack configured with SFT_PER_DEVICE_BATCH_SIZE=auto: the job's search, its choice set on the trainer,
    and what it measured (empty for an integer size)."""
    import time

    from job.train import micro_batch

    if cfg.train.per_device_batch_size != micro_batch.AUTO:
        return {}
    started = time.monotonic()
    chosen = micro_batch.searched(cfg, trainer, dataset, collator, dict(trainer.memory_settings))
    trainer.use_micro_batch(chosen.size, chosen.grad_accum)
    return {"search_s": time.monotonic() - started, "search": chosen.to_json()}


def measure_auto_batch(measure, results: list[dict], dataset, collator, args) -> None:
    """Stacks auto and batch2 (same effective batch), then their ratio, printed and emitted."""
    from benchmarks.gpu_step import emit

    accum = args.auto_accum
    measure("auto", "mixed", collator, dataset, train_overrides={"per_device_batch_size": "auto", "grad_accum": accum})
    measure("batch2", "mixed", collator, dataset, train_overrides={"per_device_batch_size": 2, "grad_accum": accum})
    auto, two = results[-2], results[-1]
    search = auto["search"]
    tried = ", ".join(f"{t['rows']} {t['outcome']}" + (f" ({t['peak_bytes'] / 2**30:.1f} GiB)" if t["peak_bytes"]
                                                          else "") for t in search["trials"])
    record = {"kind": "auto_batch", "dry_run": args.dry_run, "picked": search["size"],
              "grad_accum": search["grad_accum"], "effective": search["effective"], "tried": search["trials"],
              "device_bytes": search["device_bytes"], "tokens_s_ratio": auto["tokens_s"] / two["tokens_s"],
              "auto_peak_gib": auto["peak_gib"], "batch2_peak_gib": two["peak_gib"], "search_s": auto["search_s"]}
    print(f"RESULT gpu_step [auto batch] picked {search['size']} row(s) x {search['grad_accum']} accumulation "
          f"(effective {search['effective']}; tried {tried}; search {auto['search_s']:.1f} s): tokens/s "
          f"auto/batch2={record['tokens_s_ratio']:.2f}x, peak {auto['peak_gib']:.2f} vs {two['peak_gib']:.2f} GiB"
          + (" (dry run)" if args.dry_run else ""))
    emit(args.json, record)


def measure_vision(model, collator, dataset, args) -> None:
    """The vision tower's forward time with the GEMM and with the Conv3d, on the first rows of `dataset`."""
    import torch

    from benchmarks.gpu_step import emit

    batch = collator([dataset[i] for i in range(min(len(dataset), args.batch_size))])
    device = next(model.parameters()).device
    pixels, grid = batch["pixel_values"].to(device), batch["image_grid_thw"].to(device)
    timed = vision_forward_s(model, pixels, grid, repeats=2 if args.dry_run else 10)
    record = {"kind": "vision", "dry_run": args.dry_run, "patches": int(grid.prod(dim=-1).sum()),
              "rows": int(grid.shape[0]), "torch": torch.__version__, **timed}
    print(f"RESULT gpu_step [vision forward] {record['rows']} image(s), {record['patches']} patches: conv3d "
          f"{timed['vision_conv_s'] * 1e3:.1f} ms, gemm {timed['vision_gemm_s'] * 1e3:.1f} ms: conv/gemm "
          f"{timed['vision_speedup']:.2f}x (torch {torch.__version__})" + (" (dry run)" if args.dry_run else ""))
    emit(args.json, record)

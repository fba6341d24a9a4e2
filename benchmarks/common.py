"""Shared pieces of the benchmarks: the tiny assets, synthetic long-tailed lengths and mixed-size images, timing."""

from __future__ import annotations

import os
import platform
import random
import time
from pathlib import Path

from benchmarks import REPO

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

DEFAULT_ASSETS = REPO / ".cache" / "bench"
# Image sizes of a mixed multimodal dataset: phone photos, screenshots, memes, banners (width, height).
ASPECTS = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (3, 2), (2, 1), (1, 3))


def tiny_assets(path: str | Path | None = None) -> tuple[Path, Path]:
    """(model_dir, data_dir) of job.demo.tiny's offline Qwen3-VL, built once into `path` (default .cache/bench)."""
    from job.demo.tiny import build_demo_assets

    return build_demo_assets(Path(path) if path else DEFAULT_ASSETS)


def mixed_image_sizes(n: int, seed: int = 0, max_side: int = 1600) -> list[tuple[int, int]]:
    """(width, height) pairs: log-uniform area from ~0.05 to ~1.9 Mpx, assorted aspect ratios, sides <= max_side."""
    rng = random.Random(seed)
    sizes = []
    for _ in range(n):
        aw, ah = rng.choice(ASPECTS)
        area = 10 ** rng.uniform(4.7, 6.3)
        scale = (area / (aw * ah)) ** 0.5
        w, h = max(32, int(aw * scale)), max(32, int(ah * scale))
        shrink = min(1.0, max_side / max(w, h), (max_side * 3 // 4) / min(w, h))
        sizes.append((max(32, int(w * shrink)), max(32, int(h * shrink))))
    return sizes


def skewed_lengths(n: int, seed: int = 0, min_pixels: int = 256 * 256, max_pixels: int = 1024 * 1024) -> list[int]:
    """Token counts of long-tailed multimodal rows: visual tokens 64..1024 plus 50..300 text tokens.

    Visual tokens are what Qwen3-VL's image processor produces (`smart_resize` to multiples of 32 px within
    [min_pixels, max_pixels], one token per 32x32 px) for lognormal image areas (median ~0.3 Mpx, a long tail of
    large photos) of assorted aspect ratios. Text tokens are lognormal (median ~90) clipped to 50..300.
    """
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    rng = random.Random(seed)
    lengths = []
    for _ in range(n):
        aw, ah = rng.choice(ASPECTS)
        area = min(rng.lognormvariate(12.6, 1.0), 8e6)
        scale = (area / (aw * ah)) ** 0.5
        h, w = smart_resize(max(32, int(ah * scale)), max(32, int(aw * scale)), factor=32,
                            min_pixels=min_pixels, max_pixels=max_pixels)
        text = int(min(300, max(50, rng.lognormvariate(4.5, 0.5))))
        lengths.append((h // 32) * (w // 32) + text)
    return lengths


def draw_image(size: tuple[int, int], seed: int):
    """A noisy RGB image (noise so no codec or resize shortcut makes it cheaper than a photo)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


def best_time(fn, repeat: int, warmup: int = 1, clock=time.process_time) -> float:
    """Minimum time of `fn()` over `repeat` runs (after `warmup` runs).

    The default clock is this process's CPU time, not wall time: the benchmarks run on shared machines where other
    jobs come and go, and CPU time with one torch thread (what a DataLoader worker uses) barely moves when the box
    is busy, while wall time can double. Pass clock=time.perf_counter for wall time.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        started = clock()
        fn()
        times.append(clock() - started)
    return min(times)


def load_average() -> str:
    try:
        return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "load average unknown"


def machine() -> str:
    import torch
    import transformers

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPUs ({cpu}), torch threads {torch.get_num_threads()}, {gpu}; "
            f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")

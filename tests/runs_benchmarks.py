"""The shared benchmark run (tests/runs.py): benchmarks/*.py in their quick and dry-run modes, once per session."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

from runs_scheduler import Ctx

BENCHMARKS = {
    "padding": ["-m", "benchmarks.padding", "--quick"],
    "collator": ["-m", "benchmarks.collator", "--quick"],
    "eval": ["-m", "benchmarks.eval", "--quick"],
    "gpu_step": ["-m", "benchmarks.gpu_step", "--dry-run"],
    "patch_embed": ["-m", "benchmarks.patch_embed", "--quick"],
}


def benchmark_outputs(ctx: Ctx) -> dict[str, subprocess.CompletedProcess]:
    assets = str(ctx.tiny_assets[0].parent)
    env = {**ctx.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           # glibc: keep freed memory instead of returning every large block to the OS. TRL's chunked log-prob
           # kernel allocates ~40 MB temporaries per tile; without this, page faults double gpu_step's dry run.
           "MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**32)}

    def bench(name: str) -> subprocess.CompletedProcess:
        with ctx.slots.hold(ctx.priority):
            argv = BENCHMARKS[name] + (["--assets", assets] if name != "patch_embed" else [])  # no model: no assets
            done = ctx.zygote.run(argv, env, ctx.tmp / name)
        return subprocess.CompletedProcess(done.args, done.returncode, done.stdout + done.stderr)

    # Five independent short processes: they fill whichever slots the longer runs leave free.
    with ThreadPoolExecutor(max_workers=len(BENCHMARKS), thread_name_prefix="benchmark") as pool:
        return dict(zip(BENCHMARKS, pool.map(bench, BENCHMARKS), strict=True))

"""Qwen3-VL's patch embedding: the Conv3d against the same weights as a GEMM (job/patch_embed.py), in one run.

    python -m benchmarks.patch_embed [--patches 4096] [--repeats 20] [--dtype fp32|bf16] [--json FILE]
    python -m benchmarks.patch_embed --quick      # fewer repeats: the smoke test (tests/test_benchmarks.py)

At the real 8B geometry (patch 16, temporal patch 2, 3 channels, 1152 channels out: the vision_config of
job/demo/assets/qwen3_vl/config-8b-instruct.json) on the patches of one image at the card's pixel cap (1024x1024 px
= 4096 patches of 16x16). Times each forward (median of --repeats, after one warm-up; CUDA synchronised) on CUDA when
there is one, else the CPU, and prints the ratio and the relative difference of the outputs. `vision_forward_s`
times the whole vision tower of a loaded model both ways (the GPU kit: benchmarks/gpu_step.py --patch-embed-ab).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from benchmarks.common import machine
from job import patch_embed
from job.demo.tiny import load_asset_json


def _median_s(fn, repeats: int) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def compare(patches: int, repeats: int, dtype: torch.dtype, device: str) -> dict:
    """The 8B patch embedding's Conv3d and its GEMM on `patches` random patches: seconds each, and the outputs'
    relative difference."""
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionPatchEmbed

    vision = load_asset_json("config-8b-instruct.json")["vision_config"]
    torch.manual_seed(0)
    conv = Qwen3VLVisionPatchEmbed(Qwen3VLVisionConfig(**vision)).to(device=device, dtype=dtype).eval()
    gemm = Qwen3VLVisionPatchEmbed(Qwen3VLVisionConfig(**vision)).to(device=device, dtype=dtype).eval()
    gemm.load_state_dict(conv.state_dict())
    patch_embed.as_gemm(torch.nn.ModuleDict({"patch_embed": gemm}))
    volume = vision["in_channels"] * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    x = torch.randn(patches, volume, device=device, dtype=dtype)
    with torch.no_grad():
        expected, got = conv(x).float(), gemm(x).float()
        conv_s, gemm_s = _median_s(lambda: conv(x), repeats), _median_s(lambda: gemm(x), repeats)
    return {"device": device, "dtype": str(dtype).removeprefix("torch."), "patches": patches, "conv_s": conv_s,
            "gemm_s": gemm_s, "speedup": conv_s / gemm_s, "torch": torch.__version__,
            "rel_diff": float(torch.linalg.norm(got - expected) / torch.linalg.norm(expected))}


def vision_forward_s(model, pixel_values, grid_thw, repeats: int) -> dict:
    """The whole vision tower of a loaded Qwen3-VL (job.model.load_model: its patch embedding already a GEMM), timed
    with the GEMM and with the Conv3d forward put back; the GEMM is left in place."""
    visual = (model.get_base_model() if hasattr(model, "get_base_model") else model).model.visual
    embed = visual.patch_embed
    gemm_forward = vars(embed).get("forward")
    if gemm_forward is None:
        raise SystemExit("the model's patch embedding is not a GEMM: load it with job.model.load_model")
    run = lambda: visual(pixel_values, grid_thw=grid_thw)  # noqa: E731
    with torch.no_grad():
        gemm_s = _median_s(run, repeats)
        del embed.forward  # the class's Conv3d forward
        try:
            conv_s = _median_s(run, repeats)
        finally:
            embed.forward = gemm_forward
    return {"vision_conv_s": conv_s, "vision_gemm_s": gemm_s, "vision_speedup": conv_s / gemm_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=4096, help="patches (4096: one 1024x1024 image)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                        help="default: bf16 on CUDA (the job's compute dtype), fp32 on the CPU")
    parser.add_argument("--quick", action="store_true", help="1024 patches, 3 repeats: the smoke test")
    parser.add_argument("--json", default=None, metavar="FILE", help="append the result as one JSON line")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    patches, repeats = (1024, 3) if args.quick else (args.patches, args.repeats)
    print(f"machine: {machine()}")
    result = compare(patches, repeats, dtype, device)
    print(f"RESULT patch_embed [{device} {result['dtype']}, {patches} patches, torch {torch.__version__}] "
          f"conv3d {result['conv_s'] * 1e3:.2f} ms, gemm {result['gemm_s'] * 1e3:.2f} ms: "
          f"conv/gemm {result['speedup']:.2f}x; relative difference {result['rel_diff']:.1e}")
    if args.json:
        with open(args.json, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"kind": "patch_embed", **result}, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

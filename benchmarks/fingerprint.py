"""Cost of the data fingerprint (rows and image bytes) inside the preflight pass.

    python -m benchmarks.fingerprint [--assets DIR] [--rows 2000] [--quick] [--repeat R]

The resume fingerprint (job/train/resume.py) needs a hash of everything training reads, images included. It is
taken from the preflight pass, which already reads and fully decodes every image: each row's digest covers its
image bytes (blake2b, streamed) and its text, and the split fingerprint is a sha256 over those digests in order.
Variants, on the same JSONL dataset of `--rows` rows with 1024x768 JPEGs (noise, quality 90), in one process:
  (a) preflight as shipped (decode, tokenize, check, image digest, split fingerprints);
  (b) preflight with the image digest removed (the image file is only opened by the decoder);
  (c) a separate pass that hashes every image file with sha256 (what a fingerprint outside preflight would cost).
Prints RESULT lines: a/b (the price of hashing inside preflight) and c/b (the price of a second pass). Single
process (one worker), CPU time, best of --repeat, variants interleaved; the page cache is warm for every variant.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from unittest import mock

from benchmarks.common import draw_image, load_average, machine, tiny_assets


def build_dataset(root: Path, rows: int) -> Path:
    """train.jsonl + validation.jsonl over `rows` 1024x768 JPEGs (built once per size)."""
    data = root / f"jpeg-{rows}"
    if (data / "validation.jsonl").is_file():
        return data
    (data / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(rows):
        image = data / "images" / f"{i:05d}.jpg"
        draw_image((1024, 768), seed=i).save(image, quality=90)
        label = "sarcastic" if i % 2 else "not_sarcastic"
        lines.append(json.dumps({"image": f"images/{image.name}", "query": "Is this post sarcastic? Reply with JSON.",
                                 "caption": f"post {i}", "target_json": json.dumps({"label": label})}))
    (data / "train.jsonl").write_text("\n".join(lines[: rows - 8]) + "\n")
    (data / "validation.jsonl").write_text("\n".join(lines[rows - 8:]) + "\n")
    return data


class _NoDigest:
    def hexdigest(self) -> str:
        return "0" * 32


def _no_file_digest(handle, _digest):
    return _NoDigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="200 rows, 1 repeat")
    args = parser.parse_args()
    rows, repeat = (200, 1) if args.quick else (args.rows, args.repeat)

    from job.cards import ModelCards
    from job.config.schema import build_cfg
    from job.data import checks
    from job.model import load_processor
    from job.preflight.run import run_preflight

    model_dir, _ = tiny_assets(args.assets)
    data = build_dataset(model_dir.parent, rows)
    out = model_dir.parent / "fingerprint-out"
    cfg = build_cfg(ModelCards().qwen3_vl_8b_instruct, {
        "SFT_MODEL_ID": str(model_dir), "SFT_DATASET_URI": str(data), "SFT_OUTPUT_DIR": str(out),
        "SFT_IMAGE_MIN_PIXELS": "65536", "SFT_IMAGE_MAX_PIXELS": "1048576", "SFT_MAX_LENGTH": "2048"})
    processor = load_processor(cfg.model, cfg.image, cfg.model.id)
    images = sorted((data / "images").glob("*.jpg"))

    def shipped() -> dict:
        return run_preflight(cfg, cfg.data.uri, processor).report["data_fingerprint"]

    def without_digest() -> None:
        with mock.patch.object(checks.hashlib, "file_digest", _no_file_digest):
            run_preflight(cfg, cfg.data.uri, processor)

    def separate_pass() -> None:
        for path in images:
            with path.open("rb") as handle:
                hashlib.file_digest(handle, "sha256")

    # preflight forks workers for >= 200 rows; one worker keeps the CPU time of this process the whole cost
    with mock.patch("job.preflight.run.worker_count", return_value=1):
        times = {"a": [], "b": [], "c": []}
        fingerprint = shipped()  # warm-up: page cache, tokenizer caches
        for _ in range(repeat):
            for name, fn in (("a", shipped), ("b", without_digest), ("c", separate_pass)):
                started = time.process_time()
                fn()
                times[name].append(time.process_time() - started)
    a, b, c = (min(times[k]) for k in "abc")
    print(f"# {machine()}; {load_average()}")
    print(f"# {rows} rows of 1024x768 JPEG ({sum(p.stat().st_size for p in images) / 2**20:.0f} MiB), best of {repeat}")
    print(f"# (a) preflight as shipped {a:.2f} s CPU; (b) without the image digest {b:.2f} s; "
          f"(c) separate sha256 pass {c:.2f} s")
    print(f"# train fingerprint {fingerprint['train'][:16]}...")
    print(f"RESULT fingerprint_in_preflight_ratio a/b={a / b:.3f}")
    print(f"RESULT separate_pass_ratio (b+c)/b={(b + c) / b:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

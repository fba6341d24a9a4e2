"""The benchmarks run (quick modes, as subprocesses, all five at once) and print their result lines.

Timings are never asserted here (CI machines vary); what is asserted is what does not depend on speed: exit 0, the
label identity of the seed's two-pass and our single-pass collator, identical batched vs per-row eval outputs, the
same label scores from the KV cache as from a forward per label, padding under 5% with length grouping, gpu_step's
table from its CPU dry run, and the patch embedding's Conv3d and GEMM giving the same output (the ratio printed).
"""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def outputs(benchmark_outputs):
    """The five benchmark scripts' outputs, run once per session in the background (tests/runs.py)."""
    return benchmark_outputs


def _ok(outputs, name: str) -> str:
    result = outputs[name]
    assert result.returncode == 0, f"{name} exited {result.returncode}:\n{result.stdout[-3000:]}"
    return result.stdout


def test_padding_grouped_under_5_percent(outputs):
    out = _ok(outputs, "padding")
    lines = re.findall(r"RESULT padding \[(.+?)\] batch=(\d+) random=([\d.]+) grouped=([\d.]+) goal<=0.05 met", out)
    assert {(name, int(bs)) for name, bs, *_ in lines} >= {("synthetic long-tailed", 4), ("synthetic long-tailed", 8)}
    for *_, grouped in lines:
        assert float(grouped) <= 0.05
    synthetic = [(float(r), float(g)) for name, _, r, g in lines if name == "synthetic long-tailed"]
    assert all(r > 0.3 and g < r / 6 for r, g in synthetic)


def test_collator_labels_identical_and_ratios_printed(outputs):
    out = _ok(outputs, "collator")
    assert re.search(r"LABELS identical \(a\) vs \(b\) \[capped 1024\^2\]: 8 rows", out)
    assert re.search(r"RESULT collator \[capped 1024\^2\] b/a speed-up=[\d.]+x .* b/c time ratio=[\d.]+", out)


def test_eval_batched_outputs_identical(outputs):
    out = _ok(outputs, "eval")
    assert "OUTPUTS identical per row (batch 1 vs 8): True (8/8 rows equal)" in out
    assert re.search(r"predictions: ([2-8]) distinct of 8", out), "a vacuous check: (almost) all outputs equal"
    assert re.search(r"RESULT eval batch=8 vs 1 speed-up=[\d.]+x", out)


def test_scoring_from_the_kv_cache_equals_a_forward_per_label(outputs):
    """The cached scorer and the per-label forward give the same scores on the data's 2 labels and on 5, and the
    5-label probabilities are not all near 0 or 1 (where a wrong score could still round to the right one)."""
    out = _ok(outputs, "eval")
    for name in ("data", "5 labels"):
        assert re.search(rf"RESULT score \[{name}\] ours vs per-label forward speed-up=[\d.]+x CPU time; scores "
                         rf"agree \(within 0.0001 nats, 1e-05 in probability\): True", out), name
        assert re.search(rf"RESULT score \[{name}\] vs generation \(4 new tokens\) CPU time ratio=[\d.]+", out)
    spread = re.search(r"scoring \[5 labels\]: 5 labels.*\(probabilities ([\d.e-]+)\.\.([\d.e-]+)\)", out)
    assert spread and 0.01 < float(spread.group(1)) < float(spread.group(2)) < 0.99, out[-2000:]


def test_gpu_step_dry_run_prints_the_table(outputs):
    out = _ok(outputs, "gpu_step")
    assert "DRY RUN" in out
    for stack, sampler in (("baseline", "RandomSampler"), ("ours", "LengthGroupedSampler")):
        for data in ("fixed", "mixed"):
            assert re.search(rf"^{stack}\s+{data}\s+{sampler}\s+[\d.]+\s+[\d.]+\s+[\d.]+%", out, re.M), (stack, data)
    for data in ("fixed", "mixed"):
        assert re.search(rf"RESULT gpu_step \[{data}\] ours/baseline tokens/s=[\d.]+x", out)


def test_patch_embed_prints_the_ratio_of_the_same_output(outputs):
    """Both forwards at the 8B geometry in one run: the ratio is printed (never asserted), the outputs agree in fp32."""
    out = _ok(outputs, "patch_embed")
    found = re.search(r"RESULT patch_embed \[cpu float32, 1024 patches, torch [^\]]+\] conv3d [\d.]+ ms, "
                      r"gemm [\d.]+ ms: conv/gemm [\d.]+x; relative difference ([\d.e+-]+)$", out, re.M)
    assert found and float(found.group(1)) <= 1e-5, out[-2000:]

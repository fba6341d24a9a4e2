"""job/serving.py: the vLLM server lines that export_report.json and the cards print, exactly as docs/export.md
("Serving recipes") gives them, and the pixel bounds read back from a saved processor. No vLLM here: `make serve-check`
runs these commands (docs/development.md)."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO

# docs/export.md, "Serving recipes": the commands `make serve-check` ran on the demo (Makefile DEMO_ENV:
# SFT_RUN_ID=demo, SFT_MAX_LENGTH=512, SFT_EVAL_MAX_NEW_TOKENS=16, SFT_IMAGE_MIN/MAX_PIXELS=4096/16384; r 16).
DEMO_MERGED = (
    "python -m vllm.entrypoints.openai.api_server --model .cache/demo/out/merged --served-model-name demo "
    "--max-model-len 528 --limit-mm-per-prompt '{\"image\": 1}'"
)
DEMO_ADAPTER = (
    "python -m vllm.entrypoints.openai.api_server --model .cache/demo/model --enable-lora "
    "--lora-modules demo=.cache/demo/out/adapter --max-lora-rank 16 --max-model-len 528 "
    "--limit-mm-per-prompt '{\"image\": 1}' "
    "--mm-processor-kwargs '{\"size\": {\"shortest_edge\": 4096, \"longest_edge\": 16384}}' "
    "--override-generation-config '{\"top_k\": 1, \"max_new_tokens\": 16}'"
)


def test_the_demos_commands_are_the_documented_ones():
    from job import serving

    pixels = serving.pixel_bounds(4096, 16384)
    model_len = serving.max_model_len(512, 16)
    assert model_len == 528
    assert serving.vllm_merged(".cache/demo/out/merged", "demo", model_len=model_len) == DEMO_MERGED
    assert serving.vllm_adapter(".cache/demo/model", ".cache/demo/out/adapter", "demo", revision=None, lora_rank=16,
                                pixels=pixels, model_len=model_len, max_new_tokens=16) == DEMO_ADAPTER
    docs = (REPO / "docs" / "export.md").read_text()
    assert f"```bash\n{DEMO_MERGED}\n```" in docs and f"```bash\n{DEMO_ADAPTER}\n```" in docs


def test_paths_and_revisions_are_shell_words():
    """A path with a space stays one word, a pinned base names its revision, an odd rank rounds up to one vLLM takes."""
    from job import serving

    command = serving.vllm_adapter("Qwen/Qwen3-VL-8B-Instruct", "my runs/adapter", "run 1", revision="abc123",
                                   lora_rank=12, pixels=serving.pixel_bounds(65536, 1048576), model_len=2304,
                                   max_new_tokens=256)
    assert command == (
        "python -m vllm.entrypoints.openai.api_server --model Qwen/Qwen3-VL-8B-Instruct --revision abc123 "
        "--enable-lora --lora-modules 'run 1=my runs/adapter' --max-lora-rank 16 --max-model-len 2304 "
        "--limit-mm-per-prompt '{\"image\": 1}' "
        "--mm-processor-kwargs '{\"size\": {\"shortest_edge\": 65536, \"longest_edge\": 1048576}}' "
        "--override-generation-config '{\"top_k\": 1, \"max_new_tokens\": 256}'"
    )
    assert [serving.vllm_lora_rank(r) for r in (1, 2, 8, 9, 64, 65, 512)] == [1, 8, 8, 16, 64, 128, 512]


def test_the_pixel_bounds_are_read_from_the_saved_processor(processor, tmp_path):
    """What the adapter directory holds (the real Qwen3VLProcessor saved, as training saves it)."""
    from job.serving import saved_pixel_bounds

    processor.save_pretrained(tmp_path)
    assert saved_pixel_bounds(tmp_path) == {"shortest_edge": 4096, "longest_edge": 16384}
    assert saved_pixel_bounds(tmp_path / "missing") is None
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 1024}}))
    assert saved_pixel_bounds(tmp_path / "bare") is None  # half a size is no bound to pass on


def test_the_demo_model_has_a_head_size_vllms_cpu_kernel_accepts_and_stale_assets_are_rebuilt(tiny_assets, tmp_path):
    """vLLM's CPU attention refuses head_dim 16 (it takes 32, 64, 80 and up): the demo's tiny model uses 32. A demo
    folder built by an older recipe (the marker `ok`, written before the recipe was recorded) is not reused."""
    from job.demo.tiny import assets_current

    config = json.loads((tiny_assets[0] / "config.json").read_text())
    assert config["text_config"]["head_dim"] == 32
    root = tiny_assets[0].parent
    assert assets_current(root)  # the session's assets, as build_demo_assets wrote them
    # ... and as another process reads them before it builds anything (the benchmarks and `make demo` do): a recipe
    # that building changes would make them rebuild, under the feet of the tests reading these files.
    fresh = subprocess.run([sys.executable, "-c", "from job.demo.tiny import recipe; print(recipe(), end='')"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert fresh == (root / ".complete").read_text()
    (tmp_path / ".complete").write_text("ok\n")
    assert not assets_current(tmp_path)
    (tmp_path / ".complete").write_text((root / ".complete").read_text())
    assert assets_current(tmp_path)

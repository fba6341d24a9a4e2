"""The saved adapter directory as a serving container (another uid) reads it."""

from __future__ import annotations

import stat

import pytest

from job.cards import ModelCards
from job.config.schema import build_cfg
from job.model import apply_lora, load_model
from job.outputs import ADAPTER_FILES, save_adapter


@pytest.fixture(scope="module")
def cfg(tiny_assets):
    model_dir, data_dir = tiny_assets
    return build_cfg(ModelCards().qwen3_vl_8b_instruct, {
        "SFT_MODEL_ID": str(model_dir), "SFT_DATASET_URI": str(data_dir), "SFT_MAX_LENGTH": "512",
        "SFT_IMAGE_MIN_PIXELS": "4096", "SFT_IMAGE_MAX_PIXELS": "16384",
    })


def test_every_adapter_file_is_world_readable(cfg, processor, tmp_path):
    model = apply_lora(load_model(cfg.model, cfg.model.id), cfg.model, cfg.lora)
    files = save_adapter(model, processor, tmp_path / "adapter")
    assert set(ADAPTER_FILES) <= set(files)
    modes = {name: stat.S_IMODE((tmp_path / "adapter" / name).stat().st_mode) for name in files}
    assert modes == {name: 0o644 for name in files}

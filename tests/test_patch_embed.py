"""The vision tower's patch embedding as a GEMM (job/patch_embed.py): the same vision output as the convolution, on
the tiny model at the real 8B patch geometry, the layer left unquantized in 4-bit, and the start-up warning."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from job import patch_embed
from job.demo.tiny import ASSETS

# Qwen/Qwen3-VL-8B-Instruct's config.json, vision_config (job/demo/assets/qwen3_vl/SOURCE.md): the tiny model keeps
# its patch geometry.
PATCH, TEMPORAL, CHANNELS = 16, 2, 3


@pytest.fixture(scope="module")
def tiny_fp32(tiny_assets):
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(str(tiny_assets[0]), dtype=torch.float32).eval()


def _images(processor):
    from helpers import noise_image

    images = [noise_image((96, 64), seed=1), noise_image((64, 128), seed=2)]
    return processor.image_processor(images=images, return_tensors="pt")


@pytest.mark.slow  # the tiny model loads (~4 s): the fast tier is full
def test_the_real_8b_and_the_tiny_model_share_the_patch_geometry(tiny_fp32):
    real = json.loads((ASSETS / "config-8b-instruct.json").read_text())["vision_config"]
    for config in (real, tiny_fp32.config.vision_config.to_dict()):
        assert (config["patch_size"], config["temporal_patch_size"], config["in_channels"]) == (PATCH, TEMPORAL,
                                                                                              CHANNELS)
    proj = tiny_fp32.model.visual.patch_embed.proj
    assert isinstance(proj, torch.nn.Conv3d) and proj.kernel_size == proj.stride == (TEMPORAL, PATCH, PATCH)


@pytest.mark.slow
def test_the_vision_output_as_a_gemm_equals_the_convolutions(tiny_fp32, processor):
    """fp32, the whole vision tower (patch embedding, blocks, merger and the deepstack features): within 1e-5
    relative; the module keeps its Conv3d and its weights."""
    batch = _images(processor)
    visual = tiny_fp32.model.visual
    weights = {k: v.clone() for k, v in visual.state_dict().items()}
    with torch.no_grad():
        conv = visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        assert patch_embed.as_gemm(tiny_fp32) == 1
        gemm = visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    pairs = [(conv.pooler_output, gemm.pooler_output), *zip(conv.deepstack_features, gemm.deepstack_features,
                                                              strict=True)]
    for expected, got in pairs:
        assert torch.linalg.norm(got - expected) <= 1e-5 * torch.linalg.norm(expected)
    patches = batch["pixel_values"]
    with torch.no_grad():
        direct = visual.patch_embed.proj(patches.view(-1, CHANNELS, TEMPORAL, PATCH, PATCH)).flatten(1)
        assert torch.linalg.norm(visual.patch_embed(patches) - direct) <= 1e-6 * torch.linalg.norm(direct)
    assert isinstance(visual.patch_embed.proj, torch.nn.Conv3d)
    assert all(torch.equal(weights[k], v) for k, v in visual.state_dict().items())


@pytest.mark.slow
def test_4bit_loading_leaves_the_patch_embedding_unquantized_and_runs_it_as_a_gemm(tiny_assets):
    from bitsandbytes.nn import Linear4bit

    from job.cards import ModelCards
    from job.config.schema import build_cfg
    from job.model import load_model

    env = {"SFT_MODEL_ID": str(tiny_assets[0]), "SFT_LOAD_IN_4BIT": "true"}
    cfg = build_cfg(ModelCards().qwen3_vl_8b_instruct, env)
    model = load_model(cfg.model, cfg.model.id)
    embed = model.model.visual.patch_embed
    assert type(embed.proj) is torch.nn.Conv3d and embed.proj.weight.dtype == torch.float32
    assert "forward" in vars(embed)  # this instance's GEMM forward
    assert isinstance(model.model.language_model.layers[0].mlp.up_proj, Linear4bit)  # 4-bit is on
    assert not any(isinstance(m, Linear4bit) for m in model.model.visual.modules())


def test_the_slow_convolution_warning_names_the_torch_version_once(caplog):
    patch_embed.slow_conv_warning.cache_clear()
    caplog.set_level(logging.WARNING, logger="job.patch_embed")
    for _ in range(2):
        message = patch_embed.slow_conv_warning("2.9.1+cu128", 0)
    assert message is not None and message.startswith("torch 2.9.1+cu128 runs Qwen3-VL's patch-embedding Conv3d on "
                                                       "a slow kernel (10-20x slower vision forward")
    assert caplog.messages == [message]
    assert patch_embed.slow_conv_warning("2.9.1+cu128", 1) is None  # replaced: the kernel is never used
    assert patch_embed.slow_conv_warning("2.14.1", 0) is None
    assert patch_embed.slow_conv_warning("2.10.0", 0) is None

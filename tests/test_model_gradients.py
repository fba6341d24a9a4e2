"""A QLoRA training step's gradients never depend on what ran before it.

Guards against the bitsandbytes CPU repacking bug (see `keep_4bit_layout_unpacked` in job/model.py): on a CPU
with avx512_bf16, generation repacked every 4-bit weight in place, after which the training forward went through a
kernel with no autograd, so the gradients after pre-eval were about half the true ones, and a save converted the
weights back lossily. The reference is the same PEFT model with every 4-bit base layer replaced by a plain fp32
`nn.Linear` holding its dequantized weight: a 4-bit step must equal it within fp32 noise (a) on a fresh model, (b)
right after generation through `evaluate_qwen3`, (c) after a checkpoint save and (d) after loading that checkpoint.

On a CPU without avx512_bf16 bitsandbytes never repacks, so (a)-(d) hold with or without the fix there;
`test_an_avx512bf16_cpu_is_emulated_and_caught` turns on bitsandbytes' own flag to take the repacking path on any
CPU and shows that the same check then fails: the invariant is checked for real on every machine.
"""

from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from peft import PeftModel
from runs_reference import STEPS
from safetensors.torch import load_file

from job.cards import ModelCards
from job.collators.qwen3_collator import Qwen3VisionSFTCollator
from job.config.schema import build_cfg
from job.data.loaders import load_local_split
from job.eval.generate import evaluate_qwen3
from job.model import apply_lora, keep_trainable_params_fp32, load_model


@pytest.fixture(scope="module")
def cfg(tiny_assets):
    model_dir, data_dir = tiny_assets
    return build_cfg(ModelCards().qwen3_vl_8b_instruct, {
        "SFT_MODEL_ID": str(model_dir), "SFT_DATASET_URI": str(data_dir), "SFT_MAX_LENGTH": "512",
        "SFT_IMAGE_MIN_PIXELS": "4096", "SFT_IMAGE_MAX_PIXELS": "16384", "SFT_EVAL_MAX_NEW_TOKENS": "4",
        "SFT_LORA_DROPOUT": "0", "SFT_GRADIENT_CHECKPOINTING": "false",
    })


@pytest.fixture(scope="module")
def batches(tiny_assets, processor):
    train = load_local_split(str(tiny_assets[1]), "train").select(range(2))
    eval_rows = load_local_split(str(tiny_assets[1]), "validation").select(range(2))
    batch = Qwen3VisionSFTCollator(processor, training=True, max_length=512)(list(train))
    return batch, eval_rows, Qwen3VisionSFTCollator(processor, training=False, max_length=512)


def _trainable_model(cfg):
    """The run's model: 4-bit base + LoRA, fp32 adapters; LoRA B made non-zero so A's gradients are not all zero."""
    torch.manual_seed(0)
    model = apply_lora(load_model(cfg.model, cfg.model.id), cfg.model, cfg.lora)
    keep_trainable_params_fp32(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    return model.train()


def _step(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and LoRA gradients of one training step on `batch` (no optimizer update)."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def _four_bit_layers(model) -> list[tuple[str, bnb.nn.Linear4bit]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def _reference_step(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """The same step with every 4-bit base layer swapped for an fp32 nn.Linear of its dequantized weight."""
    swapped = []
    for name, layer in _four_bit_layers(model):
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False), f"{name} is repacked"
        dense = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        dense.weight.data = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        dense.weight.requires_grad_(False)
        if layer.bias is not None:
            dense.bias.data = layer.bias.data.float()
            dense.bias.requires_grad_(False)
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        setattr(parent, name.rsplit(".", 1)[1], dense)
        swapped.append((parent, name.rsplit(".", 1)[1], layer))
    try:
        return _step(model, batch)
    finally:
        for parent, attr, layer in swapped:
            setattr(parent, attr, layer)


def _layouts(model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(layer.weight.shape) for name, layer in _four_bit_layers(model)}


def _assert_matches(got: tuple[float, dict], ref: tuple[float, dict], stage: str) -> None:
    loss, grads = got
    ref_loss, ref_grads = ref
    assert loss == pytest.approx(ref_loss, rel=1e-6, abs=1e-6), stage
    assert set(grads) == set(ref_grads)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    ref_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in ref_grads.values())).item()
    assert norm == pytest.approx(ref_norm, rel=1e-5), f"{stage}: grad norm {norm} vs reference {ref_norm}"
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-7, msg=f"{stage}: {name}")


def test_gradients_equal_the_dequantized_reference_before_and_after_generate_save_and_load(cfg, batches, tmp_path):
    batch, eval_rows, eval_collator = batches
    model = _trainable_model(cfg)
    layers = _four_bit_layers(model)
    assert layers and all(layer.support_avx512bf16_for_cpu is False for _, layer in layers)
    layout = _layouts(model)
    reference = _reference_step(model, batch)

    _assert_matches(_step(model, batch), reference, "(a) fresh model")

    evaluate_qwen3(model, eval_collator.processor, eval_rows, eval_collator, cfg)
    assert _layouts(model) == layout, "generation repacked the 4-bit weights"
    _assert_matches(_step(model, batch), reference, "(b) after generate")

    model.save_pretrained(tmp_path / "checkpoint")
    assert _layouts(model) == layout
    _assert_matches(_step(model, batch), reference, "(c) after a checkpoint save")

    base = load_model(cfg.model, cfg.model.id)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "checkpoint"), is_trainable=True)
    keep_trainable_params_fp32(loaded)
    assert _layouts(loaded) == layout
    _assert_matches(_step(loaded, batch), reference, "(d) after loading the checkpoint")


# The emulated bad path runs bitsandbytes' CPU gemv_4bit kernel, which has no autograd registration: torch warns
# about exactly the defect this test provokes.
@pytest.mark.filterwarnings("ignore:bitsandbytes.+gemv_4bit:UserWarning")
def test_an_avx512bf16_cpu_is_emulated_and_caught(cfg, batches):
    """bitsandbytes sets `support_avx512bf16_for_cpu` from the CPU; set by hand it takes the repacking path anywhere.

    This is the code before the fix, on a CPU like the one the bug was found on: generation repacks the weights and
    the training step no longer equals the reference. It proves the check above can fail on this machine too.
    """
    batch, eval_rows, eval_collator = batches
    model = _trainable_model(cfg)
    layout = _layouts(model)
    reference = _reference_step(model, batch)
    for _, layer in _four_bit_layers(model):
        layer.support_avx512bf16_for_cpu = True  # what bitsandbytes 0.50 sets on an avx512_bf16 CPU
    evaluate_qwen3(model, eval_collator.processor, eval_rows, eval_collator, cfg)
    assert _layouts(model) != layout, "the emulated avx512_bf16 path no longer repacks: re-check the fix"
    with pytest.raises(AssertionError):
        _assert_matches(_step(model, batch), reference, "emulated avx512_bf16 CPU after generate")


@pytest.mark.slow
def test_a_job_run_trains_the_same_with_and_without_pre_eval(reference_run, pre_eval_off_run):
    """The same invariant at the flow level: two job runs (tests/runs.py), the shared reference run and the same
    configuration with SFT_EVAL_PRE=false, log identical losses and grad norms at every step (SFT_LOGGING_STEPS=1)
    and end with the same adapter. Before the fix, on an avx512_bf16 CPU, the grad norms differed by about 2x."""
    assert reference_run.returncode == 0, reference_run.log[-3000:]
    assert "pre-eval:" in reference_run.log and "pre-eval:" not in pre_eval_off_run.log
    assert (pre_eval_off_run.out / "adapter/adapter_model.safetensors").is_file(), pre_eval_off_run.log[-3000:]

    def per_step(run) -> list[tuple[int, float, float]]:
        state = json.loads((run.out / f"checkpoints/checkpoint-{STEPS}/trainer_state.json").read_text())
        return [(e["step"], e["loss"], e["grad_norm"]) for e in state["log_history"] if "loss" in e]

    with_pre, without_pre = per_step(reference_run), per_step(pre_eval_off_run)
    assert [step for step, *_ in with_pre] == list(range(1, STEPS + 1))
    assert with_pre == without_pre
    ref = load_file(str(reference_run.out / "adapter/adapter_model.safetensors"))
    other = load_file(str(pre_eval_off_run.out / "adapter/adapter_model.safetensors"))
    assert set(ref) == set(other)
    assert max((ref[k] - other[k]).abs().max().item() for k in ref) <= 1e-6

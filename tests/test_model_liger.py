"""SFT_USE_LIGER: auto is off on CPU, false is off, true fails clearly on a GPU without liger-kernel.

The GPU paths are exercised with a fake `liger_kernel` module (no Triton here); benchmarks/gpu_step.py runs the real
kernels when a GPU is lent.
"""

from __future__ import annotations

import logging
import sys
import types

import pytest

from job import model as model_mod
from job.cards import ModelCards
from job.config.schema import build_cfg
from job.config.sections.model import ModelConfig
from job.errors import ConfigError
from job.model import apply_liger, liger_wanted


def _model(setting: str) -> ModelConfig:
    return build_cfg(ModelCards().qwen3_vl_8b_instruct, {"SFT_USE_LIGER": setting}).model


@pytest.fixture
def fake_liger(monkeypatch):
    """A liger_kernel whose qwen3-vl entry point records its call (signature of liger-kernel 0.6)."""
    calls = []

    def apply_liger_kernel_to_qwen3_vl(rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True,
                                       swiglu=False, model=None):
        calls.append({"rope": rope, "cross_entropy": cross_entropy, "flce": fused_linear_cross_entropy,
                      "rms_norm": rms_norm, "swiglu": swiglu, "model": model})

    package = types.ModuleType("liger_kernel")
    package.__path__ = []
    package.__spec__ = types.SimpleNamespace(name="liger_kernel")
    transformers = types.ModuleType("liger_kernel.transformers")
    transformers.apply_liger_kernel_to_qwen3_vl = apply_liger_kernel_to_qwen3_vl
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", transformers)
    real = model_mod.importlib.util.find_spec
    monkeypatch.setattr(model_mod.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "liger_kernel" else real(name, *a))
    return calls


def test_auto_and_false_are_off_on_cpu(monkeypatch):
    monkeypatch.setattr(model_mod, "has_cuda", lambda: False)
    assert liger_wanted(_model("auto")) is False
    assert liger_wanted(_model("false")) is False
    assert apply_liger(_model("auto"), model=object()) is False


def test_true_on_cpu_warns_and_skips(monkeypatch, caplog):
    monkeypatch.setattr(model_mod, "has_cuda", lambda: False)
    with caplog.at_level(logging.WARNING, logger="job.model"):
        assert liger_wanted(_model("true")) is False
    assert "SFT_USE_LIGER=true" in caplog.text and "GPU" in caplog.text


def test_true_with_cuda_but_no_liger_is_a_config_error(monkeypatch):
    monkeypatch.setattr(model_mod, "has_cuda", lambda: True)
    real = model_mod.importlib.util.find_spec
    monkeypatch.setattr(model_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    with pytest.raises(
        ConfigError, match=r"SFT_USE_LIGER=true but liger-kernel is not installed: pip install liger-kernel"
    ):
        liger_wanted(_model("true"))
    assert liger_wanted(_model("auto")) is False  # auto just stays off


def test_applied_on_gpu_without_fused_cross_entropy_and_unwrapping_peft(monkeypatch, fake_liger):
    monkeypatch.setattr(model_mod, "has_cuda", lambda: True)
    base = object()
    peft_like = types.SimpleNamespace(get_base_model=lambda: base)
    assert apply_liger(_model("auto"), peft_like) is True
    assert fake_liger == [{"rope": True, "cross_entropy": False, "flce": False, "rms_norm": True, "swiglu": True,
                           "model": base}]
    assert apply_liger(_model("false"), peft_like) is False and len(fake_liger) == 1

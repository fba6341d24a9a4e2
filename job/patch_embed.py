"""The vision tower's patch embedding as a GEMM, on every torch: no Conv3d kernel is ever chosen for it.

Qwen3-VL embeds each 2x16x16x3 patch with an `nn.Conv3d` whose stride equals its kernel (no overlap, no padding):
exactly a matrix multiply of the flattened patches by the flattened kernel. Some torch/cuDNN pairs run that
convolution on a slow fallback kernel: torch 2.9.x (`aten::slow_conv_dilated3d`, a 10-20x slower vision forward:
pytorch/pytorch#174051, fixed in 2.10; the pins skip 2.9.0), up to 62x on other configurations and far worse on
Blackwell in bf16 (huggingface/transformers#45750). `as_gemm` replaces the forward of each such module, on this model
instance only, with `F.linear(patches, weight.reshape(out, -1), bias)`: the same weights (the Conv3d's parameters,
reshaped in the forward; state dicts, checkpoints, LoRA scoping and 4-bit loading see the Conv3d as before: it is no
nn.Linear, so bitsandbytes never quantizes it), the same sums in another order (fp32: within 1e-6 relative of the
convolution, tests/test_patch_embed.py).

Why not transformers' own fusion (`from_pretrained(..., fusion_config={"patch_embeddings": True})`, in 5.24): it
registers a process-wide class patch and a checkpoint conversion for the model type, so every later load of a
Qwen3-VL in the process is fused too, asked or not (measured with 5.24.0: a second `from_pretrained` without
fusion_config gave FusedQwen3VLVisionPatchEmbed), and the weight moves to a new `linear_proj` module. This module's
change stays with the model it was applied to, and works on any transformers.

Always on; `slow_conv_warning` warns once, naming the torch version, when a torch with the regression runs a model
whose patch embedding could not be replaced (a structure this module does not know).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# torch releases whose Conv3d takes the slow fallback for this shape, and the slowdown measured upstream
# (pytorch/pytorch#174051: Qwen3-VL's vision forward, torch 2.9.1 against 2.8).
SLOW_CONV_TORCH = "2.9."
SLOW_CONV_MEASURED = "10-20x slower vision forward (pytorch/pytorch#174051)"


def is_patchify(conv: object) -> bool:
    """A Conv3d that embeds non-overlapping patches: stride == kernel, no padding, dilation or groups."""
    return (isinstance(conv, torch.nn.Conv3d) and tuple(conv.stride) == tuple(conv.kernel_size)
            and conv.padding == (0, 0, 0) and conv.dilation == (1, 1, 1) and conv.groups == 1)


def _gemm_forward(module: torch.nn.Module):
    proj = module.proj

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        weight = proj.weight
        patches = hidden_states.reshape(-1, weight[0].numel()).to(dtype=weight.dtype)
        return F.linear(patches, weight.reshape(weight.shape[0], -1), proj.bias)

    return forward


def as_gemm(model: torch.nn.Module) -> int:
    """Replace the forward of each patch embedding of `model` (a module with a patchify Conv3d `proj`) by its GEMM;
    returns how many were replaced."""
    replaced = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "patch_embed" and is_patchify(getattr(module, "proj", None)):
            module.forward = _gemm_forward(module)
            replaced += 1
    return replaced


@functools.cache
def slow_conv_warning(torch_version: str, replaced: int) -> str | None:
    """The start-up warning (logged once per process) when this torch has the Conv3d regression and no patch
    embedding was replaced; None otherwise."""
    if not torch_version.startswith(SLOW_CONV_TORCH) or replaced:
        return None
    message = (f"torch {torch_version} runs Qwen3-VL's patch-embedding Conv3d on a slow kernel ({SLOW_CONV_MEASURED}) "
               "and this model's patch embedding could not be run as a GEMM (an unknown module structure): install "
               "torch >= 2.10 or 2.8")
    log.warning(message)
    return message

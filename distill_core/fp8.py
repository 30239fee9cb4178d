"""Frozen weights in 8-bit floats (``frozen_precision fp8``), for LoRA students of teachers too large for the GPU
in bf16.

A Linear layer's weight W [out, in] is stored as

    W_8 = e4m3(W / s),   s_i = max_j |W_ij| / 448   (per output row i; 448: the largest e4m3 value),

and used as s W_8, widened to the precision it computes in (autocast's, else its input's), one layer at a time:
a byte per weight, half of bf16's memory. The layers a diffusers network names precision-sensitive (its
``_skip_layerwise_casting_patterns``: embeddings of positions and time, norms and their modulation; diffusers'
defaults for other networks), its convolutions and every other weight stay 16-bit (``builtin.cast_weights``).

In training, a product with a frozen layer keeps only W_8 and s for the backward pass (``ScaledMatmul``), where
the activations' gradient g (s W_8) widens the weight again: no widened copy of any layer outlives its product.
The 8-bit weights are buffers, not parameters, so that a network's dtype (diffusers' ``ModelMixin.dtype``, its
first floating parameter's) stays its compute precision.
"""

from __future__ import annotations

import re

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
#: the largest finite e4m3 value
E4M3_MAX = 448.0
#: the buffer of a layer's row scales s, kept in float32
SCALE = "weight_scale"
#: the layers kept 16-bit in a network that names none (diffusers' defaults for layerwise casting)
DEFAULT_SENSITIVE = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The precision a product with ``x`` computes in: autocast's where it is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def widened(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """s W_8 in ``dtype``."""
    return weight.to(dtype) * scale.to(dtype)


class ScaledMatmul(torch.autograd.Function):
    """x (s W_8)^T, saving W_8 and s (not the widened weight) for the gradient g (s W_8) of x; W_8 and s are
    frozen."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, scale)
        dtype = compute_dtype(x)
        return x.to(dtype) @ widened(weight, scale, dtype).T

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        weight, scale = ctx.saved_tensors
        return grad @ widened(weight, scale, grad.dtype), None, None


class Fp8Linear(nn.Linear):
    """A Linear layer whose weight is W_8 with its row scales s (``SCALE``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ScaledMatmul.apply(x, self.weight, getattr(self, SCALE))
        return y if self.bias is None else y + self.bias.to(y.dtype)


def sensitive(module: nn.Module) -> set[int]:
    """The ids of the Linear layers of ``module`` kept 16-bit: those whose path, or an ancestor's, within the network
    that names the patterns (``_skip_layerwise_casting_patterns``; ``DEFAULT_SENSITIVE`` where none does) matches
    one of them, as diffusers matches them."""
    roots = [m for m in module.modules() if getattr(m, "_skip_layerwise_casting_patterns", None) is not None]
    kept = set()
    for root in roots or [module]:
        patterns = getattr(root, "_skip_layerwise_casting_patterns", None) or DEFAULT_SENSITIVE
        for name, layer in root.named_modules():
            parts = name.split(".")
            paths = [".".join(parts[:k]) for k in range(1, len(parts) + 1)]
            if any(re.search(p, path) for p in patterns for path in paths if path):
                kept.add(id(layer))
    return kept


def store_linear_fp8(module: nn.Module, kept_float32: set[str]) -> None:
    """Every Linear layer of ``module`` but the sensitive ones and those holding a weight named in ``kept_float32``
    as an ``Fp8Linear``, in place."""
    skipped = sensitive(module)
    for name, layer in module.named_modules():
        if type(layer) is not nn.Linear or id(layer) in skipped or f"{name}.weight" in kept_float32:
            continue
        w = layer.weight.detach().float()
        scale = (w.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)
        del layer.weight
        layer.register_buffer("weight", (w / scale).to(FP8))
        layer.register_buffer(SCALE, scale)
        layer.__class__ = Fp8Linear

"""Attention backend: xformers' memory-efficient kernel on CUDA when installed, torch SDPA otherwise."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def _xformers_ops():
    """``xformers.ops`` when it imports and its kernel runs on this CUDA device, else None (SDPA). A
    wheel built for another torch imports with a warning and then has no operator to dispatch to
    (seen with xformers 0.0.35, built for torch 2.10, under torch 2.11), so one tiny call decides."""
    try:
        import xformers.ops as xops  # noqa: PLC0415 - optional, CUDA-only dependency

        probe = torch.zeros(1, 1, 1, 8, device="cuda")
        xops.memory_efficient_attention(probe, probe, probe)
    except Exception:  # xformers missing, built for another torch, or without this GPU's kernels
        return None
    return xops


def backend_for(device: torch.device) -> str:
    """Name of the backend ``attention`` uses for tensors on ``device``."""
    return "xformers" if device.type == "cuda" and _xformers_ops() is not None else "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for tensors of shape ``[B, heads, L, d]``."""
    if backend_for(q.device) == "xformers":
        # xformers expects [B, L, heads, d].
        out = _xformers_ops().memory_efficient_attention(
            q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        )
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)

"""The one denoiser convention of the engine.

A denoiser D maps a noisy sample ``x = x0 + sigma * n`` (variance-exploding convention of
Karras et al. 2022, "Elucidating the Design Space", and k-diffusion) to an estimate of x0.
It knows the sigma range it was trained on. Prediction types (eps, v, x0, flow) and
conditioning formats live inside adapters; solvers, the teacher and methods never see them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

#: A batch-first condition: class labels, text embeddings, a dict of such tensors, or None.
Cond = torch.Tensor | dict | None


@runtime_checkable
class Denoiser(Protocol):
    """``D(x, sigma, cond) -> x0``; ``sigma`` is a scalar or a tensor of shape ``[B]``."""

    sigma_min: float
    sigma_max: float

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond = None) -> torch.Tensor: ...


#: the key under which a condition may carry each row's own unconditional side (a ComfyUI negative per prompt,
#: ``comfy_source``), which CFG takes in place of its one stored negative (``CFGTeacher.uncond_like``); denoisers
#: read the condition without it (``conditional``)
OWN_UNCOND = "own_uncond"


def conditional(cond: Cond) -> Cond:
    """``cond`` without the rows' own unconditional sides (``OWN_UNCOND``): what a denoiser reads."""
    if isinstance(cond, dict) and OWN_UNCOND in cond:
        return {k: v for k, v in cond.items() if k != OWN_UNCOND}
    return cond


def move_cond(cond: Cond, device: torch.device) -> Cond:
    """A condition (tensor, dict of tensors or None) on ``device``."""
    if isinstance(cond, torch.Tensor):
        return cond.to(device)
    if isinstance(cond, dict):
        return {k: move_cond(v, device) for k, v in cond.items()}
    return cond


def network_dtype(net: torch.nn.Module, default: torch.dtype) -> torch.dtype:
    """The precision a network computes in: the one most of its floating-point weights hold (``default``, the
    input's, without any; a bf16 network may keep a few in float32, as Wan's time embedder). An adapter feeds
    its network inputs of this dtype, so a teacher whose weights were cast to bf16 runs without autocast too
    (trained LoRA adapters, float32, cast their own inputs)."""
    held: dict[torch.dtype, int] = {}
    for p in net.parameters():
        if p.is_floating_point():
            held[p.dtype] = held.get(p.dtype, 0) + p.numel()
    return max(held, key=held.get) if held else default


def cast_cond(cond: Cond, dtype: torch.dtype) -> Cond:
    """A condition with its floating-point tensors (text embeddings) in ``dtype``; labels keep theirs."""
    if isinstance(cond, torch.Tensor):
        return cond.to(dtype) if cond.is_floating_point() else cond
    if isinstance(cond, dict):
        return {k: cast_cond(v, dtype) for k, v in cond.items()}
    return cond


def expand_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Return sigma as a tensor of shape ``[B]`` on x's device, in float32 (float64 for float64 x)."""
    sigma = torch.as_tensor(sigma, device=x.device).to(torch.promote_types(x.dtype, torch.float32))
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape [{x.shape[0]}], got {tuple(sigma.shape)}")
    return sigma


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` [B], one per sample, viewed to scale ``like`` [B, ...] (an image [B, C, H, W] or a clip
    [B, C, T, H, W]) sample by sample."""
    return values.view(-1, *(1,) * (like.ndim - 1))


def tile_tokens(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Token sequences [B, ..., T_i, C] (tokens on the second-to-last axis: a text embedding [B, T, C], a stack
    of hidden states [B, L, T, C]) tiled to a common length, the least common multiple of the T_i
    (ComfyUI's rule for batching text embeddings): cross-attention over keys repeated k times gives every
    copy 1/k of the weight, so a cross-attention's output is unchanged; a model that reads a row's first T_i
    tokens (``ComfyDenoiser`` with row lengths) reads the row itself."""
    if len({(p.shape[1:-2], p.shape[-1]) for p in parts}) > 1:
        raise ValueError("token inputs differ in more than their token count: "
                         f"{sorted({tuple(p.shape[1:]) for p in parts})}")
    length = math.lcm(*(p.shape[-2] for p in parts))
    return [p.repeat(*(1,) * (p.ndim - 2), length // p.shape[-2], 1) for p in parts]


def clip_shape(still: tuple[int, ...], frames: int, per_latent: int) -> tuple[int, ...]:
    """The sample shape of a clip of ``frames`` video frames, ``still`` (C, H, W) a frame's: (C, T, H, W) with
    T = (frames - 1) // k + 1 latent frames of k = ``per_latent`` video frames each (the first frame alone, as
    video VAEs encode it, and as ComfyUI's and diffusers' video latents count); ``still`` for one latent frame."""
    latent_frames = (frames - 1) // per_latent + 1
    return (still[0], latent_frames, *still[1:]) if latent_frames > 1 else still


def tile_masks(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Token masks [B, T_i] tiled along their tokens as ``tile_tokens`` tiles the tokens they mask."""
    return [p[..., 0] for p in tile_tokens([p[..., None] for p in parts])]


def cat_conds(a: Cond, b: Cond) -> Cond:
    """Concatenate two batch-first conditions along the batch (for one batched CFG forward); token inputs
    of different token counts are tiled to a common length (``tile_tokens``), and so are token masks [B, T]
    (``tile_masks``: the only 2-D inputs whose widths differ between conditions of one model)."""
    if a is None and b is None:
        return None
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.ndim == b.ndim >= 3 and a.shape[-2] != b.shape[-2]:
            a, b = tile_tokens([a, b])
        elif a.ndim == b.ndim == 2 and a.shape[-1] != b.shape[-1]:
            a, b = tile_masks([a, b])
        return torch.cat([a, b])
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            raise ValueError(f"conditions have different keys: {sorted(a)} vs {sorted(b)}")
        return {k: cat_conds(a[k], b[k]) for k in a}
    raise TypeError(f"cannot batch conditions of types {type(a).__name__} and {type(b).__name__}")


def cat_all(conds: list[Cond]) -> Cond:
    """Concatenate several batch-first conditions along the batch."""
    out = conds[0]
    for c in conds[1:]:
        out = cat_conds(out, c)
    return out


def index_cond(cond: Cond, idx: torch.Tensor) -> Cond:
    """Rows ``idx`` of a batch-first condition."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: index_cond(v, idx) for k, v in cond.items()}
    return cond[idx.to(cond.device)]


def switch_rows(first: torch.Tensor, run_first: Callable[[torch.Tensor], torch.Tensor],
                run_rest: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One output row per row of a batch: ``run_first(idx)`` for the rows ``idx`` where the mask ``first`` [B]
    holds, ``run_rest(idx)`` for the others, each called only when it has rows (a model of two experts, each
    sample to the expert of its noise level)."""
    out = None
    for run, rows in ((run_first, first), (run_rest, ~first)):
        if rows.any():
            idx = rows.nonzero().squeeze(1)
            part = run(idx)
            out = part.new_empty((len(first), *part.shape[1:])) if out is None else out
            out[idx] = part
    return out

"""ComfyUI's models as engine denoisers, and ComfyUI ``CONDITIONING`` as engine conditions.

A ComfyUI ``MODEL`` is a ModelPatcher around a ``BaseModel``; ``BaseModel.apply_model(x, sigma,
c_crossattn=..., y=...)`` already takes sigma (not a timestep) and returns the x0 prediction for
every prediction type (eps, v, EDM), through its ``model_sampling``: exactly the engine's
``D(x, sigma, cond)``. So the adapter only moves conditions into its keyword arguments. Flow-matching
models (SD3, Flux, ...: ``model_sampling`` of the CONST family, x = (1 - sigma) x0 + sigma n) live in a
different noise convention and are refused with a clear message. A MODEL's model sampling is read
through its patcher (``model_sampling``): clones of one checkpoint share the BaseModel, whose attribute
holds the sampling of whichever clone was loaded last.

Nothing here imports ComfyUI: the adapter uses the model object it is given, so CI tests it with a
stand-in, and a real ComfyUI checkout runs the gated tests.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from distill_core.denoisers.base import Cond, expand_sigma


def model_sampling(model):
    """The noise convention of a ComfyUI MODEL (a ModelPatcher) or BaseModel. A patcher's own, through
    ``get_model_object`` (what its object patches, e.g. ModelSamplingSD3, install when it is loaded): the
    BaseModel's attribute is shared by every clone of a checkpoint and holds whichever clone ran last."""
    if hasattr(model, "get_model_object"):
        return model.get_model_object("model_sampling")
    return getattr(model, "model_sampling", None)


def refuse_unsupported(model, sampling=None) -> None:
    """A clear error for models whose noise convention the engine does not speak; ``model`` is a MODEL (a
    ModelPatcher) or its BaseModel, ``sampling`` its model sampling (default: ``model_sampling(model)``)."""
    base_model = model.model if hasattr(model, "get_model_object") else model
    sampling = sampling if sampling is not None else model_sampling(model)
    if sampling is None or not hasattr(base_model, "apply_model"):
        raise TypeError(
            f"expected a ComfyUI model (MODEL from Load Checkpoint: a ModelPatcher whose .model has "
            f"apply_model and model_sampling), got {type(base_model).__name__}"
        )
    kinds = {cls.__name__ for cls in type(sampling).__mro__}
    if "CONST" in kinds or any("Flow" in k for k in kinds):
        raise ValueError(
            "this is a flow-matching model (SD3, Flux, AuraFlow, ...): distillation supports "
            "eps-, v- and EDM-prediction models (SD1.x, SD2.x, SDXL) for now"
        )


class ComfyDenoiser(nn.Module):
    """``D(x, sigma, cond) = base_model.apply_model(x, sigma, **cond)``, cond a dict such as
    ``{"c_crossattn": [B, T, C], "y": [B, adm]}`` (see ``encode_conditioning``). ``sampling``: the MODEL's
    own model sampling (``model_sampling(patcher)``), which is the BaseModel's once the MODEL is loaded."""

    def __init__(self, base_model: nn.Module, sampling=None):
        super().__init__()
        sampling = sampling if sampling is not None else base_model.model_sampling
        refuse_unsupported(base_model, sampling)
        self.base = base_model
        self.sigma_min, self.sigma_max = float(sampling.sigma_min), float(sampling.sigma_max)

    @property
    def lora_target(self) -> tuple[nn.Module, str]:
        """LoRA file keys are relative to the BaseModel: ``diffusion_model.<layer>``, as ComfyUI's
        stock LoRA loader expects."""
        return self.base, "diffusion_model"

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond = None) -> torch.Tensor:
        if cond is not None and not isinstance(cond, dict):
            raise TypeError("a ComfyUI model's condition is a dict of model inputs (c_crossattn, y, ...)")
        return self.base.apply_model(x, expand_sigma(sigma, x), **(cond or {}))


def latent_shape(base_model: nn.Module, width: int, height: int) -> tuple[int, int, int]:
    """(channels, height / 8, width / 8) of the model's latent for an image of width x height."""
    channels = getattr(getattr(base_model, "latent_format", None), "latent_channels", 4)
    if width % 8 or height % 8:
        raise ValueError(f"width and height must be multiples of 8, got {width}x{height}")
    return channels, height // 8, width // 8


def encode_conditioning(base_model: nn.Module, conditioning: list, shape: tuple[int, ...]) -> dict:
    """ComfyUI ``CONDITIONING`` (a list of ``[cross_attn [1, T, C], {"pooled_output": ...}]``) as one
    batch-first condition, one row per entry. The model's own ``extra_conds`` builds its inputs
    (SDXL's ``y`` from the pooled output and sizes), as ComfyUI's samplers do. Entries whose token
    counts differ are tiled to a common length: cross-attention over keys repeated k times gives
    every copy 1/k of the weight, so the output is unchanged."""
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError("CONDITIONING must be a non-empty list of [tensor, dict] entries (from CLIP Text Encode)")
    rows = []
    for entry in conditioning:
        cross_attn, options = entry[0], dict(entry[1])
        if cross_attn.shape[0] != 1:
            raise ValueError(f"each CONDITIONING entry must hold one prompt, got a batch of {cross_attn.shape[0]}")
        options.setdefault("width", shape[-1] * 8)
        options.setdefault("height", shape[-2] * 8)
        noise = torch.zeros((1, *shape), device=cross_attn.device)
        out = base_model.extra_conds(cross_attn=cross_attn.clone(), device=cross_attn.device, noise=noise, **options)
        rows.append({k: v.cond.clone() for k, v in out.items()})
    keys = rows[0].keys()
    if any(r.keys() != keys for r in rows):
        raise ValueError("the CONDITIONING entries give different model inputs; encode them with one CLIP")
    if "c_concat" in keys:
        raise ValueError("inpainting / image-conditioned models (c_concat) are not supported for distillation")
    cond = {}
    for k in keys:
        parts = [r[k] for r in rows]
        if k == "c_crossattn":
            length = math.lcm(*(p.shape[1] for p in parts))
            parts = [p.repeat(1, length // p.shape[1], 1) for p in parts]
        cond[k] = torch.cat(parts)
    return cond

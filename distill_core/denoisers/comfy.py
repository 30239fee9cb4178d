"""ComfyUI's models as engine denoisers (their ``CONDITIONING`` as engine conditions: ``comfy_conditioning``;
their latents' shapes: ``comfy_family``).

A ComfyUI ``MODEL`` is a ModelPatcher around a ``BaseModel``; ``BaseModel.apply_model(x, sigma,
c_crossattn=..., y=...)`` takes the model's own noise level and returns the x0 prediction for every
prediction type, through its ``model_sampling``. Two conventions:

* variance exploding (EPS, V_PREDICTION, EDM, X0 and Cosmos' COSMOS_RFLOW, which divides by 1 + sigma
  inside): x = x0 + sigma n, exactly the engine's ``D(x, sigma, cond)``;
* flow (the CONST family: SD3 / 3.5, Flux, Wan, Qwen-Image, HiDream, Lumina 2, AuraFlow, Chroma):
  x_t = (1 - t) x0 + t n, where ComfyUI's "sigma" is the time t. With sigma = t / (1 - t) (see
  ``denoisers.flow``), x_t = x / (1 + sigma), so ``D(x, sigma) = apply_model(x / (1 + sigma), sigma / (1 + sigma))``.
  t = 1 is sigma = inf: the adapter stops at ``FLOW_SIGMA_MAX``.

Models with video latents ([B, C, T, H, W]: Wan, HunyuanVideo, Qwen-Image, ...) distil on images by default:
the engine holds one frame as [B, C, H, W] and the adapter adds the frame axis of length 1 around
``apply_model``. Video models also distil on clips (``latent_shape``'s ``length``): the engine then holds
[B, C, T, H, W] as it is, and every method treats a clip as one sample.

So the adapter only moves conditions into keyword arguments and, for flow models, changes variables (and, for a
clip that starts from an image in its latent, keeps that image's frames). A
MODEL's model sampling is read through its patcher (``model_sampling``): clones of one checkpoint share the
BaseModel, whose attribute holds the sampling of whichever clone was loaded last.

Nothing here imports ComfyUI: the adapter uses the model object it is given, so CI tests it with a
stand-in, and a real ComfyUI checkout runs the gated tests.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from distill_core.denoisers.base import Cond, conditional, expand_sigma, index_cond, per_sample, switch_rows
from distill_core.denoisers.comfy_conditioning import (
    KEPT_LATENT,
    KEPT_MASK,
    ONE_SAMPLE_INPUT,
    ROW_KEYS,
    keep_start,
    row_text,
)
from distill_core.denoisers.comfy_family import has_frame_axis, unet_config
from distill_core.denoisers.flow import FLOW_SIGMA_MAX, sigma_to_t, t_to_sigma

#: ComfyUI's prediction classes (``comfy.model_sampling``), the most derived first in a sampling's MRO
PREDICTIONS = ("EDM", "V_PREDICTION", "EPS", "X0", "IMG_TO_IMG", "CONST", "COSMOS_RFLOW")


def model_sampling(model):
    """The noise convention of a ComfyUI MODEL (a ModelPatcher) or BaseModel. A patcher's own, through
    ``get_model_object`` (what its object patches, e.g. ModelSamplingSD3, install when it is loaded): the
    BaseModel's attribute is shared by every clone of a checkpoint and holds whichever clone ran last."""
    if hasattr(model, "get_model_object"):
        return model.get_model_object("model_sampling")
    return getattr(model, "model_sampling", None)


def prediction(sampling) -> str:
    """The prediction class of a model sampling ("EPS", "V_PREDICTION", "EDM", "CONST", ...), or its class name."""
    names = [cls.__name__ for cls in type(sampling).__mro__]
    return next((n for n in names if n in PREDICTIONS), names[0])


def flow_shift(sampling) -> float:
    """The static time shift s of a flow model's sampling, t' = s t / (1 + (s - 1) t): SD3's ``shift`` as is;
    Flux's ``shift`` is mu of e^mu / (e^mu + 1 / t - 1), which is that shift with s = e^mu."""
    shift = float(getattr(sampling, "shift", 1.0))
    flux = any(cls.__name__ == "ModelSamplingFlux" for cls in type(sampling).__mro__)
    return math.exp(shift) if flux else shift


def refuse_unsupported(model, sampling=None) -> None:
    """A clear error for objects that are not ComfyUI models; ``model`` is a MODEL (a ModelPatcher) or its
    BaseModel, ``sampling`` its model sampling (default: ``model_sampling(model)``)."""
    base_model = model.model if hasattr(model, "get_model_object") else model
    sampling = sampling if sampling is not None else model_sampling(model)
    if sampling is None or not hasattr(base_model, "apply_model"):
        raise TypeError(
            f"expected a ComfyUI model (MODEL from Load Checkpoint: a ModelPatcher whose .model has "
            f"apply_model and model_sampling), got {type(base_model).__name__}"
        )
    if unet_config(base_model).get("meanflow"):
        raise ValueError(f"{type(base_model).__name__} is a MeanFlow few-step model (HunyuanImage 2.1 distilled): its "
                         "network reads the sampler's next sigma, which distillation does not feed; distil the base "
                         "model it came from")


class ComfyDenoiser(nn.Module):
    """``D(x, sigma, cond) = base_model.apply_model(x, sigma, **cond)`` for variance-exploding models, and
    ``apply_model(x / (1 + sigma), sigma / (1 + sigma), **cond)`` for flow models; cond a dict such as
    ``{"c_crossattn": [B, T, C], "y": [B, adm]}`` (see ``encode_conditioning``). ``sampling``: the MODEL's
    own model sampling (``model_sampling(patcher)``), which is the BaseModel's once the MODEL is loaded.

    ``prediction``: "flow" for flow models (the engine then offers the flow time grid, with the model's own
    ``shift``), else ComfyUI's prediction class in lower case.

    A condition with a start latent (``KEPT_LATENT``, Wan 2.2 5B, LTX-Video and HunyuanVideo v2 image-to-video) has
    the model's input and its x0 hold that latent on the start frames (``keep_start``), as ComfyUI's sampler does:
    ``D(x, sigma)`` is then the model's denoiser of the other frames given the clean start frames, whatever ``x``
    holds there. A condition with HunyuanVideo v2's guiding frame (``ONE_SAMPLE_INPUT``) runs one sample at a
    time: its model modulates the frame's tokens correctly for a batch of one only."""

    def __init__(self, base_model: nn.Module, sampling=None):
        super().__init__()
        sampling = sampling if sampling is not None else base_model.model_sampling
        refuse_unsupported(base_model, sampling)
        self.base = base_model
        self.kind = prediction(sampling)
        self.flow = self.kind == "CONST"
        self.prediction = "flow" if self.flow else self.kind.lower()
        self.frames = has_frame_axis(base_model)
        low, high = float(sampling.sigma_min), float(sampling.sigma_max)
        if self.flow:
            self.shift = flow_shift(sampling)
            low, high = t_to_sigma(low), (t_to_sigma(high) if high < 1 else math.inf)
            high = min(high, FLOW_SIGMA_MAX)
        self.sigma_min, self.sigma_max = low, high

    def settings(self) -> dict:
        """What ties a student to this teacher beside its weights: the prediction type and the noise range."""
        return {"preconditioning": "comfyui", "prediction": self.kind, "sigma_min": self.sigma_min,
                "sigma_max": self.sigma_max, **({"shift": self.shift} if self.flow else {})}

    @property
    def lora_target(self) -> tuple[nn.Module, str]:
        """LoRA file keys are relative to the BaseModel: ``diffusion_model.<layer>``, as ComfyUI's
        stock LoRA loader expects."""
        return self.base, "diffusion_model"

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond = None) -> torch.Tensor:
        if cond is not None and not isinstance(cond, dict):
            raise TypeError("a ComfyUI model's condition is a dict of model inputs (c_crossattn, y, ...)")
        cond = conditional(cond)
        sigma = expand_sigma(sigma, x)
        if cond and ONE_SAMPLE_INPUT in cond and len(x) > 1:  # each sample alone, as ComfyUI's sampler runs it
            return torch.cat([self(x[i:i + 1], sigma[i:i + 1], index_cond(cond, torch.tensor([i])))
                              for i in range(len(x))])
        if cond and any(k in cond for k in ROW_KEYS):
            return self._by_rows(x, sigma, cond)
        framed = self.frames and x.ndim == 4  # an image to a video model: one frame
        if framed:
            x = x.unsqueeze(2)
        if self.flow:
            x = x / (1 + per_sample(sigma, x))
            sigma = sigma_to_t(sigma)
        # a list input (reference latents) is held as a dict of its items
        inputs = {k: list(v.values()) if isinstance(v, dict) else v for k, v in (cond or {}).items()}
        kept, mask = inputs.pop(KEPT_LATENT, None), inputs.pop(KEPT_MASK, None)
        if kept is not None:  # the start frames, as ComfyUI's sampler keeps a LATENT's masked part
            x = keep_start(x, kept, mask)
        if not torch.is_grad_enabled():
            out = self.base.apply_model(x, sigma, **inputs)
        else:
            with torch.autograd.graph.saved_tensors_hooks(_keep_a_copy, _as_kept):
                out = self.base.apply_model(x, sigma, **inputs)
        if kept is not None:
            out = keep_start(out, kept, mask)
        return out.squeeze(2) if framed else out

    def _by_rows(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        """The rows of a batch grouped by their own token counts (``LENGTHS``), scalar model inputs
        (``CONSTANTS``) and text ones (``TEXTS``), one ``apply_model`` per group with its token inputs cut back
        to their own length, the scalars as numbers and the texts as strings: each row is what the model computes
        for it alone. (A model that joins text and image tokens in one attention, or reads its token count, would
        see tiled copies.)"""
        lengths, constants, texts = (cond.get(k, {}) for k in ROW_KEYS)
        rest = {k: v for k, v in cond.items() if k not in ROW_KEYS}
        scalars = [v.to(x.device, torch.float64)[:, None] for v in (*lengths.values(), *constants.values())]
        values = torch.cat([*scalars, *(v.to(x.device, torch.float64) for v in texts.values())], 1)
        out = torch.empty_like(x)
        for group in values.unique(dim=0):
            idx = (values == group).all(1).nonzero().squeeze(1)
            inputs = index_cond(rest, idx)
            for k, n in zip(lengths, group.tolist()[:len(lengths)], strict=True):
                inputs[k] = inputs[k][..., :int(n), :] if inputs[k].ndim >= 3 else inputs[k][..., :int(n)]
            inputs.update({k: v[int(idx[0])].item() for k, v in constants.items()})
            inputs.update({k: row_text(v[int(idx[0])]) for k, v in texts.items()})
            out[idx] = self(x[idx], sigma[idx], inputs).to(out.dtype)
        return out


class ComfyExperts(nn.Module):
    """Two ComfyUI flow MODELs of one family as one teacher, as Wan 2.2 A14B ships its two experts: ``high``
    denoises where the time t = sigma / (1 + sigma) is at or above ``boundary`` (ComfyUI's sigma of a flow
    model is t: 0.875 for Wan 2.2's text-to-video experts), ``low`` below it, each
    sample of a batch by its own sigma, as the two samplers of a Wan 2.2 workflow hand over. A LoRA student
    adapts both networks; its file keys are ``high.diffusion_model.<layer>`` and ``low.diffusion_model.<layer>``
    (``EXPERTS``), which ``expert_loras`` splits into one stock LoRA per expert."""

    def __init__(self, high: ComfyDenoiser, low: ComfyDenoiser, boundary: float):
        super().__init__()
        if not (high.flow and low.flow):
            raise ValueError("two experts switched at a time boundary are flow models (Wan 2.2 14B's high- and "
                             "low-noise models); for another model leave low_noise_model unconnected")
        if type(high.base) is not type(low.base) or high.frames != low.frames:
            raise ValueError(f"the experts are two kinds of model ({type(high.base).__name__} and "
                             f"{type(low.base).__name__}): connect the high- and low-noise models of one release")
        if abs(high.shift - low.shift) > 1e-6:
            raise ValueError(f"the experts sample with different shifts ({high.shift:g} and {low.shift:g}): give both "
                             "the same ModelSamplingSD3 shift, as their sampler does")
        if not 0 < boundary < 1:
            raise ValueError(f"the experts' boundary is a time t between 0 and 1 (Wan 2.2 text-to-video: 0.875), "
                             f"got {boundary:g}")
        self.high, self.low, self.boundary = high, low, float(boundary)
        self.kind, self.flow, self.prediction, self.shift = high.kind, True, "flow", high.shift
        self.frames = high.frames
        self.sigma_min, self.sigma_max = low.sigma_min, high.sigma_max

    def settings(self) -> dict:
        return {**self.high.settings(), "sigma_min": self.sigma_min, "expert_boundary": self.boundary}

    @property
    def lora_target(self) -> tuple[nn.Module, str]:
        """Each expert's network under its name, so that its keys read as the stock loader's own once the name
        is cut off (``expert_loras``)."""
        return nn.ModuleDict({name: nn.ModuleDict({"diffusion_model": getattr(self, name).base.diffusion_model})
                              for name in EXPERTS}), ""

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond = None) -> torch.Tensor:
        sigma = expand_sigma(sigma, x)
        return switch_rows(sigma_to_t(sigma) >= self.boundary,
                           lambda idx: self.high(x[idx], sigma[idx], index_cond(cond, idx)),
                           lambda idx: self.low(x[idx], sigma[idx], index_cond(cond, idx)))


def high_noise_steps(times: torch.Tensor, boundary: float) -> int:
    """How many steps of a schedule of times t (a two-expert student's, as ComfyUI gives it) the high-noise
    expert takes: those that start at t >= ``boundary``, where ``ComfyExperts`` hands a sample to it (the first
    step at least: a flow student starts at t = 0.988, above every boundary the teacher node takes)."""
    return int((times[:-1] >= boundary).sum())


#: the names of a two-expert teacher's networks (``ComfyExperts``), the prefixes of its LoRA students' keys
EXPERTS = ("high", "low")


def expert_loras(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A LoRA student of a two-expert teacher as one stock LoRA per expert: {"high": ..., "low": ...}, each
    with the expert's keys (``diffusion_model.<layer>...``) and nothing else."""
    return {name: {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
            for name in EXPERTS}


def _keep_a_copy(tensor: torch.Tensor) -> torch.Tensor:
    """What backward keeps of a tensor ComfyUI's forward saves: a copy, since its DiT blocks add into their
    inputs in place (Flux: ``x += ...``), which would change the tensor autograd saved. Frozen weights
    (parameters, never changed in place) are kept as they are."""
    return tensor if isinstance(tensor, nn.Parameter) else tensor.clone()


def _as_kept(tensor: torch.Tensor) -> torch.Tensor:
    return tensor

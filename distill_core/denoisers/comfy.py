"""ComfyUI's models as engine denoisers, and ComfyUI ``CONDITIONING`` as engine conditions.

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

from distill_core.denoisers.base import (
    Cond,
    clip_shape,
    expand_sigma,
    index_cond,
    per_sample,
    switch_rows,
    tile_masks,
    tile_tokens,
)
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


def unet_config(base_model: nn.Module) -> dict:
    """The network's configuration as ComfyUI detected it from the checkpoint (``model_config.unet_config``)."""
    return getattr(getattr(base_model, "model_config", None), "unet_config", None) or {}


class ComfyDenoiser(nn.Module):
    """``D(x, sigma, cond) = base_model.apply_model(x, sigma, **cond)`` for variance-exploding models, and
    ``apply_model(x / (1 + sigma), sigma / (1 + sigma), **cond)`` for flow models; cond a dict such as
    ``{"c_crossattn": [B, T, C], "y": [B, adm]}`` (see ``encode_conditioning``). ``sampling``: the MODEL's
    own model sampling (``model_sampling(patcher)``), which is the BaseModel's once the MODEL is loaded.

    ``prediction``: "flow" for flow models (the engine then offers the flow time grid, with the model's own
    ``shift``), else ComfyUI's prediction class in lower case.

    A condition with a start latent (``KEPT_LATENT``, Wan 2.2 5B and LTX-Video image-to-video) has the model's
    input and its x0 hold that latent on the start frames (``keep_start``), as ComfyUI's sampler does: ``D(x,
    sigma)`` is then the model's denoiser of the other frames given the clean start frames, whatever ``x`` holds
    there."""

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
        sigma = expand_sigma(sigma, x)
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
        kept = inputs.pop(KEPT_LATENT, None)
        if kept is not None:  # the start frames, as ComfyUI's sampler keeps a LATENT's masked part
            x = keep_start(x, kept, inputs[KEEP_MASK])
        if not torch.is_grad_enabled():
            out = self.base.apply_model(x, sigma, **inputs)
        else:
            with torch.autograd.graph.saved_tensors_hooks(_keep_a_copy, _as_kept):
                out = self.base.apply_model(x, sigma, **inputs)
        if kept is not None:
            out = keep_start(out, kept, inputs[KEEP_MASK])
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


#: ComfyUI latent formats whose VAE shrinks an image by other than 8 per side (the versions of ComfyUI that
#: predate ``spacial_downscale_ratio`` on the format do not say it), as their own empty-latent nodes make
#: them: Wan 2.2 5B's 48-channel VAE, HunyuanImage 2.1's, LTX-Video's, and Chroma Radiance's pixel space
DOWNSCALE = {"Wan22": 16, "HunyuanImage21": 32, "LTXV": 32, "ChromaRadiance": 1}


def latent_downscale(base_model: nn.Module) -> int:
    """How many image pixels one latent pixel spans per side: for the families in ``DOWNSCALE`` their VAE's
    (whatever the format says: a version may inherit its base class's 8), else the format's own
    ``spacial_downscale_ratio`` where ComfyUI gives one, else 8 (SD, SDXL, SD3, Flux, Wan 2.1)."""
    latent_format = getattr(base_model, "latent_format", None)
    name = type(latent_format).__name__
    return DOWNSCALE.get(name) or int(getattr(latent_format, "spacial_downscale_ratio", None) or 8)


#: ComfyUI's video models (BaseModel classes, subclasses included) and how many video frames one latent frame
#: spans, as their own empty-latent nodes count: a clip of ``length`` frames is (length - 1) // k + 1 latent frames
VIDEO_FRAMES = {"WAN21": 4, "HunyuanVideo": 4, "LTXV": 8, "GenmoMochi": 6, "CosmosVideo": 8}


#: ComfyUI's models whose network refuses some latent sizes (BaseModel classes, subclasses included): PixArt cuts
#: patches of 2 x 2 latent pixels without padding, so its sides are even, and its position table divides by
#: round(side / 64) of the mean side (h + w) // 2, which must be over 32
UNPADDED_PATCH, LEAST_MEAN_SIDE = {"PixArt": 2}, {"PixArt": 33}


def _family_value(base_model: nn.Module, table: dict, default):
    """The value ``table`` holds for the model's BaseModel class or the nearest base class it names."""
    return next((table[c.__name__] for c in type(base_model).__mro__ if c.__name__ in table), default)


def frames_per_latent(base_model: nn.Module) -> int | None:
    """k, the video frames per latent frame of a video model (``VIDEO_FRAMES``); None for an image model,
    Qwen-Image and Cosmos Predict2 text-to-image among them (video latents, image networks)."""
    return _family_value(base_model, VIDEO_FRAMES, None)


def latent_shape(base_model: nn.Module, width: int, height: int, length: int = 1) -> tuple[int, ...]:
    """(channels, height / f, width / f) of the model's latent of one width x height image, f its
    ``latent_downscale`` (8 for most; Wan 2.2 5B: 16). A latent with a frame axis (the video VAEs of Wan and
    Qwen-Image) is one frame, held without the axis (``has_frame_axis``). A clip of a video model, ``length``
    frames, is (channels, T, height / f, width / f) with T = (length - 1) // k + 1 latent frames
    (``frames_per_latent``); a clip of one latent frame is an image. Sizes that a family's network refuses
    (``UNPADDED_PATCH``, ``LEAST_MEAN_SIDE``) are refused here, before training."""
    latent_format = getattr(base_model, "latent_format", None)
    dims = getattr(latent_format, "latent_dimensions", 2)
    name = type(base_model).__name__
    if dims not in (2, 3):
        raise ValueError(f"{name} has {dims}-dimensional latents: distillation supports image models and models "
                         "with video latents (SD1.x, SD2.x, SDXL, SD3, Flux, Wan, Qwen-Image, ...)")
    channels = getattr(latent_format, "latent_channels", 4)
    f = latent_downscale(base_model)
    patch = _family_value(base_model, UNPADDED_PATCH, 1)
    if width % (f * patch) or height % (f * patch):
        patches = f" and whose network takes unpadded patches of {patch} x {patch} latent pixels" if patch > 1 else ""
        raise ValueError(f"width and height must be multiples of {f * patch} for {name}, whose latent pixel spans {f} "
                         f"image pixels{patches}; got {width}x{height}")
    least = _family_value(base_model, LEAST_MEAN_SIDE, 1)
    if (height // f + width // f) // 2 < least:
        raise ValueError(f"{name} needs width + height of at least {2 * least * f} pixels (its position table fails on "
                         f"smaller latents); got {width}x{height}")
    still = (channels, height // f, width // f)
    if length == 1:
        return still
    k = frames_per_latent(base_model)
    if k is None:
        raise ValueError(f"{name} is an image model: set length to 1 (clips of several frames need a video model: "
                         "Wan, HunyuanVideo, LTX-Video, Mochi, Cosmos)")
    return clip_shape(still, length, k)


def has_frame_axis(base_model: nn.Module) -> bool:
    """Whether the model's latents are video latents [B, C, T, H, W] (Wan, Qwen-Image). The engine holds an
    image as [B, C, H, W]; ``ComfyDenoiser`` hands such a model one frame, [B, C, 1, H, W]."""
    return getattr(getattr(base_model, "latent_format", None), "latent_dimensions", 2) == 3


#: the keys of a condition's scalar model inputs (``CONDConstant``, one value per row), of its text ones (a
#: ``CONDConstant`` string: FluxKontextMultiReferenceLatentMethod's ``ref_latents_method``, one row of UTF-8 bytes
#: each, ``text_rows``) and of each row's own token count (before tiling) in every token input
CONSTANTS, TEXTS, LENGTHS = "constants", "texts", "lengths"
#: the keys under which a condition holds what the adapter hands the model row group by row group (``_by_rows``)
ROW_KEYS = (LENGTHS, CONSTANTS, TEXTS)
#: the bytes of a text input's row (its UTF-8 bytes, zero-padded)
TEXT_BYTES = 32
#: the model input of an image-conditioned model (an image-to-video model's start frames, an inpainting model's
#: masked image), laid out as the sample
IMAGE_INPUT = "c_concat"
#: a start latent's two parts in a condition (Wan 2.2 5B and LTX-Video image-to-video, ``start_rows``): the model
#: input that masks the start frames off (ComfyUI's ``denoise_mask``: 0 on them, 1 elsewhere) and the latent they
#: hold, in the model's scale, which the adapter keeps in place of the sample there (``keep_start``)
KEEP_MASK, KEPT_LATENT = "denoise_mask", "kept_latent"
#: the model input of an editing model's reference images (Flux Kontext's, Qwen-Image-Edit's: ComfyUI's CONDList of
#: latents, from ReferenceLatent or TextEncodeQwenImageEdit), held as a dict of its items, each batch-first
REFERENCES = "ref_latents"
#: the model inputs made from an entry's image (beside ``IMAGE_INPUT``, Wan 2.1 image-to-video's CLIP vision
#: features, a start latent's and reference latents), which the unconditional side of CFG takes from each row
#: (``CFGTeacher.uncond_like``)
IMAGE_INPUTS = (IMAGE_INPUT, "clip_fea", KEEP_MASK, KEPT_LATENT, REFERENCES)
#: ComfyUI's models (BaseModel classes, subclasses included) whose samplers keep a LATENT's masked part as it is at
#: every step (``scale_latent_inpaint`` gives the latent back, not re-noised) and that read the mask as a time per
#: latent frame or patch, 0 on the start frames: Wan 2.2 5B and LTX-Video, whose image-to-video modes start from the
#: LATENT of Wan22ImageToVideoLatent and of LTXVImgToVideo
KEEPS_START = ("WAN22", "LTXV")


def keep_start(x: torch.Tensor, kept: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x * m + kept * (1 - m)``: the sample (or the model's x0) with the start frames, where the mask m is 0,
    replaced by the kept latent; ComfyUI's sampler does this to the model's input and to its output (the noise
    level on those frames is 0: they are clean). ``mask`` [B, 1, T, H, W] broadcasts over the channels."""
    return x * mask + kept.to(x.dtype) * (1 - mask)


def start_rows(base_model: nn.Module, start: dict, shape: tuple[int, ...], prompts: int) -> tuple:
    """(the start latents in the model's scale [N, C, T, H, W], their masks [N, 1, T, H, W]) of a LATENT with a start
    image (Wan22ImageToVideoLatent's with its ``start_image``, LTXVImgToVideo's: ``samples`` and ``noise_mask``, 0 on
    the image's latent frames, or 1 - strength; LTX-Video's one value per frame), one row per start image (one for
    all ``prompts``, or one each, in order), checked against the model and the teacher's clip ``shape``
    (C, T, H, W)."""
    name = type(base_model).__name__
    if not any(cls.__name__ in KEEPS_START for cls in type(base_model).__mro__):
        raise ValueError(f"a start latent is for Wan 2.2 5B and LTX-Video image-to-video, and the model is {name}: for "
                         "Wan 2.1 / 2.2 14B image-to-video give each prompt its image through WanImageToVideo's "
                         "positive, and leave start_latent unconnected")
    if not isinstance(start, dict) or "noise_mask" not in start:
        raise ValueError("the start latent holds no start image: connect an image to start_image of "
                         "Wan22ImageToVideoLatent, or use LTXVImgToVideo's latent (without an image, leave "
                         "start_latent unconnected: text-to-video)")
    samples, mask = start["samples"], start["noise_mask"]
    if len(shape) != 4:
        raise ValueError("with a start image the teacher distils clips: set length to the clip's frames (a clip of "
                         "one frame would be the start image itself)")
    if tuple(samples.shape[1:]) != tuple(shape):
        raise ValueError(f"the start latent is {list(samples.shape[1:])} (channels, frames, height, width) and the "
                         f"teacher's clips are {list(shape)}: give its node (Wan22ImageToVideoLatent, "
                         "LTXVImgToVideo) the teacher's width, height and length")
    if len(samples) not in (1, prompts):
        raise ValueError(f"the start latent holds {len(samples)} images for {prompts} prompts: give one image for "
                         "all prompts, or one per prompt in order (Latent Batch joins them)")
    if mask.ndim != 5 or any(m not in (1, s) for m, s in zip(mask.shape[2:], shape[1:], strict=True)):
        raise ValueError(f"the start latent's noise mask is {list(mask.shape)}, not one per latent frame or pixel "
                         "of its clip: make the latent with Wan22ImageToVideoLatent or LTXVImgToVideo")
    mask = mask[:, :1] if len(mask) == len(samples) else mask[:1, :1]
    mask = mask.float().expand(len(samples), 1, *shape[1:])
    return base_model.process_latent_in(samples.float()), mask


def encode_conditioning(base_model: nn.Module, conditioning: list, shape: tuple[int, ...],
                        start: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """ComfyUI ``CONDITIONING`` (a list of ``[cross_attn [1, T, C], {"pooled_output": ...}]``) as one
    batch-first condition, one row per entry. The model's own ``extra_conds`` builds its inputs
    (SDXL's ``y`` from the pooled output and sizes), as ComfyUI's samplers do. Entries whose token
    counts differ are stored tiled to a common length (``tile_tokens``; a token mask [1, T] the same way along
    its tokens), with each row's own token count in every token input under ``LENGTHS``; scalar inputs
    (``CONDConstant``, as Lumina 2's token count) are kept per row under ``CONSTANTS``. The adapter calls the
    model once per group of rows that agree on both, each on its own tokens (``ComfyDenoiser._by_rows``):
    tiling is exact for cross-attention (SD1.x, SDXL, Wan) but not for the DiTs that join text and image
    tokens in one attention (SD3, Flux, Chroma, Qwen-Image, HiDream, Lumina 2), where repeated text keys would
    take k times their weight. An image-conditioned model (Wan image-to-video, an inpainting model) takes each
    entry's image (``concat_latent_image``, as WanImageToVideo or InpaintModelConditioning write it) as
    ``IMAGE_INPUT``, one row per entry at the sample's size (``check_image_input``). ``start``: start latents and their
    masks (Wan 2.2 5B and LTX-Video image-to-video, ``start_rows``), entry i starting from latent i modulo their
    count: its mask as the model input ``KEEP_MASK`` (made by ``extra_conds``, as ComfyUI's samplers make it) and
    its latent under ``KEPT_LATENT``."""
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError("CONDITIONING must be a non-empty list of [tensor, dict] entries (from CLIP Text Encode)")
    rows = []
    for i, entry in enumerate(conditioning):
        cross_attn, options = entry[0], dict(entry[1])
        if cross_attn.shape[0] != 1:
            raise ValueError(f"each CONDITIONING entry must hold one prompt, got a batch of {cross_attn.shape[0]}")
        options.setdefault("width", shape[-1] * latent_downscale(base_model))
        options.setdefault("height", shape[-2] * latent_downscale(base_model))
        framed = (*shape[:-2], 1, *shape[-2:]) if has_frame_axis(base_model) and len(shape) == 3 else shape
        noise = torch.zeros((1, *framed), device=cross_attn.device)
        if getattr(base_model, "concat_keys", ()):  # an inpainting model, whose inputs need the entry's image
            check_image_input(None, noise, options, len(rows))
        if start is not None:
            options[KEEP_MASK] = start[1][i % len(start[1])][None]
        out = base_model.extra_conds(cross_attn=cross_attn.clone(), device=cross_attn.device, noise=noise, **options)
        if IMAGE_INPUT in out:
            check_image_input(out[IMAGE_INPUT].cond, noise, options, len(rows))
        # an input ComfyUI leaves None (Cosmos Predict2's fps for an image) is left out: the model's default
        rows.append({k: _row_input(k, v.cond) for k, v in out.items() if v.cond is not None})
        if start is not None:
            rows[-1][KEPT_LATENT] = start[0][i % len(start[0])][None].clone()
    keys = rows[0].keys()
    if any(r.keys() != keys for r in rows):
        some = sorted(set().union(*rows) - set.intersection(*(set(r) for r in rows)))
        raise ValueError(f"the CONDITIONING entries give different model inputs ({', '.join(some)} in some entries, "
                         "not in others): encode them all with one CLIP, and for HunyuanImage 2.1 either quote "
                         "text in every prompt or in none (quoted text adds its glyph tokens)")
    cond, constants, texts, lengths = {}, {}, {}, {}
    for k in keys:
        parts = [r[k] for r in rows]
        if isinstance(parts[0], str):  # a text input, one per row
            texts[k] = text_rows(k, parts)
            continue
        if isinstance(parts[0], dict):  # a list input: each item batched across the entries
            cond[k] = _batched_items(k, parts)
            continue
        if k in (IMAGE_INPUT, KEEP_MASK, KEPT_LATENT):  # laid out as the sample, one row per entry
            cond[k] = torch.cat(parts)
            continue
        if parts[0].ndim == 0:  # a scalar input, one per row
            constants[k] = torch.stack(parts)
            continue
        if parts[0].ndim >= 3:  # tokens on the second-to-last axis
            lengths[k] = torch.tensor([p.shape[-2] for p in parts])
            parts = tile_tokens(parts)
        elif parts[0].ndim == 2 and "mask" in k:  # a token mask [1, T] (HunyuanDiT's, LTX-Video's)
            lengths[k] = torch.tensor([p.shape[-1] for p in parts])
            parts = tile_masks(parts)
        cond[k] = torch.cat(parts)
    if constants:
        cond[CONSTANTS] = constants
    if texts:
        cond[TEXTS] = texts
    if lengths:
        cond[LENGTHS] = lengths
    return cond


def check_image_input(image: torch.Tensor | None, noise: torch.Tensor, options: dict, entry: int) -> None:
    """Refuse a CONDITIONING entry of an image-conditioned model that carries no image (the model would see a
    blank one, or fail) or whose image input (``image``, where made) spans other latent frames than the teacher's
    samples."""
    if "concat_latent_image" not in options:
        raise ValueError(f"CONDITIONING entry {entry} has no image, and this model is conditioned on one (an "
                         "image-to-video or inpainting model): give every prompt its image through the model's own "
                         "conditioning node (WanImageToVideo, InpaintModelConditioning), at the teacher's size")
    if image is not None and image.shape[2:] != noise.shape[2:]:
        raise ValueError(f"the image of CONDITIONING entry {entry} makes a model input of {list(image.shape[2:])} "
                         f"latent pixels (frames first), and the teacher's samples are {list(noise.shape[2:])}: "
                         "give the image's node the teacher's width, height and length")


def _row_input(name: str, value) -> torch.Tensor | dict[str, torch.Tensor] | str:
    """One entry's model input: a tensor, a number (``CONDConstant``: Lumina 2's ``num_tokens``) as a 0-d tensor,
    a string (``CONDConstant``: the reference method of Flux Kontext and Qwen-Image-Edit) as it is, or a list of
    tensors (``CONDList``: reference latents) as a dict of its items."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, bool | int | float):
        return torch.tensor(value)
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, torch.Tensor) for v in value):
        return {str(i): v.clone() for i, v in enumerate(value)}
    raise ValueError(f"the model input {name!r} of this conditioning is a {type(value).__name__}, which "
                     "distillation cannot batch; it supports tensor, number, text and tensor-list inputs")


def text_rows(name: str, texts: list[str]) -> torch.Tensor:
    """The strings of one text input, one per entry, as rows of their UTF-8 bytes [N, ``TEXT_BYTES``], zero-padded:
    a batch-first condition holds them as it holds every input (indexed, moved and joined as a tensor), and
    ``row_text`` reads a row back."""
    encoded = [text.encode() for text in texts]
    if any(len(e) > TEXT_BYTES or b"\0" in e for e in encoded):
        raise ValueError(f"the model input {name!r} is a text of more than {TEXT_BYTES} bytes or with a zero byte "
                         f"({', '.join(map(repr, texts))}), which distillation does not batch")
    return torch.tensor([list(e.ljust(TEXT_BYTES, b"\0")) for e in encoded], dtype=torch.uint8)


def row_text(row: torch.Tensor) -> str:
    """The string of one row of ``text_rows``."""
    return bytes(row.tolist()).rstrip(b"\0").decode()


def _batched_items(name: str, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The items of one list input of every entry, each concatenated along the batch; refused where the entries'
    lists differ in length or shapes (reference images of other sizes)."""
    shapes = [[tuple(v.shape[1:]) for v in p.values()] for p in parts]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"the CONDITIONING entries' {name} (reference images) differ in count or size "
                         f"({', '.join(map(str, shapes))} latent sizes): give every prompt as many reference images, "
                         "each at one size (scale the images to one size before the node that encodes them)")
    return {i: torch.cat([p[i] for p in parts]) for i in parts[0]}


#: the options of an editing model's CONDITIONING entry that come with its reference images, each with what it is
#: and the node that sets it
REFERENCE_OPTIONS = {"reference_latents": ("reference images", "TextEncodeQwenImageEdit or ReferenceLatent with "
                                                               "the same image"),
                     "reference_latents_method": ("a reference method", "FluxKontextMultiReferenceLatentMethod with "
                                                                        "the same method")}


def negative_with_references(positive: list, negative: list, cfg: float) -> list:
    """The negative entries given the first positive's reference images and reference method where they have none
    (ComfyUI's Flux Kontext workflows zero out the prompt for the negative before the image is added): CFG's
    unconditional side takes each row's own (``IMAGE_INPUTS``). At CFG 1 the negative does not count; above it, the
    sampler would run the negative without them, which one batch cannot: refused, naming the fix."""
    given = {k: v for k, v in positive[0][1].items() if k in REFERENCE_OPTIONS}
    missing = [k for k in given if any(k not in entry[1] for entry in negative)]
    if not missing:
        return negative
    if cfg != 1.0:
        what, fix = (" and ".join(REFERENCE_OPTIONS[k][i] for k in missing) for i in (0, 1))
        raise ValueError(f"the positive prompts carry {what} and the negative does not, which the sampler runs "
                         f"without them at CFG above 1: give the negative the same ({fix} on it), or set the "
                         "guidance to 1")
    return [[entry[0], {**given, **entry[1]}] for entry in negative]


def teacher_inputs(base_model: nn.Module, positive: list, negative: list, shape: tuple[int, ...], guidance: float,
                   start: dict | None = None) -> tuple[dict, float]:
    """(the model inputs of every ``positive`` entry and, as the last row, of the first ``negative`` one, the CFG
    scale w): ``encode_conditioning`` of them, each prompt starting from its image of the LATENT ``start`` where one
    is given (``start_rows``), the negative given the prompts' reference images where it has none
    (``negative_with_references``). A guidance-distilled model (Flux dev) takes ``guidance`` as its input, and
    samples with w = 1; any other model with w = ``guidance``. What cannot be batched is refused here."""
    guided = embeds_guidance(base_model)
    cfg = 1.0 if guided else guidance
    prompts = list(positive) + negative_with_references(positive, negative[:1], cfg)
    kept = start_rows(base_model, start, shape, len(positive)) if start is not None else None
    return encode_conditioning(base_model, with_guidance(prompts, guidance) if guided else prompts, shape, kept), cfg


def embeds_guidance(base_model: nn.Module) -> bool:
    """Whether the model is guidance-distilled (Flux dev): it takes the guidance scale as an input (the
    ``guidance`` of its conditioning, which ComfyUI's FluxGuidance node writes) instead of sampling with CFG."""
    return bool(unet_config(base_model).get("guidance_embed", False))


def with_guidance(conditioning: list, guidance: float) -> list:
    """CONDITIONING entries with the guidance input of a guidance-distilled model set to ``guidance``, as
    FluxGuidance sets it."""
    return [[entry[0], {**entry[1], "guidance": float(guidance)}] for entry in conditioning]

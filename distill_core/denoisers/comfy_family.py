"""What a ComfyUI model's family implies for distillation: the shape of its latents (channels, how many image
pixels a latent pixel spans, video frames per latent frame, the sizes its network refuses) and the flags of its
configuration (guidance as an input). Read from the BaseModel's classes and latent format, without importing
ComfyUI."""

from __future__ import annotations

from torch import nn

from distill_core.denoisers.base import clip_shape


def unet_config(base_model: nn.Module) -> dict:
    """The network's configuration as ComfyUI detected it from the checkpoint (``model_config.unet_config``)."""
    return getattr(getattr(base_model, "model_config", None), "unet_config", None) or {}


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


def embeds_guidance(base_model: nn.Module) -> bool:
    """Whether the model is guidance-distilled (Flux dev): it takes the guidance scale as an input (the
    ``guidance`` of its conditioning, which ComfyUI's FluxGuidance node writes) instead of sampling with CFG."""
    return bool(unet_config(base_model).get("guidance_embed", False))

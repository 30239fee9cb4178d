"""diffusers' flow-matching networks as the velocity network ``net(x_t, time, cond)`` of a ``FlowDenoiser``.

Every diffusers flow model (``FlowMatchEulerDiscreteScheduler``, or a multistep solver with ``use_flow_sigmas``
as Wan's UniPC) trains on x_t = (1 - t) x0 + t n and predicts v = n - x0, the convention of ``denoisers.flow``;
they differ in what they take besides x_t:

* a ``UNet2DModel``: the time t * T (T = ``num_train_timesteps``) and optional class labels;
* SD3's ``SD3Transformer2DModel``: t * T, the text encoders' token embeddings c (``encoder_hidden_states``) and
  their pooled embedding p (``pooled_projections``), given as a condition of those keywords; AuraFlow's
  ``AuraFlowTransformer2DModel``: t itself and c;
* Flux's ``FluxTransformer2DModel``: t itself, c and p as SD3, the latent cut into 2 x 2 patches, each patch a
  token of 4 C channels with its position (0, row, column) (``img_ids``; text tokens at 0, ``txt_ids``), and, in
  a guidance-distilled model (Flux dev), the guidance scale g as an input: v(x_t, t, c, p, g); Flux Kontext's
  the same with the image it edits beside the sample, its latent's patches at (1, row, column); Chroma's
  ``ChromaTransformer2DModel``: as Flux without p and g, with its text tokens' mask (``attention_mask``), every
  image token attended;
* Ovis-Image's ``OvisImageTransformer2DModel``: as Flux's without guidance or pooled embedding, its text tokens at
  (0, l, l) (``OvisImageVelocity``); LongCat-Image's the same, its image tokens after its padded text
  (``LongCatImageVelocity``);
* Lumina 2's ``Lumina2Transformer2DModel`` and Z-Image's ``ZImageTransformer2DModel`` run time the other way:
  they take t' = 1 - t (0: pure noise) and predict the velocity of that time, dx/dt' = x0 - n = -v
  (``ReversedTime``); Lumina 2 takes c with its padding mask (``encoder_attention_mask``), Z-Image each
  sample as a list entry [C, 1, H, W] and each prompt's tokens unpadded (``cap_feats``, cut to its mask);
* Qwen-Image's ``QwenImageTransformer2DModel``: t itself, the latent packed as Flux's, the text encoder's token
  embeddings c with their padding mask m (``encoder_hidden_states_mask``: prompts of different lengths share one
  padded table), and the latent's patch grid (1, H / 2, W / 2) for its rotary positions (``img_shapes``);
  Qwen-Image-Edit's the same with the image it edits after the sample's tokens, its grid the second;
* SANA's ``SanaTransformer2DModel``: t * T times its ``timestep_scale``, c with its padding mask
  (``encoder_attention_mask``), on the latents of its deep-compression autoencoder;
* HiDream's ``HiDreamImageTransformer2DModel``: t * T, T5's token embeddings, Llama 3.1's hidden states of every
  layer ([layers, B, L, D]: stored batch first, ``encoder_hidden_states_llama3``) and the two CLIPs' pooled
  embeddings side by side; it predicts -v;
* Flux.2's ``Flux2Transformer2DModel``: t itself and c, on latents whose channels are the VAE's 2 x 2 patches
  already (Flux.2's VAE normalises them): each latent pixel a token at position (0, row, column, 0), text
  token l at (0, 0, 0, l), and an edit's image's latent pixels at (10, row, column, 0); Flux.2 dev, guidance-distilled
  as Flux dev, also takes g;
* HunyuanVideo 1.5's ``HunyuanVideo15Transformer3DModel``: t * T, Qwen2.5-VL's and ByT5's token embeddings with
  their masks, on video latents beside its text-to-video pipeline's empty start-image inputs
  (``HunyuanVideo15Velocity``);
* LTX-Video's ``LTXVideoTransformer3DModel``: t * T, T5's c with its mask, each latent pixel of a clip a token,
  with the clip's grid and rotary positions in frames and pixels (``LTXVelocity``);
* CogView4's ``CogView4Transformer2DModel``: GLM-4's token embeddings of each prompt alone and the image's size
  and crop, at the time before its scheduler's shift (``CogView4Velocity``);
* Wan's ``WanTransformer3DModel``: t * T and c, on video latents [B, C, F, H, W]: an image is one frame (F = 1);
  Wan 2.2 A14B's two of them, one expert for high noise and one for low (``WanExperts``); its image-to-video
  transformer also reads the clip's start condition beside it (``start_images``).

The time shift s that a model's scheduler samples with (t' = s t / (1 + (s - 1) t); Flux and Qwen-Image:
s = e^mu, mu linear in the image's token count; a scheduler with the linear time shift: s = mu; Flux.2: its
pipelines' fit in the token count and the step count, taken at their default ``FLUX2_STEPS``; CogView4: mu in the
square root of the token count) does not change the denoiser (but CogView4's, whose network takes the time before
the shift); it sets the students' flow grid (``FlowDenoiser.shift``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from distill_core.denoisers.base import switch_rows
from distill_core.denoisers.flow import FLOW_SIGMA_MAX, FlowDenoiser, t_to_sigma
from distill_core.reference_images import REFERENCE_TABLE
from distill_core.schedules import cogview4_shift, flux2_shift, flux_shift
from distill_core.start_images import KEPT_START, SIGLIP_EMBEDDINGS, START_TABLE

#: the embedded guidance a guidance-distilled model is distilled at unless the run says another, by network: its
#: pipeline's default (FluxPipeline's 3.5, Flux2Pipeline's 4)
EMBEDDED_GUIDANCE = {"FluxTransformer2DModel": 3.5, "Flux2Transformer2DModel": 4.0}
#: the step count at which Flux.2's shift sets its students' grid (its pipelines' default)
FLUX2_STEPS = 50
#: the time coordinate of the tokens of the image a Flux.2 edit reads (its pipelines' first reference image's)
REFERENCE_TIME = 10
#: the image embeddings HunyuanVideo 1.5's text-to-video pipeline gives its transformer, all zeros (its
#: ``vision_num_semantic_tokens``)
HUNYUAN15_IMAGE_TOKENS = 729


class UNetVelocity(nn.Module):
    """A diffusers UNet as v(x_t, t T, labels)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, time: torch.Tensor, cond=None) -> torch.Tensor:
        return self.unet(x, time, class_labels=cond, return_dict=False)[0]


class KeywordVelocity(nn.Module):
    """A transformer that takes its condition as keywords beside ``hidden_states`` and ``timestep``: SD3's as
    v(x_t, t T, {"encoder_hidden_states": c, "pooled_projections": p}), AuraFlow's as v(x_t, t, {"encoder_hidden_
    states": c}), SANA's as v(x_t, t T s, {"encoder_hidden_states": c, "encoder_attention_mask": m})."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x: torch.Tensor, time: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.transformer(hidden_states=x, timestep=time, **cond, return_dict=False)[0]


#: the text tokens LongCat-Image's pipeline pads every prompt to, past which its image tokens' positions start
LONGCAT_TEXT_TOKENS = 512
#: how far below a whole number CogView4's time input may land, from float32's rounding of t, and still count as it
WHOLE_TOLERANCE = 1e-3


class CogView4Velocity(nn.Module):
    """CogView4's transformer as v(x_t, t, {"encoder_hidden_states": c, "encoder_attention_mask": m, "original_size",
    "target_size", "crop_coords"}). Its pipeline feeds the network the time before its shift, T t_u cast to a whole
    number, while the noise is at the shifted t = mu t_u / (1 + (mu - 1) t_u): so t_u = t / (mu - (mu - 1) t). It
    encodes each prompt alone, its tokens left-padded to a multiple of 16 and all attended (no mask reaches the
    network): prompts of different lengths (the rows of m) run in separate calls, each with its own tokens, as the
    pipeline runs each."""

    def __init__(self, transformer: nn.Module, mu: float, steps: int):
        super().__init__()
        self.transformer, self.mu, self.steps = transformer, mu, steps

    def time_input(self, time: torch.Tensor) -> torch.Tensor:
        """The network's time input at the shifted time t: T t_u, down to a whole number as its pipeline casts it
        (a whole number that t, rounded to float32, lands just below counts as reached), in float32 as its
        pipeline gives it, whatever the network computes in."""
        t = time.double()
        return torch.floor(self.steps * t / (self.mu - (self.mu - 1) * t) + WHOLE_TOLERANCE).float()

    def forward(self, x: torch.Tensor, time: torch.Tensor, cond: dict) -> torch.Tensor:
        cond = dict(cond)
        lengths = cond.pop("encoder_attention_mask").sum(dim=1)
        time = self.time_input(time.expand(x.shape[0]))
        parts, order = [], []
        for length in lengths.unique().tolist():
            rows = (lengths == length).nonzero().squeeze(1)
            inputs = {key: value[rows] for key, value in cond.items()}
            inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, :length]
            parts.append(self.transformer(hidden_states=x[rows], timestep=time[rows], **inputs, return_dict=False)[0])
            order.append(rows)
        return torch.cat(parts)[torch.cat(order).argsort()]


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] latents as (H / 2)(W / 2) tokens of their 2 x 2 patches, 4 C channels each (Flux, Qwen-Image)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)


def unpack(tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``pack``'s inverse: tokens back to latents of ``shape`` [B, C, H, W]."""
    b, c, h, w = shape
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def each_reference(reference: torch.Tensor | None) -> list[torch.Tensor]:
    """The latents [B, C, H', W'] of each image a condition's reference table holds: none, its one image's
    ([B, C, H', W']), or each of its set's ([B, R, C, H', W'])."""
    if reference is None:
        return []
    return list(reference.unbind(1)) if reference.ndim == 5 else [reference]


class FluxVelocity(nn.Module):
    """Flux's transformer as v(x_t, t, {"encoder_hidden_states": c, "pooled_projections": p}) on [B, C, H, W]
    latents: packed into (H / 2)(W / 2) tokens of 4 C channels at positions (0, row, column) on the way in,
    unpacked on the way out; ``guidance``: the embedded guidance g of a guidance-distilled model (None for one
    without, as Flux schnell, and Chroma, whose transformer takes no guidance input). Chroma's condition adds its
    text tokens' mask m ({"attention_mask": m}), which every image token joins. Flux Kontext's adds the latents of
    the image being edited (``REFERENCE_TABLE``: [B, C, H', W']), packed as the sample and joined to its tokens at
    positions (1, row, column); the velocity is the sample's tokens' alone."""

    def __init__(self, transformer: nn.Module, guidance: float | None):
        super().__init__()
        self.transformer, self.guidance = transformer, guidance

    def forward(self, x: torch.Tensor, time: torch.Tensor, cond: dict) -> torch.Tensor:
        b, c, h, w = x.shape
        cond = dict(cond)
        tokens, img_ids = pack(x), self.image_positions(h // 2, w // 2, x)
        reference = cond.pop(REFERENCE_TABLE, None)
        if reference is not None:
            tokens = torch.cat([tokens, pack(reference.to(x.dtype))], dim=1)
            img_ids = torch.cat([img_ids, patch_positions(reference.shape[-2] // 2, reference.shape[-1] // 2, 1, x)])
        text_tokens = cond["encoder_hidden_states"].shape[1]
        if self.guidance is not None:
            cond["guidance"] = torch.full((b,), self.guidance, device=x.device)
        if "attention_mask" in cond:
            cond["attention_mask"] = torch.cat([cond["attention_mask"], torch.ones(b, tokens.shape[1], dtype=torch.bool,
                                                                                  device=x.device)], dim=1)
        v = self.transformer(hidden_states=tokens, timestep=time, **cond, txt_ids=self.text_positions(text_tokens, x),
                             img_ids=img_ids, return_dict=False)[0]
        return unpack(v[:, :h * w // 4], x.shape)

    def text_positions(self, tokens: int, like: torch.Tensor) -> torch.Tensor:
        """The positions of the text tokens [L, 3]: all at 0."""
        return like.new_zeros(tokens, 3)

    def image_positions(self, rows: int, columns: int, like: torch.Tensor) -> torch.Tensor:
        """The positions of the sample's rows x columns patch tokens [rows columns, 3]: (0, row, column)."""
        return patch_positions(rows, columns, 0, like)


class LongCatImageVelocity(FluxVelocity):
    """LongCat-Image's transformer, Flux's layout without guidance or pooled embedding, as v(x_t, t,
    {"encoder_hidden_states": c}): its text token l at position (0, l, l), the sample's patch tokens at
    (1, ``LONGCAT_TEXT_TOKENS`` + row, ``LONGCAT_TEXT_TOKENS`` + column), past its pipeline's padded text."""

    def __init__(self, transformer: nn.Module):
        super().__init__(transformer, None)

    def text_positions(self, tokens: int, like: torch.Tensor) -> torch.Tensor:
        return diagonal_positions(tokens, like)

    def image_positions(self, rows: int, columns: int, like: torch.Tensor) -> torch.Tensor:
        ids = patch_positions(rows, columns, 1, like)
        ids[:, 1:] += LONGCAT_TEXT_TOKENS
        return ids


def diagonal_positions(tokens: int, like: torch.Tensor) -> torch.Tensor:
    """Text token l at position (0, l, l) [L, 3] (Ovis-Image's, LongCat-Image's), on ``like``'s device and dtype."""
    ids = like.new_zeros(tokens, 3)
    ids[:, 1] = ids[:, 2] = torch.arange(tokens, device=like.device, dtype=like.dtype)
    return ids


class OvisImageVelocity(FluxVelocity):
    """Ovis-Image's transformer, Flux's layout without guidance or pooled embedding, as v(x_t, t,
    {"encoder_hidden_states": c}): its text token l at position (0, l, l)."""

    def __init__(self, transformer: nn.Module):
        super().__init__(transformer, None)

    def text_positions(self, tokens: int, like: torch.Tensor) -> torch.Tensor:
        return diagonal_positions(tokens, like)


def patch_positions(rows: int, columns: int, index: int, like: torch.Tensor) -> torch.Tensor:
    """Flux's positions of a latent's rows x columns patch tokens, row by row: (index, row, column) [rows columns, 3]
    (index 0: the sample; 1: Flux Kontext's reference image), on ``like``'s device and in its dtype."""
    ids = torch.zeros(rows, columns, 3, device=like.device, dtype=like.dtype)
    ids[..., 0] = index
    ids[..., 1] += torch.arange(rows, device=like.device, dtype=like.dtype)[:, None]
    ids[..., 2] += torch.arange(columns, device=like.device, dtype=like.dtype)[None, :]
    return ids.view(-1, 3)


class HiDreamVelocity(nn.Module):
    """HiDream's transformer, which predicts -v, as v(x_t, t T, {"encoder_hidden_states_t5": c_T5,
    "encoder_hidden_states_llama3": c_Llama [B, layers, L, D], "pooled_embeds": p}). Its mixtures of experts
    route tokens without gradients in eval mode: wherever gradients are wanted (a student's forward, a LoRA
    student's frozen base included) they take their training route, the same sum of the same experts. In
    training mode the transformer returns its patches unplaced, [B, C, (H / p)(W / p), p p]: put back in place
    here."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        self.mixtures = [m for m in transformer.modules() if hasattr(m, "moe_infer")]

    def forward(self, x: torch.Tensor, time: torch.Tensor, cond: dict) -> torch.Tensor:
        cond = {**cond, "encoder_hidden_states_llama3": cond["encoder_hidden_states_llama3"].transpose(0, 1)}
        modes = [m.training for m in self.mixtures]
        for m in self.mixtures:
            m.training = m.training or torch.is_grad_enabled()
        try:
            out = self.transformer(hidden_states=x, timesteps=time, **cond, return_dict=False)[0]
        finally:
            for m, mode in zip(self.mixtures, modes):
                m.training = mode
        if out.shape != x.shape:  # the training layout: patch (row, column) tokens of p x p pixels
            b, c, h, w = x.shape
            p = self.transformer.config.patch_size
            out = out.view(b, c, h // p, w // p, p, p).permute(0, 1, 2, 4, 3, 5).reshape(x.shape)
        return -out


class Flux2Velocity(nn.Module):
    """Flux.2's transformer as v(x_t, t, {"encoder_hidden_states": c}) on [B, C, H, W] latents of 2 x 2 VAE
    patches: every latent pixel a token at (0, row, column, 0), text token l at (0, 0, 0, l); ``guidance``: the
    embedded guidance g of a guidance-distilled model (Flux.2 dev; None for klein, which takes none). An edit's
    condition adds the latents of the image being edited (``REFERENCE_TABLE``: [B, C, H', W']), their tokens after
    the sample's at (``REFERENCE_TIME``, row, column, 0), or of a set of R images ([B, R, C, H', W']), image r's at
    ((r + 1) ``REFERENCE_TIME``, row, column, 0), as its pipelines place them; the velocity is the sample's tokens'
    alone."""

    def __init__(self, transformer: nn.Module, guidance: float | None = None):
        super().__init__()
        self.transformer, self.guidance = transformer, guidance

    def forward(self, x: torch.Tensor, time: torch.Tensor, cond: dict) -> torch.Tensor:
        b, _, h, w = x.shape
        cond = dict(cond)

        def grid(*sizes: int, start: int = 0) -> torch.Tensor:
            axes = [torch.arange(n, device=x.device) for n in sizes]
            axes[0] = axes[0] + start
            return torch.cartesian_prod(*axes).expand(b, -1, -1)

        tokens, img_ids = x.flatten(2).transpose(1, 2), grid(1, h, w, 1)
        reference = cond.pop(REFERENCE_TABLE, None)
        for r, latent in enumerate(each_reference(reference)):  # reference r's tokens at time (r + 1) REFERENCE_TIME
            tokens = torch.cat([tokens, latent.to(x.dtype).flatten(2).transpose(1, 2)], dim=1)
            img_ids = torch.cat([img_ids, grid(1, *latent.shape[-2:], 1, start=(r + 1) * REFERENCE_TIME)], dim=1)
        if self.guidance is not None:
            cond["guidance"] = torch.full((b,), self.guidance, device=x.device)
        txt_ids = grid(1, 1, 1, cond["encoder_hidden_states"].shape[1])
        v = self.transformer(hidden_states=tokens, timestep=time, **cond, img_ids=img_ids, txt_ids=txt_ids,
                             return_dict=False)[0]
        return v[:, :h * w].transpose(1, 2).reshape(x.shape)


class QwenImageVelocity(nn.Module):
    """Qwen-Image's transformer as v(x_t, t, {"encoder_hidden_states": c, "encoder_hidden_states_mask": m}) on
    [B, C, H, W] latents, packed as Flux's, with their patch grid as ``img_shapes``. Qwen-Image-Edit's condition adds
    the latents of the image being edited (``REFERENCE_TABLE``: [B, C, H', W']), packed and joined after the
    sample's tokens, their grid the second of ``img_shapes``, or of a set of R images ([B, R, C, H', W']), each
    after the one before, with its grid; the velocity is the sample's tokens' alone."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x: torch.Tensor, time: torch.Tensor, cond: dict) -> torch.Tensor:
        b, _, h, w = x.shape
        cond = dict(cond)
        tokens, grids = pack(x), [(1, h // 2, w // 2)]
        reference = cond.pop(REFERENCE_TABLE, None)
        for latent in each_reference(reference):
            tokens = torch.cat([tokens, pack(latent.to(x.dtype))], dim=1)
            grids.append((1, latent.shape[-2] // 2, latent.shape[-1] // 2))
        v = self.transformer(hidden_states=tokens, timestep=time, img_shapes=[grids] * b, **cond,
                             return_dict=False)[0]
        return unpack(v[:, :h * w // 4], x.shape)


class ReversedTime(nn.Module):
    """A network of reversed time (Lumina 2, Z-Image), ``net(x_t, 1 - t, cond)`` = dx/d(1 - t) = -v, as
    v(x_t, t, cond)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, time: torch.Tensor, cond: dict) -> torch.Tensor:
        return -self.net(x, 1 - time, cond)


class Lumina2Output(nn.Module):
    """Lumina 2's transformer as ``net(x_t, 1 - t, {"encoder_hidden_states": c, "encoder_attention_mask": m})``."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x: torch.Tensor, time: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.transformer(hidden_states=x, timestep=time, **cond, return_dict=False)[0]


class ZImageOutput(nn.Module):
    """Z-Image's transformer as ``net(x_t, 1 - t, {"cap_feats": c, "cap_mask": m})`` on [B, C, H, W] latents:
    each sample a list entry of one frame [C, 1, H, W], each prompt's tokens c cut to its mask m."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x: torch.Tensor, time: torch.Tensor, cond: dict) -> torch.Tensor:
        tokens = [feats[mask] for feats, mask in zip(cond["cap_feats"], cond["cap_mask"])]
        out = self.transformer(list(x[:, :, None].unbind(0)), time.expand(len(x)), tokens, return_dict=False)[0]
        return torch.stack(out)[:, :, 0]


class WanVelocity(nn.Module):
    """Wan's video transformer as v(x_t, t T, {"encoder_hidden_states": c}) on clips [B, C, F, H, W], and on
    images: [B, C, H, W] latents as videos of one frame. Its image-to-video transformer's condition adds the start
    condition y (``START_TABLE``: [B, k + C, F, H, W], the mask and the start image's latents), joined to the clip
    along the channels, and in Wan 2.1, CLIP's embeddings of the start image (``encoder_hidden_states_image``);
    Wan 2.2 TI2V 5B's the start latent (``KEPT_START``: [B, C, 1, H, W]), which replaces the clip's first frame,
    whose tokens take the time 0 (``start_images``)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x: torch.Tensor, time: torch.Tensor, cond: dict) -> torch.Tensor:
        still = x.ndim == 4
        cond = dict(cond)
        start, kept = cond.pop(START_TABLE, None), cond.pop(KEPT_START, None)
        clip = x[:, :, None] if still else x
        if start is not None:
            clip = torch.cat([clip, start.to(x.dtype)], dim=1)
        if kept is not None:
            clip, time = with_start_frame(clip, kept, time, self.transformer.config.patch_size)
        v = self.transformer(hidden_states=clip, timestep=time, **cond, return_dict=False)[0]
        return v[:, :, 0] if still else v


def with_start_frame(clip: torch.Tensor, kept: torch.Tensor, time: torch.Tensor,
                     patch: tuple[int, int, int] = (1, 1, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """A clip [B, C, F, H, W] whose first latent frame is the start latent ``kept`` [B, C, 1, H, W], and the time of
    each of its tokens (patches of ``patch`` frames, rows and columns, one frame deep), 0 on the first frame's: it
    is clean (Wan 2.2 TI2V 5B's and LTX-Video's image-to-video); the others' the sample's ``time`` [B]."""
    frames, rows, columns = (side // size for side, size in zip(clip.shape[2:], patch))
    later = (torch.arange(frames * rows * columns, device=clip.device) >= rows * columns).to(time.dtype)
    return torch.cat([kept.to(clip.dtype), clip[:, :, 1:]], dim=2), time.expand(len(clip))[:, None] * later


class HunyuanVideo15Velocity(nn.Module):
    """HunyuanVideo 1.5's transformer as v(x_t, t T, {"encoder_hidden_states": c, "encoder_attention_mask": m,
    "encoder_hidden_states_2": c_2, "encoder_attention_mask_2": m_2}) (Qwen2.5-VL's tokens and ByT5's, each with
    its mask) on video latents [B, C, F, H, W] (an image: one frame), beside a start image's latents and mask
    ([B, 2 C + 1, F, H, W]) and its SigLIP embeddings: an image-to-video condition's (``START_TABLE``,
    ``SIGLIP_EMBEDDINGS``), or as its text-to-video pipeline gives them, zeros, and zero embeddings
    (``HUNYUAN15_IMAGE_TOKENS``), which it reads as no image."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x: torch.Tensor, time: torch.Tensor, cond: dict) -> torch.Tensor:
        clip, cond = (x[:, :, None] if x.ndim == 4 else x), dict(cond)
        start = cond.pop(START_TABLE, None)
        start = torch.cat([torch.zeros_like(clip), torch.zeros_like(clip[:, :1])], dim=1) if start is None else \
            start.to(clip.dtype)
        image = cond.pop(SIGLIP_EMBEDDINGS, None)
        image = clip.new_zeros(len(clip), HUNYUAN15_IMAGE_TOKENS, self.transformer.config.image_embed_dim) \
            if image is None else image.to(clip.dtype)
        v = self.transformer(hidden_states=torch.cat([clip, start], dim=1), timestep=time, image_embeds=image,
                             **cond, return_dict=False)[0]
        return v.view(x.shape)


class WanExperts(nn.Module):
    """Wan 2.2's two experts as one network: ``high`` (its pipeline's ``transformer``) at times t T at or above
    the boundary (``boundary_ratio`` T), ``low`` (``transformer_2``) below it, as its pipeline switches them;
    each sample of a batch by its own time, with its own rows of every other input. Guidance is one w for both
    (its pipeline's ``guidance_scale_2`` defaults to its ``guidance_scale``)."""

    def __init__(self, high: nn.Module, low: nn.Module, boundary: float):
        super().__init__()
        self.high, self.low, self.boundary = high, low, boundary

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, return_dict: bool = False,
                **inputs: torch.Tensor) -> tuple[torch.Tensor]:
        timestep = timestep.expand(len(hidden_states))

        def run(expert: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda idx: expert(hidden_states=hidden_states[idx], timestep=timestep[idx],
                                      **{key: value[idx] for key, value in inputs.items()}, return_dict=False)[0]

        return (switch_rows(timestep >= self.boundary, run(self.high), run(self.low)),)


#: the frame rate at which LTX-Video's pipeline places a clip's frames in time (its call's ``frame_rate``)
LTX_FRAME_RATE = 25


class LTXVelocity(nn.Module):
    """LTX-Video's transformer as v(x_t, t T, {"encoder_hidden_states": c, "encoder_attention_mask": m}) on clips
    [B, C, F, H, W] (images: clips of one frame), each latent pixel a token in (frame, row, column) order, with the
    clip's latent grid and its rotary positions in video frames at ``LTX_FRAME_RATE`` and in pixels (``span``: the
    video frames and pixels a latent pixel of its VAE spans), as its pipeline calls it. Its image-to-video pipeline's
    condition adds the start latent (``KEPT_START``), which replaces the clip's first frame, whose tokens take the
    time 0."""

    def __init__(self, transformer: nn.Module, span: tuple[int, int]):
        super().__init__()
        self.transformer, self.span = transformer, span

    def forward(self, x: torch.Tensor, time: torch.Tensor, cond: dict) -> torch.Tensor:
        still = x.ndim == 4
        cond = dict(cond)
        kept = cond.pop(KEPT_START, None)
        clip = x[:, :, None] if still else x
        b, c, f, h, w = clip.shape
        if kept is not None:
            clip, time = with_start_frame(clip, kept, time)
        frames, pixels = self.span
        v = self.transformer(hidden_states=clip.flatten(2).transpose(1, 2), timestep=time, **cond, num_frames=f,
                             height=h, width=w, rope_interpolation_scale=(frames / LTX_FRAME_RATE, pixels, pixels),
                             return_dict=False)[0]
        v = v.transpose(1, 2).reshape(b, c, f, h, w)
        return v[:, :, 0] if still else v


#: the networks that take a guidance input where they are guidance-distilled (``guidance_embeds``): their velocity
#: wrappers, which take the embedded guidance g (None: no input), and their time t itself
GUIDED_VELOCITIES = {"FluxTransformer2DModel": FluxVelocity, "Flux2Transformer2DModel": Flux2Velocity}
#: each other diffusers flow network: its velocity wrapper,
#: and whether it takes the time as t T (T = ``num_train_timesteps``) or as t; others: ``UNetVelocity``, t T
VELOCITIES: dict[str, tuple[Callable[[nn.Module], nn.Module], bool]] = {
    "SD3Transformer2DModel": (KeywordVelocity, True),
    "SanaTransformer2DModel": (KeywordVelocity, True),
    "AuraFlowTransformer2DModel": (KeywordVelocity, False),
    "ChromaTransformer2DModel": (lambda model: FluxVelocity(model, None), False),
    "QwenImageTransformer2DModel": (QwenImageVelocity, False),
    "OvisImageTransformer2DModel": (OvisImageVelocity, False),
    "LongCatImageTransformer2DModel": (LongCatImageVelocity, False),
    "HiDreamImageTransformer2DModel": (HiDreamVelocity, True),
    "Lumina2Transformer2DModel": (lambda model: ReversedTime(Lumina2Output(model)), False),
    "ZImageTransformer2DModel": (lambda model: ReversedTime(ZImageOutput(model)), False),
    "WanTransformer3DModel": (WanVelocity, True),
    "WanExperts": (WanVelocity, True),
    "HunyuanVideo15Transformer3DModel": (HunyuanVideo15Velocity, True),
}


def flow_denoiser(model: nn.Module, scheduler: dict, shape: tuple[int, ...],
                  embedded_guidance: float | None = None, span: tuple[int, int] = (1, 1)) -> FlowDenoiser:
    """The ``FlowDenoiser`` of a diffusers flow model with its scheduler's config, for samples of ``shape``
    (C, H, W), or clips (C, F, H, W): from its lowest trained time t = 1 / T to sigma_max = 80, shifted as its
    scheduler samples; a guidance-distilled Flux or Flux.2 model at ``embedded_guidance`` (default its pipeline's,
    ``EMBEDDED_GUIDANCE``);
    LTX-Video's with its VAE's ``span`` (video frames, pixels) per latent pixel."""
    steps = int(scheduler.get("num_train_timesteps", 1000))
    name = type(model).__name__
    if name in GUIDED_VELOCITIES:  # its embedded guidance, where it takes one
        embedded = EMBEDDED_GUIDANCE[name] if embedded_guidance is None else embedded_guidance
        net, per_step = GUIDED_VELOCITIES[name](model, embedded if model.config.guidance_embeds else None), False
    elif name == "LTXVideoTransformer3DModel":
        net, per_step = LTXVelocity(model, span), True
    elif name == "CogView4Transformer2DModel":  # its shift, on its patch tokens, also maps its time input
        mu = cogview4_shift(shape[1] * shape[2] // 4, scheduler.get("base_shift", 0.25),
                            scheduler.get("max_shift", 0.75), scheduler.get("base_image_seq_len", 256))
        net, per_step = CogView4Velocity(model, mu, steps), False
    else:
        wrap, per_step = VELOCITIES.get(name, (UNetVelocity, True))
        net = wrap(model)
    # the time input per unit of t: T or 1, times the network's own timestep_scale (SANA's) where it has one
    time_scale = (float(steps) if per_step else 1.0) * float(getattr(model, "config", {}).get("timestep_scale", 1.0))
    if name == "Flux2Transformer2DModel":  # its pipelines' own fit, whatever its scheduler's config says
        shift = flux2_shift(shape[1] * shape[2], FLUX2_STEPS)
    elif name == "CogView4Transformer2DModel":
        shift = net.mu
    elif scheduler.get("use_dynamic_shifting"):  # on its token count: LTX-Video's a token per latent pixel, the
        # others' per 2 x 2 patch
        tokens = math.prod(shape[1:]) if name == "LTXVideoTransformer3DModel" else shape[1] * shape[2] // 4
        shift = flux_shift(tokens, scheduler.get("base_shift", 0.5), scheduler.get("max_shift", 1.15),
                           scheduler.get("base_image_seq_len", 256), scheduler.get("max_image_seq_len", 4096))
        if scheduler.get("time_shift_type") == "linear":  # t' = mu t / (1 + (mu - 1) t): the shift is mu itself
            shift = math.log(shift)
    else:  # FlowMatch's "shift"; a multistep solver's flow variant (Wan's UniPC): "flow_shift"
        shift = float(scheduler.get("shift", scheduler.get("flow_shift", 1.0)))
    return FlowDenoiser(net, float(t_to_sigma(1 / steps)), FLOW_SIGMA_MAX, time_scale=time_scale, shift=shift)

"""ComfyUI ``CONDITIONING`` as engine conditions: every entry's model inputs, made by the model's own
``extra_conds`` as ComfyUI's samplers make them, batched one row per entry (``encode_conditioning``), with what
a row cannot share with the others held per row (token counts, scalar and text inputs, start images, reference
images); and the refusals of what one batch cannot hold, named at the node that holds it (``teacher_inputs``).
``ComfyDenoiser`` hands the rows back to the model."""

from __future__ import annotations

import torch
from torch import nn

from distill_core.denoisers.base import tile_masks, tile_tokens
from distill_core.denoisers.comfy_family import embeds_guidance, has_frame_axis, latent_downscale

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
#: a start latent's parts in a condition (Wan 2.2 5B, LTX-Video and HunyuanVideo v2 image-to-video,
#: ``start_rows``): the model input that masks the start frames off (ComfyUI's ``denoise_mask``, made by the models
#: that read it), and the mask (0 on the start frames, 1 elsewhere) and the latent they hold, in the model's scale,
#: which the adapter keeps in place of the sample there (``keep_start``)
KEEP_MASK, KEPT_MASK, KEPT_LATENT = "denoise_mask", "kept_mask", "kept_latent"
#: the model input of an editing model's reference images (Flux Kontext's, Qwen-Image-Edit's: ComfyUI's CONDList of
#: latents, from ReferenceLatent or TextEncodeQwenImageEdit), held as a dict of its items, each batch-first
REFERENCES = "ref_latents"
#: the model inputs made from an entry's image (beside ``IMAGE_INPUT``, Wan 2.1 image-to-video's CLIP vision
#: features, a start latent's and reference latents), which the unconditional side of CFG takes from each row
#: (``CFGTeacher.uncond_like``)
IMAGE_INPUTS = (IMAGE_INPUT, "clip_fea", KEEP_MASK, KEPT_MASK, KEPT_LATENT, REFERENCES)
#: ComfyUI's models (BaseModel classes, subclasses included) whose samplers keep a LATENT's masked part as it is at
#: every step (``scale_latent_inpaint`` gives the latent back, not re-noised), their start frames clean to the
#: model: Wan 2.2 5B and LTX-Video, which read the mask as a time per latent frame or patch (0 on the start frames),
#: and HunyuanVideo, whose v2 image-to-video model reads its start frame at time 0 (HunyuanImageToVideo's
#: ``guiding_frame_index``); their image-to-video modes start from the LATENT of Wan22ImageToVideoLatent,
#: LTXVImgToVideo and HunyuanImageToVideo (v2, replace)
KEEPS_START = ("WAN22", "LTXV", "HunyuanVideo")
#: the model input of HunyuanVideo v2's guiding start frame (HunyuanImageToVideo's), whose tokens its model
#: modulates correctly in a batch of one only: the adapter runs such rows one at a time (``ComfyDenoiser``)
ONE_SAMPLE_INPUT = "guiding_frame_index"


def keep_start(x: torch.Tensor, kept: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x * m + kept * (1 - m)``: the sample (or the model's x0) with the start frames, where the mask m is 0,
    replaced by the kept latent; ComfyUI's sampler does this to the model's input and to its output (the noise
    level on those frames is 0: they are clean). ``mask`` [B, 1, T, H, W] broadcasts over the channels."""
    return x * mask + kept.to(x.dtype) * (1 - mask)


def start_rows(base_model: nn.Module, start: dict, shape: tuple[int, ...], prompts: int) -> tuple:
    """(the start latents in the model's scale [N, C, T, H, W], their masks [N, 1, T, H, W]) of a LATENT with a start
    image (Wan22ImageToVideoLatent's with its ``start_image``, LTXVImgToVideo's, HunyuanImageToVideo's in v2
    (replace): ``samples`` and ``noise_mask``, 0 on the image's latent frames, or 1 - strength; LTX-Video's one value
    per frame), one row per start image (one for
    all ``prompts``, or one each, in order), checked against the model and the teacher's clip ``shape``
    (C, T, H, W)."""
    name = type(base_model).__name__
    if not any(cls.__name__ in KEEPS_START for cls in type(base_model).__mro__):
        raise ValueError(f"a start latent is for Wan 2.2 5B, LTX-Video and HunyuanVideo v2 image-to-video, and the "
                         f"model is {name}: for Wan 2.1 / 2.2 14B image-to-video give each prompt its image through "
                         "WanImageToVideo's positive, and leave start_latent unconnected")
    if not isinstance(start, dict) or "noise_mask" not in start:
        raise ValueError("the start latent holds no start image: connect an image to start_image of "
                         "Wan22ImageToVideoLatent or HunyuanImageToVideo (v2), or use LTXVImgToVideo's latent (without "
                         "an image, leave start_latent unconnected: text-to-video)")
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
    (``CONDConstant``, as Lumina 2's token count) are kept per row under ``CONSTANTS``, text ones (a reference
    method) under ``TEXTS``. The adapter calls the model once per group of rows that agree on all of them, each on
    its own tokens (``ComfyDenoiser._by_rows``):
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
            rows[-1][KEPT_MASK] = start[1][i % len(start[1])][None].clone()
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
        if k in (IMAGE_INPUT, KEEP_MASK, KEPT_MASK, KEPT_LATENT):  # laid out as the sample, one row per entry
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


#: the options of a CONDITIONING entry that come with its images, each with what it is and the node that sets it:
#: an editing model's reference images and their method; an image-to-video or inpainting model's image, its mask
#: and CLIP vision features (HunyuanImageToVideo sets them on the positive only)
IMAGE_OPTIONS = {"reference_latents": ("reference images", "TextEncodeQwenImageEdit or ReferenceLatent with the same "
                                                           "image"),
                 "reference_latents_method": ("a reference method", "FluxKontextMultiReferenceLatentMethod with the "
                                                                    "same method"),
                 "concat_latent_image": ("an image", "the model's image node with the same image"),
                 "concat_mask": ("its mask", "the same mask"),
                 "clip_vision_output": ("CLIP vision features", "the same clip_vision_output"),
                 "guiding_frame_index": ("a guiding start frame", "HunyuanImageToVideo (v2) on it too")}


def negative_with_images(positive: list, negative: list, cfg: float) -> list:
    """The negative entries given their prompts' images (``IMAGE_OPTIONS``) where they have none (ComfyUI's Flux
    Kontext workflows zero out the prompt for the negative before the image is added; HunyuanImageToVideo gives
    only the positive its image), entry i its own prompt's where the negatives are paired with the prompts
    (``paired_negatives``), else the first prompt's: CFG's unconditional side takes each row's own
    (``IMAGE_INPUTS``). At CFG 1 the negative does not count; above it, the sampler would run the negative without
    them, which one batch cannot: refused, naming the fix."""
    paired = paired_negatives(positive, negative)
    out, missing = [], set()
    for i, entry in enumerate(negative):
        given = {k: v for k, v in positive[i if paired else 0][1].items() if k in IMAGE_OPTIONS}
        missing |= set(given) - set(entry[1])
        out.append([entry[0], {**given, **entry[1]}])
    if not missing:
        return negative
    if cfg != 1.0:
        what, fix = (" and ".join(IMAGE_OPTIONS[k][i] for k in IMAGE_OPTIONS if k in missing) for i in (0, 1))
        raise ValueError(f"the positive prompts carry {what} and the negative does not, which the sampler runs "
                         f"without them at CFG above 1: give the negative the same ({fix} on it), or set the "
                         "guidance to 1")
    return out


def paired_negatives(positive: list, negative: list) -> bool:
    """Whether each prompt has its own negative: as many negative entries as positive ones, more than one (an
    editing model's negatives, each encoded with its prompt's image, as TextEncodeQwenImageEdit encodes them);
    else the first negative entry is every prompt's."""
    return len(positive) > 1 and len(negative) == len(positive)


def teacher_inputs(base_model: nn.Module, positive: list, negative: list, shape: tuple[int, ...], guidance: float,
                   start: dict | None = None) -> tuple[dict, float]:
    """(the model inputs of every ``positive`` entry and, after them, of the first ``negative`` one, or of every
    negative where each prompt has its own (``paired_negatives``), the CFG scale w): ``encode_conditioning`` of
    them, each prompt starting from its image of the LATENT ``start`` where one is given (``start_rows``), the
    negatives given the prompts' images where they have none (``negative_with_images``). A
    guidance-distilled model (Flux dev) takes ``guidance`` as its input, and samples with w = 1; any other model
    with w = ``guidance``. What cannot be batched is refused here."""
    guided = embeds_guidance(base_model)
    cfg = 1.0 if guided else guidance
    negative = list(negative) if paired_negatives(positive, negative) else negative[:1]
    prompts = list(positive) + negative_with_images(positive, negative, cfg)
    kept = start_rows(base_model, start, shape, len(positive)) if start is not None else None
    return encode_conditioning(base_model, with_guidance(prompts, guidance) if guided else prompts, shape, kept), cfg


def with_guidance(conditioning: list, guidance: float) -> list:
    """CONDITIONING entries with the guidance input of a guidance-distilled model set to ``guidance``, as
    FluxGuidance sets it."""
    return [[entry[0], {**entry[1], "guidance": float(guidance)}] for entry in conditioning]

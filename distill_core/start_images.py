"""The images an image-to-video pipeline's clips start from (``--images``: Wan, LTX-Video), as the inputs its network
reads.

``WanImageToVideoPipeline``'s transformer reads, beside the noisy clip x_t [C, T, H, W], a condition of k + C
channels joined to it along the channels (``WanVelocity``): a mask m [k, T, H, W] (k the VAE's video frames per
latent frame), 1 on the first latent frame and 0 after it, and the latent of the start image I followed by black
frames (zeros in [-1, 1]), as long as the clip,

    y = (E([I, 0, ..., 0]) - mu) / s        (per channel: the VAE's ``latents_mean`` and ``latents_std``),

E the mode of its VAE's encoder and I scaled to the clip's frame size as its pipeline scales it. Wan 2.1's I2V
transformer also reads the start image through its CLIP vision tower (the second-to-last hidden states,
``encoder_hidden_states_image``); Wan 2.2 A14B's has no image encoder. Both sides of CFG read the same image, the
negative prompt on the unconditional one, as its pipeline guides.

Wan 2.2 TI2V 5B's pipeline (``expand_timesteps``) and LTX-Video's image-to-video pipeline put the start image in
the clip instead: its latent alone, y = (E(I) - mu) / s [C, 1, H, W], replaces the clip's first latent frame at the
network's input, whose tokens there take the time 0 (clean; the others the sample's time), and is the first frame
of the clip it draws. The teacher does both: ``WanVelocity`` or ``LTXVelocity`` at the input, ``PromptConditioned``
on the x0 it gives, whose first frame is y (``KEPT_START``). (LTX-Video's pipeline draws its y from the encoder's
distribution; the teacher takes its mode, as for every other.)

HunyuanVideo 1.5's image-to-video pipeline joins to the noisy clip, along the channels, y = [s E(I), 0, ..., 0]
(s its VAE's ``scaling_factor``: the start latent on the first latent frame, zeros after) and a mask m [1, T, H, W],
1 on the first latent frame, and its transformer reads SigLIP's last hidden states of I beside the prompt
(``HunyuanVideo15Velocity``); I is cropped to the clip's frame, which its pipeline takes from the image's aspect
ratio and its network's target size (``hunyuan15_frame``). Its own methods encode both.

Each prompt's image is encoded once, into tables the teacher reads by the condition's image row
(``PromptConditioned``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

#: the image-to-video pipelines whose clips start from an image of ``--images``, by ``model_index.json``'s class name
IMAGE_TO_VIDEO_PIPELINES = ("WanImageToVideoPipeline", "LTXImageToVideoPipeline", "HunyuanVideo15ImageToVideoPipeline")
#: the image-to-video pipeline whose start conditions ``hunyuan15_start_tables`` encodes
HUNYUAN15_I2V = "HunyuanVideo15ImageToVideoPipeline"
#: the table of the mask and start latents y that ``WanVelocity`` joins to the clip's channels
START_TABLE = "start_condition"
#: the table of CLIP's image embeddings, under the keyword Wan 2.1's I2V transformer takes them by
IMAGE_EMBEDDINGS = "encoder_hidden_states_image"
#: the table of start latents y that Wan 2.2 TI2V 5B and LTX-Video keep as their clips' first latent frame
KEPT_START = "kept_start"
#: the table of SigLIP's image embeddings, by the keyword HunyuanVideo 1.5's transformer takes them
SIGLIP_EMBEDDINGS = "image_embeds"


def keeps_start(index: dict) -> bool:
    """Whether the image-to-video pipeline of ``model_index.json`` ``index`` keeps its start image as the clip's
    first latent frame (``KEPT_START``): LTX-Video's, and Wan's with ``expand_timesteps`` (Wan 2.2 TI2V 5B)."""
    return index.get("_class_name") == "LTXImageToVideoPipeline" or bool(index.get("expand_timesteps"))


@torch.no_grad()
def start_tables(root: Path, files: list[Path], shape: tuple[int, ...], pixels: int, kept: bool = False
                 ) -> dict[str, torch.Tensor]:
    """The tables of ``files``' start conditions (see the module docstring) for clips of latent ``shape``
    (C, T, H, W), a latent pixel spanning ``pixels`` image pixels: ``START_TABLE`` [N, k + C, T, H, W], and where
    the pipeline has an image encoder, ``IMAGE_EMBEDDINGS`` [N, L, D]; ``kept`` (Wan 2.2 TI2V 5B):
    ``KEPT_START`` [N, C, 1, H, W]."""
    import diffusers
    from diffusers.image_processor import VaeImageProcessor

    from distill_core.reference_images import pil_image
    from distill_core.text_pipeline import encoding_device, latent_statistics, vae_frames

    config = root / "vae" / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{root}: an image-to-video pipeline encodes its start images with its VAE, and it "
                                "has no vae/ folder")
    device = encoding_device()  # a clip's encoding is a GPU's work
    vae_class = getattr(diffusers, json.loads(config.read_text())["_class_name"])
    vae = vae_class.from_pretrained(root / "vae", use_safetensors=True, local_files_only=True).eval().to(device)
    channels, latent_frames, height, width = shape
    k = vae_frames(root)
    mask = torch.zeros(1, k, latent_frames, height, width)
    mask[:, :, 0] = 1
    mean, std = latent_statistics(vae)
    processor, rows = VaeImageProcessor(), []
    for file in files:
        image = processor.preprocess(pil_image(file), height=height * pixels, width=width * pixels)[:, :, None]
        frames = image if kept else torch.cat([image, image.new_zeros(1, 3, (latent_frames - 1) * k,
                                                                      *image.shape[-2:])], 2)
        z = (vae.encode(frames.to(device, vae.dtype)).latent_dist.mode().float().cpu() - mean) / std
        rows.append(z if kept else torch.cat([mask, z], dim=1))
    if kept:
        return {KEPT_START: torch.cat(rows)}
    tables = {START_TABLE: torch.cat(rows)}
    if (root / "image_encoder").is_dir():
        tables[IMAGE_EMBEDDINGS] = clip_image_embeddings(root, files)
    return tables


def hunyuan15_frame(root: Path, files: list[Path]) -> tuple[int, int]:
    """(height, width) in pixels of the clips HunyuanVideo 1.5's image-to-video pipeline at ``root`` draws from the
    images ``files``: the frame of its network's target size nearest each image's aspect ratio, one for all (else a
    refusal that names each image's)."""
    from distill_core.reference_images import pil_image

    frames = {file: hunyuan15_drawn_frame(root, image.height, image.width)
              for file, image in ((file, pil_image(file)) for file in dict.fromkeys(files))}
    if len(set(frames.values())) > 1:
        shown = ", ".join(f"{file.name}: {height}x{width}" for file, (height, width) in frames.items())
        raise ValueError(f"--images: a {HUNYUAN15_I2V} draws each image's clip at a frame of its aspect ratio, and one "
                         f"run holds one size ({shown}); crop the images to one aspect ratio, or give --resolution")
    return next(iter(frames.values()))


def hunyuan15_drawn_frame(root: Path, height: int, width: int) -> tuple[int, int]:
    """(height, width) in pixels of the clip HunyuanVideo 1.5's image-to-video pipeline at ``root`` draws from an
    image of ``height`` x ``width``: the frame of its network's target size nearest the image's aspect ratio."""
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    from distill_core.diffusers_source import read_json
    from distill_core.text_pipeline import vae_scale

    processor = HunyuanVideo15ImageProcessor(vae_scale_factor=vae_scale(root))
    target = read_json(root / "transformer" / "config.json").get("target_size", 640)
    return tuple(processor.calculate_default_height_width(height, width, target))


@torch.no_grad()
def hunyuan15_start_tables(root: Path, files: list[Path], shape: tuple[int, ...], pixels: int
                           ) -> dict[str, torch.Tensor]:
    """HunyuanVideo 1.5's start conditions of ``files`` (see the module docstring) for clips of latent ``shape``
    (C, T, H, W), a latent pixel spanning ``pixels`` image pixels: ``START_TABLE`` [N, C + 1, T, H, W], y then m,
    and ``SIGLIP_EMBEDDINGS`` [N, L, D], by its pipeline's own methods."""
    import diffusers

    from distill_core.reference_images import pil_image
    from distill_core.text_pipeline import encoding_device

    cls = getattr(diffusers, HUNYUAN15_I2V)
    pipe = cls.from_pretrained(root, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                               transformer=None, use_safetensors=True, local_files_only=True)
    device = encoding_device(pipe)
    channels, frames, height, width = shape
    mask = torch.zeros(1, 1, frames, height, width)
    mask[:, :, 0] = 1
    starts, embeddings = [], []
    for file in files:
        image = pipe.video_processor.resize(pil_image(file), height=height * pixels, width=width * pixels,
                                            resize_mode="crop")
        z = cls._get_image_latents(pipe.vae, pipe.video_processor, image, height * pixels, width * pixels,
                                   device).float().cpu()
        later = z.new_zeros(1, channels, frames - 1, height, width)
        starts.append(torch.cat([torch.cat([z, later], dim=2), mask], dim=1))
        embeddings.append(cls._get_image_embeds(pipe.image_encoder, pipe.feature_extractor, image, device)
                          .float().cpu())
    return {START_TABLE: torch.cat(starts), SIGLIP_EMBEDDINGS: torch.cat(embeddings)}


def clip_image_embeddings(root: Path, files: list[Path]) -> torch.Tensor:
    """The second-to-last hidden states [N, L, D] of the pipeline's CLIP vision tower (``image_encoder/``) over
    ``files``, each prepared by its ``image_processor/`` as its pipeline prepares the start image."""
    import transformers

    from distill_core.reference_images import pil_image

    folder = root / "image_encoder"
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{folder}: no .safetensors weights (only safetensors are loaded)")
    encoder = transformers.CLIPVisionModel.from_pretrained(folder, use_safetensors=True, local_files_only=True).eval()
    # the processor without torchvision, as the pipeline loads it where torchvision is missing
    processor_class = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    processor = processor_class.from_pretrained(root / "image_processor", local_files_only=True)
    inputs = processor(images=[pil_image(file) for file in files], return_tensors="pt")
    with torch.no_grad():
        states = encoder(pixel_values=inputs["pixel_values"].to(encoder.dtype), output_hidden_states=True)
    return states.hidden_states[-2].float()

"""Teachers from diffusers model directories on disk (``--teacher DIR``), offline and safetensors only.

A directory is a diffusers ``UNet2DModel`` (its ``config.json`` and ``diffusion_pytorch_model.safetensors``)
with its scheduler's ``scheduler_config.json`` beside it or in ``../scheduler/`` (a pipeline's layout), or a
pipeline directory whose ``unet/`` or ``transformer/`` and ``scheduler/`` hold them. The scheduler says how
the network was trained:

* a DDPM-family scheduler (DDPM, DDIM, Euler, DPM-Solver, ...): ``alphas_cumprod`` and the prediction type
  (epsilon, v, sample) -> ``DiffusersDenoiser``;
* ``FlowMatchEulerDiscreteScheduler`` (or a multistep solver's flow variant, ``use_flow_sigmas``, as Wan's
  UniPC): a rectified flow -> ``FlowDenoiser`` over the velocity
  (``denoisers.diffusers_flow``), from t = 1 / ``num_train_timesteps`` (its lowest trained time) to
  sigma_max = 80 (t = 0.988), with the scheduler's time shift for the students' grid.

Conditions: class labels 0 .. ``classes`` - 1 (a ``UNet2DModel`` with class embeddings), the null class
``null_class`` as the unconditional side of guidance; ``classes`` 0: an unconditional model. A text-to-image
pipeline (SD1.x, SD2.x and SDXL: a ``UNet2DConditionModel``; SD3, Flux, Qwen-Image, Wan 2.1 / 2.2, LTX-Video and
HunyuanVideo 1.5 as image or video models, AuraFlow, Chroma, Lumina 2, Z-Image, Flux.2 (dev and klein), HiDream,
SANA, CogView4, Ovis-Image and LongCat-Image: their transformers; with all their text encoders) trains on
``prompts`` instead (``text_pipeline``), and one that reads an image beside each prompt (Flux Kontext's,
Qwen-Image-Edit's and Flux.2's edits, Wan's and LTX-Video's image-to-video) on ``images`` too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from distill_core.denoisers.base import clip_shape
from distill_core.methods.base import TeacherSource
from distill_core.prompts import prompt_flag

UNETS = ("UNet2DModel", "UNet2DConditionModel")
#: diffusion transformers, which take text embeddings and come in their pipeline's directory
TRANSFORMERS = ("SD3Transformer2DModel", "FluxTransformer2DModel", "QwenImageTransformer2DModel",
                "WanTransformer3DModel", "AuraFlowTransformer2DModel", "ChromaTransformer2DModel",
                "Lumina2Transformer2DModel", "ZImageTransformer2DModel", "Flux2Transformer2DModel",
                "HiDreamImageTransformer2DModel", "SanaTransformer2DModel", "LTXVideoTransformer3DModel",
                "HunyuanVideo15Transformer3DModel", "CogView4Transformer2DModel", "OvisImageTransformer2DModel",
                "LongCatImageTransformer2DModel")
#: the transformers that take their latent as tokens of 2 x 2 patches of 4 C channels
PACKED = ("FluxTransformer2DModel", "QwenImageTransformer2DModel", "ChromaTransformer2DModel",
          "OvisImageTransformer2DModel", "LongCatImageTransformer2DModel")
#: the transformers whose latents are their VAE's 2 x 2 patches already (Flux.2: 4 C channels on a grid of half
#: the VAE's latent side)
PATCHIFIED = ("Flux2Transformer2DModel",)
#: the CFG scale w (x0 = x0_u + w (x0_c - x0_u)) a text-to-image pipeline is distilled at unless the run says
#: another, by network: its pipeline's default (Flux: no CFG; Qwen-Image: its ``true_cfg_scale``; Z-Image: its
#: ``guidance_scale`` g = 5, which its pipeline applies as x0_c + g (x0_c - x0_u), w = g + 1; LTX-Video: 3), or the
#: scale of a pipeline's own CFG guider (``guider/``: HunyuanVideo 1.5's); a pipeline that names itself
#: step-distilled (``is_distilled``: Flux.2 klein's 4-step models) or guidance-distilled (``guidance_embeds``: Flux.2
#: dev) samples without CFG
TEXT_GUIDANCE = 5.0
GUIDANCE_BY_NETWORK = {"FluxTransformer2DModel": 1.0, "QwenImageTransformer2DModel": 4.0,
                       "AuraFlowTransformer2DModel": 3.5, "Lumina2Transformer2DModel": 4.0,
                       "ZImageTransformer2DModel": 6.0, "Flux2Transformer2DModel": 4.0, "SanaTransformer2DModel": 4.5,
                       "LTXVideoTransformer3DModel": 3.0, "LongCatImageTransformer2DModel": 4.5}
#: the video networks, whose samples may be clips (``sample_shape``'s frames)
VIDEO_NETWORKS = ("WanTransformer3DModel", "LTXVideoTransformer3DModel", "HunyuanVideo15Transformer3DModel")
#: the image a pipeline draws unless told another size, (height, width) in pixels, for networks whose config
#: names none or another: Qwen-Image's (``default_sample_size`` latent pixels x 8), Wan's (its pipeline's 480p
#: frame), LTX-Video's (its pipeline's 512 x 704 frame), AuraFlow's, Z-Image's, Flux.2's and HiDream's (their
#: pipelines' 1024 pixels)
DEFAULT_IMAGE = {"QwenImageTransformer2DModel": (1024, 1024), "WanTransformer3DModel": (480, 832),
                 "AuraFlowTransformer2DModel": (1024, 1024), "ZImageTransformer2DModel": (1024, 1024),
                 "Flux2Transformer2DModel": (1024, 1024), "HiDreamImageTransformer2DModel": (1024, 1024),
                 "LTXVideoTransformer3DModel": (512, 704), "OvisImageTransformer2DModel": (1024, 1024),
                 "LongCatImageTransformer2DModel": (1024, 1024)}

def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None


def model_and_scheduler_dirs(root: Path, index: dict) -> tuple[Path, Path]:
    """(the model's folder, the folder with scheduler_config.json) of a model directory, or of a pipeline
    directory with its ``model_index.json`` ``index``."""
    model = root / ("transformer" if "transformer" in index else "unet") if index else root
    for sched in (root / "scheduler", model, model.parent / "scheduler"):
        if (sched / "scheduler_config.json").is_file():
            return model, sched
    raise FileNotFoundError(f"{root}: no scheduler_config.json beside the model or in a scheduler/ folder; the "
                            "scheduler says how the model was trained (its noise schedule and prediction type)")


def model_config(folder: Path, pipeline: bool) -> dict:
    """The ``config.json`` of the diffusers network in ``folder`` (a UNet, or in a pipeline directory a
    diffusion transformer), with a clear refusal of what this command does not distil."""
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    name = config.get("_class_name")
    if name in TRANSFORMERS and not pipeline:
        raise ValueError(f"{folder}: a {name} takes the text embeddings of its pipeline's encoders: give the "
                         "pipeline's directory (the one with model_index.json)")
    if name not in UNETS + TRANSFORMERS:
        raise ValueError(f"{folder}: a {name or 'folder without config.json'} is not a model this command "
                         f"distils; it takes {', '.join(UNETS + TRANSFORMERS)}")
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{folder}: no .safetensors weights (only safetensors are loaded; convert a .bin "
                                "checkpoint with diffusers' save_pretrained(safe_serialization=True))")
    return config


def load_model(folder: Path, config: dict, frozen_precision: str = "as-loaded") -> nn.Module:
    """The network ``model_config`` accepted, frozen. A run whose frozen teacher computes in bf16 or fp8
    (``frozen_precision``) loads it in the 16-bit precision its files hold, which holds them exactly: the run
    casts it next, and a float32 copy on the way would double the load's memory. Its fingerprint is
    the one of a float32 load (``builtin.fingerprint`` hashes the values)."""
    import diffusers

    from distill_core.safetensors_io import stored_dtype
    from distill_core.stages import announce, weights_size

    stored = stored_dtype(folder)
    dtype = stored if frozen_precision != "as-loaded" and stored != torch.float32 else None
    announce(f"loading the {config['_class_name']} in {folder} ({weights_size(folder)})")
    model = getattr(diffusers, config["_class_name"]).from_pretrained(folder, use_safetensors=True,
                                                                      local_files_only=True, torch_dtype=dtype)
    return model.eval().requires_grad_(False)


def denoiser_for(model: nn.Module, scheduler_dir: Path, shape: tuple[int, ...],
                 embedded_guidance: float | None = None) -> nn.Module:
    """The teacher's denoiser: a DDPM adapter or a flow adapter, as the scheduler says (a guidance-distilled
    flow model at ``embedded_guidance``)."""
    import diffusers

    from distill_core.denoisers.diffusers import DiffusersDenoiser
    from distill_core.denoisers.diffusers_flow import flow_denoiser
    from distill_core.text_pipeline import vae_frames, vae_scale

    config = read_json(scheduler_dir / "scheduler_config.json")
    name = config.get("_class_name", "")
    if name.startswith("FlowMatch") or config.get("use_flow_sigmas"):
        root = scheduler_dir.parent  # a pipeline's, whose VAE sets a video network's positions
        return flow_denoiser(model, config, shape, embedded_guidance, (vae_frames(root), vae_scale(root)))
    if type(model).__name__ in TRANSFORMERS:
        raise ValueError(f"{scheduler_dir}: a {type(model).__name__} samples with a FlowMatch scheduler, not {name}")
    scheduler_class = getattr(diffusers, name, None)
    if scheduler_class is None:
        raise ValueError(f"{scheduler_dir}: unknown scheduler {name!r}")
    return DiffusersDenoiser.from_scheduler(model, scheduler_class.from_config(config))


def diffusers_source(path: str | Path, classes: int = 0, null_class: int | None = None,
                     prompts: str | Path | list[str] | None = None, guidance: float | None = None,
                     resolution: int | None = None, negative: str | None = None,
                     frozen_precision: str = "as-loaded", encode: bool = True, frames: int = 1,
                     images: str | Path | None = None, pairing: str = "in-order",
                     width: int | None = None, encodings: str | Path | None = None,
                     references: int | None = None) -> TeacherSource:
    """A diffusers model directory as a teacher (see the module docstring); ``prompts``: a text-to-image
    pipeline's file of training prompts (default: the shipped list); ``guidance``: the run's guidance, which a
    guidance-distilled pipeline (Flux dev) takes as its input; ``resolution``: the side of its square images in
    pixels, or with ``width`` their height (None: the model's own), which its students' files name, as ``width``;
    ``negative``: a text-to-image pipeline's negative prompt (None: its own), which its students' files name;
    ``frozen_precision``: the run's (``load_model``); ``encode``: False loads a text-to-image pipeline's network
    without encoding any prompt (its text encoders are not loaded), for a command that reads the network only
    (export-diffusers); ``frames``: a video pipeline's clips of that many video frames (``sample_shape``), which its
    students' files name; ``images``: an editing or image-to-video pipeline's images, paired with the prompts as
    ``pairing`` says (``reference_images.image_files``), for a student of edits of sets of ``references`` images a
    folder of images one set; ``encodings``: a folder that keeps a pipeline's encoded prompts and images (a run's
    ``cache/``), read back where the same inputs were encoded before (``encoding_cache``)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"teacher {root} is not a directory: give builtin, builtin-flow, builtin-bold or a "
                                "local diffusers model directory")
    index = read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
    model_dir, scheduler_dir = model_and_scheduler_dirs(root, index)
    if "text_encoder" in index:
        return text_source(root, index, model_dir, scheduler_dir, classes, prompts, guidance, resolution, negative,
                           frozen_precision, encode, frames, images, pairing, width,
                           None if encodings is None else Path(encodings), references)
    for flag, given in ((prompts and prompt_flag(prompts), prompts), ("--negative", negative is not None),
                        ("--images", images is not None)):
        if given:
            raise ValueError(f"{root}: {flag} is for text-to-image pipelines (a model_index.json naming a "
                             "text_encoder); this model is conditioned on class labels or nothing")
    config = model_config(model_dir, pipeline=False)
    unet = load_model(model_dir, config, frozen_precision)
    embeds = config.get("num_class_embeds")
    if classes and not embeds:
        raise ValueError(f"{root}: --classes {classes} given, but the model has no class embeddings")
    if embeds and not classes:
        raise ValueError(f"{root}: the model takes class labels ({embeds} embeddings): give --classes N (and "
                         "--null-class K if one of them is the unconditional class)")
    for label in (classes - 1, null_class):
        if label is not None and embeds and not 0 <= label < embeds:
            raise ValueError(f"{root}: class label {label} is outside the model's {embeds} class embeddings")

    def draw_cond(batch: int, generator: torch.Generator) -> torch.Tensor | None:
        return torch.randint(classes, (batch,), generator=generator) if classes else None

    uncond = torch.tensor([null_class]) if null_class is not None else None
    shape = sample_shape(config, root, resolution, frames, width)
    return TeacherSource(str(root), denoiser_for(unet, scheduler_dir, shape), shape, draw_cond, uncond, 1.0,
                         classes, card=size_card(resolution, width))


def size_card(resolution: int | None, width: int | None) -> dict:
    """What a student's file names of its images' size, where the run gave one: ``resolution`` and ``width``."""
    return {key: value for key, value in (("resolution", resolution), ("width", width)) if value}


def size_from_images(root: Path, name: str, files: list[Path], network: str) -> tuple[int | None, int | None]:
    """(height, width) in pixels at which the pipeline ``name`` at ``root``, its network of class ``network``, draws
    from ``files`` when not told a size, where its images set it (Qwen-Image-Edit: their megapixel; HunyuanVideo
    1.5's image-to-video: its frame nearest their aspect ratio), else (None, None): its own default."""
    from distill_core.start_images import HUNYUAN15_I2V, hunyuan15_frame
    from distill_core.vision_prompts import VISION_PROMPT_PIPELINES, drawn_size

    if name in VISION_PROMPT_PIPELINES:
        return drawn_size(files, name, 2 * latent_pixels(root, network))
    if name == HUNYUAN15_I2V:
        return hunyuan15_frame(root, files)
    return None, None


def guider_scale(root: Path) -> float | None:
    """The CFG scale w of the pipeline's own guider (``guider/``: HunyuanVideo 1.5's), None without one; a guider
    that guides otherwise than x0_u + w (x0_c - x0_u) at every step, as the engine's teacher does, is refused."""
    path = root / "guider" / "guider_config.json"
    if not path.is_file():
        return None
    config = read_json(path)
    if not config.get("enabled", True):  # a guider that does not guide
        return 1.0
    if (config.get("_class_name") != "ClassifierFreeGuidance" or config.get("guidance_rescale")
            or config.get("use_original_formulation") or (config.get("start", 0.0), config.get("stop", 1.0)) != (0, 1)):
        raise ValueError(f"{path}: this guider guides otherwise than CFG at every step, x0_u + w (x0_c - x0_u), as "
                         "the engine's teacher does; give the pipeline a ClassifierFreeGuidance guider without "
                         "rescaling, on from the first step to the last")
    return float(config["guidance_scale"])


def latent_pixels(root: Path, network: str) -> int:
    """How many image pixels a pixel of the samples of the pipeline at ``root`` spans per side, its network of
    class ``network``: its VAE's scale (``text_pipeline.vae_scale``), twice that for Flux.2 (``PATCHIFIED``)."""
    from distill_core.text_pipeline import vae_scale

    return vae_scale(root) * (2 if network in PATCHIFIED else 1)


def sample_shape(config: dict, root: Path, resolution: int | None = None, frames: int = 1,
                 width: int | None = None) -> tuple[int, ...]:
    """(C, H, W) of the samples of the model whose ``config.json`` is ``config``: ``resolution`` pixels a side, or
    ``resolution`` high and ``width`` wide (in a pipeline with a VAE, its latent of those sides / ``latent_pixels``),
    else the configured size;
    Flux, which has none and takes 2 x 2 patches of its latent as 4 C channels: the size its pipeline's VAE
    makes of the VAE's own image size; Qwen-Image (packed as Flux), Wan and the others whose configs name none
    or another: their pipelines' default image (``DEFAULT_IMAGE``). A side the network cannot take (its UNet's
    downsamplings, its transformer's patches) is refused with the nearest sizes that fit. A video network's clip
    of ``frames`` video frames is (C, T, H, W), T = (frames - 1) // k + 1 latent frames of k video frames (its
    VAE's, ``text_pipeline.vae_frames``), as its pipeline counts them; a clip of one latent frame is an image."""
    still = _still_shape(config, root, resolution, width)
    if frames == 1:
        return still
    name = config["_class_name"]
    if name not in VIDEO_NETWORKS:
        raise ValueError(f"{root}: --frames is for video pipelines (Wan, LTX-Video); its {name} draws still images")
    from distill_core.text_pipeline import vae_frames

    return clip_shape(still, frames, vae_frames(root))


def _still_shape(config: dict, root: Path, resolution: int | None, width: int | None) -> tuple[int, ...]:
    """``sample_shape`` of an image: (C, H, W)."""
    name = config["_class_name"]
    packed = name in PACKED
    channels = config["in_channels"] // 4 if packed else config["in_channels"]
    if name in VIDEO_NETWORKS:  # Wan's image-to-video transformer reads its start condition's channels beside them
        channels = config.get("out_channels") or channels
    scale = latent_pixels(root, name)
    if resolution is None:
        if width is not None:
            raise ValueError(f"--width {width} sets the images' width beside their height: give the height with "
                             "--resolution")
        if name == "HunyuanVideo15Transformer3DModel":  # its pipeline's 16:9 frame of its network's target size
            from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

            sides = HunyuanVideo15ImageProcessor(vae_scale_factor=scale).calculate_default_height_width(
                9, 16, config.get("target_size", 640))
            return (channels, *(side // scale for side in sides))
        if name in DEFAULT_IMAGE:
            return (channels, *(side // scale for side in DEFAULT_IMAGE[name]))
        size = read_json(root / "vae" / "config.json")["sample_size"] // scale if packed else config["sample_size"]
        return (channels, *((size, size) if isinstance(size, int) else size))
    patch = config.get("patch_size", (config.get("all_patch_size") or [None])[0])  # Z-Image: all_patch_size
    patch = patch[-1] if isinstance(patch, (list, tuple)) else patch  # Wan's: (frames, height, width)
    step = scale * (2 if packed else patch or 2 ** (len(config.get("block_out_channels", ())) - 1))
    sides = {"--resolution": resolution, "--width": width or resolution}
    for flag, side in sides.items():
        if side % step:
            low, high = side // step * step, (side // step + 1) * step
            raise ValueError(f"{flag} {side}: this model takes sides in multiples of {step} pixels; give "
                             f"{low or step} or {high}")
    return (channels, *(side // scale for side in sides.values()))


def pipeline_network(root: Path, index: dict, model_dir: Path, config: dict, scheduler_dir: Path,
                     frozen_precision: str = "as-loaded") -> nn.Module:
    """A pipeline's network, frozen (``load_model``); Wan 2.2 A14B's two, its high-noise ``transformer`` and
    low-noise ``transformer_2``, as one network that switches at its ``boundary_ratio`` of the training times."""
    model = load_model(model_dir, config, frozen_precision)
    if not (index.get("transformer_2") or [None])[0]:
        return model
    from distill_core.denoisers.diffusers_flow import WanExperts

    if index.get("boundary_ratio") is None:
        raise ValueError(f"{root}: its model_index.json names a transformer_2 but no boundary_ratio, the share of the "
                         "training times from which its first transformer takes over; add it (Wan 2.2 T2V A14B: 0.875)")
    low = load_model(root / "transformer_2", model_config(root / "transformer_2", pipeline=True), frozen_precision)
    steps = read_json(scheduler_dir / "scheduler_config.json").get("num_train_timesteps", 1000)
    return WanExperts(model, low, index["boundary_ratio"] * steps)


#: the words in the class names of pipelines whose network takes an image beside the noise, which this command does
#: not feed but for editing pipelines (``EDITING_PIPELINES``: Flux Kontext, Qwen-Image-Edit) and image-to-video ones
#: (``IMAGE_TO_VIDEO_PIPELINES``): inpainting, and other editing pipelines
IMAGE_CONDITIONED = ("ImageToVideo", "Inpaint", "Edit")


def text_source(root: Path, index: dict, model_dir: Path, scheduler_dir: Path, classes: int,
                prompts: str | Path | None, guidance: float | None = None,
                resolution: int | None = None, negative: str | None = None,
                frozen_precision: str = "as-loaded", encode: bool = True, frames: int = 1,
                images: str | Path | None = None, pairing: str = "in-order",
                width: int | None = None, encodings: Path | None = None,
                references: int | None = None) -> TeacherSource:
    """A text-to-image pipeline as a teacher over its prompts: condition k is prompt k, the pipeline's negative
    (condition P; ``negative`` where given) is CFG's unconditional side at the default scale ``TEXT_GUIDANCE``
    (Qwen-Image: 4). Flux samples without CFG (w = 1, as its pipeline does); a guidance-distilled Flux or Flux.2
    (dev) samples without CFG too, takes ``guidance`` (default its pipeline's, ``EMBEDDED_GUIDANCE``) as its input,
    and its students' files name it (``embedded_guidance``).
    A pipeline that reads an image beside each prompt takes prompt k with image k of ``images`` (``image_tables``,
    read by the condition's ``IMAGE_ROW``; the negative with each sample's own image), or with ``pairing`` every,
    each prompt with each image (condition r: prompt r mod P with image r div P, ``PromptConditioned.pairs``): an
    editing pipeline (Flux Kontext, Qwen-Image-Edit, whose text encoder reads the prompt beside it:
    ``vision_prompts``, and whose samples are by default the size its pipeline draws them at, the images' megapixel)
    edits it, an image-to-video pipeline (Wan) starts its clip from it (``start_images``).
    ``encode`` False: no prompt tables (the network alone; it refuses to run). ``encodings``: where the encoded
    prompts and images are kept and read back (``encoding_cache.kept``); ``references``: a student's sets' size, for
    which a folder of images is one set (``reference_images.image_files``)."""
    from distill_core.denoisers.diffusers_flow import EMBEDDED_GUIDANCE
    from distill_core.encoding_cache import file_stamp, kept, pipeline_stamp
    from distill_core.prompts import DEFAULT_EDITS, DEFAULT_MOTIONS, DEFAULT_PROMPTS, read_prompts
    from distill_core.reference_images import (
        EDITING_PIPELINES,
        OPTIONAL_EDITING,
        image_files,
        image_tables,
        set_size,
    )
    from distill_core.start_images import IMAGE_TO_VIDEO_PIPELINES, keeps_start
    from distill_core.text_pipeline import PROMPT_ROW, PromptConditioned, encode_prompts, prompt_condition, vae_decoder
    from distill_core.vision_prompts import VISION_PROMPT_PIPELINES, vision_tables

    if classes:
        raise ValueError(f"{root}: a text-to-image pipeline trains on prompts (--prompts FILE), not --classes")
    name = index.get("_class_name", "")
    reading = EDITING_PIPELINES + IMAGE_TO_VIDEO_PIPELINES
    if name not in reading and any(kind in name for kind in IMAGE_CONDITIONED):
        raise ValueError(f"{root}: a {name}'s network takes an image beside the noise, which this command does not "
                         f"feed (it feeds {', '.join(reading)}: --images); distil it in ComfyUI, where each prompt "
                         "carries its image (docs/comfyui.md), or distil the text-to-image or text-to-video pipeline")
    if images is not None and name not in reading + OPTIONAL_EDITING:
        raise ValueError(f"{root}: --images is for pipelines that read an image beside each prompt "
                         f"({', '.join(reading + OPTIONAL_EDITING)}); a {name} draws from its prompts alone")
    if name in reading and images is None and encode:
        raise ValueError(f"{root}: a {name} reads an image with each prompt: give the images with --images (one file "
                         "for every prompt, or a folder with one image per prompt)")
    if name in IMAGE_TO_VIDEO_PIPELINES and frames < 2:
        raise ValueError(f"{root}: a {name} draws clips that start from an image: give --frames (its pipeline's "
                         "default: 81)")
    # without --prompts: the shipped edits of any image, motions from any start image, or prompts
    optional_edits = name in OPTIONAL_EDITING and images is not None  # edits, where it might draw from prompts alone
    edits = name in EDITING_PIPELINES or optional_edits
    prompts = read_prompts(prompts, DEFAULT_EDITS if edits else
                           DEFAULT_MOTIONS if name in IMAGE_TO_VIDEO_PIPELINES else DEFAULT_PROMPTS)
    config = model_config(model_dir, pipeline=True)
    network = config["_class_name"]
    guidance_input = bool(config.get("guidance_embeds"))  # guidance-distilled: its guidance an input, no CFG
    if guidance_input and network not in EMBEDDED_GUIDANCE:
        raise ValueError(f"{model_dir}: a guidance-distilled {network} (guidance_embeds) is not a teacher this "
                         "command distils; give the pipeline it was distilled from")
    if config.get("use_meanflow"):
        raise ValueError(f"{model_dir}: a MeanFlow few-step {network} (use_meanflow) is distilled already; give the "
                         "pipeline it was distilled from")
    every = pairing == "every"
    files = image_files(images, len(prompts), every, references) if images is not None and encode else []
    if files and resolution is width is None:
        resolution, width = size_from_images(root, name, files, config["_class_name"])
    shape = sample_shape(config, root, resolution, frames, width)
    if negative is not None and (network == "FluxTransformer2DModel" or guidance_input):
        family = "Flux" if network == "FluxTransformer2DModel" else "Flux.2 dev"  # the guidance-distilled Flux.2
        raise ValueError(f"{root}: {family} samples without CFG, so a negative prompt has nothing to steer away from; "
                         "drop --negative")
    # the encoders freed before the network loads; what an earlier start of the run encoded read back
    inputs = {"pipeline": pipeline_stamp(root), "prompts": prompts, "negative": negative, "shape": shape,
              "images": [file_stamp(file) for file in files], "every": every} if encodings and encode else {}
    tables, per_image, pair_rows = {}, {}, None
    if files and name in VISION_PROMPT_PIPELINES:  # each prompt read beside its image
        tables, per_image, pair_rows = kept(encodings, "pairs", inputs, lambda: vision_tables(
            root, name, prompts, negative, files, every))
    elif encode:  # the images first: what does not fit is refused before the text encoders load
        per_image = kept(encodings, "images", inputs, lambda: image_tables(
            root, name, files, shape, latent_pixels(root, network), keeps_start(index))) if files else {}
        tables = kept(encodings, "prompts", inputs, lambda: encode_prompts(root, index, prompts, shape, negative))
    model = pipeline_network(root, index, model_dir, config, scheduler_dir, frozen_precision)
    name = config["_class_name"]
    embedded = None
    if guidance_input:
        embedded = EMBEDDED_GUIDANCE[name] if guidance is None else float(guidance)
    n = len(prompts)
    denoiser = PromptConditioned(denoiser_for(model, scheduler_dir, shape, embedded), tables, per_image,
                                 n if every else None, pair_rows)
    conditions = n * len(files) if every else n  # training conditions: prompts, or (prompt, image) pairs

    def draw_cond(batch: int, generator: torch.Generator) -> torch.Tensor | dict:
        return prompt_condition(denoiser, torch.randint(conditions, (batch,), generator=generator))

    card = {**({} if embedded is None else {"embedded_guidance": embedded}),
            **size_card(resolution, width), **({"frames": frames} if frames > 1 else {}),
            **({} if negative is None else {"negative": negative}),
            **({"edits": True} if optional_edits else {}),
            **({"references": set_size(files)} if files and files[0].is_dir() else {})}
    guided = guider_scale(root)
    w = 1.0 if index.get("is_distilled") or guidance_input else guided if guided is not None else \
        GUIDANCE_BY_NETWORK.get(name, TEXT_GUIDANCE)
    uncond = {PROMPT_ROW: torch.tensor([n])} if per_image else torch.tensor([n])  # each sample's own image
    return TeacherSource(str(root), denoiser, shape, draw_cond, uncond, w, conditions, card=card,
                         decode=vae_decoder(root), prompt_table=True)

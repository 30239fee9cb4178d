"""Prompts that a vision-language text encoder reads beside the image they edit (Qwen-Image-Edit, ``--images``).

Qwen-Image-Edit's text encoder, Qwen2.5-VL, reads each instruction together with the image it edits: the condition
c_{k,i} = E(prompt_k, I_i) belongs to the pair, not to the prompt, and so does CFG's unconditional side
c_{-,i} = E(negative, I_i). The teacher holds one table row per distinct pair it trains on and per image's
negative, and a lookup R [P + 1, N] from prompt row k and image row i to the pair's row (row P: the negative;
``PromptConditioned.pair_rows``), so its conditions stay {prompt: k, image: i} and CFG reads each sample's own
negative through the image row, as for the other pipelines that read an image.

The pipeline scales each image twice, at its aspect ratio with sides in multiples of 32 pixels: for the text encoder
to its condition area (Qwen-Image-Edit: a megapixel; Edit Plus: ``CONDITION_IMAGE_SIZE``, 384 x 384 pixels), and to
a megapixel for the reference latent its transformer reads beside the sample, whatever size it draws,

    z_ref = (E_vae(I) - mu) / sigma    (per channel, the mode of its video VAE's encoder, one frame),

packed as the sample and joined to its tokens (``QwenImageVelocity``). One run's reference latents form one table,
so its images must share an aspect ratio.

transformers' ``Qwen2VLProcessor`` also loads a video processor, which needs torchvision; ``VisionTextProcessor``
does what the pipeline asks of it (images and text, no video) with the image processor and tokenizer of the
pipeline's ``processor/``.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import torch

#: the pipelines whose text encoder reads each prompt beside its image, by ``model_index.json``'s class name
VISION_PROMPT_PIPELINES = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")
#: the area in pixels of the image whose latent the pipelines' transformer reads beside the sample
REFERENCE_AREA = 1024 * 1024


class VisionTextProcessor:
    """Text with image placeholders and their images as a Qwen2-VL reads them: the images' patches
    (``pixel_values``) and patch grids (``image_grid_thw``), and the text's tokens with each image's placeholder
    repeated once per merged patch, t h w / m^2 (m: the image processor's ``merge_size``)."""

    def __init__(self, folder: Path):
        import transformers

        self.image_processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.image_token = getattr(self.tokenizer, "image_token", None) or "<|image_pad|>"

    def __call__(self, text: list[str], images=None, padding: bool = True, return_tensors: str = "pt"):
        import transformers

        images = [] if images is None else images if isinstance(images, list) else [images]
        seen = self.image_processor(images=images, return_tensors=return_tensors) if images else {}
        counts = iter((seen["image_grid_thw"].prod(dim=-1) // self.image_processor.merge_size ** 2).tolist()
                      if images else [])
        expanded = []
        for line in text:
            parts = line.split(self.image_token)
            expanded.append(parts[0] + "".join(self.image_token * next(counts) + part for part in parts[1:]))
        tokens = self.tokenizer(expanded, padding=padding, return_tensors=return_tensors)
        return transformers.BatchFeature({**tokens, **seen})


def pair_rows(prompts: list[str], negative: str, files: list[Path], every: bool) -> tuple[torch.Tensor, list]:
    """The lookup R [P + 1, N] of each (prompt row, image row) to its pair's table row (-1: a pair no condition
    draws) and the distinct (text, file) pairs in row order: prompt r with image r (``every``: each prompt with each
    image), and the negative with each image."""
    used = [(r % len(prompts), r // len(prompts)) for r in range(len(prompts) * len(files))] if every \
        else [(r, r) for r in range(len(prompts))]
    used += [(len(prompts), i) for i in range(len(files))]
    lookup = torch.full((len(prompts) + 1, len(files)), -1, dtype=torch.long)
    distinct: dict[tuple[str, Path], int] = {}
    for k, i in used:
        text = negative if k == len(prompts) else prompts[k]
        lookup[k, i] = distinct.setdefault((text, files[i]), len(distinct))
    return lookup, list(distinct)


def shared_size(files: list[Path], name: str) -> tuple[int, int]:
    """(width, height) of the megapixel at which a pipeline ``name`` reads every image of ``files`` (of each set's,
    for sets): one for all, else a refusal that names each image's."""
    from distill_core.reference_images import distinct_images, pil_image

    sizes = {file: fitted(pil_image(file).size, REFERENCE_AREA) for file in distinct_images(files)}
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{file.name}: {'x'.join(map(str, size))}" for file, size in sizes.items())
        raise ValueError(f"--images: a {name} reads each image at a megapixel of its own aspect ratio, and one run "
                         f"holds one size ({shown}); crop the images to one aspect ratio")
    return next(iter(sizes.values()))


def drawn_size(files: list[Path], name: str, multiple: int) -> tuple[int, int]:
    """(height, width) in pixels that the pipeline ``name`` draws its edits of ``files`` at when not told another:
    their megapixel size (``shared_size``), each side rounded down to a multiple of ``multiple``."""
    width, height = shared_size(files, name)
    return height // multiple * multiple, width // multiple * multiple


def fitted(size: tuple[int, int], area: int) -> tuple[int, int]:
    """(width, height) of ``area`` pixels at the aspect ratio of ``size`` (width, height), each side rounded to a
    multiple of 32, as the pipelines size their images."""
    width = math.sqrt(area * size[0] / size[1])
    return round(width / 32) * 32, round(width * size[1] / size[0] / 32) * 32


def vision_tables(root: Path, name: str, prompts: list[str], negative: str | None, files: list[Path], every: bool
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """The text tables (``encoder_hidden_states`` c, ``encoder_hidden_states_mask`` m: a row per distinct pair,
    padded to the longest), the image table (``REFERENCE_TABLE``: z_ref per image) and the lookup R of
    ``pair_rows`` of the pipeline ``name`` at ``root`` (see the module docstring), against ``negative`` (None: the
    pipeline's own), its text encoder loaded in the precision its files hold."""
    import diffusers
    import transformers

    from distill_core.reference_images import distinct_images, refuse_sets
    from distill_core.stages import announce, counted
    from distill_core.text_pipeline import NEGATIVE_PROMPT, exact_narrowing, quiet, stored_dtypes

    refuse_sets(name, files)
    if not (root / "processor").is_dir():
        raise FileNotFoundError(f"{root}: a {name} reads each prompt beside its image with the processor in its "
                                "processor/ folder, and it has none")
    dtypes = stored_dtypes(root)
    announce(f"encoding {counted(len(prompts), 'instruction')} with their images, and the VAE latents of "
             f"{counted(len(distinct_images(files)), 'image')}, with {name}'s text encoder and VAE, loaded from {root}")
    with quiet(diffusers, transformers):
        tables, reference, lookup = _read(root, getattr(diffusers, name), prompts,
                                          NEGATIVE_PROMPT[name] if negative is None else negative, files, every, dtypes)
    tables["encoder_hidden_states"] = exact_narrowing(tables["encoder_hidden_states"], set(dtypes.values()))
    return tables, reference, lookup


@torch.no_grad()
def _read(root: Path, cls: type, prompts: list[str], negative: str, files: list[Path], every: bool,
          dtypes: dict[str, torch.dtype]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """``vision_tables`` with the pipeline class ``cls`` loaded without its transformer."""
    from distill_core.reference_images import REFERENCE_TABLE, distinct_images, images_of, pil_image, reference_table
    from distill_core.text_pipeline import encoding_device, padded

    pipe = cls.from_pretrained(root, transformer=None, processor=None, use_safetensors=True, local_files_only=True,
                               torch_dtype={**dtypes, "default": torch.float32})
    pipe.processor = VisionTextProcessor(root / "processor")
    device = encoding_device(pipe)
    condition_area = getattr(inspect.getmodule(cls), "CONDITION_IMAGE_SIZE", REFERENCE_AREA)
    width, height = shared_size(files, cls.__name__)
    images = {file: pil_image(file) for file in distinct_images(files)}
    seen = {file: pipe.image_processor.resize(image, *fitted(image.size, condition_area)[::-1])
            for file, image in images.items()}
    lookup, distinct = pair_rows(prompts, negative, files, every)
    # each pair alone, unpadded, as the pipeline encodes one prompt (a set's images as a list: Picture 1, 2, ...);
    # then one padded table, Qwen-Image's mask long
    context, mask = padded([pipe.encode_prompt(text, image=[seen[image] for image in images_of(entry)]
                                               if entry.is_dir() else seen[entry], device=device)[0][0]
                            for text, entry in distinct], torch.long)
    latents = {file: pipe._encode_vae_image(pipe.image_processor.preprocess(image, height, width)[:, :, None]
                                            .to(device, pipe.vae.dtype), None)[:, :, 0].float().cpu()
               for file, image in images.items()}
    return ({"encoder_hidden_states": context, "encoder_hidden_states_mask": mask},
            {REFERENCE_TABLE: reference_table(latents, files)}, lookup)

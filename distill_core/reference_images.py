"""The images an editing pipeline's prompts edit (``--images``: Flux Kontext, Flux.2), as the latents its
network reads; and the dispatch of every pipeline that reads an image beside each prompt (``image_tables``;
Qwen-Image-Edit: ``vision_prompts``; image-to-video: ``start_images``).

Flux Kontext's transformer reads the image being edited beside the noise: its VAE latent z_ref, packed into
2 x 2 patches as the sample is, joins the sample's tokens, each at position (1, row, column) where the sample's
are at (0, row, column), and the network's velocity is read off the sample's tokens alone
(``FluxVelocity``). Each prompt k is an edit of its own image I_k; the teacher encodes them once,

    z_ref,k = (E(I_k) - shift) * scale,

E the mode of the pipeline's VAE encoder, I_k scaled to the teacher's image size (Lanczos, in [-1, 1]) as the
pipeline's image processor scales it, into a table the teacher reads by the condition's image row beside the
prompts' (``PromptConditioned``).
The pipeline then draws the student's edits of an image of that size with ``_auto_resize=False`` and
``max_area`` the image's area, which keep both the image and the drawn size as they are.

Flux.2 (dev and klein) draws from its prompts alone, or edits the images given with them (``OPTIONAL_EDITING``):
z_ref,k is E(I_k) in 2 x 2 patches, normalised per patch channel by the running statistics of its VAE's ``bn``, as its
samples are, its latent pixels tokens at (10, row, column, 0) beside the sample's at (0, row, column, 0)
(``Flux2Velocity``); the pipeline draws the edit of an image given at the student's size at that size. A prompt may
also edit a set of R images read together (``image_sets``: Flux.2, whose image r's tokens sit at time 10 (r + 1),
and Qwen-Image-Edit Plus): its table row holds R latents.

In ComfyUI (*Distill edit list*, *Distill image-to-video list*) images are ComfyUI's IMAGE, [N, H, W, C] in [0, 1];
each is fitted to one size (``cover``), as one batch of conditions holds images of one size.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distill_core.vision_prompts import VISION_PROMPT_PIPELINES

#: the pipelines whose prompts each edit an image, by ``model_index.json``'s class name (Qwen-Image-Edit's read it
#: in their text encoder too: ``vision_prompts``)
EDITING_PIPELINES = ("FluxKontextPipeline", *VISION_PROMPT_PIPELINES)
#: the pipelines that draw from their prompts alone, or edit the images given with them (``--images``)
OPTIONAL_EDITING = ("Flux2KleinPipeline", "Flux2Pipeline")
#: the pipelines whose prompts may each edit a set of images (``--images`` a folder of folders, one set each)
SET_EDITING = ("Flux2KleinPipeline", "Flux2Pipeline", "QwenImageEditPlusPipeline")
#: the most pixels of an image that Flux.2's pipelines read at its own size (it scales larger ones down)
FLUX2_REFERENCE_AREA = 1024 * 1024
#: the files a folder of reference images holds
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
#: the table of reference latents in a text teacher's tables (``PromptConditioned``), the keyword ``FluxVelocity``
#: reads them by
REFERENCE_TABLE = "image_latents"


def image_files(path: str | Path, prompts: int, every: bool = False, references: int | None = None) -> list[Path]:
    """The image of each of ``prompts`` prompts: one file for all, or a folder's images in file-name order, one per
    prompt (one image in it: for all); ``every``: the images each prompt is paired with, the file or the folder's
    images. A folder of folders and no images gives each prompt a set of images (``SET_EDITING``): its folders in
    name order stand for the images above, each holding its set's images (``images_of``), as many in every set.
    For a student whose edits read sets (``references``: their size), a folder of images is one set for all."""
    path = Path(path)
    if path.is_file():
        return [path] if every else [path] * prompts
    if not path.is_dir():
        raise FileNotFoundError(f"--images {path}: no such file or folder; give an image for every prompt, or a "
                                "folder with one image per prompt")
    if references and folder_images(path) and not image_sets(path):
        return [path] if every else [path] * prompts
    files = folder_images(path) or image_sets(path)
    if not files:
        raise ValueError(f"--images {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if every:
        return files
    if len(files) == 1:
        return files * prompts
    if len(files) != prompts and files[0].is_dir():
        raise ValueError(f"--images {path} holds {len(files)} sets of images (folders) for {prompts} prompts: give "
                         "one set per prompt, in the prompts' order by folder name, or one for all (distill --pairing "
                         "every trains each prompt on each set)")
    if len(files) != prompts:
        raise ValueError(f"--images {path} holds {len(files)} images ({', '.join(IMAGE_SUFFIXES)}) for {prompts} "
                         "prompts: give one image per prompt, in the prompts' order by file name, or one for all "
                         "(distill --pairing every trains each prompt on each image)")
    return files


def folder_images(folder: Path) -> list[Path]:
    """The image files of ``folder`` (``IMAGE_SUFFIXES``, not its subfolders) in file-name order."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def image_sets(folder: Path) -> list[Path]:
    """The subfolders of ``folder`` that hold images, in name order: one set of images each, as many in every one
    (else a refusal that names each set's count)."""
    sets = sorted(p for p in folder.iterdir() if p.is_dir() and folder_images(p))
    counts = {entry.name: len(folder_images(entry)) for entry in sets}
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{name}: {count}" for name, count in counts.items())
        raise ValueError(f"--images {folder}: its folders are sets of images that the edits read together, and one "
                         f"run's sets hold as many images each ({shown}); give every set as many images")
    return sets


def images_of(entry: Path) -> list[Path]:
    """The images of an entry of ``image_files``: a file, or a set's folder of images in name order."""
    return folder_images(entry) if entry.is_dir() else [entry]


def set_size(files: list[Path]) -> int:
    """How many images each entry of ``files`` holds: 1 for files, a set's count for sets."""
    return len(images_of(files[0])) if files else 1


def distinct_images(files: list[Path]) -> list[Path]:
    """The distinct images of the entries ``files``, each once, in order."""
    return list(dict.fromkeys(image for entry in files for image in images_of(entry)))


def refuse_sets(pipeline: str, files: list[Path]) -> None:
    """Refuse sets of images (``image_sets``) for a pipeline whose prompts read one image each."""
    if any(entry.is_dir() for entry in files) and pipeline not in SET_EDITING:
        raise ValueError(f"--images: a {pipeline} reads one image with each prompt, and the folder's entries are "
                         f"folders (sets of images, for {', '.join(SET_EDITING)}); give a folder of images")


def read_image(file: Path) -> torch.Tensor:
    """``file`` as ComfyUI's IMAGE [1, H, W, 3] in [0, 1], upright by its EXIF orientation, as Load Image reads it;
    a file that is no image is refused in one line."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            upright = ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{file} is not an image this reads ({e}): remove it from its folder") from None
    pixels = torch.frombuffer(bytearray(upright.tobytes()), dtype=torch.uint8).view(upright.height, upright.width, 3)
    return pixels[None].float() / 255


def cover(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """IMAGE ``pixels`` [N, H, W, C] at ``height`` x ``width``: scaled (bicubic, antialiased) until it covers that
    size, then cropped about its centre, so no image is stretched and every one comes out the same size."""
    h, w = pixels.shape[1:3]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    scaled = torch.nn.functional.interpolate(pixels.movedim(-1, 1), size=size, mode="bicubic", antialias=True)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return scaled[:, :, top:top + height, left:left + width].clamp(0, 1).movedim(1, -1)


def image_tables(root: Path, pipeline: str, files: list[Path], shape: tuple[int, ...], pixels: int,
                 kept: bool = False) -> dict[str, torch.Tensor]:
    """The tables of what the network of the ``pipeline`` at ``root`` reads of each prompt's image (``files``,
    one per prompt), for samples of latent ``shape`` whose pixels span ``pixels`` image pixels: an editing
    pipeline's reference latents (``REFERENCE_TABLE``), an image-to-video pipeline's start conditions, or with
    ``kept`` the start latents it keeps as its clips' first frames (``start_images.start_tables``)."""
    from distill_core.stages import announce, counted
    from distill_core.start_images import HUNYUAN15_I2V, hunyuan15_start_tables, start_tables

    height, width = shape[-2] * pixels, shape[-1] * pixels
    if pipeline in OPTIONAL_EDITING and height * width > FLUX2_REFERENCE_AREA:
        raise ValueError(f"a {pipeline} reads the image it edits at a megapixel at most, and this run's "
                         f"{height}x{width} is more: distil its edits at a megapixel or less (--resolution 1024)")
    refuse_sets(pipeline, files)
    announce(f"encoding {counted(len(distinct_images(files)), 'image')} at {height}x{width} with {pipeline}'s VAE "
             "(and image encoder, where it has one)")
    if pipeline in EDITING_PIPELINES + OPTIONAL_EDITING:
        return {REFERENCE_TABLE: reference_latents(root, files, height, width)}
    if pipeline == HUNYUAN15_I2V:
        return hunyuan15_start_tables(root, files, shape, pixels)
    return start_tables(root, files, shape, pixels, kept)


def pil_image(file: Path):
    """``file`` as an RGB PIL image, upright by its EXIF orientation, as diffusers' ``load_image`` gives it to a
    pipeline; a file that is no image is refused in one line."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--images: {file} is not an image this reads ({e})") from None


def reference_latents(root: Path, files: list[Path], height: int, width: int) -> torch.Tensor:
    """The latents z_ref [N, C, height / f, width / f] of ``files`` (see the module docstring), each scaled to
    ``height`` x ``width`` pixels and encoded by the VAE of the pipeline at ``root`` (Flux.2's: in 2 x 2 patches,
    normalised per patch channel); of sets of R images (``image_sets``), [N, R, C, height / f, width / f]."""
    import json

    import diffusers
    from diffusers.image_processor import VaeImageProcessor

    from distill_core.text_pipeline import PATCH_VAES, patch_statistics

    folder = root / "vae"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{root}: an editing pipeline encodes its prompts' images with its VAE, and it has "
                                "no vae/ folder")
    patches = json.loads((folder / "config.json").read_text()).get("_class_name") in PATCH_VAES
    vae_class = diffusers.AutoencoderKLFlux2 if patches else diffusers.AutoencoderKL
    vae = vae_class.from_pretrained(folder, use_safetensors=True, local_files_only=True).eval()
    processor = VaeImageProcessor()
    latents = {}
    for file in distinct_images(files):
        pixels = processor.preprocess(pil_image(file), height=height, width=width)
        with torch.no_grad():
            z = vae.encode(pixels.to(vae.dtype)).latent_dist.mode().float()
        if patches:  # each 2 x 2 patch's channels side by side, then normalised as the samples are
            b, c, h, w = z.shape
            z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
            mean, std = patch_statistics(vae)
            latents[file] = (z - mean) / std
        else:
            latents[file] = (z - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor
    return reference_table(latents, files)


def reference_table(latents: dict[Path, torch.Tensor], files: list[Path]) -> torch.Tensor:
    """The reference table of the entries ``files`` from each image's latent [1, C, h, w]: [N, C, h, w], or for sets
    of R images (``image_sets``) [N, R, C, h, w]."""
    if any(entry.is_dir() for entry in files):
        return torch.stack([torch.cat([latents[image] for image in images_of(entry)]) for entry in files])
    return torch.cat([latents[file] for file in files])

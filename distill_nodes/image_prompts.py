"""Prompts that carry images, many in one node: an editing model's training edits (Flux Kontext, Qwen-Image-Edit)
and an image-to-video model's start images (Wan, HunyuanVideo, LTX-Video), from images and lines of text, each pair
encoded as the model's own stock nodes encode one.

An encoder takes one image, the texts paired with it and the negative, and gives a CONDITIONING entry per text, the
negative's entry, both carrying the image (so each prompt is guided against the negative with its own image), and
the LATENT its clips start from where the model holds the image there instead (Wan 2.2 5B, LTX-Video), else None.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from distill_core.prompts import DEFAULT_EDITS, DEFAULT_MOTIONS, DEFAULT_NEGATIVE, prompt_lines
from distill_core.reference_images import IMAGE_SUFFIXES, cover, folder_images, read_image

from . import host
from .spec import In, Out, node
from .teachers import encode

NO_FOLDER = "(none)"
EVERY_PAIR, IN_ORDER, BESIDE = "every line on every image", "image i with line i", "each image with its .txt file"


class TextEntries:
    """Each text's CONDITIONING entry as CLIP Text Encode encodes it, encoded once."""

    def __init__(self, clip):
        self.clip, self.entries = clip, {}

    def __call__(self, text: str) -> list:
        if text not in self.entries:
            self.entries[text] = encode(self.clip, text)
        return self.entries[text]


def clip_size(width: int, height: int, length: int) -> dict:
    """The size inputs of the stock image-to-video nodes, for one clip."""
    return {"width": width, "height": height, "length": length, "batch_size": 1}


def vision_reading(clip_vision, image: torch.Tensor):
    """The stock CLIPVisionEncode's reading of ``image``, uncropped (it is fitted to the clip already)."""
    return host.run_stock_node("CLIPVisionEncode", clip_vision=clip_vision, image=image, crop="none")[0]


class ReferenceLatentEdit:
    """Flux Kontext's edits: each instruction as CLIP Text Encode encodes it, the image's VAE latent joined to it by
    the stock ReferenceLatent; the image is encoded once."""

    def __init__(self, clip, vae):
        self.text, self.vae = TextEntries(clip), vae

    def __call__(self, image: torch.Tensor, texts: list[str], negative: str) -> tuple[list, list, None]:
        latent = {"samples": self.vae.encode(image)}

        def refer(text: str) -> list:
            return host.run_stock_node("ReferenceLatent", conditioning=[self.text(text)], latent=latent)[0][0]

        return [refer(text) for text in texts], refer(negative), None


class StockEdit:
    """Qwen-Image-Edit's edits: its stock text-encoding node, whose vision-language text encoder reads the image with
    the instruction, once per text, as the encoding depends on both. The node adds the image's VAE latent to the
    first text's entry; the others take that latent through the stock ReferenceLatent, as the node would add it,
    so the VAE encodes each image once."""

    def __init__(self, node_id: str, image_input: str, clip, vae):
        self.node_id, self.image_input, self.clip, self.vae = node_id, image_input, clip, vae

    def __call__(self, image: torch.Tensor, texts: list[str], negative: str) -> tuple[list, list, None]:
        def encode(text: str, **vae) -> list:
            return host.run_stock_node(self.node_id, clip=self.clip, prompt=text, **vae,
                                       **{self.image_input: image})[0][0]

        first, *others = [*texts, negative]
        entries = [encode(first, vae=self.vae)]
        for text in others:
            entry = encode(text)
            for latent in entries[0][1].get("reference_latents", []):  # the image's, encoded for the first text
                entry = host.run_stock_node("ReferenceLatent", conditioning=[entry], latent={"samples": latent})[0][0]
            entries.append(entry)
        return entries[:-1], entries[-1], None


class WanStartImage:
    """Wan's image-to-video prompts: the stock WanImageToVideo on the image's prompts and the negative at once (the
    clip's start frames encoded once per image), with its CLIPVisionEncode output where a CLIP vision model is
    given (Wan 2.1; Wan 2.2 reads none)."""

    def __init__(self, clip, vae, clip_vision, width: int, height: int, length: int):
        self.text, self.vae, self.clip_vision = TextEntries(clip), vae, clip_vision
        self.size = clip_size(width, height, length)

    def __call__(self, image: torch.Tensor, texts: list[str], negative: str) -> tuple[list, list, None]:
        vision = {} if self.clip_vision is None else {"clip_vision_output": vision_reading(self.clip_vision, image)}
        positive, negatives, _ = host.run_stock_node(
            "WanImageToVideo", positive=[self.text(text) for text in texts], negative=[self.text(negative)],
            vae=self.vae, start_image=image, **self.size, **vision)
        return positive, negatives[0], None


class HunyuanStartImage:
    """HunyuanVideo's image-to-video prompts: its text encoder reads the image (the stock CLIPVisionEncode once per
    image, then TextEncodeHunyuanVideo_ImageToVideo per text), and the stock HunyuanImageToVideo in its
    ``guidance_type`` adds the start frames to every prompt and to the negative, given to it beside them (the node
    has no negative input; HunyuanVideo samples at CFG 1, where the negative does not count): v1 (concat), their
    latent beside the clip's; v2 (replace), a guiding frame, the latent in the clip's first frame of the LATENT it
    makes."""

    def __init__(self, guidance_type: str, clip, vae, clip_vision, width: int, height: int, length: int):
        if clip_vision is None:
            raise ValueError("HunyuanVideo image-to-video reads the image through its text encoder: connect its CLIP "
                             "vision model (Load CLIP Vision: llava_llama3_vision) to clip_vision")
        self.guidance_type, self.clip, self.vae, self.clip_vision = guidance_type, clip, vae, clip_vision
        self.size = clip_size(width, height, length)

    def __call__(self, image: torch.Tensor, texts: list[str], negative: str) -> tuple[list, list, dict | None]:
        vision = vision_reading(self.clip_vision, image)
        entries = [host.run_stock_node("TextEncodeHunyuanVideo_ImageToVideo", clip=self.clip, clip_vision_output=vision,
                                       prompt=text, image_interleave=2)[0][0] for text in [*texts, negative]]
        with_image, latent = host.run_stock_node("HunyuanImageToVideo", positive=entries, vae=self.vae,
                                                 start_image=image, guidance_type=self.guidance_type, **self.size)
        return with_image[:-1], with_image[-1], latent if self.guidance_type.startswith("v2") else None


class StartLatent:
    """Image-to-video prompts of a model that keeps the start image in the clip's latent (Wan 2.2 5B, LTX-Video):
    each text as CLIP Text Encode encodes it, and the image in the LATENT its stock node makes (the image's latent
    in the first latent frame, a noise mask that keeps it), once per image; ``image_input``: that node's image
    input, ``options``: its other inputs."""

    def __init__(self, node_id: str, image_input: str, options: dict, clip, vae, clip_vision, width: int,
                 height: int, length: int):
        if clip_vision is not None:
            raise ValueError(f"{node_id} reads no CLIP vision features: disconnect clip_vision")
        self.node_id, self.image_input, self.text, self.vae = node_id, image_input, TextEntries(clip), vae
        self.inputs = {**clip_size(width, height, length), **options}

    def __call__(self, image: torch.Tensor, texts: list[str], negative: str) -> tuple[list, list, dict]:
        latent = host.run_stock_node(self.node_id, vae=self.vae, **self.inputs, **{self.image_input: image})[-1]
        return [self.text(text) for text in texts], self.text(negative), latent


#: each editing model's encoding of its edits (the stock nodes its own workflows encode an edit with)
EDITORS = {
    "Flux Kontext": ReferenceLatentEdit,
    "Qwen-Image-Edit": functools.partial(StockEdit, "TextEncodeQwenImageEdit", "image"),
    "Qwen-Image-Edit 2509": functools.partial(StockEdit, "TextEncodeQwenImageEditPlus", "image1"),
}
#: each image-to-video model's encoding of its start images
RELEASES = {"Wan 2.1 / Wan 2.2 14B (WanImageToVideo)": WanStartImage,
            "HunyuanVideo (HunyuanImageToVideo, v1 concat)": functools.partial(HunyuanStartImage, "v1 (concat)"),
            "HunyuanVideo v2 (HunyuanImageToVideo, v2 replace)": functools.partial(HunyuanStartImage,
                                                                                   "v2 (replace)"),
            "Wan 2.2 5B (Wan22ImageToVideoLatent)": functools.partial(StartLatent, "Wan22ImageToVideoLatent",
                                                                      "start_image", {}),
            "LTX-Video (LTXVImgToVideo)": functools.partial(StartLatent, "LTXVImgToVideo", "image", {
                "positive": [], "negative": [], "strength": 1.0})}


def image_folders() -> list[str]:
    """The folders inside ComfyUI's input folder that hold images, for the folder menu."""
    root = host.input_folder()
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and host.SAFE_NAME.match(p.name)
                     and folder_images(p)) if root.is_dir() else []
    return [NO_FOLDER, *folders]


def texts_per_image(images: list[Path | None], lines: list[str], pairing: str, kind: str) -> list[list[str]]:
    """The texts of each image (``images``: each one's file, None for a connected one): every line on every image,
    image i with line i (one image or one line: with every one of the other), or each image with the lines of the
    text file of its name beside it (``a.png``: ``a.txt``)."""
    if pairing == BESIDE:
        if None in images:
            raise ValueError(f"pairing '{BESIDE}' reads each image's {kind}s from a .txt file beside it, and connected "
                             "images have none: use an image folder alone, or another pairing")
        texts = []
        for file in images:
            caption = file.with_suffix(".txt")
            found = prompt_lines(caption.read_text(encoding="utf-8", errors="replace")) if caption.is_file() else []
            if not found:
                raise ValueError(f"{file.name} has no {kind}s beside it: write them in {caption.name}, one per line, "
                                 "in the same folder")
            texts.append(found)
        return texts
    if pairing not in (EVERY_PAIR, IN_ORDER):
        raise ValueError(f"pairing {pairing!r} is none of '{EVERY_PAIR}', '{IN_ORDER}' and '{BESIDE}'")
    if not lines:
        raise ValueError(f"the {kind} list is empty: write at least one (one per line)")
    if pairing == EVERY_PAIR or len(images) == 1 or len(lines) == 1:
        return [lines] * len(images)
    if len(images) != len(lines):
        raise ValueError(f"pairing '{IN_ORDER}' needs as many images as lines, got {len(images)} images and "
                         f"{len(lines)} lines: give one line per image, or pair '{EVERY_PAIR}'")
    return [[line] for line in lines]


def gather_images(images: torch.Tensor | None, folder: str) -> list[tuple[torch.Tensor, Path | None]]:
    """Each image [1, H, W, 3] with its file (None for a connected one): the socket's batch, then the folder's files
    by name."""
    found = [] if images is None else [(image, None) for image in images.split(1)]
    if folder != NO_FOLDER:
        path = host.confined(host.input_folder(), folder)
        files = folder_images(path) if path.is_dir() else []
        if not files:
            raise ValueError(f"the image folder {folder!r} holds no images ({', '.join(IMAGE_SUFFIXES)}) in "
                             f"{host.input_folder()}: put the images there")
        found += [(read_image(file), file) for file in files]
    if not found:
        raise ValueError("no images: connect images (Load Image) or pick an image folder (a folder of images inside "
                         "ComfyUI's input folder)")
    return found


def listed_prompts(encoder, lines_text: str, negative: str, pairing: str, images, image_folder: str, width: int,
                   height: int, kind: str) -> tuple:
    """(the prompts, a negative per prompt, the images fitted to ``width`` x ``height`` (``cover``), the start LATENT
    of each prompt or None, a line saying how many prompts were made): ``encoder`` on each image with its texts
    (``texts_per_image``), image by image."""
    found = gather_images(images, image_folder)
    texts = texts_per_image([file for _, file in found], prompt_lines(lines_text), pairing, kind)
    fitted = [cover(image[:, :, :, :3], height, width) for image, _ in found]
    positive, negatives, starts = [], [], []
    for image, own_texts in zip(fitted, texts, strict=True):
        entries, own, start = encoder(image, own_texts, negative)
        positive += entries
        negatives += [own] * len(entries)
        starts += [start] * len(entries)
        host.check_interrupt()
    distinct = len({text for own_texts in texts for text in own_texts})
    summary = f"{len(fitted)} images x {distinct} {kind}s -> {len(positive)} training prompts"
    print(f"[comfyui-distill] {summary}")
    start = None if starts[0] is None else {key: torch.cat([latent[key] for latent in starts])
                                            for key in ("samples", "noise_mask")}
    return positive, negatives, torch.cat(fitted), start, summary


class ReadsImageFolder:
    """A node that reads the images (and their text files) of the folder its ``image_folder`` widget names. ComfyUI
    reuses a node's outputs while its inputs stay the same; ``IS_CHANGED`` adds the folder's file names, sizes and
    modification times to them, so the node reads the folder again once images or their texts change."""

    @classmethod
    def IS_CHANGED(cls, image_folder: str = NO_FOLDER, **_) -> str:  # noqa: N802 - ComfyUI's
        if image_folder == NO_FOLDER:
            return image_folder
        try:
            path = host.confined(host.input_folder(), image_folder)
        except ValueError:
            return image_folder  # a name the node itself refuses
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
        return "|".join([image_folder, *(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)])


def pairing_inputs(default_width: int, default_height: int, size_help: str) -> list[In]:
    """The inputs both lists share: pairing, the size every image is fitted to, and where the images come from."""
    return [
        In("pairing", (EVERY_PAIR, IN_ORDER, BESIDE), "which lines go with which image: every line on every image, "
           "image i with line i (in the images' order: the connected batch, then the folder's files by name), or "
           "each folder image with the lines of the .txt file of its name beside it (a.png: a.txt; the list above "
           "is then unused)"),
        In("width", "INT", f"the width every image is fitted to (scaled to cover it, centre-cropped): {size_help}",
           default_width, options={"min": 64, "max": 4096, "step": 16}),
        In("height", "INT", "the height every image is fitted to", default_height,
           options={"min": 64, "max": 4096, "step": 16}),
        In("images", "IMAGE", "images (Load Image; several joined with Image Batch)", optional=True),
        In("image_folder", image_folders, "a folder of images inside ComfyUI's input folder (png, jpg, webp), "
           "after the connected images", NO_FOLDER, optional=True),
    ]


PROMPT_OUTPUTS = [Out("CONDITIONING", "positive", "one entry per (image, line) pair, for Teacher from MODEL"),
                  Out("CONDITIONING", "negative", "the negative with each pair's image, one entry per positive entry "
                      "(each prompt guided against its own)"),
                  Out("IMAGE", "images", "the images as fitted and encoded, in order")]


@node("DistillEditList", "Distill edit list", "teachers",
      "Training edits for an editing model (Flux Kontext, Qwen-Image-Edit): images (connected, or a folder in "
      "ComfyUI's input folder) and edit instructions, one per line, paired and encoded as the model's own nodes "
      "encode one edit (Flux Kontext: CLIP Text Encode + ReferenceLatent; Qwen-Image-Edit: "
      "TextEncodeQwenImageEdit). Every image is first fitted to width x height. Connect positive and negative to "
      "Teacher from MODEL at the same width and height.",
      inputs=[
          In("clip", "CLIP", "the editing model's text encoder (Flux Kontext: CLIP-L and T5; Qwen-Image-Edit: "
             "Qwen2.5-VL)"),
          In("vae", "VAE", "the editing model's VAE: encodes each image as the model's reference latent"),
          In("editor", tuple(EDITORS), "which model the edits are for: Flux Kontext (instruction + ReferenceLatent), "
             "Qwen-Image-Edit (TextEncodeQwenImageEdit) or Qwen-Image-Edit 2509 (TextEncodeQwenImageEditPlus, "
             "one image per instruction)"),
          In("instructions", "STRING", "edit instructions, one per line; a list of edits that fit any image ships "
             "as the default", DEFAULT_EDITS, options={"multiline": True}),
          In("negative", "STRING", "negative prompt for classifier-free guidance, encoded with each image as the "
             "instructions are (Flux Kontext samples at CFG 1 and does not use it)", "",
             options={"multiline": True}),
          *pairing_inputs(1024, 1024, "the size you distil at (Teacher from MODEL's) and sample at. "
                          "Qwen-Image-Edit's nodes then scale it to a megapixel, keeping this shape"),
      ],
      outputs=PROMPT_OUTPUTS)
class EditList(ReadsImageFolder):
    def run(self, clip, vae, editor: str, instructions: str, negative: str, pairing: str, width: int, height: int,
            images=None, image_folder: str = NO_FOLDER, unique_id=None):
        *prompts, _, summary = listed_prompts(EDITORS[editor](clip, vae), instructions, negative, pairing, images,
                                              image_folder, width, height, "instruction")
        return {"ui": {"text": [summary]}, "result": tuple(prompts)}


@node("DistillImageToVideoList", "Distill image-to-video list", "teachers",
      "Training prompts for an image-to-video model (Wan 2.1 I2V, Wan 2.2 14B I2V, Wan 2.2 5B, HunyuanVideo I2V, "
      "LTX-Video): start images (connected, or a folder in ComfyUI's input folder) and prompts, one per line, paired "
      "and encoded as WanImageToVideo encodes them (with CLIPVisionEncode for Wan 2.1), as HunyuanImageToVideo and "
      "its image-reading text encoder do, or for Wan 2.2 5B, LTX-Video and HunyuanVideo v2 as "
      "Wan22ImageToVideoLatent, LTXVImgToVideo and HunyuanImageToVideo (v2) hold the image in the clip's latent. "
      "Every image is first fitted to width x height. Connect positive and negative (and for Wan 2.2 5B, LTX-Video "
      "and HunyuanVideo v2 start_latent) to Teacher from MODEL at the same width, height and length.",
      inputs=[
          In("clip", "CLIP", "the model's text encoder (Wan: UMT5-XXL; HunyuanVideo: its LLaVA text encoder; "
             "LTX-Video: T5-XXL)"),
          In("vae", "VAE", "the model's VAE: encodes each clip's start frame"),
          In("release", tuple(RELEASES), "which model the prompts are for: Wan 2.1 and Wan 2.2 14B image-to-video "
             "take the image with each prompt (WanImageToVideo), HunyuanVideo too (HunyuanImageToVideo, v1 concat, "
             "its text encoder reading the image); Wan 2.2 5B (TI2V), LTX-Video and HunyuanVideo v2 keep it in the "
             "clip's first latent frame (Wan22ImageToVideoLatent, LTXVImgToVideo at strength 1, HunyuanImageToVideo "
             "v2 replace, its text encoder reading the image too: connect start_latent)"),
          In("prompts", "STRING", "prompts, one per line; a list of motions that fit any start image ships as the "
             "default", DEFAULT_MOTIONS, options={"multiline": True}),
          In("negative", "STRING", "negative prompt for classifier-free guidance, with each start image as the "
             "prompts", DEFAULT_NEGATIVE, options={"multiline": True}),
          In("length", "INT", "video frames of each clip: Teacher from MODEL's length, the length you sample with "
             "(Wan: 4k + 1; LTX-Video: 8k + 1)",
             81, options={"min": 1, "max": 1024, "step": 4}),
          *pairing_inputs(832, 480, "the size you distil at (Teacher from MODEL's) and sample at"),
          In("clip_vision", "CLIP_VISION", "Wan 2.1 and HunyuanVideo image-to-video: their CLIP vision model (Load "
             "CLIP Vision; HunyuanVideo: llava_llama3_vision), whose reading of each image joins its prompts; Wan "
             "2.2 takes none", optional=True),
      ],
      outputs=[*PROMPT_OUTPUTS, Out("LATENT", "start_latent", "Wan 2.2 5B, LTX-Video, HunyuanVideo v2: each "
                                    "prompt's start latent, in order, for Teacher from MODEL's start_latent (none for "
                                    "the other releases)")])
class ImageToVideoList(ReadsImageFolder):
    def run(self, clip, vae, release: str, prompts: str, negative: str, length: int, pairing: str, width: int,
            height: int, images=None, image_folder: str = NO_FOLDER, clip_vision=None, unique_id=None):
        encoder = RELEASES[release](clip, vae, clip_vision, width, height, length)
        *prompts, summary = listed_prompts(encoder, prompts, negative, pairing, images, image_folder, width, height,
                                           "prompt")
        return {"ui": {"text": [summary]}, "result": tuple(prompts)}

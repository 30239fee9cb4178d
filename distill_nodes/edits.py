"""The edit list: an editing model's training conditions (Flux Kontext, Qwen-Image-Edit) from images and edit
instructions, each pair encoded as the model's stock nodes encode one edit."""

from __future__ import annotations

import functools

import torch

from distill_core.prompts import DEFAULT_EDITS
from distill_core.reference_images import IMAGE_SUFFIXES, cover, folder_images, read_image

from . import host
from .spec import In, Out, node
from .teachers import encode

NO_FOLDER = "(none)"
EVERY_PAIR, IN_ORDER = "every instruction on every image", "image i with instruction i"


class ReferenceLatentEdit:
    """Flux Kontext's edit: the instruction as CLIP Text Encode encodes it, the image's VAE latent joined to it by
    the stock ReferenceLatent. Each instruction and each image is encoded once."""

    def __init__(self, clip, vae):
        self.clip, self.vae, self.texts, self.latents = clip, vae, {}, {}

    def __call__(self, text: str, index: int, image: torch.Tensor) -> list:
        if text not in self.texts:
            self.texts[text] = encode(self.clip, text)
        if index not in self.latents:
            self.latents[index] = self.vae.encode(image[:, :, :, :3])
        (conditioning,) = host.run_stock_node("ReferenceLatent", conditioning=[self.texts[text]],
                                              latent={"samples": self.latents[index]})
        return conditioning[0]


class StockEdit:
    """Qwen-Image-Edit's edit: its stock text-encoding node, whose vision-language text encoder reads the image with
    the instruction and which adds the image's VAE latent; once per pair, as the encoding depends on both."""

    def __init__(self, node_id: str, image_input: str, clip, vae):
        self.node_id, self.image_input, self.clip, self.vae = node_id, image_input, clip, vae

    def __call__(self, text: str, index: int, image: torch.Tensor) -> list:
        (conditioning,) = host.run_stock_node(self.node_id, clip=self.clip, prompt=text, vae=self.vae,
                                              **{self.image_input: image})
        return conditioning[0]


#: each editing model's encoding of one edit (the stock nodes its own workflows encode an edit with)
EDITORS = {
    "Flux Kontext": ReferenceLatentEdit,
    "Qwen-Image-Edit": functools.partial(StockEdit, "TextEncodeQwenImageEdit", "image"),
    "Qwen-Image-Edit 2509": functools.partial(StockEdit, "TextEncodeQwenImageEditPlus", "image1"),
}


def image_folders() -> list[str]:
    """The folders inside ComfyUI's input folder that hold images, for the folder menu."""
    root = host.input_folder()
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and host.SAFE_NAME.match(p.name)
                     and folder_images(p)) if root.is_dir() else []
    return [NO_FOLDER, *folders]


def edit_pairs(images: int, instructions: int, pairing: str) -> list[tuple[int, int]]:
    """(image, instruction) index pairs: every instruction on every image, or image i with instruction i (one image
    or one instruction: with every one of the other)."""
    if pairing == EVERY_PAIR or images == 1 or instructions == 1:
        return [(i, t) for i in range(images) for t in range(instructions)]
    if images != instructions:
        raise ValueError(f"pairing '{IN_ORDER}' needs as many images as instructions, got {images} images and "
                         f"{instructions} instructions: give one per image, or pair '{EVERY_PAIR}'")
    return [(i, i) for i in range(images)]


def gather_images(images: torch.Tensor | None, folder: str, height: int, width: int) -> list[torch.Tensor]:
    """Each image [1, height, width, 3] (``cover``): the socket's batch, then the folder's files by name."""
    found = [] if images is None else list(images.split(1))
    if folder != NO_FOLDER:
        path = host.confined(host.input_folder(), folder)
        files = folder_images(path) if path.is_dir() else []
        if not files:
            raise ValueError(f"the image folder {folder!r} holds no images ({', '.join(IMAGE_SUFFIXES)}) in "
                             f"{host.input_folder()}: put the images to edit there")
        found += [read_image(file) for file in files]
    if not found:
        raise ValueError("no images to edit: connect images (Load Image) or pick an image folder (a folder of "
                         "images inside ComfyUI's input folder)")
    return [cover(image[:, :, :, :3], height, width) for image in found]


@node("DistillEditList", "Distill edit list", "teachers",
      "Training edits for an editing model (Flux Kontext, Qwen-Image-Edit): images (connected, or a folder in "
      "ComfyUI's input folder) and edit instructions, one per line, paired and encoded as the model's own nodes "
      "encode one edit (Flux Kontext: CLIP Text Encode + ReferenceLatent; Qwen-Image-Edit: "
      "TextEncodeQwenImageEdit). Every image is first fitted to width x height (scaled to cover it, centre "
      "cropped). Connect positive and negative to Teacher from MODEL at the same width and height.",
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
          In("pairing", (EVERY_PAIR, IN_ORDER), "which instructions edit which image: every instruction on every "
             "image, or image i with instruction i (in the images' order: the connected batch, then the folder's "
             "files by name)"),
          In("width", "INT", "the width every image is fitted to: the size you distil at (Teacher from MODEL's) "
             "and sample at. Qwen-Image-Edit's nodes then scale it to a megapixel, keeping this shape", 1024,
             options={"min": 64, "max": 4096, "step": 16}),
          In("height", "INT", "the height every image is fitted to", 1024,
             options={"min": 64, "max": 4096, "step": 16}),
          In("images", "IMAGE", "images to edit (Load Image; several joined with Image Batch)", optional=True),
          In("image_folder", image_folders, "a folder of images to edit inside ComfyUI's input folder (png, jpg, "
             "webp), after the connected images", NO_FOLDER, optional=True),
      ],
      outputs=[Out("CONDITIONING", "positive", "one entry per (image, instruction) pair, for Teacher from MODEL"),
               Out("CONDITIONING", "negative", "the negative encoded with each pair's image, one entry per positive "
                   "entry (each prompt guided against its own)"),
               Out("IMAGE", "images", "the images as fitted and encoded, in order (e.g. for VAE Encode and "
                   "ReferenceLatent when sampling a new edit)")])
class EditList:
    def run(self, clip, vae, editor: str, instructions: str, negative: str, pairing: str, width: int, height: int,
            images=None, image_folder: str = NO_FOLDER, unique_id=None):
        lines = [line.strip() for line in instructions.splitlines() if line.strip()]
        if not lines:
            raise ValueError("the instruction list is empty: write at least one edit instruction (one per line)")
        fitted = gather_images(images, image_folder, height, width)
        pairs = edit_pairs(len(fitted), len(lines), pairing)
        edit, encoded = EDITORS[editor](clip, vae), {}

        def encoded_pair(text: str, index: int) -> list:
            if (text, index) not in encoded:
                encoded[text, index] = edit(text, index, fitted[index])
                host.check_interrupt()
            return encoded[text, index]

        positive = [encoded_pair(lines[t], i) for i, t in pairs]
        negatives = [encoded_pair(negative, i) for i, _ in pairs]
        summary = f"{len(fitted)} images x {len(lines)} instructions -> {len(pairs)} training edits ({editor})"
        print(f"[comfyui-distill] edit list: {summary}")
        return {"ui": {"text": [summary]}, "result": (positive, negatives, torch.cat(fitted))}

"""Text-to-image teachers from diffusers pipeline directories (``--teacher DIR --prompts FILE``), offline.

A pipeline directory (``model_index.json``) with one text encoder: ``unet/`` (a ``UNet2DConditionModel``, as
SD1.x and SD2.x), ``scheduler/``, ``text_encoder/`` and ``tokenizer/`` (the transformers classes that
``model_index.json`` names), and optionally ``vae/`` (an ``AutoencoderKL``, which decodes the report's grid).

The prompts are encoded once, with the empty prompt as classifier-free guidance's unconditional side (the
pipeline's own default negative). The teacher is then class-conditional over prompts: condition k < P is
prompt k, condition P the empty prompt. So every part of the engine that takes class labels (training
draws, CFG, evaluation sets that cycle through the conditions, reports) takes prompts unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

#: attributes of the text denoiser that the engine reads from a teacher's denoiser
DENOISER_ATTRIBUTES = ("sigma_min", "sigma_max", "prediction", "shift")


class PromptConditioned(nn.Module):
    """D(x, sigma, k) = D_text(x, sigma, e_k): a denoiser over text embeddings read through a table ``e`` of
    encoded prompts ``[P + 1, T, C]`` (row P: the empty prompt). The table is no part of the teacher's identity
    (its fingerprint): a student distilled on some prompts samples any others."""

    def __init__(self, inner: nn.Module, embeddings: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("embeddings", embeddings, persistent=False)
        for name in DENOISER_ATTRIBUTES:
            if hasattr(inner, name):
                setattr(self, name, getattr(inner, name))

    def settings(self) -> dict:
        return self.inner.settings()

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is None:
            raise ValueError("a text-to-image teacher needs a prompt index per sample")
        return self.inner(x, sigma, self.embeddings[cond.to(self.embeddings.device).long()])


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("text-to-image pipelines need the transformers package for their text encoder: "
                          "pip install transformers") from None
    return transformers


def text_parts(root: Path, index: dict) -> tuple[str, str]:
    """The transformers class names of the pipeline's tokenizer and text encoder; a clear refusal for
    pipelines with more than one text encoder."""
    if "text_encoder_2" in index or "text_encoder_3" in index:
        raise ValueError(f"{root}: a pipeline with several text encoders (SDXL, SD3) is distilled through ComfyUI "
                         "(Teacher from MODEL); this command takes pipelines with one (SD1.x, SD2.x)")
    names = []
    for part in ("tokenizer", "text_encoder"):
        entry = index.get(part) or [None, None]
        if entry[0] != "transformers" or not (root / part).is_dir():
            raise ValueError(f"{root}: model_index.json names no transformers {part} in {root / part}")
        names.append(entry[1])
    return names[0], names[1]


@torch.no_grad()
def encode_prompts(root: Path, index: dict, prompts: list[str]) -> torch.Tensor:
    """``[P + 1, T, C]``: the text encoder's last hidden states of every prompt and of the empty prompt,
    padded to the tokenizer's length, as the pipeline encodes them."""
    transformers = _transformers()
    transformers.utils.logging.disable_progress_bar()
    tokenizer_name, encoder_name = text_parts(root, index)
    tokenizer = getattr(transformers, tokenizer_name).from_pretrained(root / "tokenizer", local_files_only=True)
    if not any((root / "text_encoder").glob("*.safetensors")):
        raise FileNotFoundError(f"{root / 'text_encoder'}: no .safetensors weights (only safetensors are loaded)")
    encoder = getattr(transformers, encoder_name).from_pretrained(
        root / "text_encoder", local_files_only=True, use_safetensors=True).eval()
    ids = tokenizer([*prompts, ""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return encoder(ids)[0].float()


def vae_decoder(root: Path) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Latents to images in [-1, 1] with the pipeline's ``vae/`` (None without one)."""
    folder = root / "vae"
    if not (folder / "config.json").is_file():
        return None
    import diffusers

    vae = diffusers.AutoencoderKL.from_pretrained(folder, use_safetensors=True, local_files_only=True).eval()

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        return vae.decode(latents.float() / vae.config.scaling_factor).sample.clamp(-1, 1)

    return decode

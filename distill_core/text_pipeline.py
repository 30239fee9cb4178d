"""Text-to-image teachers from diffusers pipeline directories (``--teacher DIR --prompts FILE``), offline.

A pipeline directory (``model_index.json``) with ``scheduler/``, optionally ``vae/`` (an ``AutoencoderKL``,
which decodes the report's grid), and either

* ``unet/`` (a ``UNet2DConditionModel``, as SD1.x and SD2.x) with one ``text_encoder/`` and ``tokenizer/`` (the
  transformers classes that ``model_index.json`` names): a prompt's condition is the encoder's last hidden
  states c; or
* ``transformer/`` (SD3, Flux) with all of its text encoders: the pipeline's own ``encode_prompt`` gives the
  token embeddings c and the pooled embedding p of each prompt.

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
    encoded prompts ``[P + 1, T, C]`` (row P: the empty prompt), or through several tables by name (SD3 and
    Flux: {"context": c, "pooled": p}). The tables are no part of the teacher's identity (its fingerprint): a
    student distilled on some prompts samples any others."""

    def __init__(self, inner: nn.Module, embeddings: torch.Tensor | dict[str, torch.Tensor]):
        super().__init__()
        self.inner = inner
        self.names = list(embeddings) if isinstance(embeddings, dict) else None
        tables = embeddings if isinstance(embeddings, dict) else {"embeddings": embeddings}
        for name, table in tables.items():
            self.register_buffer(name, table, persistent=False)
        for name in DENOISER_ATTRIBUTES:
            if hasattr(inner, name):
                setattr(self, name, getattr(inner, name))

    def settings(self) -> dict:
        return self.inner.settings()

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is None:
            raise ValueError("a text-to-image teacher needs a prompt index per sample")
        rows = cond.to(x.device).long()
        if self.names is None:
            return self.inner(x, sigma, self.embeddings[rows])
        return self.inner(x, sigma, {name: getattr(self, name)[rows] for name in self.names})


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("text-to-image pipelines need the transformers package for their text encoder: "
                          "pip install transformers") from None
    return transformers


def text_parts(root: Path, index: dict) -> tuple[str, str]:
    """The transformers class names of a UNet pipeline's tokenizer and text encoder; a clear refusal for UNet
    pipelines with more than one text encoder."""
    if "text_encoder_2" in index or "text_encoder_3" in index:
        raise ValueError(f"{root}: a UNet pipeline with several text encoders (SDXL) is distilled through ComfyUI "
                         "(Teacher from MODEL); this command takes SD1.x, SD2.x, SD3 and Flux pipelines")
    names = []
    for part in ("tokenizer", "text_encoder"):
        entry = index.get(part) or [None, None]
        if entry[0] != "transformers" or not (root / part).is_dir():
            raise ValueError(f"{root}: model_index.json names no transformers {part} in {root / part}")
        names.append(entry[1])
    return names[0], names[1]


@torch.no_grad()
def encode_prompts(root: Path, index: dict, prompts: list[str]) -> torch.Tensor | dict[str, torch.Tensor]:
    """The conditions of every prompt and of the empty prompt, as the pipeline encodes them: a UNet pipeline's
    ``[P + 1, T, C]`` last hidden states of its text encoder, padded to the tokenizer's length; a transformer
    pipeline's token and pooled embeddings (``encode_with_pipeline``)."""
    if "transformer" in index:
        return encode_with_pipeline(root, [*prompts, ""])
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


@torch.no_grad()
def encode_with_pipeline(root: Path, prompts: list[str]) -> dict[str, torch.Tensor]:
    """{"context": [P, T, C], "pooled": [P, C']} from an SD3 or Flux pipeline's own ``encode_prompt`` (all its
    text encoders: SD3's two CLIPs and T5, Flux's CLIP and T5), loaded without its transformer and VAE."""
    transformers = _transformers()
    import diffusers

    for log in (diffusers.utils.logging, transformers.utils.logging):
        log.disable_progress_bar()
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        folder = root / part
        if folder.is_dir() and not any(folder.glob("*.safetensors")):
            raise FileNotFoundError(f"{folder}: no .safetensors weights (only safetensors are loaded)")
    pipe = diffusers.DiffusionPipeline.from_pretrained(root, transformer=None, vae=None, use_safetensors=True,
                                                       local_files_only=True)
    name = type(pipe).__name__
    if name == "StableDiffusion3Pipeline":
        context, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device="cpu",
                                                   do_classifier_free_guidance=False)
    elif name == "FluxPipeline":
        context, pooled, _ = pipe.encode_prompt(prompts, None, device="cpu")
    else:
        raise ValueError(f"{root}: a {name} is not a pipeline this command distils (it takes SD1.x, SD2.x, SD3 "
                         "and Flux pipelines)")
    return {"context": context.float(), "pooled": pooled.float()}


def vae_decoder(root: Path) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Latents to images in [-1, 1] with the pipeline's ``vae/`` (None without one)."""
    folder = root / "vae"
    if not (folder / "config.json").is_file():
        return None
    import diffusers

    vae = diffusers.AutoencoderKL.from_pretrained(folder, use_safetensors=True, local_files_only=True).eval()

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        shift = vae.config.shift_factor or 0.0  # SD3's and Flux's latents are shifted, SD's not
        return vae.decode(latents.float() / vae.config.scaling_factor + shift).sample.clamp(-1, 1)

    return decode

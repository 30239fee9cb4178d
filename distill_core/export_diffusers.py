"""A student of a diffusers text-to-image pipeline directory (SD1.x, SD2.x, SDXL, SD3 / 3.5, Flux, Flux Kontext,
Qwen-Image, AuraFlow, Chroma, Lumina 2, Z-Image, Flux.2 (dev and klein), SANA, CogView4, Ovis-Image, LongCat-Image,
HiDream, Wan 2.1, Wan 2.2 A14B and TI2V 5B; Wan 2.1's, 2.2 A14B's and TI2V 5B's image-to-video; LTX-Video's and
HunyuanVideo 1.5's text- and image-to-video) as files diffusers loads:

    python -m distill_core export-diffusers STUDENT.safetensors --out DIR [--teacher PIPELINE_DIR]

writes into DIR a LoRA student as ``pytorch_lora_weights.safetensors`` (diffusers' PEFT layout, which
``pipe.load_lora_weights(DIR)`` reads) or a full student as ``unet/`` or ``transformer/`` (the network's
``from_pretrained``), beside ``scheduler/`` and ``sampling.json``: the sigmas, guidance scale, starting-noise
scale, image size and any other keywords (``call``) to pass to the pipeline,
``pipe(prompt, latents=..., sigmas=..., guidance_scale=..., **call)``. Wan's and LTX-Video's pipeline calls take no
sigmas: their scheduler's ``set_timesteps`` is made to set them, whatever the pipeline asks, and the call is given
the step count. HunyuanVideo 1.5's pipeline takes its guidance scale from its guider, which the printed lines
replace with one at the student's scale (1: none). Wan 2.2 A14B's
two experts are two networks, ``transformer`` (high noise) and ``transformer_2`` (low noise), switched at the
pipeline's ``boundary_ratio`` as the engine's teacher switched them: a LoRA student exports one file for each
(``LORA_FILES``; the second loaded with ``load_into_transformer_2=True``), a full student both folders.
HiDream's pipeline scales every image to the area of its default size (``drawn_size``): a student distilled at
another area is refused.

Why the pipeline then samples as the engine does. Both take Euler steps with the network's x0 (DDIM, Song
et al. 2021), a step x_{s'} = x0 + (s' / s)(x_s - x0) that is the same map whether the noisy sample is
written x = x0 + sigma n (the engine's convention, a UNet's Euler scheduler) or x_t = (1 - t) x0 + t n with
t = sigma / (1 + sigma) (a flow pipeline's); given custom sigmas, the exported schedulers step through exactly
those (the flow scheduler with shift 1 and no terminal stretch, so that it moves none of them: the student's
times are shifted already).

Where the pipeline starts. An SFD student's first step is analytic about the centre 0 (``afs_center: zero``, a
text-to-image student's): from x_N = s_0 z, with the direction x / sqrt(1 + s_0^2), it lands on

    x_1 = k z,   k = s_0 (1 + (s_1 - s_0) / sqrt(1 + s_0^2))   (k = s_1 + O(1 / s_0)),

with no network evaluation; the pipeline takes the student's N network steps from s_1. Latents
``noise_scale`` z start it there: a UNet pipeline multiplies its latents by ``init_noise_sigma``, which with
``timestep_spacing`` "linspace" is its first sigma, so noise_scale = k / s_1; a flow pipeline takes them as
x_t = x_1 / (1 + s_1), so noise_scale = k / (1 + s_1). A student without the analytic step starts at s_0 with
k = s_0. A flow pipeline's last step goes to t = 0: the student's last point, sigma_min (0.006 by default),
becomes 0 there, so its images end the last step's remaining sigma_min of noise early.

Guidance distilled into the student: ``guidance_scale`` 1 (no CFG); a student of guidance mode "cfg": its w, against
the negative it was distilled with (the pipeline's own, or the prompt its file names, passed as
``negative_prompt``), as in training (CFG in epsilon or velocity is CFG in x0: x0 is affine in either at fixed x and
sigma); Flux dev and Flux.2 dev: the guidance input its file names. Z-Image's pipeline takes g = w - 1 (it guides as
x0_c + g (x0_c - x0_u)); Lumina 2's is told not to rescale its guided velocities (``cfg_normalization=False``), and
LongCat-Image's not to rescale them or rewrite the prompt (``enable_cfg_renorm=False``,
``enable_prompt_rewrite=False``), so that they guide as the engine does; SANA's not to snap the image size to its
bins of aspect ratios (``use_resolution_binning=False``), so that it samples at the student's size. Qwen-Image's
pipeline always rescales its guided velocities, which the engine's CFG does not: only its guidance-distilled
students export. Flux.2 klein's pipeline guides against the empty prompt only: a student guided against another
negative does not export. A LoRA's update (alpha / r) B A is written with alpha / r folded into B, so PEFT's default
scale 1 applies it.

Students that re-noise between their steps (DMD2, moment matching, LCM-LoRA: x_{i+1} = x0_i + s_{i+1} n_i,
n_i drawn afresh) export to the flow pipelines: their scheduler, told ``stochastic_sampling``, steps to
x_{t'} = (1 - t') x0 + t' n, which is that step divided by 1 + s' (t' = s' / (1 + s')). The schedule ends at
0, so the pipeline's last step lands on the student's image exactly. A UNet pipeline's schedulers re-noise
only on their own discrete timesteps, so its re-noising students are refused. A student of LoRA experts
(Phased DMD: expert k for step k, on its phase (s_{k+1}, s_k]) exports one LoRA per expert,
``expert_{k}.safetensors``, loaded as named adapters; a step-end callback makes the next step's expert the
active one (``set_adapters``).

Students whose sampling a diffusers scheduler does not reproduce are refused in one line (sample them with
``python -m distill_core sample``): samplers that run a named solver (phased), a first step about class
means, step- or guidance-conditioned networks (SFD-v, LCM), full-weight experts, and teachers other than
these pipelines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class Target:
    """What an export writes for one pipeline class: its network's attribute and class, whether it samples a
    flow (``FlowMatchEulerDiscreteScheduler`` over times t, else ``EulerDiscreteScheduler`` over sigmas), whether it
    takes its latents packed in 2 x 2 patches (Flux, Qwen-Image, Chroma), the keyword of its guidance scale and how
    far that scale lies below the engine's w (Z-Image: 1), whether its CFG is the engine's (Qwen-Image's rescales
    the guided velocity), the call's keywords that make it so (``call``), whether the call takes a negative prompt
    (Flux.2 klein's does not) and sigmas (Wan's does not), whether it draws videos (Wan: latents [B, C, T, H, W],
    ``num_frames``, ``.frames``), the side, in latent pixels, of the square whose area it scales every image to
    (``area``: HiDream's, 128; None: it draws the size asked), and the image its call takes (``image``): the one it
    edits (``edit``, Flux Kontext and Qwen-Image-Edit) or the one its clip starts from (``start``, Wan and LTX-Video
    image-to-video), given as loaded (the pipeline scales it) or, where the engine scaled it to the student's size
    (``sized``: Flux Kontext, Flux.2's edits), at that size, whether its call takes the area it draws at
    (``drawn_area``: Flux Kontext's ``max_area``), and whether the start image's latent goes in the first frame of
    the latents it is given (``keeps_start``: LTX-Video's, which takes given latents as they are). A pipeline that
    draws from prompts alone or edits (Flux.2) takes its image as ``edited`` says, for a student trained on edits
    (``target``). HunyuanVideo 1.5's takes its guidance scale from its guider (``guider``), not a keyword of its
    call; it, Ovis-Image's and LongCat-Image's have no LoRA loader of their own: a LoRA loads into the network
    (``network_lora``); HunyuanVideo 1.5's image-to-video pipeline takes no size (``takes_size``): it draws at the
    frame its start image's aspect ratio picks. CogView4's network takes the time
    before its scheduler's shift, which its call takes as ``timesteps`` beside the sigmas (``time_before_shift``)."""

    network: str
    network_class: str
    flow: bool = False
    packed: bool = False
    guidance_keyword: str = "guidance_scale"
    w_offset: float = 0.0
    engine_cfg: bool = True
    call: tuple[tuple[str, object], ...] = ()
    takes_negative: bool = True
    takes_sigmas: bool = True
    video: bool = False
    area: int | None = None
    image: str = ""
    sized: bool = False
    drawn_area: bool = False
    keeps_start: bool = False
    edited: tuple[tuple[str, object], ...] = ()
    guider: bool = False
    network_lora: bool = False
    takes_size: bool = True
    time_before_shift: bool = False

    @property
    def scheduler_class(self) -> str:
        return "FlowMatchEulerDiscreteScheduler" if self.flow else "EulerDiscreteScheduler"


PIPELINES = {
    "StableDiffusionPipeline": Target("unet", "UNet2DConditionModel"),
    "StableDiffusionXLPipeline": Target("unet", "UNet2DConditionModel"),
    "StableDiffusion3Pipeline": Target("transformer", "SD3Transformer2DModel", flow=True),
    "FluxPipeline": Target("transformer", "FluxTransformer2DModel", flow=True, packed=True),
    "FluxKontextPipeline": Target("transformer", "FluxTransformer2DModel", flow=True, packed=True,
                                  call=(("_auto_resize", False),), image="edit", sized=True, drawn_area=True),
    "QwenImagePipeline": Target("transformer", "QwenImageTransformer2DModel", flow=True, packed=True,
                                guidance_keyword="true_cfg_scale", engine_cfg=False),
    "QwenImageEditPipeline": Target("transformer", "QwenImageTransformer2DModel", flow=True, packed=True,
                                    guidance_keyword="true_cfg_scale", engine_cfg=False, image="edit"),
    "QwenImageEditPlusPipeline": Target("transformer", "QwenImageTransformer2DModel", flow=True, packed=True,
                                        guidance_keyword="true_cfg_scale", engine_cfg=False, image="edit"),
    "AuraFlowPipeline": Target("transformer", "AuraFlowTransformer2DModel", flow=True),
    "ChromaPipeline": Target("transformer", "ChromaTransformer2DModel", flow=True, packed=True),
    "Lumina2Pipeline": Target("transformer", "Lumina2Transformer2DModel", flow=True,
                              call=(("cfg_normalization", False),)),
    "ZImagePipeline": Target("transformer", "ZImageTransformer2DModel", flow=True, w_offset=1.0),
    "Flux2KleinPipeline": Target("transformer", "Flux2Transformer2DModel", flow=True, takes_negative=False,
                                 edited=(("image", "edit"), ("sized", True))),
    "Flux2Pipeline": Target("transformer", "Flux2Transformer2DModel", flow=True, takes_negative=False,
                            edited=(("image", "edit"), ("sized", True))),
    "SanaPipeline": Target("transformer", "SanaTransformer2DModel", flow=True,
                           call=(("use_resolution_binning", False),)),
    "CogView4Pipeline": Target("transformer", "CogView4Transformer2DModel", flow=True, time_before_shift=True),
    "OvisImagePipeline": Target("transformer", "OvisImageTransformer2DModel", flow=True, packed=True,
                                network_lora=True),
    "LongCatImagePipeline": Target("transformer", "LongCatImageTransformer2DModel", flow=True, packed=True,
                                   network_lora=True,
                                   call=(("enable_cfg_renorm", False), ("enable_prompt_rewrite", False))),
    "WanPipeline": Target("transformer", "WanTransformer3DModel", flow=True, takes_sigmas=False, video=True),
    "WanImageToVideoPipeline": Target("transformer", "WanTransformer3DModel", flow=True, takes_sigmas=False,
                                      video=True, image="start"),
    "HunyuanVideo15Pipeline": Target("transformer", "HunyuanVideo15Transformer3DModel", flow=True, video=True,
                                     guider=True, network_lora=True),
    "HunyuanVideo15ImageToVideoPipeline": Target("transformer", "HunyuanVideo15Transformer3DModel", flow=True,
                                                 video=True, guider=True, network_lora=True, image="start",
                                                 takes_size=False),
    "HiDreamImagePipeline": Target("transformer", "HiDreamImageTransformer2DModel", flow=True, area=128),
    "LTXPipeline": Target("transformer", "LTXVideoTransformer3DModel", flow=True, packed=True, takes_sigmas=False,
                          video=True),
    "LTXImageToVideoPipeline": Target("transformer", "LTXVideoTransformer3DModel", flow=True, packed=True,
                                      takes_sigmas=False, video=True, image="start", keeps_start=True),
}
#: the file name ``load_lora_weights`` reads from a directory
LORA_FILE = "pytorch_lora_weights.safetensors"
#: the LoRA file of each network of a pipeline: its own (``unet`` or ``transformer``), and Wan 2.2 A14B's low-noise
#: ``transformer_2``
LORA_FILES = {"unet": LORA_FILE, "transformer": LORA_FILE,
              "transformer_2": "pytorch_lora_weights_transformer_2.safetensors"}
#: the LoRA file and adapter name of expert k of a student of experts
EXPERT_FILE, EXPERT_ADAPTER = "expert_{}.safetensors", "expert_{}"


def pipeline_target(pipeline: str, edits: bool = False) -> Target:
    """What an export writes for the pipeline class ``pipeline``, for a student trained on edits (``edits``) where
    its pipeline also draws from prompts alone."""
    target = PIPELINES[pipeline]
    return dataclasses.replace(target, **dict(target.edited)) if edits else target


def refusal(card: dict, pipeline: str | None = None) -> str | None:
    """Why a diffusers Euler scheduler cannot sample the student of ``card`` as the engine does, in the pipeline
    class ``pipeline`` where it is known (None: it can)."""
    from distill_core.sampling import sampler_key

    sampler, target = sampler_key(card), PIPELINES.get(pipeline)
    if sampler == "renoise" and not (target and target.flow):
        return (f"this {card['method']} student re-noises between its steps, which only a flow-matching pipeline's "
                "scheduler does on the student's sigmas; sample it with python -m distill_core sample, or in "
                "ComfyUI with the lcm sampler")
    if sampler not in ("euler_afs", "renoise"):
        return (f"this {card['method']} student samples with sampler {sampler!r}, which a diffusers Euler scheduler "
                "does not reproduce; sample it with python -m distill_core sample")
    if card.get("afs") and card.get("afs_center", "zero") != "zero":
        return ("this student's first step is centred on class means, which a pipeline cannot take; sample it "
                "with python -m distill_core sample")
    if card.get("step_embedding") or card.get("w_embedding"):
        return ("this student takes its step count or guidance scale as an input, which a pipeline's network does "
                "not; distil with method sfd (one student per step count) to export it")
    if card.get("architecture"):
        return "this student is not the teacher's network (its own architecture): it cannot replace it"
    if card.get("experts") and card.get("student", {}).get("kind") != "lora":
        return ("this student's experts are full networks, one copy of the teacher's each; distil it with student "
                "lora (one LoRA per expert) to export it")
    with_cfg = card.get("guidance", {}).get("mode") != "distilled"
    if target and not target.engine_cfg and with_cfg:
        return (f"this student samples with CFG, which {pipeline} rescales where the engine does not; distil the "
                "guidance into the student (guidance mode distilled) to export it")
    if target and not target.takes_negative and with_cfg and card.get("negative"):
        return (f"this student samples with CFG against the negative {card['negative']!r}, and {pipeline} guides "
                "against the empty prompt only; distil the guidance into the student (guidance mode distilled) "
                "to export it")
    return None


def pipeline_start(card: dict, steps: int, flow: bool = False) -> tuple[list[float], float]:
    """The sigmas to pass to the pipeline and the scale of the standard normal latents that start it where the
    student's first network step starts (see the module docstring): the student's points after its analytic
    first step, if it has one, with k / s_1 (else its whole schedule, with 1); for a flow pipeline their times
    t = sigma / (1 + sigma) but the last (the pipeline ends at 0 after them), with k / (1 + s_1)."""
    from distill_core.sampling import euler_step

    sigmas = [float(s) for s in card["sigmas"][str(steps)]]
    k = sigmas[0]
    if card.get("afs"):  # the engine's analytic step from x_N = s_0 z, linear in z: k is where z = 1 lands
        start = torch.tensor(sigmas[0], dtype=torch.float64)
        k = float(euler_step(None, start, start, torch.tensor(sigmas[1], dtype=torch.float64), analytic=True))
        sigmas = sigmas[1:]
    if flow:
        return [s / (1 + s) for s in sigmas[:-1]], k / (1 + sigmas[0])
    return sigmas, k / sigmas[0]


def drawn_size(height: int, width: int, pixels: int, area: int) -> tuple[int, int]:
    """The height and width a pipeline that scales every image to the area of a square of ``area`` latent pixels a
    side (HiDream's) draws when asked for ``height`` x ``width`` pixels, ``pixels`` image pixels a latent pixel:
    both sides scaled by sqrt(area^2 pixels^2 / (height width)), rounded down to multiples of 2 latent pixels."""
    step, scale = 2 * pixels, math.sqrt((area * pixels) ** 2 / (height * width))
    return int(height * scale // step * step), int(width * scale // step * step)


def network_paths(denoiser: nn.Module, network: str) -> dict[str, str]:
    """The pipeline's networks and their paths inside an engine denoiser: ``{network: path}`` of its one diffusers
    network (a UNet or transformer), or for Wan 2.2 A14B's two experts (``WanExperts``) the high-noise one as
    ``transformer`` and the low-noise one as ``transformer_2``, as its pipeline names them."""
    from diffusers import ModelMixin

    from distill_core.denoisers.diffusers_flow import WanExperts

    for name, module in denoiser.named_modules():  # parents first: the experts before either network
        if isinstance(module, WanExperts):
            return {"transformer": f"{name}.high", "transformer_2": f"{name}.low"}
        if isinstance(module, ModelMixin):
            return {network: name}
    raise ValueError("the teacher holds no diffusers network to export")


def peft_lora(tensors: dict[str, torch.Tensor], prefix: str, network: str) -> dict[str, torch.Tensor]:
    """The engine's LoRA tensors (``<path>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``, paths from the
    denoiser, whose network lies at ``prefix``) in diffusers' PEFT layout: ``<network>.<path in the network>
    .lora_A.weight`` = down and ``lora_B.weight`` = (alpha / r) up, so that the default scale 1 applies
    (alpha / r) B A."""
    out = {}
    for key, down in tensors.items():
        if not key.endswith(".lora_down.weight"):
            continue
        path = key.removesuffix(".lora_down.weight")
        if not path.startswith(prefix + "."):
            raise ValueError(f"LoRA layer {path} lies outside the network ({prefix}): this student cannot be exported")
        up = tensors[f"{path}.lora_up.weight"]
        scale = float(tensors[f"{path}.alpha"]) / down.shape[0]
        name = f"{network}.{path.removeprefix(prefix + '.')}"
        out[f"{name}.lora_A.weight"] = down.float().contiguous()
        out[f"{name}.lora_B.weight"] = (up.float() * scale).contiguous()
    return out


def pipeline_class(root: Path) -> str | None:
    """The pipeline class a directory's ``model_index.json`` names (None: no such file)."""
    index = root / "model_index.json"
    return json.loads(index.read_text()).get("_class_name") if index.is_file() else None


def exportable(student_path: str | Path) -> bool:
    """Whether the student file at ``student_path`` exports (a pipeline's student that a diffusers Euler
    scheduler samples as the engine does), as far as its card and its teacher's ``model_index.json`` tell."""
    from distill_core.student_files import read_student_card

    card = read_student_card(student_path)
    pipeline = pipeline_class(Path(card.get("teacher", "")))
    return pipeline in PIPELINES and refusal(card, pipeline) is None


def export(student_path: str | Path, out: str | Path, teacher: str | Path | None = None) -> dict:
    """Write the diffusers files of the student at ``student_path`` into ``out`` (see the module docstring) and
    return what ``sampling.json`` holds."""
    import diffusers

    from distill_core.atomic import atomic_dir, write_json
    from distill_core.denoisers.diffusers_flow import CogView4Velocity
    from distill_core.diffusers_source import latent_pixels
    from distill_core.safetensors_io import load, save_atomic
    from distill_core.sampling import sampler_key
    from distill_core.sources import as_trained, teacher_source
    from distill_core.start_images import hunyuan15_drawn_frame
    from distill_core.student_files import expert_tensors, load_student, read_student_card

    card = read_student_card(student_path)
    root = Path(teacher or card.get("teacher", ""))
    pipeline = pipeline_class(root)
    why = refusal(card, pipeline)
    if why:
        raise ValueError(why)
    if pipeline is None:
        raise ValueError(f"the student's teacher {root} is not a pipeline directory (no model_index.json): give the "
                         "pipeline it was distilled from with --teacher")
    if pipeline not in PIPELINES:
        raise ValueError(f"the student's teacher is a {pipeline}: export-diffusers writes files for "
                         f"{', '.join(PIPELINES)}; sample it with python -m distill_core sample")
    target = pipeline_target(pipeline, bool(card.get("edits")))
    lora = card.get("student", {"kind": "full"})["kind"] == "lora"
    # the network alone: no text encoder loads (students do not depend on the prompt tables); a LoRA's teacher
    # only checks that the student is its own, so 16-bit files load as they are (half the memory)
    source = teacher_source(str(root), encode=False,
                            **{**as_trained(card), "frozen_precision": "bf16" if lora else "as-loaded"})
    # refuses a student of another teacher; no copy of the teacher's network: a LoRA's adapters hook into it, a
    # full student's weights load into it
    student = load_student(student_path, source.denoiser, source.uncond, consume=True)
    pixels = latent_pixels(root, target.network_class)
    height, width = source.shape[-2] * pixels, source.shape[-1] * pixels
    if target.area and drawn_size(height, width, pixels, target.area) != (height, width):
        side = target.area * pixels
        drawn = "x".join(map(str, drawn_size(height, width, pixels, target.area)))
        raise ValueError(f"{pipeline} scales every image to the area of its default {side}x{side}: it would draw this "
                         f"student's {height}x{width} images at {drawn}; distil at --resolution {side} to export it, "
                         "or sample it with python -m distill_core sample")
    if not target.takes_size and hunyuan15_drawn_frame(root, height, width) != (height, width):
        drawn = "x".join(map(str, hunyuan15_drawn_frame(root, height, width)))
        raise ValueError(f"{pipeline} draws its clips at the frame its start image's aspect ratio picks, and from an "
                         f"image of this student's {height}x{width} it would draw {drawn}; distil without --resolution "
                         "(at the frame of its images) to export it, or sample it with python -m distill_core sample")
    paths = network_paths(source.denoiser, target.network)
    if card.get("experts") and len(paths) > 1:
        raise ValueError("this student holds an expert per step on each of Wan 2.2's two networks, which the pipeline "
                         "cannot switch between; sample it with python -m distill_core sample")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = load(student_path)[0] if lora else {}
    if card.get("experts"):  # one LoRA per expert (the card rides along in each file's metadata; diffusers skips it)
        files = [EXPERT_FILE.format(k) for k in range(card["experts"]["count"])]
        for part, name in zip(expert_tensors(tensors, card), files):
            save_atomic(peft_lora(part, paths[target.network], target.network), out / name, card)
    elif lora:  # one LoRA per network, each keyed as the pipeline's loader reads it (``transformer.``)
        for network, path in paths.items():
            part = {k: v for k, v in tensors.items() if k.startswith(f"{path}.")}
            save_atomic(peft_lora(part, path, target.network), out / LORA_FILES[network], card)
    else:
        for network, path in paths.items():
            with atomic_dir(out / network) as tmp:
                student.net.get_submodule(f"denoiser.{path}").save_pretrained(tmp, safe_serialization=True)
    scheduler = getattr(diffusers, target.scheduler_class)
    config = scheduler.load_config(root / "scheduler")  # the teacher's noise schedule and prediction type
    fixed = ({"shift": 1.0, "use_dynamic_shifting": False, "shift_terminal": None,
              "stochastic_sampling": sampler_key(card) == "renoise"} if target.flow
             else {"timestep_spacing": "linspace"})
    with atomic_dir(out / "scheduler") as tmp:
        scheduler.from_config(config, **fixed).save_pretrained(tmp)
    steps = student.nfe_choices[-1]
    guidance = card["guidance"]
    sigmas, noise_scale = pipeline_start(card, steps, target.flow)
    w = 1.0 if guidance["mode"] == "distilled" else guidance["w"]
    call = {**dict(target.call), **({"num_frames": as_trained(card)["frames"]} if target.video else {}),
            **({"max_area": height * width} if target.drawn_area else {})}
    if target.time_before_shift:  # the network's time input at each of the sigmas, which the call would not feed
        timing = next(m for m in source.denoiser.modules() if isinstance(m, CogView4Velocity))
        call["timesteps"] = timing.time_input(torch.tensor(sigmas, dtype=torch.float64)).tolist()
    settings = {"pipeline": pipeline, "teacher": str(root), "steps": steps, "sigmas": sigmas,
                "noise_scale": noise_scale, "latent_shape": list(source.shape), "height": height, "width": width,
                "guidance_scale": float(card.get("embedded_guidance", w - target.w_offset)),
                "call": call, "student": "lora" if lora else target.network, "networks": list(paths),
                **({"experts": files} if card.get("experts") else {}), **({"edits": True} if card.get("edits") else {}),
                **({"references": card["references"]} if card.get("references") else {}),
                **({"negative_prompt": card["negative"]} if "negative" in card and guidance["mode"] != "distilled"
                   else {})}
    write_json(out / "sampling.json", settings)
    return settings


def usage(settings: dict, out: str | Path) -> str:
    """The Python lines that sample the exported student with its pipeline."""
    target = pipeline_target(settings["pipeline"], settings.get("edits", False))
    experts = settings.get("experts", [])
    if experts:  # one named adapter per expert, the next step's made active at the end of each step
        adapters = [EXPERT_ADAPTER.format(k) for k in range(len(experts))]
        load = "\n".join([
            *(f"pipe.load_lora_weights({str(out)!r}, weight_name={name!r}, adapter_name={adapter!r})  # needs peft"
              for name, adapter in zip(experts, adapters)),
            f"pipe.set_adapters({adapters[0]!r})",
            "def next_expert(pipe, step, t, tensors):  # expert k samples step k",
            f"    pipe.set_adapters({adapters!r}[min(step + 1, {len(adapters) - 1})])",
            "    return tensors"])
    elif settings["student"] == "lora" and target.network_lora:
        load = f"pipe.transformer.load_lora_adapter({str(out)!r}, weight_name={LORA_FILE!r})  # needs peft"
    elif settings["student"] == "lora":
        into = {"transformer_2": f", weight_name={LORA_FILES['transformer_2']!r}, load_into_transformer_2=True"}
        load = "\n".join(f"pipe.load_lora_weights({str(out)!r}{into.get(name, '')})  # needs peft"
                         for name in settings["networks"])
    else:
        load = "\n".join(f"pipe.{name} = {target.network_class}.from_pretrained({str(out)!r}, subfolder={name!r})"
                         for name in settings["networks"])
    channels, *frames, height, width = settings["latent_shape"]
    shape = [channels, *(frames or [1]), height, width] if target.video else settings["latent_shape"]
    lines = [
        "import torch",
        f"from diffusers import {settings['pipeline']}, {target.scheduler_class}, {target.network_class}",
        f"pipe = {settings['pipeline']}.from_pretrained({settings['teacher']!r})",
        f"pipe.scheduler = {target.scheduler_class}.from_pretrained({str(out)!r}, subfolder='scheduler')",
        load,
        f"latents = {settings['noise_scale']!r} * torch.randn(1, {', '.join(map(str, shape))})",
    ]
    if target.guider:  # its CFG at the student's scale: none at 1
        lines[1:1] = ["from diffusers import ClassifierFreeGuidance"]
        lines.append(f"pipe.guider = ClassifierFreeGuidance(guidance_scale={settings['guidance_scale']:g})")
    if target.image:  # as loaded, or scaled as the engine scaled the training images
        lines[1:1] = ["from diffusers.utils import load_image", *(["from PIL import Image"] if target.sized else [])]
        size = f".resize(({settings['width']}, {settings['height']}), Image.Resampling.LANCZOS)" if target.sized \
            else ""
        what = "the image to edit" if target.image == "edit" else "the image the clip starts from"
        if not target.takes_size:  # the frame it draws is its image's aspect ratio's
            what += f", of the student's aspect ratio, {settings['height']}:{settings['width']}"
        if settings.get("references"):  # a set of images, read together, in order
            count = settings["references"]
            lines.append(f"{target.image} = [load_image(f'image_{{k}}.png'){size} for k in range(1, {count + 1})]  "
                         f"# the {count} images each edit reads, in order")
        else:
            lines.append(f"{target.image} = load_image('image.png'){size}  # {what}")
    if target.keeps_start:  # given latents, the pipeline takes their first frame as the start image's latent
        lines += [f"pixels = pipe.video_processor.preprocess(start, height={settings['height']}, "
                  f"width={settings['width']})[:, :, None]",
                  "kept = pipe.vae.encode(pixels).latent_dist.mode()",
                  "kept = pipe._normalize_latents(kept, pipe.vae.latents_mean, pipe.vae.latents_std)",
                  "latents = torch.cat([kept, latents[:, :, 1:]], dim=2)"]
    if target.packed:  # in 2 x 2 patches; a video pipeline's (LTX-Video's), a token per latent pixel
        lines.append("latents = pipe._pack_latents(latents)" if target.video else
                     f"latents = pipe._pack_latents(latents, 1, {channels}, {height}, {width})")
    sigmas = "[" + ", ".join(f"{s!r}" for s in settings["sigmas"]) + "]"
    if target.takes_sigmas:
        steps = f"sigmas={sigmas}"
    else:  # the call takes a step count only: the scheduler is given the sigmas, whatever the call asks of it
        lines += ["set_timesteps = pipe.scheduler.set_timesteps",
                  "def student_sigmas(num_inference_steps=None, device=None, sigmas=None, **shift):",
                  f"    return set_timesteps(sigmas={sigmas}, device=device)",
                  "pipe.scheduler.set_timesteps = student_sigmas"]
        steps = f"num_inference_steps={len(settings['sigmas'])}"
    negative = f", negative_prompt={settings['negative_prompt']!r}" if "negative_prompt" in settings else ""
    call = "".join(f", {key}={value!r}" for key, value in settings["call"].items())
    call += f", image={target.image}" if target.image else ""
    if experts:
        call += ", callback_on_step_end=next_expert"
    output = "video = " if target.video else "image = "
    scale = "" if target.guider else f", {target.guidance_keyword}={settings['guidance_scale']:g}"
    size = f", height={settings['height']}, width={settings['width']}" if target.takes_size else ""
    lines.append(f"{output}pipe(prompt='a prompt'{negative}, latents=latents, {steps}{scale}{size}{call})"
                 f".{'frames' if target.video else 'images'}[0]")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("student", metavar="STUDENT", help="a student file of a diffusers pipeline directory")
    p.add_argument("--teacher", help="the pipeline directory the student was distilled from (default: the one its "
                   "file names)")
    p.add_argument("--out", required=True, help="where the LoRA (or the network's folder), scheduler/ and "
                   "sampling.json go")


def run(args: argparse.Namespace) -> int:
    if not Path(args.student).is_file():
        raise FileNotFoundError(f"no student file {args.student}: give the .safetensors file that distill writes")
    settings = export(args.student, args.out, args.teacher)
    print(f"wrote the {settings['steps']}-step student for diffusers to {args.out}; sample it with:\n"
          + usage(settings, args.out))
    return 0

"""Few-step sampling nodes: the student's own SIGMAS and SAMPLER for the stock SamplerCustom, and a
one-node sampler. The schedule travels in the student file, so picking the file gives the right
sigmas (a shared LoRA carries its own sampling recipe)."""

from __future__ import annotations

import torch

from distill_core import safetensors_io
from distill_core.denoisers.comfy import high_noise_steps
from distill_core.denoisers.comfy_family import has_frame_axis
from distill_core.report import preview_pixels
from distill_core.sampling import comfy_sigmas, k_sampler, sample, sampler_key
from distill_core.student_files import check_card

from . import host
from .handles import StudentHandle
from .spec import In, Out, node, seed
from .training import expert_models

STUDENT_FOLDERS = ("loras", "diffusion_models")


def student_files() -> list[str]:
    """"<folder>/<file>" for every safetensors file in the folders students are saved to."""
    return ["(connected student)"] + [f"{kind}/{name}" for kind in STUDENT_FOLDERS for name in host.list_files(kind)]


def resolve_student_file(choice: str) -> tuple:
    """(path, card) of a "<folder>/<file>" choice; a clear error for files without a student card."""
    kind, _, name = choice.partition("/")
    if kind not in STUDENT_FOLDERS:
        raise ValueError(f"pick a student file from {STUDENT_FOLDERS} or connect a student, got {choice!r}")
    path = host.find_file(kind, name)
    card = safetensors_io.read_card(path)
    if card.get("kind") != "student":
        raise ValueError(f"{choice} is not a student made by Distill to N steps (no student metadata)")
    return path, check_card(path, card)


class ReadsStudentFile:
    """A node that reads the student file its ``student_file`` widget names. ComfyUI reuses a node's outputs
    while its inputs stay the same; ``IS_CHANGED`` adds the file's size and modification time to them, so the
    node reads the file again once a run (the command line, the panel, a resumed node) has replaced it."""

    @classmethod
    def IS_CHANGED(cls, student_file: str = "", **_) -> str:  # noqa: N802 - ComfyUI's; no student_file if linked
        kind, _, name = student_file.partition("/")
        try:
            state = host.find_file(kind, name).stat() if kind in STUDENT_FOLDERS else None
        except FileNotFoundError:
            state = None
        if state is None:
            return student_file  # the connected student, or a name the node itself refuses
        return f"{student_file}:{state.st_size}:{state.st_mtime_ns}"


STEPS = In("steps", "INT", "evaluations per image; 0: the student's own (an SFD-v student accepts its range)", 0,
           options={"min": 0, "max": 64})


def schedule_inputs(file_help: str) -> list[In]:
    """The inputs of a node that reads a student's sampling recipe: its file (``file_help`` says what it holds) or a
    connected student, and the step count."""
    return [In("student_file", student_files, f"{file_help}, or '(connected student)' to use the student input",
               options={"file_list": True}),
            STEPS,
            In("student", "DISTILL_STUDENT", "a student straight from Distill to N steps (overrides the file)",
               optional=True)]


@node("DistillStudentSchedule", "Student sigmas + sampler", "sample",
      "The student's sampling recipe from its file: SIGMAS and the SAMPLER it was trained for (SFD: Euler with "
      "the analytic first step) "
      "for the stock SamplerCustom / SamplerCustomAdvanced, and the cfg to use (1 for distilled guidance). A "
      "student of Flux dev samples with FluxGuidance at the guidance it was distilled at (its file's "
      "embedded_guidance).",
      inputs=schedule_inputs("a student LoRA / model file (its metadata holds the schedule)"),
      outputs=[Out("SIGMAS", "sigmas", "the student's noise levels, from sigma_max to its sigma_min"),
               Out("SAMPLER", "sampler", "the sampler the student file names, as the student was trained"),
               Out("FLOAT", "cfg", "the CFG scale to sample with: 1 for distilled guidance, else the trained w")])
class StudentSchedule(ReadsStudentFile):
    def run(self, student_file: str, steps: int, student: StudentHandle | None = None, unique_id=None):
        card = student.card if student is not None else resolve_student_file(student_file)[1]
        if card.get("comfy_experts"):
            raise ValueError("this student is of a teacher of two models (Wan 2.2 14B), which sample in turn: use "
                             "Student sigmas for two models")
        sigmas, cfg = recipe(card, steps)
        return sigmas, host.ksampler(k_sampler(card)), cfg


@node("DistillTwoModelSchedule", "Student sigmas for two models", "sample",
      "The sampling recipe of a student of two models (Wan 2.2 14B's high- and low-noise models): the steps "
      "from t at or above the boundary for the high-noise model with its LoRA (<name>_high_noise), the rest "
      "for the low-noise model with its LoRA (<name>_low_noise), chained as a Wan 2.2 workflow chains its "
      "two samplers: the first SamplerCustom adds the noise, the second takes its output without adding any.",
      inputs=schedule_inputs("the student file (its metadata holds the schedule and the boundary)"),
      outputs=[Out("MODEL", "model_high_noise", "the connected student's high-noise model with its LoRA (None for a "
                   "file: load <name>_high_noise on the high-noise model with LoraLoaderModelOnly)"),
               Out("SIGMAS", "sigmas_high_noise", "the high-noise model's steps, from sigma_max"),
               Out("SAMPLER", "sampler_high_noise", "the high-noise model's sampler (the student's first step)"),
               Out("MODEL", "model_low_noise", "the connected student's low-noise model with its LoRA (None for a "
                   "file: load <name>_low_noise on the low-noise model with LoraLoaderModelOnly)"),
               Out("SIGMAS", "sigmas_low_noise", "the low-noise model's steps, to the student's last time"),
               Out("SAMPLER", "sampler_low_noise", "the low-noise model's sampler, going on from the high-noise "
                   "model's output: Euler, or for a DMD2 or moment-matching student its re-noising sampler, which "
                   "draws the fresh noise of its own steps"),
               Out("FLOAT", "cfg", "the CFG scale to sample both with: 1 for distilled guidance, else the trained w")])
class TwoModelSchedule(ReadsStudentFile):
    def run(self, student_file: str, steps: int, student: StudentHandle | None = None, unique_id=None):
        card = student.card if student is not None else resolve_student_file(student_file)[1]
        if not card.get("comfy_experts"):
            raise ValueError("this student is of a teacher of one model: use Student sigmas + sampler")
        if sampler_key(card) == "solver":
            raise ValueError(f"this {card['method']} student samples with the multistep solver {card['solver']!r}, "
                             "whose history two chained samplers would cut: sample it with Few-step sample")
        sigmas, cfg = recipe(card, steps)
        high = high_noise_steps(sigmas, card["comfy_experts"]["boundary"])
        models = expert_models(student) if student is not None else {"high": None, "low": None}
        return (models["high"], sigmas[:high + 1], host.ksampler(k_sampler(card)),
                models["low"], sigmas[high:], host.ksampler(k_sampler({**card, "afs": False})), cfg)


def recipe(card: dict, steps: int = 0) -> tuple[torch.Tensor, float]:
    """(sigmas, cfg) of a student card at ``steps`` (0: its own) for the stock samplers."""
    if card.get("experts"):
        raise ValueError(f"this {card['method']} student is {card['experts']['count']} experts, a LoRA for each step, "
                         "which no one MODEL holds: sample it with the Few-step sample node")
    if card.get("afs_center", "zero") == "class_mean":
        raise ValueError(
            "this student's first step is centred on its teacher's class means, which SamplerCustom cannot "
            "see: sample it with the Few-step sample node"
        )
    choices = sorted(int(n) for n in card["sigmas"])
    n = choices[-1] if steps == 0 else steps
    if n not in choices:
        raise ValueError(f"this student samples with {choices} steps, not {n}")
    guidance = card["guidance"]
    sigmas = comfy_sigmas(card, torch.tensor(card["sigmas"][str(n)]))
    return sigmas, (1.0 if guidance["mode"] == "distilled" else guidance["w"])


@node("DistillSample", "Few-step sample", "sample",
      "Samples the student in its few steps from a seed: digits for the built-in teacher, latents (and images "
      "with a VAE) for ComfyUI models, with its training prompts.",
      inputs=[In("student", "DISTILL_STUDENT", "the student to sample"),
              seed("noise seed"),
              In("count", "INT", "number of images (of clips, for a teacher distilled on clips)", 10,
                 options={"min": 1, "max": 64}),
              STEPS,
              In("vae", "VAE", "decodes latents of ComfyUI models to images (else a quick preview)", optional=True)],
      outputs=[Out("IMAGE", "images", "the samples as images (of clips: every frame, clip after clip)"),
               Out("LATENT", "latent", "the samples as latents (ComfyUI models; the images' latents otherwise)")],
      output_node=True)
class FewStepSample:
    def run(self, student: StudentHandle, seed: int, count: int, steps: int, vae=None, unique_id=None):
        source = student.teacher.source()
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((count, *source.shape), generator=gen) * source.denoiser.sigma_max
        cond = source.draw_cond(count, gen)
        host.load_models(student.teacher.models)
        with student.loaded() as s:
            x = sample(s, noise, cond, steps=steps or None)
        images, latent = to_images(x, student.teacher.model, vae)
        return {"ui": {"text": [f"{count} samples in {steps or student.card.get('nfe', '?')} steps"],
                       "images": host.preview_images(images)},
                "result": (images, latent)}


def to_images(x: torch.Tensor, model=None, vae=None) -> tuple[torch.Tensor, dict]:
    """ComfyUI IMAGE ``[B, H, W, 3]`` in [0, 1] and LATENT of model-space samples ``x``: images, or clips
    ``[B, C, T, H, W]`` of a video model, whose IMAGE holds every frame, clip after clip (as VAE Decode gives
    them)."""
    x = x.cpu()  # ComfyUI's IMAGE and LATENT live on its intermediate device, the CPU
    if model is None:  # built-in pixels in [-1, 1], shown 4x larger
        pixels = ((x.clamp(-1, 1) + 1) / 2).repeat_interleave(4, -1).repeat_interleave(4, -2)
        return pixels.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous(), {"samples": x}
    framed = x.unsqueeze(2) if has_frame_axis(model.model) and x.ndim == 4 else x  # a still: one frame
    latent = {"samples": model.model.process_latent_out(framed)}
    if vae is not None:
        images = vae.decode(latent["samples"])  # [B, T, H, W, 3] from a video VAE, as the stock VAE Decode flattens
        return images.reshape(-1, *images.shape[-3:]), latent
    stills = x.transpose(1, 2).flatten(0, 1) if x.ndim == 5 else x
    frames = [preview_pixels(xi[None], model.model.latent_format, 1) for xi in stills]
    return torch.stack(frames).float().div(255), latent

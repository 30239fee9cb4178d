"""**Distill to N steps**: SFD / SFD-v on a teacher, as a LoRA or a full student, inside one node run.

Training runs under ``torch.inference_mode(False)`` (ComfyUI runs nodes in inference mode) with
the teacher's conditions and weights made trainable-safe; a LoRA student trains adapters hooked into
the teacher's own network (one copy of the weights; the shared MODEL is never changed), a full
student trains a copy. Progress shows on the node with previews; Cancel saves a checkpoint first, and
queueing the node again with ``resume`` on continues from it.
"""

from __future__ import annotations

import copy
import json
import shutil

import torch

from distill_core import safetensors_io
from distill_core.config import DistillConfig
from distill_core.denoisers.base import move_cond
from distill_core.main_job import train_student
from distill_core.report import loss_curve, preview_pixels

from . import host
from .handles import StudentHandle, TeacherHandle
from .spec import In, Out, node, seed


def run_inputs(save_name: str, preview_every: int, checkpoint_every: int) -> list[In]:
    """The inputs every training node ends with: where the run goes, resume, previews, checkpoints."""
    return [
        In("save_name", "STRING", "file name of the student (no folders); also the run folder's name", save_name),
        In("resume", "BOOLEAN", "continue the run saved under save_name (after Cancel or a crash)", False),
        In("preview_every", "INT", "show a preview of the student on the node every this many iterations "
           "(0: none)", preview_every, options={"min": 0, "max": 10000}),
        In("checkpoint_every", "INT", "write a resumable checkpoint every this many iterations", checkpoint_every,
           options={"min": 1, "max": 10000}),
    ]


STUDENT = Out("DISTILL_STUDENT", "student", "the trained student and its run (for sampling, saving, comparing)")


@node("DistillToSteps", "Distill to N steps", "train",
      "Distils the teacher into a student that samples in N steps (SFD, Zhou et al. 2024). Saves the student "
      "under loras/ (LoRA) or diffusion_models/ (full) with its sampling recipe in the file, and a resumable run "
      "under output/distill_runs/<save_name>.",
      inputs=[
          In("teacher", "DISTILL_TEACHER", "the teacher (Built-in teacher, or Teacher from MODEL)"),
          In("steps", "INT", "network evaluations per image of the student (SFD-v: the top of its range)", 4,
             options={"min": 1, "max": 16}),
          In("method", ("sfd", "sfd-v"), "sfd: one student for exactly N steps; sfd-v: one student for 2..N steps",
             "sfd"),
          In("iterations", "INT", "training iterations (every batch of teacher trajectories serves two of them)",
             200, options={"min": 1, "max": 100000}),
          In("learning_rate", "FLOAT",
             "Adam learning rate (reached after a warmup of 10 iterations, or a tenth of the run if shorter, "
             "then decays to 0 on a cosine)", 2e-4,
             options={"min": 1e-6, "max": 1e-2, "step": 1e-5, "round": False}),
          In("batch", "INT", "trajectories per iteration", 8, options={"min": 1, "max": 512}),
          seed("seed of noise, prompt draws and new layers"),
          In("guidance_mode", ("auto", "distilled", "cfg"),
             "distilled: w baked in, sample with cfg 1 (one evaluation per step); cfg: distil at w = 1 and use CFG "
             "when sampling (two per step, w free); auto: distilled for the built-in teacher, cfg for ComfyUI "
             "models (as SFD does for Stable Diffusion)", "auto"),
          In("student", ("lora", "full"), "lora: small adapters on the frozen model (what artists share); full: "
             "every weight trained (a copy of the model in memory)", "lora"),
          In("lora_rank", "INT", "LoRA rank r (adapter size)", 16, options={"min": 1, "max": 256}),
          *run_inputs("distilled_4step", preview_every=10, checkpoint_every=25),
      ],
      outputs=[Out("MODEL", "model", "the student as a MODEL for KSampler / SamplerCustom (ComfyUI teachers; "
                   "None for the built-in teacher)"),
               STUDENT,
               Out("IMAGE", "loss_curve", "log loss per student step against iteration")])
class DistillToSteps:
    def run(self, teacher: TeacherHandle, steps: int, method: str, iterations: int, learning_rate: float,
            batch: int, seed: int, guidance_mode: str, student: str, lora_rank: int, save_name: str,
            resume: bool, preview_every: int, checkpoint_every: int, unique_id=None):
        if method == "sfd-v" and teacher.model is not None:
            raise ValueError("SFD-v students of ComfyUI models need a step embedding that stock samplers cannot "
                             "feed; choose method sfd (one student per step count)")
        if guidance_mode == "auto":
            guidance_mode = "distilled" if teacher.model is None else "cfg"
        cfg = DistillConfig(
            teacher=teacher.name, method=method, steps=steps, nfe_range=(min(2, steps), steps),
            sigma_min=teacher.sigma_min, guidance=teacher.guidance, guidance_mode=guidance_mode,
            student=student, lora_rank=lora_rank, lr=learning_rate, iters=iterations, batch=batch, seed=seed,
            checkpoint_every=checkpoint_every,
        )
        handle, curve = train_to_file(teacher, cfg, host.FOLDERS[student], save_name, resume, preview_every,
                                      unique_id)
        handle.model = student_model(handle)
        return {"ui": {"text": [f"saved {handle.path}"]}, "result": (handle.model, handle, curve)}


def train_to_file(teacher: TeacherHandle, cfg: DistillConfig, folder: str, save_name: str, resume: bool,
                  preview_every: int, unique_id=None) -> tuple[StudentHandle, torch.Tensor]:
    """What every training node does: train ``cfg`` on the teacher inside the node run (progress, previews
    and Cancel on the node), the run under ``<output>/distill_runs/<save_name>``, then copy the student to
    ``<folder>/<save_name>.safetensors``. Returns its handle and the loss curve as a ComfyUI IMAGE."""
    target = host.confined(host.model_folder(folder), save_name, ".safetensors")
    run_dir = host.confined(host.runs_folder(), save_name)
    cfg = cfg.replace(out=str(run_dir))
    with torch.inference_mode(False), torch.enable_grad():
        if teacher.model is not None:
            host.load_models([teacher.model])
            host.trainable_weights(teacher.model.model)
        source = teacher.source()
        latent_format = getattr(getattr(teacher.model, "model", None), "latent_format", None)
        preview = _previewer(latent_format)
        progress = host.NodeProgress(unique_id, preview, preview_every)
        run = train_student(cfg, source, resume=resume, progress=False, callbacks=[progress])
    if run is None:
        raise RuntimeError(f"training stopped early; queue again with resume on to continue {run_dir}")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run.path, target)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return StudentHandle(target, teacher, run_dir), loss_curve(metrics).float().div(255).unsqueeze(0)


def _previewer(latent_format):
    def preview(trainer):
        if trainer.preview_inputs is None:
            gen = torch.Generator().manual_seed(trainer.cfg.seed + 777)
            source = trainer.method.source
            noise = torch.randn((4, *source.shape), generator=gen) * trainer.method.sigma_max
            device = trainer.acc.device  # where the student trains (CUDA when there is one)
            trainer.preview_inputs = (noise.to(device), move_cond(source.draw_cond(4, gen), device))
        with torch.no_grad():
            images = trainer.method.preview(*trainer.preview_inputs)
        return host.to_pil(preview_pixels(images, latent_format))

    return preview


def student_model(handle: StudentHandle):
    """The student as a ComfyUI MODEL: the teacher MODEL with the LoRA applied the stock way, or a new
    MODEL around a copy of its network with the full student's weights. None for the built-in teacher."""
    teacher = handle.teacher.model
    if teacher is None:
        return None
    tensors, card = safetensors_io.load(handle.path)
    if card["student"]["kind"] == "lora":
        return host.with_lora(teacher, tensors)
    base = copy.deepcopy(teacher.model)
    base.diffusion_model.load_state_dict(tensors)
    return host.new_model(base, like=teacher)

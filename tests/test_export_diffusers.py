"""Students of Stable Diffusion pipeline directories exported for diffusers: the pipeline, with the exported LoRA
or UNet and scheduler, draws what the engine's student draws from the same noise; what it cannot reproduce is
refused in one line."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch

from distill_core.cli import main
from distill_core.config import DistillConfig
from distill_core.diffusers_source import diffusers_source
from distill_core.export_diffusers import LORA_FILE, export, pipeline_start, refusal, usage
from distill_core.sampling import sample
from distill_core.student_files import load_student
from distill_core.train.run import train_student
from tests.test_teacher_from_dir import multi_encoder_pipeline_dir, text_pipeline_dir


def pipeline_latents(teacher, out, settings: dict, z: torch.Tensor, student: bool = True) -> torch.Tensor:
    """The pipeline's latents for prompt "an owl" from standard normal ``z``, with the exported student loaded
    (``student``) or the teacher's own UNet, on the exported scheduler and sigmas."""
    pipe = diffusers.DiffusionPipeline.from_pretrained(teacher, local_files_only=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler")
    if student and settings["student"] == "lora":
        pipe.load_lora_weights(out)
    elif student:
        pipe.unet = diffusers.UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    side = z.shape[-1] * pipe.vae_scale_factor
    return pipe(prompt="an owl", latents=settings["noise_scale"] * z, sigmas=settings["sigmas"], height=side,
                width=side, guidance_scale=settings["guidance_scale"], output_type="latent").images


@pytest.mark.parametrize("pipeline, kind", [("sd", "lora"), ("sd", "full"), ("sdxl", "lora")])
def test_the_pipeline_with_the_exported_student_draws_the_students_images(tmp_path, pipeline, kind):
    teacher = (text_pipeline_dir(tmp_path / "sd") if pipeline == "sd"
               else multi_encoder_pipeline_dir(tmp_path / "sdxl", "sdxl"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\nan owl\n")
    source = diffusers_source(teacher, prompts=prompts)
    cfg = DistillConfig(steps=2, iters=1, batch=2, lr=1e-2, seed=1, out=str(tmp_path / "run"), checkpoint_every=0,
                        student=kind, lora_rank=4, lora_alpha=2)  # a LoRA scale alpha / r of 1/2
    path = train_student(cfg, source, progress=False).path  # one large step: every trained weight moved
    out = tmp_path / "export"
    settings = export(path, out)
    assert json.loads((out / "sampling.json").read_text()) == settings
    assert (out / LORA_FILE).is_file() == (kind == "lora") and (out / "unet").is_dir() == (kind == "full")
    assert settings["guidance_scale"] == 1.0 and settings["steps"] == 2 and len(settings["sigmas"]) == 3
    student = load_student(path, source.denoiser, source.uncond)
    z = torch.randn(1, *source.shape, generator=torch.Generator().manual_seed(0))
    ours = sample(student, student.sigmas()[0] * z, torch.tensor([1]))  # prompt 1: "an owl"
    theirs = pipeline_latents(teacher, out, settings, z)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    teachers = pipeline_latents(teacher, out, settings, z, student=False)
    assert (teachers - ours).abs().max() > 50 * 1e-4  # the student's own images, not the teacher's
    if kind == "lora":  # the printed lines run as written
        scope = {}
        exec(usage(settings, out).replace("'a prompt'", "'an owl', output_type='latent'"), scope)
        assert scope["image"].shape == source.shape


def test_the_first_step_lands_where_the_pipelines_noise_starts():
    """After the analytic step x_1 = x_N + (s_1 - s_0) x_N / sqrt(1 + s_0^2) from x_N = s_0 z, the pipeline's
    latents noise_scale z times its first sigma s_1."""
    card = {"afs": True, "sigmas": {"2": [14.6, 3.0, 0.5, 0.03]}}
    sigmas, scale = pipeline_start(card, 2)
    z = torch.tensor(0.7)
    x_n = 14.6 * z
    assert sigmas == [3.0, 0.5, 0.03]
    assert float(scale * sigmas[0] * z) == pytest.approx(float(x_n + (3.0 - 14.6) * x_n / (1 + 14.6**2) ** 0.5))
    assert pipeline_start({"afs": False, "sigmas": {"2": [14.6, 3.0, 0.03]}}, 2) == ([14.6, 3.0, 0.03], 1.0)


@pytest.mark.parametrize("card, message", [
    ({"method": "dmd2", "sampler": "renoise"}, "samples with sampler 'renoise'"),
    ({"method": "sfd", "sampler": "euler_afs", "afs": True, "afs_center": "class_mean"}, "centred on class means"),
    ({"method": "sfd-v", "sampler": "euler_afs", "step_embedding": {"dim": 64}}, "takes its step count"),
    ({"method": "lcm", "sampler": "euler_afs", "w_embedding": {"dim": 64}}, "or guidance scale as an input"),
])
def test_what_a_pipeline_cannot_sample_is_refused(card, message):
    assert message in refusal(card)


def test_a_teacher_that_is_not_a_stable_diffusion_pipeline_is_refused_in_one_line(tmp_path, capsys):
    cfg = DistillConfig(steps=2, iters=1, batch=2, checkpoint_every=0, out=str(tmp_path / "run"), afs_center="zero")
    from distill_core.sources import builtin_source

    path = train_student(cfg, builtin_source(), progress=False).path
    assert main(["export-diffusers", str(path), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "the student's teacher builtin is not a pipeline directory (no model_index.json)" in err
    assert "Traceback" not in err and not (tmp_path / "x").exists()
    sd3 = tmp_path / "sd3"
    sd3.mkdir()
    (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    assert main(["export-diffusers", str(path), "--teacher", str(sd3), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "the student's teacher is a StableDiffusion3Pipeline: export-diffusers writes files for" in err
    assert "sample it with python -m distill_core sample" in err and not (tmp_path / "x").exists()

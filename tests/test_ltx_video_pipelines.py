"""LTX-Video pipelines from directories (``LTXPipeline``): a text-to-video teacher whose transformer takes each
latent pixel of a clip as a token, with the clip's grid and rotary positions in frames and pixels, and whose
scheduler shifts its times by the clip's token count; and its image-to-video pipeline, whose clips keep the start
image's latent as their first frame. Euler with CFG through the teacher reproduces the stock pipelines' samplers;
the main job distils them on clips, sample writes them as animations, and the stock pipeline with the exported
student draws the student's clip."""

from __future__ import annotations

import json
import math

import diffusers
import pytest
import torch
from PIL import Image

from distill_core.cli import main
from distill_core.diffusers_source import diffusers_source
from tests.test_teacher_from_dir import randomise, t5_encoder, teacher_steps

#: the clips of these tests: 9 video frames (5 latent frames of the tiny VAE's 2), 32 x 32 pixels (8 x 8 latents)
FRAMES, SIDE = 9, 32


@pytest.fixture(scope="module")
def ltx(tmp_path_factory):
    """A tiny LTXPipeline as diffusers saves one: T5, a video VAE of 8 latent channels spanning 4 pixels (2 x 2
    patches, one halving) and 2 frames a latent pixel, a transformer of one block, and LTX-Video's scheduler (the
    time shift of the clip's token count)."""
    root = tmp_path_factory.mktemp("ltx")
    tokens, t5 = t5_encoder()
    vae = diffusers.AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1), spatio_temporal_scaling=(True, False),
        decoder_spatio_temporal_scaling=(True, False), decoder_inject_noise=(False, False, False),
        down_block_types=("LTXVideoDownBlock3D", "LTXVideoDownBlock3D"), downsample_type=("conv", "conv"),
        upsample_residual=(False, False), upsample_factor=(1, 1), patch_size=2, patch_size_t=1)
    network = diffusers.LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2,
                                                   attention_head_dim=8, cross_attention_dim=16, num_layers=1,
                                                   caption_channels=32)
    randomise(network, seed=0)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                                          base_image_seq_len=1024, max_image_seq_len=4096)
    diffusers.LTXPipeline(scheduler=scheduler, vae=vae, text_encoder=t5, tokenizer=tokens,
                          transformer=network).save_pretrained(root / "pipeline", safe_serialization=True)
    prompts = root / "prompts.txt"
    prompts.write_text("a red fox runs\nan owl takes off\n")
    return root / "pipeline", prompts


def test_the_teacher_samples_clips_as_its_pipeline_does(ltx):
    """The teacher's clips are (C, F, H, W) latents of the VAE's frames and pixels; Euler with CFG through it
    reproduces the pipeline's sampler on a clip (its tokens unpacked), and the students' grid is shifted by the
    pipeline's own shift of the clip's token count."""

    teacher, prompts = ltx
    source = diffusers_source(teacher, prompts=prompts, resolution=SIDE, frames=FRAMES)
    assert source.shape == (8, 5, 8, 8) and source.guidance == 3.0
    x = torch.randn(1, *source.shape, generator=torch.Generator().manual_seed(0))
    pipe = diffusers.DiffusionPipeline.from_pretrained(teacher, local_files_only=True)
    set_timesteps, used = pipe.scheduler.set_timesteps, {}

    def fixed_times(num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):  # the pipeline's
        # own shift of three given times
        used["mu"] = mu
        return set_timesteps(sigmas=[0.9, 0.6, 0.3], device=device, mu=mu)

    pipe.scheduler.set_timesteps = fixed_times
    packed = x.flatten(2).transpose(1, 2)
    expected = pipe(prompt="an owl takes off", latents=packed, num_inference_steps=3, height=SIDE, width=SIDE,
                    num_frames=FRAMES, guidance_scale=2.0, output_type="latent").frames
    expected = expected.transpose(1, 2).reshape(x.shape)
    times = pipe.scheduler.sigmas.double()
    ours = teacher_steps(source, 2.0, x, times, torch.tensor([1]))
    assert expected.abs().max() > 1
    torch.testing.assert_close(ours.double(), expected.double(), atol=1e-4, rtol=1e-4)
    assert source.denoiser.shift == pytest.approx(math.exp(used["mu"]))


def test_the_main_job_distils_an_ltx_pipeline_on_clips(ltx, tmp_path):
    """distill --frames writes the full report with a grid of decoded frame strips; sample writes each clip as an
    animated WEBP of its 9 frames."""
    teacher, prompts = ltx
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--prompts", str(prompts), "--resolution", str(SIDE),
                 "--frames", str(FRAMES), "--steps", "2", "--iters", "2", "--batch", "2", "--eval-samples", "4",
                 "--reference-steps", "4", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert any(r["method"] == "sfd" for r in report["rows"]) and report["guidance"] == 3.0
    assert (out / "grid.png").read_bytes()[25] == 2  # RGB: decoded by its VAE
    drawn = tmp_path / "drawn"
    assert main(["sample", str(out / "student.safetensors"), "--prompt", "a cat yawns", "--count", "1",
                 "--out", str(drawn)]) == 0
    (clip,) = json.loads((drawn / "samples.json").read_text())["images"]
    with Image.open(drawn / clip["clip"]) as animation:
        assert animation.n_frames == FRAMES and animation.size == (SIDE, SIDE)


def test_the_image_to_video_teacher_starts_each_clip_from_its_prompts_image_as_its_pipeline_does(ltx, tmp_path):
    """LTXImageToVideoPipeline: the start image's latent is the clip's first frame, its tokens at time 0. Euler with
    CFG through the teacher, prompt 1 from its image b.png, reproduces the pipeline's sampler given the clip that
    starts from that latent; another image gives another clip; the main job distils it."""
    from distill_core.start_images import KEPT_START
    from tests.test_edit_pipelines import image_folder
    from tests.test_image_to_video_pipelines import own_and_other_image

    teacher, prompts = ltx
    pipe = diffusers.DiffusionPipeline.from_pretrained(teacher, local_files_only=True)
    diffusers.LTXImageToVideoPipeline(**pipe.components).save_pretrained(tmp_path / "i2v", safe_serialization=True)
    images = image_folder(tmp_path, 24, 24)
    source = diffusers_source(tmp_path / "i2v", prompts=prompts, images=images, resolution=SIDE, frames=FRAMES)
    kept = getattr(source.denoiser, KEPT_START)
    assert source.shape == (8, 5, 8, 8) and kept.shape == (2, 8, 1, 8, 8) and not torch.equal(kept[0], kept[1])

    x = torch.randn(1, *source.shape, generator=torch.Generator().manual_seed(0))
    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "i2v", local_files_only=True)
    set_timesteps = pipe.scheduler.set_timesteps

    def fixed_times(num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        return set_timesteps(sigmas=[0.9, 0.6, 0.3], device=device, mu=mu)

    pipe.scheduler.set_timesteps = fixed_times
    start = torch.cat([kept[1:], x[:, :, 1:]], dim=2)  # the clip the pipeline starts from: b.png's latent first
    expected = pipe(image=Image.open(images / "b.png"), prompt="an owl takes off",
                    latents=start.flatten(2).transpose(1, 2), num_inference_steps=3, height=SIDE, width=SIDE,
                    num_frames=FRAMES, guidance_scale=2.0, output_type="latent").frames
    expected = expected.transpose(1, 2).reshape(x.shape)
    ours, other = own_and_other_image(source, x, pipe.scheduler.sigmas.double())
    torch.testing.assert_close(ours.double(), expected.double(), atol=1e-4, rtol=1e-4)
    assert (other - ours)[:, :, 1:].abs().max() > 1e-3  # the later frames follow the start image

    assert main(["distill", "--teacher", str(tmp_path / "i2v"), "--prompts", str(prompts), "--images", str(images),
                 "--resolution", str(SIDE), "--frames", str(FRAMES), "--steps", "2", "--iters", "2", "--batch", "2",
                 "--eval-samples", "4", "--reference-steps", "4", "--out", str(tmp_path / "run"), "--no-progress"]) == 0


def test_the_pipeline_with_the_exported_student_draws_the_students_clip(ltx, tmp_path):
    """export-diffusers writes an LTX-Video student's LoRA; the printed lines, run as written, make the stock
    pipeline's scheduler step through the student's sigmas (the pipeline's own sigmas and shift set aside) from
    latents packed as its tokens, and it draws the student's clip from the same noise."""
    from distill_core.config import DistillConfig
    from distill_core.export_diffusers import export, usage
    from distill_core.sampling import few_step
    from distill_core.student_files import load_student
    from distill_core.train.run import train_student

    teacher, prompts = ltx
    source = diffusers_source(teacher, prompts=prompts, resolution=SIDE, frames=FRAMES)
    cfg = DistillConfig(steps=2, iters=1, batch=2, lr=1e-2, seed=1, out=str(tmp_path / "run"), checkpoint_every=0,
                        student="lora", lora_rank=4, lora_alpha=2, guidance_mode="distilled")
    path = train_student(cfg, source, progress=False).path
    settings = export(path, tmp_path / "export")
    assert settings["pipeline"] == "LTXPipeline" and settings["call"] == {"num_frames": FRAMES}
    lines = usage(settings, tmp_path / "export")
    assert "num_inference_steps=2" in lines.splitlines()[-1] and "pipe._pack_latents(latents)" in lines
    scope = {}
    exec(lines.replace("'a prompt'", "'an owl takes off', output_type='latent'"), scope)
    z = scope["latents"].transpose(1, 2).reshape(1, *source.shape) / settings["noise_scale"]
    student = load_student(path, source.denoiser, source.uncond)
    sigmas = torch.cat([student.sigmas()[:-1], torch.zeros(1)])  # the pipeline's times end at 0
    with torch.no_grad():
        ours = few_step(student.denoiser(), sigmas[0] * z, sigmas, torch.tensor([1]), afs=True)
        without = few_step(source.denoiser, sigmas[0] * z, sigmas, torch.tensor([1]), afs=True)
    theirs = scope["video"].T.reshape(ours.shape[1:])[None]
    scale = float(ours.abs().max())
    torch.testing.assert_close(theirs / scale, ours / scale, atol=2e-5, rtol=0)
    assert (without - ours).abs().max() / scale > 1e-3  # the LoRA's clip, not the teacher's network's


def test_the_image_to_video_pipeline_with_the_exported_student_draws_the_students_clip(ltx, tmp_path):
    """LTX-Video image-to-video: the printed lines put the start image's latent, encoded as the teacher encoded it,
    in the first frame of the latents they give the pipeline (which takes given latents as they are), and the stock
    pipeline with the exported LoRA draws the student's clip from that image and the same noise."""
    from distill_core.config import DistillConfig
    from distill_core.export_diffusers import export, usage
    from distill_core.sampling import few_step
    from distill_core.student_files import load_student
    from distill_core.text_pipeline import prompt_condition
    from distill_core.train.run import train_student
    from tests.test_edit_pipelines import image_folder

    teacher, prompts = ltx
    pipe = diffusers.DiffusionPipeline.from_pretrained(teacher, local_files_only=True)
    diffusers.LTXImageToVideoPipeline(**pipe.components).save_pretrained(tmp_path / "i2v", safe_serialization=True)
    images = image_folder(tmp_path, SIDE, SIDE)
    source = diffusers_source(tmp_path / "i2v", prompts=prompts, images=images, resolution=SIDE, frames=FRAMES)
    cfg = DistillConfig(steps=2, iters=1, batch=2, lr=1e-2, seed=1, out=str(tmp_path / "run"), checkpoint_every=0,
                        student="lora", lora_rank=4, lora_alpha=2, guidance_mode="distilled")
    path = train_student(cfg, source, progress=False).path
    settings = export(path, tmp_path / "export")
    assert settings["pipeline"] == "LTXImageToVideoPipeline"
    lines = usage(settings, tmp_path / "export")
    assert "image=start" in lines.splitlines()[-1]
    scope = {}
    exec(lines.replace("'a prompt'", "'an owl takes off', output_type='latent'")
         .replace("'image.png'", repr(str(images / "b.png"))), scope)
    z = scope["latents"].transpose(1, 2).reshape(1, *source.shape) / settings["noise_scale"]
    student = load_student(path, source.denoiser, source.uncond)
    sigmas = torch.cat([student.sigmas()[:-1], torch.zeros(1)])  # the pipeline's times end at 0
    with torch.no_grad():
        ours = few_step(student.denoiser(), sigmas[0] * z, sigmas, prompt_condition(source.denoiser,
                                                                                    torch.tensor([1])), afs=True)
    theirs = scope["video"].T.reshape(ours.shape[1:])[None]
    scale = float(ours.abs().max())
    torch.testing.assert_close(theirs / scale, ours / scale, atol=2e-5, rtol=0)

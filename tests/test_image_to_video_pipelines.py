"""Image-to-video pipelines from directories (Wan 2.1 I2V, which also reads the start image through CLIP; Wan 2.2
A14B I2V, two experts; Wan 2.2 TI2V 5B, its start image inside the clip): each prompt's clip starts from its own
image (``--images``), which the teacher reads as the pipeline's transformer does, on both sides of CFG; the stock
pipeline with the exported student draws the student's clip; what does not fit is refused in one line."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from PIL import Image

from distill_core.cli import main
from distill_core.config import DistillConfig
from distill_core.diffusers_source import diffusers_source
from distill_core.export_diffusers import export, usage
from distill_core.sampling import few_step
from distill_core.start_images import IMAGE_EMBEDDINGS, KEPT_START, START_TABLE
from distill_core.student_files import load_student
from distill_core.teacher import CFGTeacher
from distill_core.text_pipeline import IMAGE_ROW, PROMPT_ROW, prompt_condition
from distill_core.train.run import train_student
from tests.test_edit_pipelines import image_folder
from tests.test_teacher_from_dir import multi_encoder_pipeline_dir, randomise

#: the clips of these tests: 5 video frames (2 latent frames of the tiny VAE's 4), 16 x 16 pixels (4 x 4 latents)
FRAMES, SIDE = 5, 16


def i2v_pipeline_dir(root, kind: str):
    """A tiny WanImageToVideoPipeline: the tiny Wan pipeline's UMT5 and tokenizer, a video VAE of two halvings in
    space and in time (4 video frames a latent frame, as Wan's), a transformer of 16 + 4 + 16 input channels (the
    clip, the mask, the start latents); Wan 2.1 (``wan21``): with a CLIP vision tower read by the transformer's
    image embedder; Wan 2.2 A14B (``a14b``): two experts switched at 0.9 T, no image encoder. Wan 2.2 TI2V 5B
    (``ti2v-5b``): the tiny 5B text-to-video pipeline's parts, its start latent in the clip (``expand_timesteps``)."""
    import transformers

    if kind == "ti2v-5b":
        five = diffusers.DiffusionPipeline.from_pretrained(multi_encoder_pipeline_dir(root / "5b", "wan22-5b"),
                                                           local_files_only=True)
        diffusers.WanImageToVideoPipeline(tokenizer=five.tokenizer, text_encoder=five.text_encoder, vae=five.vae,
                                          scheduler=five.scheduler, transformer=five.transformer,
                                          expand_timesteps=True).save_pretrained(root / kind, safe_serialization=True)
        return root / kind

    wan = diffusers.DiffusionPipeline.from_pretrained(multi_encoder_pipeline_dir(root / "wan", "wan"),
                                                      local_files_only=True)
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[True, True], scale_factor_spatial=4,
                                     latents_mean=[0.1] * 16, latents_std=[2.0] * 16)
    clip = kind == "wan21"
    network = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                              in_channels=36, out_channels=16, text_dim=32, freq_dim=16, ffn_dim=32,
                                              num_layers=1, **({"image_dim": 16, "added_kv_proj_dim": 16} if clip
                                                               else {}))
    randomise(network, seed=0)
    if clip:
        parts = {"image_encoder": transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
                     hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                     patch_size=8)),
                 "image_processor": transformers.CLIPImageProcessorPil(size={"shortest_edge": 16},
                                                                       crop_size={"height": 16, "width": 16})}
    else:
        parts = {"transformer_2": randomise(diffusers.WanTransformer3DModel.from_config(network.config), seed=1),
                 "boundary_ratio": 0.9}
    diffusers.WanImageToVideoPipeline(tokenizer=wan.tokenizer, text_encoder=wan.text_encoder, vae=vae,
                                      scheduler=wan.scheduler, transformer=network,
                                      **parts).save_pretrained(root / kind, safe_serialization=True)
    return root / kind


@pytest.fixture(scope="module")
def start_images(tmp_path_factory):
    """Two prompts and a start image each (24 x 20 pixels: scaled to the clip's 16 x 16 frames)."""
    root = tmp_path_factory.mktemp("starts")
    prompts = root / "prompts.txt"
    prompts.write_text("the fox runs\nthe owl flies off\n")
    return prompts, image_folder(root, 20, 24)


@pytest.mark.parametrize("kind", ["wan21", "a14b", "ti2v-5b"])
def test_the_teacher_starts_each_clip_from_its_prompts_image_as_its_pipeline_does(tmp_path, start_images, kind):
    """Euler with CFG through the teacher, prompt 1 with its image b.png, reproduces the stock pipeline's sampler
    given that image and prompt (Wan 2.2 A14B: the high-noise expert above 0.9 T, the low-noise one below; Wan 2.2
    TI2V 5B: the start latent as the first frame, whose tokens take the time 0, and the first frame of its clip);
    the start table holds the mask and each image's latents, Wan 2.1's also CLIP's embeddings (5B's: the start
    latents alone), and another image gives another clip. Without prompts, the shipped motions start from the
    image."""
    from distill_core.prompts import DEFAULT_MOTIONS

    prompts, images = start_images
    teacher = i2v_pipeline_dir(tmp_path, kind)
    source = diffusers_source(teacher, prompts=prompts, images=images, resolution=SIDE, frames=FRAMES)
    assert source.uncond == {PROMPT_ROW: torch.tensor([2])}
    if kind == "ti2v-5b":  # 48 channels, a latent pixel of 4 image pixels
        kept = getattr(source.denoiser, KEPT_START)
        assert source.shape == (48, 2, 4, 4) and kept.shape == (2, 48, 1, 4, 4) and not torch.equal(kept[0], kept[1])
    else:
        start = getattr(source.denoiser, START_TABLE)
        assert source.shape == (16, 2, 4, 4) and start.shape == (2, 20, 2, 4, 4) and not torch.equal(start[0], start[1])
        assert start[:, :4, 0].eq(1).all() and start[:, :4, 1].eq(0).all()  # the mask: the first frame is given
        embeddings = getattr(source.denoiser, IMAGE_EMBEDDINGS, None)  # CLIP's 4 patches and its class token
        assert (embeddings.shape == (2, 5, 16) if kind == "wan21" else embeddings is None)

    x = torch.randn(1, *source.shape, generator=torch.Generator().manual_seed(0))
    pipe = diffusers.DiffusionPipeline.from_pretrained(teacher, local_files_only=True)
    set_timesteps = pipe.scheduler.set_timesteps
    pipe.scheduler.set_timesteps = lambda steps, device=None: set_timesteps(sigmas=[0.95, 0.6, 0.3], device=device)
    expected = pipe(image=Image.open(images / "b.png"), prompt="the owl flies off", latents=x, num_inference_steps=3,
                    height=SIDE, width=SIDE, num_frames=FRAMES, guidance_scale=2.0, output_type="latent").frames
    ours, other = own_and_other_image(source, x, pipe.scheduler.sigmas.double())
    assert expected.shape == x.shape and expected.abs().max() > 1
    torch.testing.assert_close(ours.double(), expected.double(), atol=1e-4, rtol=1e-4)
    assert (other - ours).abs().max() > 1e-2  # the same prompt from a.png
    motions = diffusers_source(teacher, images=images / "a.png", resolution=SIDE, frames=FRAMES)
    assert motions.classes == len(DEFAULT_MOTIONS.splitlines())  # without --prompts: the shipped motions


def own_and_other_image(source, x: torch.Tensor, times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler with CFG (w = 2) through the teacher of ``source`` from ``x`` at a pipeline's flow ``times``: prompt 1
    from its own image, and from image 0."""
    from distill_core.solvers import euler

    guided, sigmas = CFGTeacher(source.denoiser, 2.0, source.uncond), times / (1 - times)
    start = x / (1 - float(times[0]))
    with torch.no_grad():
        return (euler(guided, start, sigmas, prompt_condition(source.denoiser, torch.tensor([1]))),
                euler(guided, start, sigmas, {PROMPT_ROW: torch.tensor([1]), IMAGE_ROW: torch.tensor([0])}))


def test_the_main_job_distils_an_image_to_video_pipeline_and_samples_new_clips(tmp_path, start_images):
    """distill --images --frames writes the full report with a grid of decoded frame strips; sample draws a new
    prompt's clips from a given start image (each an animated WEBP beside its strip), and compare takes --images
    too."""
    prompts, images = start_images
    teacher = i2v_pipeline_dir(tmp_path, "wan21")
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--prompts", str(prompts), "--images", str(images),
                 "--resolution", str(SIDE), "--frames", str(FRAMES), "--steps", "2", "--iters", "2", "--batch", "2",
                 "--eval-samples", "4", "--reference-steps", "4", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert any(r["method"] == "sfd" for r in report["rows"]) and report["guidance"] == 5.0
    assert (out / "grid.png").read_bytes()[25] == 2  # RGB: decoded by its VAE
    drawn = tmp_path / "drawn"
    assert main(["sample", str(out / "student.safetensors"), "--prompt", "the fox turns", "--images",
                 str(images / "a.png"), "--count", "2", "--out", str(drawn)]) == 0
    files = json.loads((drawn / "samples.json").read_text())["images"]
    assert len(files) == 2 and all((drawn / f["clip"]).is_file() for f in files)
    with Image.open(drawn / files[0]["clip"]) as clip:  # the clip's 5 frames, animated
        assert clip.format == "WEBP" and clip.n_frames == FRAMES and clip.size == (SIDE, SIDE)
    cmp = tmp_path / "cmp"
    assert main(["compare", str(out / "student.safetensors"), "--prompts", str(prompts), "--images", str(images),
                 "--count", "2", "--reference-steps", "4", "--out", str(cmp)]) == 0
    assert json.loads((cmp / "compare.json").read_text())["rows"]


@pytest.mark.parametrize("kind", ["wan21", "ti2v-5b"])
def test_the_pipeline_with_the_exported_student_draws_the_students_clip(tmp_path, start_images, kind):
    """The stock WanImageToVideoPipeline with the exported LoRA, given the prompt's start image, takes the engine's
    Euler steps through the student (the guidance distilled into it): the same clip from the same noise (Wan 2.2
    TI2V 5B's: its first frame the start image's latent); the printed lines run as written."""
    prompts, images = start_images
    teacher = i2v_pipeline_dir(tmp_path, kind)
    source = diffusers_source(teacher, prompts=prompts, images=images, resolution=SIDE, frames=FRAMES)
    cfg = DistillConfig(steps=2, iters=1, batch=2, lr=1e-2, seed=1, out=str(tmp_path / "run"), checkpoint_every=0,
                        student="lora", lora_rank=4, lora_alpha=2, guidance_mode="distilled")
    path = train_student(cfg, source, progress=False).path
    out = tmp_path / "export"
    settings = export(path, out)
    assert settings["pipeline"] == "WanImageToVideoPipeline" and settings["call"] == {"num_frames": FRAMES}
    lines = usage(settings, out)
    assert "image=start" in lines.splitlines()[-1]
    scope = {}
    exec(lines.replace("'a prompt'", "'the owl flies off', output_type='latent'")
         .replace("'image.png'", repr(str(images / "b.png"))), scope)
    z = scope["latents"].view(1, *source.shape) / settings["noise_scale"]
    student = load_student(path, source.denoiser, source.uncond)
    sigmas = torch.cat([student.sigmas()[:-1], torch.zeros(1)])  # the pipeline's times end at 0
    with torch.no_grad():
        ours = few_step(student.denoiser(), sigmas[0] * z, sigmas, prompt_condition(source.denoiser,
                                                                                    torch.tensor([1])), afs=True)
    theirs = scope["video"].view(1, *source.shape)
    scale = float(ours.abs().max())
    torch.testing.assert_close(theirs / scale, ours / scale, atol=2e-5, rtol=0)


def test_every_pairing_trains_each_prompt_on_each_image(tmp_path, start_images):
    """--pairing every: condition r is prompt r mod P from image r div P, P x N conditions over one row per prompt
    and per image in the tables, drawn in training and cycled in the evaluation set; the main job distils it."""
    from distill_core.main_job import eval_space

    prompts, two = start_images
    teacher = i2v_pipeline_dir(tmp_path, "a14b")
    images = tmp_path / "three"  # three images for two prompts
    images.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (images / name).write_bytes((two / ("b.png" if name == "b.png" else "a.png")).read_bytes())
    source = diffusers_source(teacher, prompts=prompts, images=images, resolution=SIDE, frames=FRAMES,
                              pairing="every")
    assert source.classes == 6 and getattr(source.denoiser, START_TABLE).shape[0] == 3
    rows = prompt_condition(source.denoiser, torch.arange(6))
    assert rows[PROMPT_ROW].tolist() == [0, 1, 0, 1, 0, 1] and rows[IMAGE_ROW].tolist() == [0, 0, 1, 1, 2, 2]
    drawn = source.draw_cond(64, torch.Generator().manual_seed(0))
    assert drawn[IMAGE_ROW].unique().tolist() == [0, 1, 2] and drawn[PROMPT_ROW].unique().tolist() == [0, 1]
    assert torch.equal(eval_space(source)["condition"](torch.tensor([5]))[IMAGE_ROW], torch.tensor([2]))
    with pytest.raises(ValueError, match=r"holds 3 images .* for 2 prompts.*--pairing every"):
        diffusers_source(teacher, prompts=prompts, images=images, resolution=SIDE, frames=FRAMES)
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--prompts", str(prompts), "--images", str(images),
                 "--pairing", "every", "--resolution", str(SIDE), "--frames", str(FRAMES), "--steps", "2",
                 "--iters", "2", "--batch", "2", "--eval-samples", "6", "--reference-steps", "4", "--out",
                 str(out), "--no-progress"]) == 0
    assert "pairing: every" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("flags, message", [
    ("--prompts {prompts}", "reads an image with each prompt: give the images with --images"),
    ("--prompts {prompts} --images {images} --frames 1", "draws clips that start from an image: give --frames"),
    ("--prompts {prompts} --pairing every", "--pairing every pairs the prompts with images: give them with --images"),
])
def test_what_an_image_to_video_pipeline_cannot_take_is_refused_in_one_line(tmp_path, capsys, start_images, flags,
                                                                            message):
    prompts, images = start_images
    teacher = i2v_pipeline_dir(tmp_path, "a14b")
    args = flags.format(prompts=prompts, images=images).split()
    assert main(["distill", "--teacher", str(teacher), *args, "--out", str(tmp_path / "r"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err

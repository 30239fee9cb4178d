"""Editing pipelines from directories (Flux Kontext; Flux.2 klein and dev, which also draw from prompts alone): each
prompt edits its own image (``--images``), which the teacher reads as the pipeline's transformer does; the stock
pipeline, given the exported student and the same image, draws the student's edit; what does not fit is refused in
one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from distill_core.cli import main
from distill_core.config import DistillConfig
from distill_core.diffusers_source import diffusers_source
from distill_core.export_diffusers import export, usage
from distill_core.reference_images import REFERENCE_TABLE, image_files
from distill_core.safetensors_io import read_card
from distill_core.sampling import few_step
from distill_core.sources import trained_teacher
from distill_core.student_files import load_student
from distill_core.text_pipeline import IMAGE_ROW, PROMPT_ROW, prompt_condition
from distill_core.train.run import train_student
from tests.test_export_diffusers import pipeline_latents
from tests.test_teacher_from_dir import multi_encoder_pipeline_dir, teacher_steps


@pytest.fixture(scope="module")
def kontext(tmp_path_factory):
    """A tiny Flux Kontext pipeline (8 x 8 latents of 2 pixels: 16-pixel images), two prompts and an image each."""
    root = tmp_path_factory.mktemp("kontext")
    teacher = multi_encoder_pipeline_dir(root, "flux-kontext")
    prompts = root / "prompts.txt"
    prompts.write_text("make it snowy\nan owl on it\n")
    return teacher, prompts, image_folder(root, 16, 16)


def image_folder(root, height: int, width: int):
    """``root/images`` with two images of random pixels, ``a.png`` and ``b.png``, of height x width."""
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(images / name)
    return images


def exported_edit(source, tmp_path) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A LoRA student of a ``source`` whose prompts read an image (edits, image-to-video clips), its guidance
    distilled, trained a step into ``tmp_path / "run"`` and exported into ``tmp_path / "export"``: the export's
    settings, the standard normal noise z [1, C, ...] of seed 0 and the student's sample from it for condition 1
    (the second prompt on its image), by the engine's Euler steps."""
    cfg = DistillConfig(steps=2, iters=1, batch=2, lr=1e-2, seed=1, out=str(tmp_path / "run"), checkpoint_every=0,
                        student="lora", lora_rank=4, lora_alpha=2, guidance_mode="distilled")
    path = train_student(cfg, source, progress=False).path
    settings = export(path, tmp_path / "export")
    student = load_student(path, source.denoiser, source.uncond)
    z = torch.randn(1, *source.shape, generator=torch.Generator().manual_seed(0))
    sigmas = torch.cat([student.sigmas()[:-1], torch.zeros(1)])  # the pipeline's times end at 0
    with torch.no_grad():
        ours = few_step(student.denoiser(), sigmas[0] * z, sigmas,
                        prompt_condition(source.denoiser, torch.tensor([1])), afs=True)
    return settings, z, ours


def test_the_teacher_reads_each_prompts_image_beside_the_noise(kontext):
    """The image table holds each prompt's image latent, read by the condition's image row; the network sees it
    (another image, another x0), the negative's side of CFG reads each sample's own image, and one image file
    serves every prompt, the shipped edits without prompts."""
    from distill_core.prompts import DEFAULT_EDITS
    from distill_core.teacher import CFGTeacher

    teacher, prompts, images = kontext
    source = diffusers_source(teacher, prompts=prompts, images=images)
    table = getattr(source.denoiser, REFERENCE_TABLE)
    assert source.shape == (16, 8, 8) and table.shape == (2, 16, 8, 8) and source.guidance == 1.0
    assert not torch.equal(table[0], table[1]) and source.uncond == {PROMPT_ROW: torch.tensor([2])}
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([0, 1])
    drawn = source.draw_cond(4, torch.Generator().manual_seed(0))
    assert torch.equal(drawn[PROMPT_ROW], drawn[IMAGE_ROW])  # each prompt with its own image
    guided = CFGTeacher(source.denoiser, 2.0, source.uncond)
    with torch.no_grad():
        own = source.denoiser(x, 2.0, {PROMPT_ROW: rows, IMAGE_ROW: rows})
        swapped = source.denoiser(x, 2.0, {PROMPT_ROW: rows, IMAGE_ROW: torch.tensor([1, 1])})
        negative = source.denoiser(x, 2.0, {PROMPT_ROW: torch.tensor([2, 2]), IMAGE_ROW: rows})
        _, unconditional = guided.both_sides(x, torch.full((2,), 2.0), {PROMPT_ROW: rows, IMAGE_ROW: rows})
    torch.testing.assert_close(swapped[1], own[1])  # prompt 1 with its own image, b.png, in both
    assert (swapped[0] - own[0]).abs().max() > 1e-3  # prompt 0 with b.png instead of a.png
    torch.testing.assert_close(unconditional, negative)  # the negative with each sample's own image
    with pytest.raises(ValueError, match="reads an image beside each prompt"):
        source.denoiser(x, 2.0, rows)
    assert image_files(images / "a.png", 3) == [images / "a.png"] * 3
    edits = diffusers_source(teacher, images=images / "a.png")
    assert edits.classes == len(DEFAULT_EDITS.splitlines())  # without prompts: the shipped edits of one image


def test_the_pipeline_with_the_exported_student_draws_the_students_edit(kontext, tmp_path):
    """The stock FluxKontextPipeline with the exported LoRA, given the prompt's image at the student's size, takes the
    engine's Euler steps through the student: the same latents from the same noise; and the printed lines run."""
    teacher, prompts, images = kontext
    source = diffusers_source(teacher, prompts=prompts, images=images)
    settings, z, ours = exported_edit(source, tmp_path)  # an owl on b.png
    assert settings["pipeline"] == "FluxKontextPipeline" and settings["guidance_scale"] == 3.5
    assert settings["call"] == {"_auto_resize": False, "max_area": 256}
    edit = Image.open(images / "b.png")
    settings_with_image = {**settings, "call": {**settings["call"], "image": edit}}
    theirs = pipeline_latents(teacher, tmp_path / "export", settings_with_image, z, prompt="an owl on it")
    scale = float(ours.abs().max())
    torch.testing.assert_close(theirs / scale, ours / scale, atol=2e-5, rtol=0)
    other = {**settings, "call": {**settings["call"], "image": Image.open(images / "a.png")}}
    assert (pipeline_latents(teacher, tmp_path / "export", other, z, prompt="an owl on it") - ours).abs().max() > 1e-3
    scope = {}
    exec(usage(settings, tmp_path / "export").replace("'a prompt'", "'an owl on it', output_type='latent'")
         .replace("'image.png'", repr(str(images / "b.png"))), scope)
    assert scope["image"].numel() == 16 * 8 * 8


def test_the_main_job_distils_an_editing_pipeline_and_samples_new_edits(kontext, tmp_path, capsys):
    """distill --images writes the full report and records the images in config.yaml, and its resumption reads
    the encoded images and prompts back from the run's cache/; sample and compare take --images for the edits they
    draw."""
    teacher, prompts, images = kontext
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--prompts", str(prompts), "--images", str(images),
                 "--steps", "2", "--iters", "2", "--batch", "2", "--eval-samples", "4", "--reference-steps", "4",
                 "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert any(r["method"] == "sfd" for r in report["rows"]) and (out / "grid.png").is_file()
    assert f"images: {images}" in (out / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["distill", "--resume", "--config", str(out / "config.yaml")]) == 0
    err = capsys.readouterr().err
    assert all(f"reading the encoded {step} from {out / 'cache'}" in err for step in ("images", "prompts"))
    assert "encoding" not in err
    drawn = tmp_path / "drawn"
    assert main(["sample", str(out / "student.safetensors"), "--prompt", "make it rain", "--images",
                 str(images / "a.png"), "--count", "2", "--out", str(drawn)]) == 0
    assert len(json.loads((drawn / "samples.json").read_text())["images"]) == 2
    assert main(["sample", str(out / "student.safetensors"), "--prompt", "make it rain", "--out", str(drawn)]) == 1
    assert "reads an image with each prompt: give the images with --images" in capsys.readouterr().err
    cmp = tmp_path / "cmp"
    assert main(["compare", str(out / "student.safetensors"), "--prompts", str(prompts), "--images", str(images),
                 "--count", "2", "--reference-steps", "4", "--out", str(cmp)]) == 0
    assert json.loads((cmp / "compare.json").read_text())["rows"]


@pytest.mark.parametrize("flags, message", [
    ("--teacher {flux} --prompts {prompts} --images {images}/a.png",
     "--images is for pipelines that read an image beside each prompt (FluxKontextPipeline, QwenImageEditPipeline, "
     "QwenImageEditPlusPipeline, WanImageToVideoPipeline, LTXImageToVideoPipeline, "
     "HunyuanVideo15ImageToVideoPipeline, Flux2KleinPipeline, Flux2Pipeline); a FluxPipeline draws from its prompts "
     "alone"),
    ("--teacher {teacher} --prompts {three} --images {images}",
     "--images {images} holds 2 images (.png, .jpg, .jpeg, .webp) for 3 prompts"),
    ("--teacher {teacher} --prompts {prompts} --images {images}/none.png", "no such file or folder"),
    ("--teacher {teacher} --prompts {prompts} --images {prompts}", "is not an image this reads"),
    ("--teacher builtin --images {images}", "--images is for pipeline directories that read an image beside each "
     "prompt (Flux Kontext, Qwen-Image-Edit, Flux.2, Wan and LTX-Video image-to-video)"),
])
def test_images_that_do_not_fit_are_refused_in_one_line(kontext, tmp_path, capsys, flags, message):
    teacher, prompts, images = kontext
    three = tmp_path / "three.txt"
    three.write_text("one\ntwo\nthree\n")
    flux = multi_encoder_pipeline_dir(tmp_path, "flux") if "{flux}" in flags else None
    values = {"teacher": teacher, "flux": flux, "prompts": prompts, "images": images, "three": three}
    args = flags.format(**values).split()
    assert main(["distill", *args, "--out", str(tmp_path / "r"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert message.format(**values) in err and "Traceback" not in err, err


@pytest.mark.parametrize("kind", ["flux2-klein", "flux2-dev"])
def test_flux2_edits_the_images_given_with_its_prompts_as_its_pipeline_does(tmp_path, capsys, kind):
    """Flux.2 klein and dev with --images: the transformer reads each prompt's image (its latent's tokens at time 10)
    (klein: on both sides of CFG; dev: at its guidance input, without CFG), as its pipeline does given the image at
    the student's size: Euler through the teacher reproduces the pipeline's steps; without --images it draws from
    its prompts alone. Its exported LoRA, drawn by
    the stock pipeline with the image at that size, draws the student's edit, and the printed lines pass it so; a
    student of edits is refused by sample without --images, and edits above the megapixel its pipeline reads at are
    refused in one line."""
    from tests.test_dit_pipelines import dit_pipeline_dir, flux2_latents, stock_pipeline

    teacher = dit_pipeline_dir(tmp_path, kind)
    dev = kind == "flux2-dev"
    w = 1.0 if dev else 4.0  # dev: no CFG, its guidance input at its pipeline's 4
    images = image_folder(tmp_path, 64, 64)
    prompts = ["make it snowy", "an owl on it"]
    source = diffusers_source(teacher, prompts=prompts, images=images, resolution=64)
    assert source.shape == (64, 16, 16) and getattr(source.denoiser, REFERENCE_TABLE).shape == (2, 64, 16, 16)
    assert source.card == {"resolution": 64, "edits": True, **({"embedded_guidance": 4.0} if dev else {})}
    assert source.guidance == w
    assert not hasattr(diffusers_source(teacher, prompts=prompts, resolution=64).denoiser, REFERENCE_TABLE)
    with pytest.raises(ValueError, match="reads the image it edits at a megapixel at most, and this run's 1088x1088"):
        diffusers_source(teacher, prompts=prompts, images=images, resolution=1088)

    pipe = stock_pipeline(teacher)
    x = torch.randn(1, *source.shape, generator=torch.Generator().manual_seed(0))
    edit = Image.open(images / "b.png")
    expected = flux2_latents(pipe, x.shape, prompt="an owl on it", latents=x,
                             sigmas=[0.9, 0.6, 0.3], num_inference_steps=3, height=64, width=64, guidance_scale=4.0,
                             image=edit)
    times = pipe.scheduler.sigmas.double()
    ours = teacher_steps(source, w, x, times, prompt_condition(source.denoiser, torch.tensor([1])))
    with torch.no_grad():
        other = source.denoiser(x, 2.0, {PROMPT_ROW: torch.tensor([1]), IMAGE_ROW: torch.tensor([0])})
        own = source.denoiser(x, 2.0, {PROMPT_ROW: torch.tensor([1]), IMAGE_ROW: torch.tensor([1])})
    assert (other - own).abs().max() > 1e-4  # the image counts: far above float32 rounding (1e-6 here)
    torch.testing.assert_close(ours.double(), expected.double(), atol=1e-4, rtol=1e-4)

    settings, z, ours = exported_edit(source, tmp_path)
    assert settings["edits"] and settings["call"] == {} and settings["guidance_scale"] == (4.0 if dev else 1.0)
    theirs = pipeline_latents(teacher, tmp_path / "export", {**settings, "call": {"image": edit}}, z,
                              prompt="an owl on it")
    scale = float(ours.abs().max())
    torch.testing.assert_close(theirs / scale, ours / scale, atol=2e-5, rtol=0)
    lines = usage(settings, tmp_path / "export")
    assert "edit = load_image('image.png').resize((64, 64), Image.Resampling.LANCZOS)" in lines
    assert "image=edit" in lines
    path = tmp_path / "run" / "student.safetensors"
    assert main(["sample", str(path), "--prompt", "make it rain", "--out", str(tmp_path / "drawn")]) == 1
    err = capsys.readouterr().err
    assert "this student was distilled on edits of images: give the images to edit with --images" in err


def image_sets(root, height: int, width: int, count: int = 2):
    """``root/sets`` with two sets of ``count`` images of random pixels, ``a/`` and ``b/``, of height x width."""
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        folder = root / "sets" / name
        folder.mkdir(parents=True)
        for k in range(count):
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    return root / "sets"


def test_flux2_edits_read_each_prompts_set_of_images_as_its_pipeline_does(tmp_path, capsys):
    """--images a folder of folders: each prompt edits its folder's set of images, which Flux.2's transformer reads
    together (image r's tokens at time 10 (r + 1)), as its pipeline does given the images as a list at the
    student's size: Euler with CFG through the teacher reproduces its steps, and each image of a set counts. The
    exported LoRA, drawn by the stock pipeline with the set, draws the student's edit, and the printed lines load
    the set. Sets of unequal counts, and sets for a pipeline that reads one image per prompt, are refused in one
    line."""
    from tests.test_dit_pipelines import dit_pipeline_dir, flux2_latents, stock_pipeline

    teacher = dit_pipeline_dir(tmp_path, "flux2-klein")
    sets = image_sets(tmp_path, 64, 64)
    prompts = ["put them side by side", "an owl between them"]
    source = diffusers_source(teacher, prompts=prompts, images=sets, resolution=64)
    assert getattr(source.denoiser, REFERENCE_TABLE).shape == (2, 2, 64, 16, 16)
    assert source.card == {"resolution": 64, "edits": True, "references": 2}
    pipe = stock_pipeline(teacher)
    x = torch.randn(1, *source.shape, generator=torch.Generator().manual_seed(0))
    edits = [Image.open(sets / "b" / f"{k}.png") for k in range(2)]
    expected = flux2_latents(pipe, x.shape, prompt="an owl between them", latents=x, sigmas=[0.9, 0.6, 0.3],
                             num_inference_steps=3, height=64, width=64, guidance_scale=4.0, image=edits)
    ours = teacher_steps(source, 4.0, x, pipe.scheduler.sigmas.double(),
                         prompt_condition(source.denoiser, torch.tensor([1])))
    torch.testing.assert_close(ours.double(), expected.double(), atol=1e-4, rtol=1e-4)
    table = getattr(source.denoiser, REFERENCE_TABLE)
    with torch.no_grad():
        own = source.denoiser(x, 2.0, {PROMPT_ROW: torch.tensor([1]), IMAGE_ROW: torch.tensor([1])})
        table[1, 1] = table[0, 1]  # the set's second image swapped for another
        swapped = source.denoiser(x, 2.0, {PROMPT_ROW: torch.tensor([1]), IMAGE_ROW: torch.tensor([1])})
    assert (own - swapped).abs().max() > 1e-4

    source = diffusers_source(teacher, prompts=prompts, images=sets, resolution=64)
    settings, z, ours = exported_edit(source, tmp_path)
    assert settings["references"] == 2
    theirs = pipeline_latents(teacher, tmp_path / "export", {**settings, "call": {"image": edits}}, z,
                              prompt="an owl between them")
    scale = float(ours.abs().max())
    torch.testing.assert_close(theirs / scale, ours / scale, atol=2e-5, rtol=0)
    lines = usage(settings, tmp_path / "export")
    assert ("edit = [load_image(f'image_{k}.png').resize((64, 64), Image.Resampling.LANCZOS) for k in range(1, 3)]"
            in lines and "image=edit" in lines)
    # sample and compare rebuild the student's teacher with a folder of images as one set
    student = read_card(tmp_path / "run" / "student.safetensors")
    rebuilt = trained_teacher(str(teacher), [student], prompts=["an owl"], images=str(sets / "b"))
    torch.testing.assert_close(getattr(rebuilt.denoiser, REFERENCE_TABLE)[0],
                               getattr(source.denoiser, REFERENCE_TABLE)[1])

    (sets / "b" / "2.png").write_bytes((sets / "b" / "0.png").read_bytes())  # a set of three beside one of two
    listed = tmp_path / "prompts.txt"
    listed.write_text("\n".join(prompts))
    assert main(["distill", "--teacher", str(teacher), "--prompts", str(listed), "--images", str(sets),
                 "--resolution", "64", "--out", str(tmp_path / "r"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "one run's sets hold as many images each (a: 2, b: 3)" in err and "Traceback" not in err
    (sets / "b" / "2.png").unlink()
    kontext = multi_encoder_pipeline_dir(tmp_path / "kontext", "flux-kontext")
    with pytest.raises(ValueError, match="a FluxKontextPipeline reads one image with each prompt, and the folder's "
                                         "entries are folders"):
        diffusers_source(kontext, prompts=prompts, images=sets)

"""Qwen-Image-Edit pipelines from directories: the text encoder reads each instruction beside the image it edits, so
the teacher holds a text row per (prompt, image) pair and one negative per image; the transformer reads the image's
latent beside the sample. Checked against the stock pipeline with transformers' own processor: the same latents from
the same noise, the same negative; the exported student drawn by the stock pipeline; mixed aspect ratios refused."""

from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from distill_core.cli import main
from distill_core.diffusers_source import diffusers_source
from distill_core.export_diffusers import usage
from distill_core.reference_images import REFERENCE_TABLE
from distill_core.teacher import CFGTeacher
from distill_core.text_pipeline import IMAGE_ROW, PROMPT_ROW, prompt_condition
from tests.test_edit_pipelines import exported_edit, image_folder
from tests.test_export_diffusers import pipeline_latents
from tests.test_teacher_from_dir import qwen_vl_encoder, randomise, teacher_steps

#: the tokens of Qwen2.5-VL's chat template and image placeholders
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
#: the training images' side in pixels: 4 x 4 latents of the tiny VAE's 32 pixels
SIDE = 128


def stock_processor(folder):
    """transformers' ``Qwen2VLProcessor`` of the image processor and tokenizer in ``folder``, without its video
    processor (which needs torchvision; the pipelines never give it a video)."""
    check = transformers.ProcessorMixin.check_argument_for_proper_class
    transformers.ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None
    try:
        return transformers.Qwen2VLProcessor(image_processor=transformers.AutoImageProcessor.from_pretrained(folder),
                                             tokenizer=transformers.AutoTokenizer.from_pretrained(folder),
                                             video_processor=None)
    finally:
        transformers.ProcessorMixin.check_argument_for_proper_class = check


def qwen_edit_pipeline_dir(root, plus: bool = False):
    """A tiny QwenImageEditPipeline (``plus``: QwenImageEditPlusPipeline) as diffusers saves one: a Qwen2.5-VL of one
    text and one vision layer with a byte-level tokenizer (its chat template's and image placeholders' special
    tokens added), its processor's image processor and tokenizer in ``processor/`` (an image read as at most 16
    merged patches), a transformer of one block on 16 channels, a video VAE of five halvings (the megapixel
    reference image: 32 x 32 latents) and Qwen-Image's scheduler."""
    tokenizer, encoder = qwen_vl_encoder(SPECIAL, image_token_id="<|image_pad|>",
                                         vision_start_token_id="<|vision_start|>",
                                         vision_end_token_id="<|vision_end|>")
    torch.manual_seed(0)
    for p in encoder.parameters():  # weights large enough that the image moves the text rows
        p.data.normal_(0, 0.5)
    network = diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=1,
                                                    attention_head_dim=8, num_attention_heads=2,
                                                    joint_attention_dim=32, axes_dims_rope=(2, 2, 4))
    vae = diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1] * 6, num_res_blocks=1,
                                           temperal_downsample=[False] * 5)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192,
        shift_terminal=0.02, time_shift_type="exponential")
    randomise(network, seed=0)
    cls = diffusers.QwenImageEditPlusPipeline if plus else diffusers.QwenImageEditPipeline
    pipeline = root / "pipeline"
    cls(scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tokenizer, processor=None,
        transformer=network).save_pretrained(pipeline, safe_serialization=True)
    index = json.loads((pipeline / "model_index.json").read_text())
    (pipeline / "model_index.json").write_text(json.dumps({**index, "processor": ["transformers", "Qwen2VLProcessor"]}))
    processor = transformers.Qwen2VLImageProcessor(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
    processor.save_pretrained(pipeline / "processor")
    tokenizer.save_pretrained(pipeline / "processor")
    return pipeline


@pytest.fixture(scope="module")
def qwen_edit(tmp_path_factory):
    """A tiny Qwen-Image-Edit pipeline, two instructions and a folder of two images."""
    root = tmp_path_factory.mktemp("qwen-edit")
    prompts = root / "prompts.txt"
    prompts.write_text("make it snowy\nput an owl on the left side of it\n")
    return qwen_edit_pipeline_dir(root), prompts, image_folder(root, 40, 40)


def stock_pipeline(teacher):
    """The stock pipeline at ``teacher`` with transformers' own processor."""
    return diffusers.DiffusionPipeline.from_pretrained(teacher, processor=stock_processor(teacher / "processor"),
                                                       local_files_only=True)


@pytest.mark.parametrize("plus", [False, True])
def test_the_teacher_reads_each_instruction_beside_its_image_as_its_pipeline_does(tmp_path, qwen_edit, plus):
    """Euler through the teacher on the pipeline's own sigmas reproduces the stock pipeline's edit of an image (its
    text encoder reading instruction and image, its transformer the image's megapixel latent beside the sample);
    the negative's rows are the pipeline's own encoding of its single-space negative with each image, which CFG's
    unconditional side reads; each pair has its text row, one run of --pairing every a row per prompt and image."""
    _, prompts, images = qwen_edit
    teacher = qwen_edit_pipeline_dir(tmp_path, plus=True) if plus else qwen_edit[0]
    source = diffusers_source(teacher, prompts=prompts, images=images, resolution=SIDE)
    lookup = source.denoiser.pair_rows
    assert (source.shape, source.guidance) == ((16, 4, 4), 4.0)
    assert getattr(source.denoiser, REFERENCE_TABLE).shape == (2, 16, 32, 32)  # a megapixel, 32 pixels a latent
    assert lookup.tolist() == [[0, -1], [-1, 1], [2, 3]]  # prompt r on image r; the negative on each image

    pipe = stock_pipeline(teacher)
    edit = Image.open(images / "b.png")
    x = torch.randn(1, *source.shape, generator=torch.Generator().manual_seed(0))
    latents = pipe(image=edit, prompt="put an owl on the left side of it", latents=pipe._pack_latents(x, 1, 16, 4, 4),
                   sigmas=[0.9, 0.6, 0.3], num_inference_steps=3, height=SIDE, width=SIDE, true_cfg_scale=1.0,
                   output_type="latent").images
    expected = pipe._unpack_latents(latents, SIDE, SIDE, pipe.vae_scale_factor)[:, :, 0]
    times = pipe.scheduler.sigmas.double()
    ours = teacher_steps(source, 1.0, x, times, prompt_condition(source.denoiser, torch.tensor([1])))
    assert expected.abs().max() > 1
    torch.testing.assert_close(ours.double(), expected.double(), atol=1e-4, rtol=1e-4)

    condition = {"Plus": 384, "": 1024}["Plus" if plus else ""]
    seen = pipe.image_processor.resize(edit, condition, condition)
    negative, _ = pipe.encode_prompt(" ", image=seen, device="cpu")
    rows = source.denoiser.encoder_hidden_states_mask[3].bool()
    torch.testing.assert_close(source.denoiser.encoder_hidden_states[3][rows].float(), negative[0])
    other, _ = pipe.encode_prompt(" ", image=pipe.image_processor.resize(Image.open(images / "a.png"), condition,
                                                                         condition), device="cpu")
    assert (other - negative).abs().max() > 1e-3  # the negative reads the image
    guided = CFGTeacher(source.denoiser, 4.0, source.uncond)
    both = {PROMPT_ROW: torch.tensor([0, 1]), IMAGE_ROW: torch.tensor([0, 1])}
    z = torch.randn(2, *source.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, unconditional = guided.both_sides(z, torch.full((2,), 2.0), both)
        own = source.denoiser(z, 2.0, {PROMPT_ROW: torch.tensor([2, 2]), IMAGE_ROW: torch.tensor([0, 1])})
    torch.testing.assert_close(unconditional, own)

    every = diffusers_source(teacher, prompts=prompts, images=images, resolution=SIDE, pairing="every")
    assert every.denoiser.pair_rows.tolist() == [[0, 2], [1, 3], [4, 5]] and every.classes == 4
    assert every.denoiser.encoder_hidden_states.shape[0] == 6


def test_without_a_size_the_teacher_draws_at_the_images_own_megapixel_as_its_pipeline_does(qwen_edit, tmp_path):
    """Without --resolution the teacher's samples take the size its pipeline draws an image's edits at when not told
    another: the image's megapixel at its aspect ratio (80 x 40 pixels: 1440 x 736), each side rounded down to what
    the network takes (1408 x 704); the pipeline then samples what the teacher samples, and the student's file names
    the size, so a command that rebuilds the teacher from it (export-diffusers, sample) builds it at that size."""
    from distill_core.sources import as_trained, teacher_source

    teacher, prompts, _ = qwen_edit
    wide = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 80, 3), dtype=np.uint8)).save(wide)
    source = diffusers_source(teacher, prompts=prompts, images=wide)
    assert source.shape == (16, 22, 44) and source.card == {"resolution": 704, "width": 1408}
    assert getattr(source.denoiser, REFERENCE_TABLE).shape == (2, 16, 22, 44)
    assert teacher_source(str(teacher), encode=False, **as_trained(source.card)).shape == source.shape

    pipe = stock_pipeline(teacher)
    x = torch.randn(1, *source.shape, generator=torch.Generator().manual_seed(0))
    latents = pipe(image=Image.open(wide), prompt="make it snowy", latents=pipe._pack_latents(x, 1, 16, 22, 44),
                   sigmas=[0.9, 0.5], num_inference_steps=2, true_cfg_scale=1.0, output_type="latent").images
    expected = pipe._unpack_latents(latents, 704, 1408, pipe.vae_scale_factor)[:, :, 0]
    times = pipe.scheduler.sigmas.double()
    ours = teacher_steps(source, 1.0, x, times, prompt_condition(source.denoiser, torch.tensor([0])))
    torch.testing.assert_close(ours.double(), expected.double(), atol=1e-4, rtol=1e-4)


def test_the_pipeline_with_the_exported_student_draws_the_students_edit(qwen_edit, tmp_path):
    """The stock QwenImageEditPipeline with the exported LoRA, given the image as loaded, takes the engine's Euler
    steps through the student: the same latents from the same noise; and the printed lines run."""
    teacher, prompts, images = qwen_edit
    source = diffusers_source(teacher, prompts=prompts, images=images, resolution=SIDE)
    settings, z, ours = exported_edit(source, tmp_path)  # an owl on b.png
    assert settings["pipeline"] == "QwenImageEditPipeline" and settings["guidance_scale"] == 1.0
    assert settings["call"] == {} and (settings["height"], settings["width"]) == (SIDE, SIDE)
    processor = stock_processor(teacher / "processor")
    with_image = {**settings, "call": {"image": Image.open(images / "b.png")}}
    theirs = pipeline_latents(teacher, tmp_path / "export", with_image, z, prompt="put an owl on the left side of it",
                              components={"processor": processor})
    scale = float(ours.abs().max())
    torch.testing.assert_close(theirs / scale, ours / scale, atol=2e-5, rtol=0)
    lines = usage(settings, tmp_path / "export")
    assert "edit = load_image('image.png')  # the image to edit" in lines and "image=edit" in lines
    scope = {"processor": processor}
    exec(lines.replace(f"from_pretrained({str(teacher)!r})", f"from_pretrained({str(teacher)!r}, processor=processor)")
         .replace("'a prompt'", "'make it snowy', output_type='latent'")
         .replace("'image.png'", repr(str(images / "a.png"))), scope)
    assert scope["image"].numel() == 16 * 4 * 4


def test_the_main_job_distils_qwen_image_edit_and_refuses_images_of_two_shapes(qwen_edit, tmp_path, capsys):
    """distill --images writes the full report, and its resumption reads the encoded (instruction, image) pairs
    back from the run's cache/; sample draws new edits of an image; images whose megapixel sizes differ are refused
    in one line that names each size."""
    teacher, prompts, images = qwen_edit
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--prompts", str(prompts), "--images", str(images),
                 "--resolution", str(SIDE), "--steps", "2", "--iters", "2", "--batch", "2", "--eval-samples", "4",
                 "--reference-steps", "4", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["guidance"] == 4.0 and any(r["method"] == "sfd" for r in report["rows"])
    assert (out / "grid.png").is_file()
    capsys.readouterr()
    assert main(["distill", "--resume", "--config", str(out / "config.yaml")]) == 0
    err = capsys.readouterr().err
    assert f"reading the encoded pairs from {out / 'cache'}" in err and "encoding" not in err
    drawn = tmp_path / "drawn"
    assert main(["sample", str(out / "student.safetensors"), "--prompt", "make it rain", "--images",
                 str(images / "a.png"), "--count", "2", "--out", str(drawn)]) == 0
    assert len(json.loads((drawn / "samples.json").read_text())["images"]) == 2
    Image.fromarray(np.zeros((40, 80, 3), dtype=np.uint8)).save(images.parent / "wide.png")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name, source in (("a.png", images / "a.png"), ("b.png", images.parent / "wide.png")):
        (mixed / name).write_bytes(source.read_bytes())
    assert main(["distill", "--teacher", str(teacher), "--prompts", str(prompts), "--images", str(mixed),
                 "--resolution", str(SIDE), "--out", str(tmp_path / "r"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "reads each image at a megapixel of its own aspect ratio" in err and "a.png: 1024x1024" in err
    assert "b.png: 1440x736" in err and "Traceback" not in err


def test_edit_plus_reads_each_instructions_set_of_images_as_its_pipeline_does(tmp_path, qwen_edit):
    """--images a folder of folders: Qwen-Image-Edit Plus reads each instruction beside its set's images (Picture 1,
    Picture 2 in its text encoder; each image's megapixel latent after the sample's, in order), and Euler through
    the teacher reproduces the stock pipeline given the images as a list; Qwen-Image-Edit, which reads one image,
    refuses sets in one line."""
    from tests.test_edit_pipelines import image_sets

    teacher, prompts, _ = qwen_edit
    plus = qwen_edit_pipeline_dir(tmp_path, plus=True)
    sets = image_sets(tmp_path, 40, 40)
    source = diffusers_source(plus, prompts=prompts, images=sets, resolution=SIDE)
    assert getattr(source.denoiser, REFERENCE_TABLE).shape == (2, 2, 16, 32, 32)
    assert source.card["references"] == 2
    pipe = stock_pipeline(plus)
    edits = [Image.open(sets / "b" / f"{k}.png") for k in range(2)]
    x = torch.randn(1, *source.shape, generator=torch.Generator().manual_seed(0))
    latents = pipe(image=edits, prompt="put an owl on the left side of it", latents=pipe._pack_latents(x, 1, 16, 4, 4),
                   sigmas=[0.9, 0.6, 0.3], num_inference_steps=3, height=SIDE, width=SIDE, true_cfg_scale=1.0,
                   output_type="latent").images
    expected = pipe._unpack_latents(latents, SIDE, SIDE, pipe.vae_scale_factor)[:, :, 0]
    ours = teacher_steps(source, 1.0, x, pipe.scheduler.sigmas.double(),
                         prompt_condition(source.denoiser, torch.tensor([1])))
    assert expected.abs().max() > 1
    torch.testing.assert_close(ours.double(), expected.double(), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="a QwenImageEditPipeline reads one image with each prompt"):
        diffusers_source(teacher, prompts=prompts, images=sets, resolution=SIDE)

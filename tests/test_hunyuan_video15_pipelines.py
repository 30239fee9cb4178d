"""HunyuanVideo 1.5 text-to-video pipelines from directories: Qwen2.5-VL's and ByT5's prompts (ByT5 reading the quoted
text), the transformer given the text-to-video pipeline's empty start-image inputs, its guider's CFG scale, clips and
single frames; checked against the stock pipeline from the same noise; the main job distils it end to end."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
import transformers

from distill_core.cli import main
from distill_core.diffusers_source import diffusers_source
from distill_core.safetensors_io import read_card
from tests.test_teacher_from_dir import byte_vocab, randomise, teacher_steps

#: a chat template in the form of Qwen2.5-VL's, which the pipeline's prompts go through
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def hunyuan_video15_pipeline_dir(root, i2v: bool = False):
    """A tiny HunyuanVideo15Pipeline as diffusers saves one: a Qwen2.5-VL text model of three layers (the pipeline
    reads the third from last) with a byte-level tokenizer and a chat template, a ByT5 tokenizer with a T5 encoder
    of one layer, a transformer of one block on 16 channels (its target size 32 pixels: its pipeline's 16:9 frame
    24 x 40), a video VAE of 4 pixels and 4 frames a latent pixel,
    a shifted FlowMatch scheduler and a CFG guider at 6; ``i2v``: its HunyuanVideo15ImageToVideoPipeline, with a
    SigLIP vision tower of one layer reading 28 x 28 images (4 tokens)."""
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = byte_vocab(special)
    tokenizer = transformers.Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": special[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    text = transformers.Qwen2_5_VLTextModel(transformers.Qwen2_5_VLTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}))
    glyphs = transformers.T5EncoderModel(transformers.T5Config(vocab_size=384, d_model=16, d_kv=8, d_ff=32,
                                                               num_layers=1, num_heads=2))
    network = diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=33, out_channels=16, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_refiner_layers=1, text_embed_dim=32, text_embed_2_dim=16, image_embed_dim=16, rope_axes_dim=(2, 2, 4),
        target_size=32)
    vae = diffusers.AutoencoderKLHunyuanVideo15(latent_channels=16, block_out_channels=(32, 32, 32), layers_per_block=1,
                                                spatial_compression_ratio=4, temporal_compression_ratio=4)
    randomise(network, seed=0)
    vision = {}
    if i2v:
        torch.manual_seed(0)
        vision = {"image_encoder": transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
                      hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14)),
                  "feature_extractor": transformers.SiglipImageProcessor(size={"height": 28, "width": 28})}
    cls = diffusers.HunyuanVideo15ImageToVideoPipeline if i2v else diffusers.HunyuanVideo15Pipeline
    cls(text_encoder=text, tokenizer=tokenizer, transformer=network, vae=vae,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=glyphs,
        tokenizer_2=transformers.ByT5Tokenizer(), guider=diffusers.ClassifierFreeGuidance(guidance_scale=6.0),
        **vision).save_pretrained(root / "pipeline", safe_serialization=True)
    return root / "pipeline"


@pytest.fixture(scope="module")
def hunyuan15(tmp_path_factory):
    return hunyuan_video15_pipeline_dir(tmp_path_factory.mktemp("hunyuan15"))


@pytest.mark.parametrize("frames", [5, 1])
def test_the_teacher_samples_as_its_pipeline_does(hunyuan15, frames):
    """Euler with CFG through the teacher reproduces the stock pipeline's sampler at its guider's scale against the
    empty negative, on a clip of 5 frames (2 latent frames) and on one frame; the prompt's quoted text reaches the
    glyph encoder; without --resolution the size is its pipeline's 16:9 frame of its network's target size."""
    prompts = ["a red fox", 'a shop sign that says "OPEN"']
    source = diffusers_source(hunyuan15, prompts=prompts, resolution=32, frames=frames)
    assert source.shape == ((16, 2, 8, 8) if frames > 1 else (16, 8, 8)) and source.guidance == 6.0
    glyph_mask = source.denoiser.encoder_attention_mask_2
    assert glyph_mask[0].sum() == 0 < glyph_mask[1].sum()  # only the sign's prompt quotes text
    assert diffusers_source(hunyuan15, prompts=prompts).shape == (16, 6, 10)  # 24 x 40 pixels

    pipe = diffusers.DiffusionPipeline.from_pretrained(hunyuan15, local_files_only=True)
    x = torch.randn(1, 16, 2 if frames > 1 else 1, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = pipe(prompt=prompts[1], negative_prompt="", latents=x, sigmas=[0.9, 0.6, 0.3], num_inference_steps=3,
                    height=32, width=32, num_frames=frames, output_type="latent").frames
    times = pipe.scheduler.sigmas.double()
    ours = teacher_steps(source, 6.0, x if frames > 1 else x[:, :, 0], times, torch.tensor([1]))
    assert expected.abs().max() > 1
    torch.testing.assert_close(ours.double(), expected.view(ours.shape).double(), atol=1e-4, rtol=1e-4)


def test_the_main_job_distils_it_on_clips(hunyuan15, tmp_path):
    """distill --frames trains on clips with the full report and a grid of frame strips decoded by its VAE; the
    student's file names the frames."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\nan owl\n")
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(hunyuan15), "--prompts", str(prompts), "--resolution", "32", "--frames",
                 "5", "--steps", "2", "--iters", "2", "--batch", "2", "--eval-samples", "4", "--reference-steps", "4",
                 "--report-solvers", "euler", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["guidance"] == 6.0 and any(r["method"] == "sfd" for r in report["rows"])
    assert read_card(out / "student.safetensors")["frames"] == 5 and (out / "grid.png").is_file()


def test_the_pipeline_with_the_exported_student_draws_the_students_clip(hunyuan15, tmp_path):
    """The stock pipeline, its transformer given the exported LoRA and its guider the student's scale (1: its
    guidance distilled), takes the engine's Euler steps through the student from the same noise; the printed lines
    load the LoRA into the transformer (the pipeline has no LoRA loader) and set the guider."""
    from distill_core.config import DistillConfig
    from distill_core.export_diffusers import export, usage
    from distill_core.sampling import few_step
    from distill_core.student_files import load_student
    from distill_core.train.run import train_student

    source = diffusers_source(hunyuan15, prompts=["a red fox", "an owl"], resolution=32, frames=5)
    cfg = DistillConfig(steps=2, iters=1, batch=2, lr=1e-2, seed=1, out=str(tmp_path / "run"), checkpoint_every=0,
                        student="lora", lora_rank=4, lora_alpha=2, guidance_mode="distilled")
    path = train_student(cfg, source, progress=False).path
    settings = export(path, tmp_path / "export")
    assert settings["guidance_scale"] == 1.0 and settings["call"] == {"num_frames": 5}
    lines = usage(settings, tmp_path / "export")
    assert "pipe.guider = ClassifierFreeGuidance(guidance_scale=1)" in lines
    assert "pipe.transformer.load_lora_adapter(" in lines and "load_lora_weights" not in lines
    student = load_student(path, source.denoiser, source.uncond)
    z = torch.randn(1, *source.shape, generator=torch.Generator().manual_seed(0))
    sigmas = torch.cat([student.sigmas()[:-1], torch.zeros(1)])  # the pipeline's times end at 0
    with torch.no_grad():
        ours = few_step(student.denoiser(), sigmas[0] * z, sigmas, torch.tensor([1]), afs=True)
    scope = {"z": z}  # the printed lines on the same noise, drawing latents
    exec(lines.replace("'a prompt'", "'an owl', output_type='latent'").replace("torch.randn(", "z.view("), scope)
    theirs = scope["video"][None]
    scale = float(ours.abs().max())
    torch.testing.assert_close(theirs / scale, ours / scale, atol=2e-5, rtol=0)


def test_the_pipelines_guider_sets_the_scale_and_one_that_guides_otherwise_is_refused(tmp_path):
    """A pipeline's CFG guider gives its scale (a disabled one: 1, no guidance); one that rescales the guided
    prediction or guides only some steps is refused in one line, as the engine's teacher guides every step plainly."""
    from distill_core.diffusers_source import guider_scale

    folder = tmp_path / "guider"
    folder.mkdir()
    assert guider_scale(tmp_path) is None
    for options, expected in (({}, 6.0), ({"enabled": False}, 1.0), ({"guidance_rescale": 0.7}, None),
                              ({"stop": 0.5}, None)):
        diffusers.ClassifierFreeGuidance(guidance_scale=6.0, **options).save_config(folder)
        if expected is None:
            with pytest.raises(ValueError, match="guides otherwise than CFG at every step"):
                guider_scale(tmp_path)
        else:
            assert guider_scale(tmp_path) == expected


def test_image_to_video_reads_each_start_image_as_its_pipeline_does(tmp_path):
    """HunyuanVideo 1.5's image-to-video pipeline: each prompt's clip starts from its image, whose latent on the
    first latent frame (with its mask) and SigLIP reading the transformer takes, on both sides of CFG; Euler with
    CFG through the teacher reproduces the stock pipeline's sampler from the same noise. Without --resolution the
    clip takes the frame its pipeline draws the image at (its target size's nearest to the image's aspect ratio);
    images whose frames differ are refused in one line."""
    from PIL import Image

    from distill_core.start_images import SIGLIP_EMBEDDINGS, START_TABLE
    from distill_core.text_pipeline import prompt_condition
    from tests.test_edit_pipelines import image_folder

    teacher = hunyuan_video15_pipeline_dir(tmp_path, i2v=True)
    images = image_folder(tmp_path, 36, 64)
    source = diffusers_source(teacher, prompts=["the fox runs", "the owl flies"], images=images, frames=5)
    assert source.shape == (16, 2, 6, 10) and source.guidance == 6.0  # its 24 x 40 frame of a 16:9 image
    small = diffusers_source(teacher, prompts=["the fox runs", "the owl flies"], images=images, frames=5,
                             resolution=32)
    assert getattr(small.denoiser, START_TABLE).shape == (2, 17, 2, 8, 8)
    assert getattr(small.denoiser, SIGLIP_EMBEDDINGS).shape == (2, 4, 16)

    pipe = diffusers.DiffusionPipeline.from_pretrained(teacher, local_files_only=True)
    x = torch.randn(1, *source.shape, generator=torch.Generator().manual_seed(0))
    expected = pipe(image=Image.open(images / "b.png"), prompt="the owl flies", negative_prompt="", latents=x,
                    sigmas=[0.9, 0.5], num_inference_steps=2, num_frames=5, output_type="latent").frames
    times = pipe.scheduler.sigmas.double()
    ours = teacher_steps(source, 6.0, x, times, prompt_condition(source.denoiser, torch.tensor([1])))
    assert expected.abs().max() > 1
    torch.testing.assert_close(ours.double(), expected.double(), atol=1e-4, rtol=1e-4)

    Image.new("RGB", (40, 40)).save(images / "c.png")
    with pytest.raises(ValueError, match="draws each image's clip at a frame of its aspect ratio"):
        diffusers_source(teacher, images=images, frames=5, pairing="every")


def test_a_meanflow_few_step_model_is_refused_in_one_line(hunyuan15, tmp_path, capsys):
    """A HunyuanVideo 1.5 transformer trained as a MeanFlow few-step model (``use_meanflow``) is distilled already:
    refused in one line that asks for the pipeline it came from."""
    import shutil

    teacher = tmp_path / "meanflow"
    shutil.copytree(hunyuan15, teacher)
    config = teacher / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_meanflow": True}))
    assert main(["distill", "--teacher", str(teacher), "--out", str(tmp_path / "r"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "a MeanFlow few-step HunyuanVideo15Transformer3DModel (use_meanflow) is distilled already" in err
    assert "Traceback" not in err


def test_the_image_to_video_pipeline_with_the_exported_student_draws_the_students_clip(tmp_path, capsys):
    """A LoRA student of HunyuanVideo 1.5's image-to-video pipeline, distilled at the frame its images set, exports:
    the printed lines, given a start image of that aspect ratio and no size (the pipeline takes none: it draws at
    the frame the image's aspect ratio picks), take the engine's Euler steps through the student from the same
    noise. A student distilled at a frame the pipeline would not draw is refused in one line."""
    from distill_core.config import DistillConfig
    from distill_core.export_diffusers import usage
    from distill_core.train.run import train_student
    from tests.test_edit_pipelines import exported_edit, image_folder

    teacher = hunyuan_video15_pipeline_dir(tmp_path, i2v=True)
    images = image_folder(tmp_path, 36, 64)
    source = diffusers_source(teacher, prompts=["the fox runs", "the owl flies"], images=images, frames=5)
    settings, z, ours = exported_edit(source, tmp_path)
    assert (settings["height"], settings["width"]) == (24, 40) and settings["call"] == {"num_frames": 5}
    lines = usage(settings, tmp_path / "export")
    assert "# the image the clip starts from, of the student's aspect ratio, 24:40" in lines
    assert "height=" not in lines.splitlines()[-1] and "image=start" in lines
    scope = {"z": z}  # the printed lines on the same noise and the second prompt's image, drawing latents
    exec(lines.replace("'a prompt'", "'the owl flies', output_type='latent'").replace("torch.randn(", "z.view(")
         .replace("'image.png'", repr(str(images / "b.png"))), scope)
    theirs = scope["video"][None]
    scale = float(ours.abs().max())
    torch.testing.assert_close(theirs / scale, ours / scale, atol=2e-5, rtol=0)

    square = diffusers_source(teacher, prompts=["the fox runs"], images=images / "a.png", frames=5, resolution=16)
    cfg = DistillConfig(steps=2, iters=1, batch=2, checkpoint_every=0, student="lora", out=str(tmp_path / "square"))
    path = train_student(cfg, square, progress=False).path
    assert main(["export-diffusers", str(path), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "from an image of this student's 16x16 it would draw 32x32" in err and "distil without --resolution" in err
    assert "Traceback" not in err and not (tmp_path / "x").exists()

"""``--teacher DIR``: diffusers model directories distilled end to end by the main job (a DDPM model and a
flow-matching model, small ones built here), with clear refusals of what cannot be a teacher."""

from __future__ import annotations

import json
import string
from pathlib import Path

import diffusers
import pytest
import torch
from conftest import randomise
from safetensors import safe_open

from distill_core.cli import main
from distill_core.config import DistillConfig
from distill_core.denoisers.diffusers import DiffusersDenoiser
from distill_core.denoisers.flow import FlowDenoiser
from distill_core.diffusers_source import diffusers_source
from distill_core.report import as_images
from distill_core.safetensors_io import read_card
from distill_core.stages import weights_size

TINY = {"sample_size": 8, "in_channels": 3, "out_channels": 3, "block_out_channels": (8, 16), "layers_per_block": 1,
        "norm_num_groups": 4, "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "attention_head_dim": 8}
SCHEDULERS = {
    "ddpm": lambda: diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                            prediction_type="epsilon"),
    "flow": lambda: diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000),
}


def model_dir(root, kind: str, classes: int = 0, pipeline: bool = True):
    """A diffusers pipeline folder (unet/, scheduler/, model_index.json) or a bare model folder with its
    scheduler config beside it, holding a small random-weight UNet2DModel."""
    unet = diffusers.UNet2DModel(**TINY, **({"num_class_embeds": classes + 1} if classes else {}))
    randomise(unet, seed=0, scale=0.05)
    model = root / "unet" if pipeline else root
    unet.save_pretrained(model, safe_serialization=True)
    SCHEDULERS[kind]().save_pretrained(root / "scheduler" if pipeline else root)
    if pipeline:
        (root / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    return root


@pytest.mark.parametrize("kind, adapter", [("ddpm", DiffusersDenoiser), ("flow", FlowDenoiser)])
def test_the_main_job_distils_a_diffusers_directory_with_the_full_report(tmp_path, capsys, kind, adapter):
    teacher = model_dir(tmp_path / kind, kind)
    assert isinstance(diffusers_source(teacher).denoiser, adapter)
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--steps", "2", "--iters", "2", "--batch", "2",
                 "--eval-samples", "8", "--reference-steps", "8", "--out", str(out), "--no-progress"]) == 0
    for name in ("student.safetensors", "grid.png", "report.json", "report.md", "config.yaml", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert "teacher reference solve (Heun, 8 steps)" in (out / "report.md").read_text()
    assert len(list((out / "cache").glob("ref-*-n8-s*-heun8.safetensors"))) == 2  # the eval set and the target
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"] == str(teacher) and report["metric_space"].startswith("pixels average-pooled")
    student = next(r for r in report["rows"] if r["method"] == "sfd")
    assert student["nfe"] == 2 and {"psnr_db", "fd_teacher", "precision", "recall"} <= set(student)
    assert "class_acc" not in student and "fd" not in student  # no classifier fits this data
    assert "teacher: " + str(teacher) in (out / "config.yaml").read_text()
    lowest = min(s for s in read_card(out / "student.safetensors")["sigmas"]["2"] if s > 0)
    floor = diffusers_source(teacher).denoiser.sigma_min  # DDPM: 0.01 (its first step), flow: 0.001
    assert lowest == pytest.approx(max(DistillConfig.sigma_min, floor), rel=1e-6)  # never below its trained range
    assert report["config"]["sigma_min"] == pytest.approx(lowest, rel=1e-6)  # where the solvers' rows end too
    assert capsys.readouterr().out.count("below the teacher's trained range") == (kind == "ddpm")  # said once


def test_a_bf16_run_loads_a_16_bit_model_without_a_float32_copy(tmp_path):
    """A model whose files hold fp16, for a run whose frozen teacher computes in bf16 (--frozen-precision bf16):
    it loads in fp16, which holds its weights exactly, in half of float32's memory (float32 would only be a copy
    on the way to bf16). Its fingerprint is the float32 load's, so the float32 teacher takes the run's student."""
    from distill_core.builtin import fingerprint
    from distill_core.student_files import load_student

    teacher = model_dir(tmp_path / "t", "ddpm")
    diffusers.UNet2DModel.from_pretrained(teacher / "unet").half().save_pretrained(teacher / "unet",
                                                                                    safe_serialization=True)
    full, half = diffusers_source(teacher), diffusers_source(teacher, frozen_precision="bf16")
    assert {p.dtype for p in full.denoiser.parameters()} == {torch.float32}
    assert {p.dtype for p in half.denoiser.parameters()} == {torch.float16}
    assert fingerprint(half.denoiser) == fingerprint(full.denoiser)
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--frozen-precision", "bf16", "--steps", "2", "--iters", "1",
                 "--batch", "2", "--eval-samples", "8", "--reference-steps", "8", "--out", str(out),
                 "--no-progress"]) == 0
    student = load_student(out / "student.safetensors", full.denoiser, full.uncond)
    assert student.card["teacher_fingerprint"] == fingerprint(full.denoiser)
    model_dir(tmp_path / "t32", "ddpm")  # float32 files load as float32 for the run to cast
    assert {p.dtype for p in diffusers_source(tmp_path / "t32", frozen_precision="bf16").denoiser.parameters()} == {
        torch.float32}


def test_a_class_conditional_model_distils_with_guidance_on_its_null_class(tmp_path):
    teacher = model_dir(tmp_path / "classes", "ddpm", classes=3, pipeline=False)
    source = diffusers_source(teacher, classes=3, null_class=3)
    assert source.classes == 3 and source.uncond.tolist() == [3]
    assert source.draw_cond(64, torch.Generator().manual_seed(0)).max() <= 2
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--classes", "3", "--null-class", "3", "--guidance", "2",
                 "--steps", "2", "--iters", "2", "--batch", "2", "--eval-samples", "6", "--out", str(out),
                 "--no-progress"]) == 0
    assert json.loads((out / "report.json").read_text())["guidance"] == 2.0
    assert len(list((out / "cache").glob("ref-*-heun32.safetensors"))) == 2  # a directory's reference: 32 steps

    # compare finds the teacher the file names; the classes are given as distill took them
    cmp = tmp_path / "cmp"
    assert main(["compare", str(out / "student.safetensors"), "--classes", "3", "--null-class", "3",
                 "--count", "3", "--reference-steps", "4", "--out", str(cmp)]) == 0
    rows = json.loads((cmp / "compare.json").read_text())["rows"]
    assert [r["kind"] for r in rows] == ["teacher", "solver", "student"] and rows[2]["nfe"] == 2


def test_what_cannot_be_a_teacher_is_refused_in_one_line(tmp_path, capsys):
    cases = []
    plain = model_dir(tmp_path / "plain", "ddpm")
    cases.append((["--teacher", str(plain), "--guidance", "3"], "give its null class (--null-class K)"))
    labelled = model_dir(tmp_path / "labelled", "ddpm", classes=3)
    cases.append((["--teacher", str(labelled)], "the model takes class labels (4 embeddings): give --classes N"))
    no_scheduler = model_dir(tmp_path / "nosched", "ddpm", pipeline=False)
    (no_scheduler / "scheduler_config.json").unlink()
    cases.append((["--teacher", str(no_scheduler)], "no scheduler_config.json"))
    pickled = model_dir(tmp_path / "pickled", "ddpm")
    for f in (pickled / "unet").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    cases.append((["--teacher", str(pickled)], "no .safetensors weights (only safetensors are loaded"))
    cases.append((["--teacher", str(tmp_path / "missing")], "is not a directory"))
    cases.append((["--teacher", "nonesuch"], "unknown teacher 'nonesuch'"))
    for flags, message in cases:
        assert main(["distill", *flags, "--iters", "1", "--out", str(tmp_path / "r"), "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (flags, err)


CHARS = string.ascii_lowercase + string.digits + ",.'-"


def clip_tokenizer(root, length: int = 12):
    """A CLIP tokenizer over a character vocabulary, saved in ``root / "tokenizer"``, and its vocabulary size."""
    import transformers

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (root / "src").mkdir(parents=True, exist_ok=True)
    (root / "src" / "vocab.json").write_text(json.dumps(vocab))
    (root / "src" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(root / "src" / "vocab.json"), str(root / "src" / "merges.txt"),
                                           model_max_length=length)
    return tokenizer, len(vocab)


def t5_tokenizer():
    """A T5 tokenizer (SentencePiece unigram pieces: the characters, alone and after a word start) and its
    vocabulary size."""
    import transformers

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in CHARS] + [("\u2581" + c, -2.5) for c in CHARS]
    return transformers.T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=16), len(pieces)


def t5_encoder(umt5: bool = False):
    """A T5 tokenizer (``t5_tokenizer``) and a T5 (or UMT5) encoder of one layer over its vocabulary."""
    import transformers

    tokenizer, vocab = t5_tokenizer()
    config = {"vocab_size": vocab, "d_model": 32, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_heads": 2}
    if umt5:
        return tokenizer, transformers.UMT5EncoderModel(transformers.UMT5Config(**config))
    return tokenizer, transformers.T5EncoderModel(transformers.T5Config(**config))


def byte_vocab(special: list[str]) -> dict[str, int]:
    """A byte-level BPE vocabulary without merges (every byte a token), then the ``special`` tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {piece: i for i, piece in enumerate(bytes_to_unicode().values())}
    vocab.update({token: len(vocab) + i for i, token in enumerate(special)})
    return vocab


def autoencoder(latent_channels: int, blocks: int = 2, **latent):
    """An AutoencoderKL of ``blocks`` blocks (``blocks`` - 1 halvings) on ``latent_channels`` channels, its
    latents scaled by 1.5 (and shifted where ``latent`` says)."""
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,) * blocks,
                                   layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=1.5,
                                   latent_channels=latent_channels, down_block_types=("DownEncoderBlock2D",) * blocks,
                                   up_block_types=("UpDecoderBlock2D",) * blocks, **latent)


def clip_config(vocab: int, positions: int = 12, **extra):
    import transformers

    return transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, max_position_embeddings=positions, bos_token_id=0,
                                       eos_token_id=1, pad_token_id=1, **extra)


def text_pipeline_dir(root):
    """A tiny text-to-image pipeline as diffusers saves one: a UNet2DConditionModel on 4-channel latents, a DDIM
    scheduler, a CLIP tokenizer (a character vocabulary) and text encoder, and an AutoencoderKL."""
    import transformers

    tokenizer, vocab = clip_tokenizer(root)
    tokenizer.save_pretrained(root / "tokenizer")
    encoder = transformers.CLIPTextModel(clip_config(vocab))
    encoder.save_pretrained(root / "text_encoder", safe_serialization=True)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=16, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    randomise(unet, seed=0, scale=0.05)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                            layers_per_block=1, norm_num_groups=4, sample_size=8).save_pretrained(
        root / "vae", safe_serialization=True)
    diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear").save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDIMScheduler"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}))
    return root


def test_a_text_to_image_pipeline_distils_on_its_prompts_with_guidance_on_the_empty_prompt(tmp_path, capsys):
    """Prompts from --prompts, encoded by the pipeline's own CLIP, become the teacher's conditions (the empty
    prompt is CFG's unconditional side); the run writes the full report and a grid decoded by its VAE."""
    teacher = text_pipeline_dir(tmp_path / "sd")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n\n a lighthouse at dusk \nan owl\n")
    source = diffusers_source(teacher, prompts=prompts)  # blank lines and surrounding spaces are dropped
    assert source.classes == 3 and source.uncond.tolist() == [3] and source.shape == (4, 8, 8)
    table = source.denoiser.encoder_hidden_states
    assert table.shape == (4, 12, 16) and not torch.equal(table[0], table[1])
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():  # the condition is the prompt's text embedding
        torch.testing.assert_close(source.denoiser(x, 2.0, torch.tensor([1, 3])),
                                   source.denoiser.inner(x, 2.0, table[[1, 3]]))
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--prompts", str(prompts), "--steps", "2", "--iters", "2",
                 "--batch", "2", "--eval-samples", "6", "--reference-steps", "8",
                 "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["guidance"] == 5.0 and any(r["method"] == "sfd" for r in report["rows"])
    assert (f"to sample it in diffusers: python -m distill_core export-diffusers {out / 'student.safetensors'} "
            f"--out {out / 'diffusers'}") in capsys.readouterr().out
    assert f"prompts: {prompts}" in (out / "config.yaml").read_text()
    assert read_card(out / "student.safetensors")["afs_center"] == "zero"  # no centre per prompt: any prompts
    with safe_open(out / "student.safetensors", "pt") as f:
        assert not any(k.startswith("afs.") for k in f.keys())
    png = (out / "grid.png").read_bytes()  # IHDR: width, height (big-endian), bit depth, colour type
    width, height, colour = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big"), png[25]
    assert (width, height, colour) == (3 * (6 * 9 + 1), 3 * (3 * 9 + 1), 2)  # 6 RGB 8 x 8 images in 3 rows
    cmp, other = tmp_path / "cmp", tmp_path / "other.txt"
    other.write_text("a cat\na dog\na boat\na tree\na house\n")  # prompts the student never saw
    assert main(["compare", str(out / "student.safetensors"), "--prompts", str(other), "--prompt", "a cat",
                 "--out", str(cmp)]) == 1
    assert "give prompts with --prompt or with --prompts FILE, not both" in capsys.readouterr().err
    assert main(["compare", str(out / "student.safetensors"), *(f"--prompt={p}" for p in other.read_text().split(
        "\n") if p), "--count", "5", "--reference-steps", "4", "--out", str(cmp)]) == 0
    assert len(json.loads((cmp / "compare.json").read_text())["rows"]) == 3
    assert (cmp / "compare.png").read_bytes()[25] == 2  # RGB: the rows are decoded by the pipeline's VAE
    drawn = tmp_path / "drawn"  # prompts on the command line, a row each
    assert main(["sample", str(out / "student.safetensors"), "--prompt", "a cat", "--prompt", " a boat ", "--count",
                 "2", "--out", str(drawn)]) == 0
    images = json.loads((drawn / "samples.json").read_text())["images"]
    assert [(i["condition"], i["noise"]) for i in images] == [("a cat", 0), ("a cat", 1), ("a boat", 0), ("a boat", 1)]
    assert all((drawn / i["file"]).read_bytes()[16:26] == bytes([0, 0, 0, 8, 0, 0, 0, 8, 8, 2]) for i in images)
    readme = (Path(__file__).parents[1] / "README.md").read_text()  # the README's Python example, as written
    example = readme.split("**From Python.**")[1].split("```python\n")[1].split("```")[0]
    for placeholder, path in (("path/to/pipeline", teacher), ("runs/pipeline/student.safetensors",
                                                               out / "student.safetensors"), ("prompts.txt", other)):
        example = example.replace(f'"{placeholder}"', repr(str(path)))
    scope = {}
    exec(example, scope)
    images = scope["images"]
    assert images.shape == (2, 3, 8, 8) and images.abs().max() <= 1 and images.std() > 0
    refusals = [(["--classes", "3"], "trains on prompts (--prompts FILE), not --classes"),
                (["--teacher", "builtin", "--prompts", str(prompts)], "--prompts is for text-to-image pipeline"),
                (["--teacher", str(model_dir(tmp_path / "plain", "ddpm")), "--prompts", str(prompts)],
                 "--prompts is for text-to-image pipelines"),
                (["--prompts", str(tmp_path / "none.txt")], "cannot read it")]
    for flags, message in refusals:
        assert main(["distill", "--teacher", str(teacher), *flags, "--out", str(tmp_path / "r"), "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (flags, err)
    index = json.loads((teacher / "model_index.json").read_text())
    (teacher / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    assert main(["distill", "--teacher", str(teacher), "--out", str(tmp_path / "r"), "--no-progress"]) == 1
    assert "a KandinskyPipeline is not a pipeline this command distils" in capsys.readouterr().err


def test_the_command_line_says_which_long_step_begins_unless_told_no_progress(tmp_path, capsys):
    """Loading and running a pipeline's text encoders, loading its network and the report's solves have no progress
    bar: a line on stderr says which begins, with what it loads and how much; --no-progress silences them."""
    teacher = text_pipeline_dir(tmp_path / "sd")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\nan owl\n")
    flags = ["distill", "--teacher", str(teacher), "--prompts", str(prompts), "--steps", "2",
             "--iters", "1", "--batch", "2", "--eval-samples", "4", "--reference-steps", "8", "--out",
             str(tmp_path / "run")]
    capsys.readouterr()
    assert main(flags) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line and "sfd to 2 steps" not in line]
    size = sum(f.stat().st_size for f in (teacher / "text_encoder").glob("*.safetensors")) / 1e6
    assert lines == [
        f"encoding 2 prompts and the negative with StableDiffusionPipeline's text encoders, CLIPTextModel "
        f"({size:.1f} MB), loaded from {teacher}",
        f"loading the UNet2DConditionModel in {teacher / 'unet'} ({weights_size(teacher / 'unet')})",
        "report: the teacher's reference solves (Heun, 8 steps) of 4 evaluation noises, and its samples from as "
        "many other noises",
        "report: the student and the training-free solvers on the same noises"]
    assert main([*flags, "--overwrite", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_a_negative_prompt_is_cfgs_other_side_and_the_students_files_name_it(tmp_path, capsys, monkeypatch):
    """--negative TEXT replaces a pipeline's own negative as CFG's other side, encoded as the pipeline encodes a
    negative prompt; the report and the student file name it, and compare and sample rebuild the teacher with
    it. Teachers without a text negative refuse it in one line: the built-in ones, class-conditional models,
    and Flux, which samples without CFG."""
    import distill_core.sources as sources
    from distill_core.sources import teacher_source

    teacher = text_pipeline_dir(tmp_path / "sd")
    own = diffusers_source(teacher, prompts=["an owl"]).denoiser.encoder_hidden_states
    table = diffusers_source(teacher, prompts=["an owl"], negative="blurry").denoiser.encoder_hidden_states
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(teacher, local_files_only=True)
    with torch.no_grad():
        blurry = pipe.encode_prompt(["blurry"], "cpu", 1, False)[0][0]
    torch.testing.assert_close(table[1], blurry)
    assert torch.equal(table[0], own[0]) and not torch.allclose(table[1], own[1])

    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--prompts", str(tmp_path / "p.txt"), "--negative", "blurry",
                 "--steps", "2", "--iters", "1", "--batch", "2", "--eval-samples", "4", "--reference-steps", "8",
                 "--out", str(out), "--no-progress"]) == 1  # no such prompt file
    (tmp_path / "p.txt").write_text("an owl\n")
    capsys.readouterr()
    assert main(["distill", "--teacher", str(teacher), "--prompts", str(tmp_path / "p.txt"), "--negative", "blurry",
                 "--steps", "2", "--iters", "1", "--batch", "2", "--eval-samples", "4", "--reference-steps", "8",
                 "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "report.json").read_text())["negative"] == "blurry"
    assert read_card(out / "student.safetensors")["negative"] == "blurry"
    built = []
    monkeypatch.setattr(sources, "teacher_source", lambda *a, **k: built.append(k) or teacher_source(*a, **k))
    assert main(["compare", str(out / "student.safetensors"), "--prompt", "a cat", "--count", "1",
                 "--reference-steps", "2", "--out", str(tmp_path / "cmp")]) == 0
    assert main(["sample", str(out / "student.safetensors"), "--prompt", "a cat", "--count", "1",
                 "--out", str(tmp_path / "drawn")]) == 0
    assert [k["negative"] for k in built] == ["blurry", "blurry"]

    refusals = [("builtin", "--negative is for text-to-image pipeline directories"),
                (str(model_dir(tmp_path / "plain", "ddpm")), "--negative is for text-to-image pipelines"),
                (str(multi_encoder_pipeline_dir(tmp_path / "flux", "flux")), "Flux samples without CFG")]
    for name, message in refusals:
        assert main(["distill", "--teacher", name, "--negative", "blurry", "--out", str(tmp_path / "r"),
                     "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (name, err)


def multi_encoder_pipeline_dir(root, kind: str):
    """A tiny SDXL, SD3, Flux, Qwen-Image or Wan pipeline as diffusers saves one, 8 x 8 latents of 16 pixels:
    SDXL (4 channels, its two CLIPs, the image's size as an added condition, Euler); SD3 (16 channels, two CLIPs
    and T5, a shifted (3) FlowMatch scheduler); Flux dev (``flux``: 16 channels, guidance embedded, CLIP and T5,
    Flux's resolution-dependent shift); Flux schnell (``flux-schnell``: as Flux dev without the guidance input,
    unshifted); Flux Kontext (``flux-kontext``: Flux dev's parts in an editing pipeline); Qwen-Image
    (``qwen_image_pipeline_dir``); Wan 2.1 (16-channel video latents, UMT5, a video VAE of
    one halving, FlowMatch shifted by 3); Wan 2.2 TI2V 5B (``wan22-5b``: as Wan 2.1 with 48-channel latents from a
    VAE that also folds 2 x 2 patches into channels, and a time per latent patch in its pipeline). SD3's and Flux's
    VAEs scale and shift their latents."""
    import transformers

    clip, vocab = clip_tokenizer(root)
    t5_tokens, t5 = t5_encoder()
    vae = autoencoder(4) if kind == "sdxl" else autoencoder(16, shift_factor=0.1)
    projected = transformers.CLIPTextModelWithProjection(clip_config(vocab, projection_dim=16))
    if kind == "sdxl":
        network = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            norm_num_groups=4, cross_attention_dim=32, attention_head_dim=8, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
        pipeline = diffusers.StableDiffusionXLPipeline(
            unet=network, scheduler=diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear"), vae=vae,
            text_encoder=transformers.CLIPTextModel(clip_config(vocab)), tokenizer=clip, text_encoder_2=projected,
            tokenizer_2=clip)
    elif kind == "sd3":
        network = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
            pos_embed_max_size=16)
        pipeline = diffusers.StableDiffusion3Pipeline(
            transformer=network, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
            text_encoder=transformers.CLIPTextModelWithProjection(clip_config(vocab, projection_dim=16)),
            tokenizer=clip, text_encoder_2=projected, tokenizer_2=clip, text_encoder_3=t5, tokenizer_3=t5_tokens)
    elif kind == "qwen":
        return qwen_image_pipeline_dir(root)
    elif kind in ("wan", "wan22-5b"):
        channels, ti2v = (48, True) if kind == "wan22-5b" else (16, False)
        network = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                                  in_channels=channels, out_channels=channels, text_dim=32,
                                                  freq_dim=16, ffn_dim=32, num_layers=1)
        patches = {"is_residual": True, "patch_size": 2, "in_channels": 12, "out_channels": 12,
                   "scale_factor_spatial": 4, "latents_mean": [0.1] * 48, "latents_std": [2.0] * 48} if ti2v else {}
        vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=channels, dim_mult=[1, 1], num_res_blocks=1,
                                         temperal_downsample=[False], **patches)
        pipeline = diffusers.WanPipeline(tokenizer=t5_tokens, text_encoder=t5_encoder(umt5=True)[1], vae=vae,
                                         transformer=network, expand_timesteps=ti2v,
                                         scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    else:
        dev = kind in ("flux", "flux-kontext")
        network = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=dev,
            axes_dims_rope=(2, 2, 4))
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
            **({"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15} if dev else {"shift": 1.0}))
        pipeline = (diffusers.FluxKontextPipeline if kind == "flux-kontext" else diffusers.FluxPipeline)(
            transformer=network, scheduler=scheduler, vae=vae, tokenizer=clip, tokenizer_2=t5_tokens,
            text_encoder=transformers.CLIPTextModel(clip_config(vocab)), text_encoder_2=t5)
    randomise(network, seed=0)  # weights large enough that the text conditions move the output well above 1e-4
    pipeline.save_pretrained(root / "pipeline", safe_serialization=True)
    return root / "pipeline"


def qwen_vl_encoder(special: list[str], **ids):
    """A tokenizer and Qwen2.5-VL of one text and one vision layer: a byte-level tokenizer without merges, with
    ``special`` tokens added (the first its end of text, the third its end of turn); ``ids``: the config's ids of
    image placeholder tokens."""
    import transformers

    vocab = byte_vocab(special)
    tokenizer = transformers.Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": special[1:]})
    text = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "bos_token_id": vocab[special[0]],
            "eos_token_id": vocab[special[2]], "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 32,
              "fullatt_block_indexes": [0]}
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                           **{key: vocab[token] for key, token in ids.items()})
    return tokenizer, transformers.Qwen2_5_VLForConditionalGeneration(config)


def qwen_image_pipeline_dir(root):
    """A tiny Qwen-Image pipeline as diffusers saves one, 8 x 8 latents of 16 pixels: a Qwen2.5-VL text encoder of
    one layer with a byte-level tokenizer without merges (its chat template's special tokens added), a transformer
    of one block on 16 channels, a video VAE of one halving, and Qwen-Image's scheduler (the shift of the
    image's token count on an exponential time shift, stretched to a terminal time)."""
    tokenizer, encoder = qwen_vl_encoder(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    network = diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=1,
                                                    attention_head_dim=8, num_attention_heads=2,
                                                    joint_attention_dim=32, axes_dims_rope=(2, 2, 4))
    vae = diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1], num_res_blocks=1,
                                           temperal_downsample=[False])
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192,
        shift_terminal=0.02, time_shift_type="exponential")
    randomise(network, seed=0)
    diffusers.QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tokenizer,
                                transformer=network).save_pretrained(root / "pipeline", safe_serialization=True)
    return root / "pipeline"


#: per pipeline: its guidance (SDXL and SD3: CFG against the pipeline's own negative; Flux dev: its embedded
#: guidance, no CFG), the noise levels its sampler starts from (before a flow scheduler's shift), its shift
PIPELINE_CASES = {"sdxl": (2.0, [10.0, 3.0, 0.8], None), "sd3": (2.0, [0.9, 0.6, 0.3], 3.0),
                  "flux": (3.5, [0.9, 0.6, 0.3], "flux")}


def teacher_steps(source, w: float, x: torch.Tensor, times: torch.Tensor, cond) -> torch.Tensor:
    """Euler with CFG at ``w`` through the teacher of ``source``, from a flow pipeline's latents x at its first time
    along its ``times`` t (as the engine's sigmas t / (1 - t), x as t's VE state x / (1 - t)), for ``cond``: where
    the pipeline's own sampler lands when it samples as the teacher does."""
    from distill_core.solvers import euler
    from distill_core.teacher import CFGTeacher

    with torch.no_grad():
        return euler(CFGTeacher(source.denoiser, w, source.uncond), x / (1 - float(times[0])), times / (1 - times),
                     cond)


def pipeline_euler(teacher, prompt: str, x: torch.Tensor, guidance: float, levels: list[float]):
    """The pipeline's own sampler (Euler, at ``guidance``) from latents x at the first of ``levels``: the latents
    it ends at as [B, C, H, W], the VE sigmas it stepped through (ending at 0) and x in the VE convention."""
    pipe = diffusers.DiffusionPipeline.from_pretrained(teacher, local_files_only=True)
    b, c, h, w = x.shape
    flux = isinstance(pipe, diffusers.FluxPipeline)
    latents = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c) if flux else x
    out = pipe(prompt=prompt, latents=latents, sigmas=levels, num_inference_steps=len(levels), height=2 * h,
               width=2 * w, guidance_scale=guidance, output_type="latent").images
    if flux:
        out = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
    sigmas = pipe.scheduler.sigmas.double()
    if isinstance(pipe.scheduler, diffusers.FlowMatchEulerDiscreteScheduler):  # times t: sigma = t / (1 - t)
        return out, sigmas / (1 - sigmas), x / (1 - float(sigmas[0]))
    return out, sigmas, x * pipe.scheduler.init_noise_sigma


@pytest.mark.parametrize("kind", ["sdxl", "sd3", "flux"])
def test_multi_encoder_pipelines_sample_as_their_own_pipeline_and_distil_end_to_end(tmp_path, capsys, monkeypatch,
                                                                                      kind):
    """An SDXL, SD3 or Flux pipeline directory is a teacher over prompts: Euler through its denoiser (with CFG
    against its unconditional row) on the pipeline's own sigmas reproduces the pipeline's sampler, so the text
    encoders, the negative, SDXL's size condition, the packing of Flux's latents, the time scales and Flux's
    embedded guidance are the pipeline's. The main job distils it with the full report, a flow student on the
    scheduler's shifted grid; Flux dev takes the run's --guidance as its input (no CFG), its student file names
    it, and compare rebuilds the teacher with it."""
    from distill_core.schedules import flux_shift
    from distill_core.solvers import euler
    from distill_core.sources import teacher_source
    from distill_core.teacher import CFGTeacher

    teacher = multi_encoder_pipeline_dir(tmp_path / kind, kind)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\nan owl\n")
    source = diffusers_source(teacher, prompts=prompts)
    guidance, levels, shift = PIPELINE_CASES[kind]
    shift = flux_shift(16) if shift == "flux" else shift  # Flux: 4 x 4 tokens of 2 x 2 latent patches
    assert source.shape == ((4, 8, 8) if kind == "sdxl" else (16, 8, 8))
    assert getattr(source.denoiser, "shift", None) == (None if shift is None else pytest.approx(shift))
    assert (source.guidance, source.card) == ((1.0, {"embedded_guidance": 3.5}) if kind == "flux" else (5.0, {}))
    x = torch.randn(1, *source.shape, generator=torch.Generator().manual_seed(0))
    expected, sigmas, start = pipeline_euler(teacher, "a red fox", x, guidance, levels)
    w = 1.0 if kind == "flux" else guidance
    with torch.no_grad():
        ours = euler(CFGTeacher(source.denoiser, w, source.uncond), start, sigmas, torch.tensor([0]))
    assert expected.abs().max() > 1
    torch.testing.assert_close(ours.double(), expected.double(), atol=1e-4, rtol=1e-4)

    out = tmp_path / "run"
    flags = ["--guidance", "2.5"] if kind == "flux" else []  # Flux dev: its guidance input, and no CFG
    assert main(["distill", "--teacher", str(teacher), "--prompts", str(prompts), "--steps", "2", "--iters", "2",
                 "--batch", "2", "--eval-samples", "4", "--reference-steps", "8",
                 "--out", str(out), "--no-progress", *flags]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["guidance"], report.get("embedded_guidance")) == ((1.0, 2.5) if kind == "flux" else (5.0, None))
    assert any(r["method"] == "sfd" and r["nfe"] == 2 for r in report["rows"])
    card = read_card(out / "student.safetensors")
    if shift is not None:
        assert card["schedule"]["name"] == "flow" and card["schedule"]["shift"] == pytest.approx(shift)
    assert card.get("embedded_guidance") == report.get("embedded_guidance")
    assert (out / "grid.png").read_bytes()[25] == 2  # RGB: decoded by the pipeline's VAE
    if kind == "flux":  # compare rebuilds the teacher at the guidance input its students name
        import distill_core.sources as sources

        built = []
        monkeypatch.setattr(sources, "teacher_source",
                            lambda *a, **k: built.append((a, k)) or teacher_source(*a, **k))
        assert main(["compare", str(out / "student.safetensors"), "--prompts", str(prompts), "--count", "2",
                     "--reference-steps", "4", "--out", str(tmp_path / "cmp")]) == 0
        assert built[0][0][0] == str(teacher)  # at its guidance input, its own size, negative and precision:
        assert built[0][1] == {"guidance": 2.5, "resolution": None, "width": None, "frames": 1, "negative": None,
                               "references": None, "frozen_precision": "as-loaded", "images": None}
    if kind != "sdxl":
        assert main(["distill", "--teacher", str(teacher / "transformer"), "--out", str(tmp_path / "r"),
                     "--no-progress"]) == 1
        assert "takes the text embeddings of its pipeline's encoders" in capsys.readouterr().err

    # SFD-v and LCM condition a DiT through its timestep-and-text embedding, as a UNet through its time embedding
    from distill_core.students import StudentNet

    student = StudentNet(source.denoiser, step_conditioned=True)
    assert student.injection.endswith("time_embedding" if kind == "sdxl" else "transformer.time_text_embed")
    with torch.no_grad():
        torch.nn.init.normal_(student.step_embed.mlp[-1].weight)
        assert not torch.allclose(student(start, 2.0, torch.tensor([0]), nfe=2),
                                  student(start, 2.0, torch.tensor([0]), nfe=5))


def test_flux_schnell_samples_as_its_pipeline_without_guidance_or_shift(tmp_path):
    """Flux schnell has no guidance input and samples unshifted without CFG: its teacher takes no guidance, CFG
    stays 1, the students' grid is the plain flow grid, their files name no embedded guidance, and Euler through
    its denoiser reproduces its pipeline's sampler."""
    from distill_core.solvers import euler
    from distill_core.teacher import CFGTeacher

    teacher = multi_encoder_pipeline_dir(tmp_path / "schnell", "flux-schnell")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\nan owl\n")
    source = diffusers_source(teacher, prompts=prompts, guidance=2.5)
    flow = source.denoiser.inner
    assert (source.guidance, source.card, flow.shift, flow.net.guidance) == (1.0, {}, 1.0, None)
    assert "shift" not in flow.settings()
    x = torch.randn(1, *source.shape, generator=torch.Generator().manual_seed(0))
    expected, sigmas, start = pipeline_euler(teacher, "an owl", x, 0.0, [0.9, 0.6, 0.3])
    with torch.no_grad():
        ours = euler(CFGTeacher(source.denoiser, source.guidance, source.uncond), start, sigmas, torch.tensor([1]))
    assert expected.abs().max() > 1
    torch.testing.assert_close(ours.double(), expected.double(), atol=1e-4, rtol=1e-4)


def test_a_qwen_image_pipeline_samples_as_its_own_pipeline_and_distils_end_to_end(tmp_path):
    """A Qwen-Image pipeline directory is a teacher over prompts: prompts of different lengths share one table,
    padded, with the mask that says where; Euler through its denoiser on the pipeline's own sigmas reproduces
    its sampler (its exponential time shift of the token count, stretched to its terminal time; without CFG,
    which its pipeline rescales and the engine does not), CFG defaults to its pipeline's scale 4 against its
    single-space negative, and the side to its pipeline's 1024 pixels. The main job distils it at
    --resolution with the full report, a student on its shifted flow grid and a grid decoded by its video VAE;
    SFD-v conditions its time embedding."""
    from distill_core.diffusers_source import read_json, sample_shape
    from distill_core.schedules import flux_shift
    from distill_core.students import StudentNet

    teacher = qwen_image_pipeline_dir(tmp_path / "qwen")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\nan owl in the snow at night\n")
    assert sample_shape(read_json(teacher / "transformer" / "config.json"), teacher) == (16, 512, 512)
    source = diffusers_source(teacher, prompts=prompts, resolution=16)
    assert (source.shape, source.guidance) == ((16, 8, 8), 4.0)
    assert source.denoiser.shift == pytest.approx(flux_shift(16, 0.5, 0.9, 256, 8192))
    mask = source.denoiser.encoder_hidden_states_mask
    assert mask.shape[0] == 3 and mask[0].sum() < mask[1].sum() == mask.shape[1]  # the fox padded to the owl

    x = torch.randn(1, *source.shape, generator=torch.Generator().manual_seed(0))
    pipe = diffusers.DiffusionPipeline.from_pretrained(teacher, local_files_only=True)
    latents = pipe(prompt="a red fox", latents=pipe._pack_latents(x, 1, 16, 8, 8), sigmas=[0.9, 0.6, 0.3],
                   num_inference_steps=3, height=16, width=16, true_cfg_scale=1.0, output_type="latent").images
    expected = pipe._unpack_latents(latents, 16, 16, pipe.vae_scale_factor).view(x.shape)
    times = pipe.scheduler.sigmas.double()
    assert float(times[-2]) == pytest.approx(0.02, abs=1e-6)  # stretched to the terminal time (float32)
    ours = teacher_steps(source, 1.0, x, times, torch.tensor([0]))
    assert expected.abs().max() > 1
    torch.testing.assert_close(ours.double(), expected.double(), atol=1e-4, rtol=1e-4)

    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--prompts", str(prompts), "--resolution", "16", "--steps",
                 "2", "--iters", "2", "--batch", "2", "--eval-samples", "4", "--reference-steps", "8",
                 "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["guidance"] == 4.0 and any(r["method"] == "sfd" and r["nfe"] == 2 for r in report["rows"])
    card = read_card(out / "student.safetensors")
    assert card["schedule"]["name"] == "flow" and card["schedule"]["shift"] == pytest.approx(source.denoiser.shift)
    assert card["resolution"] == 16 and (out / "grid.png").read_bytes()[25] == 2  # RGB: decoded by its VAE
    assert StudentNet(source.denoiser, step_conditioned=True).injection.endswith("transformer.time_text_embed")


def test_a_wan_pipeline_is_an_image_teacher_of_one_frame(tmp_path, capsys):
    """A Wan 2.1 pipeline directory is a teacher of images, each a video of one frame: Euler with CFG through its
    denoiser reproduces its pipeline's sampler on one frame; its default image is its pipeline's 480 x 832
    frame, its UniPC scheduler's flow variant is a flow teacher with that scheduler's shift. The main job
    distils it at --resolution with a grid decoded by its video VAE; SFD-v conditions its time embedder; an
    image-conditioned pipeline that this command does not feed (an inpainting one) is refused in one
    line."""
    from distill_core.denoisers.flow import FlowDenoiser
    from distill_core.diffusers_source import denoiser_for, read_json, sample_shape
    from distill_core.students import StudentNet

    teacher = multi_encoder_pipeline_dir(tmp_path / "wan", "wan")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\nan owl\n")
    assert sample_shape(read_json(teacher / "transformer" / "config.json"), teacher) == (16, 240, 416)
    source = diffusers_source(teacher, prompts=prompts, resolution=16)
    assert (source.shape, source.guidance, source.denoiser.shift) == ((16, 8, 8), 5.0, 3.0)

    x = torch.randn(1, *source.shape, generator=torch.Generator().manual_seed(0))
    pipe = diffusers.DiffusionPipeline.from_pretrained(teacher, local_files_only=True)
    set_timesteps = pipe.scheduler.set_timesteps  # its call takes no sigmas: given here, shifted by 3
    pipe.scheduler.set_timesteps = lambda steps, device=None: set_timesteps(sigmas=[0.9, 0.6, 0.3], device=device)
    expected = pipe(prompt="a red fox", latents=x[:, :, None], num_inference_steps=3, height=16, width=16,
                    num_frames=1, guidance_scale=2.0, output_type="latent").frames[:, :, 0]
    times = pipe.scheduler.sigmas.double()
    ours = teacher_steps(source, 2.0, x, times, torch.tensor([0]))
    assert expected.abs().max() > 1
    torch.testing.assert_close(ours.double(), expected.double(), atol=1e-4, rtol=1e-4)
    diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                      flow_shift=5.0).save_pretrained(tmp_path / "unipc")
    unipc = denoiser_for(pipe.transformer, tmp_path / "unipc", (16, 8, 8))
    assert isinstance(unipc, FlowDenoiser) and unipc.shift == 5.0

    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--prompts", str(prompts), "--resolution", "16", "--steps",
                 "2", "--iters", "2", "--batch", "2", "--eval-samples", "4", "--reference-steps", "8",
                 "--out", str(out), "--no-progress"]) == 0
    card = read_card(out / "student.safetensors")
    assert card["schedule"]["name"] == "flow" and card["schedule"]["shift"] == 3.0
    assert (out / "grid.png").read_bytes()[25] == 2  # RGB: decoded by its VAE
    student = StudentNet(source.denoiser, step_conditioned=True)
    assert student.injection.endswith("condition_embedder.time_embedder")
    with torch.no_grad():
        torch.nn.init.normal_(student.step_embed.mlp[-1].weight)
        assert not torch.allclose(student(x, 2.0, torch.tensor([0]), nfe=2), student(x, 2.0, torch.tensor([0]), nfe=5))

    for pipeline in ("FluxKontextInpaintPipeline", "StableDiffusionInpaintPipeline"):
        assert_index_refused(teacher, {"_class_name": pipeline}, f"a {pipeline}'s network takes an image beside the "
                             "noise, which this command does not feed (it feeds FluxKontextPipeline, "
                             "QwenImageEditPipeline, QwenImageEditPlusPipeline, WanImageToVideoPipeline, "
                             "LTXImageToVideoPipeline, HunyuanVideo15ImageToVideoPipeline: --images); distil it in "
                             "ComfyUI", tmp_path, capsys)


@pytest.mark.parametrize("kind, channels, side", [("wan", 16, 8), ("wan22-5b", 48, 4)])
def test_a_wan_pipeline_distils_on_clips_that_its_own_sampler_draws_and_its_student_files_name(tmp_path, kind,
                                                                                              channels, side):
    """--frames: a Wan pipeline's teacher on clips [C, T, H, W] of (frames - 1) // 4 + 1 latent frames, as its
    pipeline counts them: Euler with CFG through its denoiser reproduces its pipeline's sampler on a clip; the
    main job distils it with a grid of frame strips decoded by its video VAE; the student's file names the
    frames, so sample rebuilds the clip teacher and writes each clip whole as an animated WEBP. Wan 2.2 TI2V 5B's
    text-to-video pipeline too: its VAE spans 16 pixels a latent pixel, here 4 (one halving, then 2 x 2 patches
    folded into its 48 channels), and its pipeline gives the network a time per latent patch, all equal without a
    start image, which the denoiser's one time per sample reproduces."""
    from PIL import Image


    teacher = multi_encoder_pipeline_dir(tmp_path / kind, kind)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\nan owl\n")
    source = diffusers_source(teacher, prompts=prompts, resolution=16, frames=5)
    assert source.shape == (channels, 2, side, side) and source.card["frames"] == 5
    one_frame = diffusers_source(teacher, prompts=prompts, resolution=16, frames=4)
    assert one_frame.shape == (channels, side, side)  # one latent frame: an image
    with pytest.raises(ValueError, match=f"multiples of {16 // side * 2} pixels"):  # the VAE's span times the patch
        diffusers_source(teacher, prompts=prompts, resolution=side * 2 + 2, frames=5)

    x = torch.randn(1, *source.shape, generator=torch.Generator().manual_seed(0))
    pipe = diffusers.DiffusionPipeline.from_pretrained(teacher, local_files_only=True)
    assert pipe.config.expand_timesteps == (kind == "wan22-5b")
    set_timesteps = pipe.scheduler.set_timesteps
    pipe.scheduler.set_timesteps = lambda steps, device=None: set_timesteps(sigmas=[0.9, 0.6, 0.3], device=device)
    expected = pipe(prompt="a red fox", latents=x, num_inference_steps=3, height=16, width=16, num_frames=5,
                    guidance_scale=2.0, output_type="latent").frames
    times = pipe.scheduler.sigmas.double()
    ours = teacher_steps(source, 2.0, x, times, torch.tensor([0]))
    assert expected.shape == x.shape and expected.abs().max() > 1
    torch.testing.assert_close(ours.double(), expected.double(), atol=1e-4, rtol=1e-4)
    frames = source.decode(ours)  # the clip's frames, 16 x 16 pixels each
    assert frames.shape[:2] == (1, 3) and frames.shape[2] >= 2 and frames.shape[3:] == (16, 16)
    strip = as_images(frames)  # side by side: 16 pixels high, a multiple of 16 wide
    assert strip.shape[:3] == (1, 3, 16) and strip.shape[3] >= 32 and strip.shape[3] % 16 == 0

    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--prompts", str(prompts), "--resolution", "16", "--frames",
                 "5", "--steps", "2", "--iters", "2", "--batch", "2", "--eval-samples", "4", "--reference-steps",
                 "8", "--out", str(out), "--no-progress"]) == 0
    assert read_card(out / "student.safetensors")["frames"] == 5
    assert (out / "grid.png").read_bytes()[25] == 2  # RGB: decoded by its VAE
    assert main(["sample", str(out / "student.safetensors"), "--prompt", "an owl", "--count", "2",
                 "--out", str(tmp_path / "owl")]) == 0
    drawn = json.loads((tmp_path / "owl" / "samples.json").read_text())["images"]
    with Image.open(tmp_path / "owl" / drawn[1]["clip"]) as clip:  # every frame of the clip, animated
        assert clip.format == "WEBP" and clip.n_frames == frames.shape[2] and clip.size == (16, 16)


def test_an_image_pipeline_refuses_frames(tmp_path, capsys):
    image_model = multi_encoder_pipeline_dir(tmp_path / "sd3", "sd3")
    assert main(["distill", "--teacher", str(image_model), "--frames", "5", "--out", str(tmp_path / "no")]) != 0
    assert "--frames is for video pipelines (Wan, LTX-Video); its SD3Transformer2DModel draws still images" in \
        capsys.readouterr().err


def test_a_wan_teacher_cast_for_a_bf16_run_keeps_what_diffusers_keeps_in_float32(tmp_path):
    """Cast to bf16 (frozen_precision bf16), a Wan teacher keeps in float32 what diffusers keeps so in every
    precision (its time embedder, modulation tables and norms) and holds its other weights in bf16, in which it
    computes; it denoises within bf16 rounding of its float32 self."""
    from distill_core.builtin import cast_weights

    source = diffusers_source(multi_encoder_pipeline_dir(tmp_path / "wan", "wan"), prompts=["a red fox"],
                              resolution=16)
    x = 2 * torch.randn(1, *source.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = source.denoiser(x, 2.0, torch.tensor([0]))
    cast_weights(source.denoiser, torch.bfloat16)
    dtypes = {name: p.dtype for name, p in source.denoiser.named_parameters()}
    kept = {d for n, d in dtypes.items() if any(k in n for k in ("time_embedder", "scale_shift_table", "norm2"))}
    assert kept == {torch.float32} and {d for n, d in dtypes.items() if "patch_embedding" in n} == {torch.bfloat16}
    with torch.no_grad():
        half = source.denoiser(x, 2.0, torch.tensor([0]))
    rms = (half - full).pow(2).mean().sqrt() / full.pow(2).mean().sqrt()
    assert half.dtype == torch.float32 and rms < 0.2  # measured 0.153 on this random network, as cast wholly to bf16


def assert_index_refused(teacher, changes: dict, message: str, tmp_path, capsys) -> None:
    """The pipeline ``teacher`` with ``changes`` in its model_index.json is refused by distill in one line."""
    index = json.loads((teacher / "model_index.json").read_text())
    (teacher / "model_index.json").write_text(json.dumps({**index, **changes}))
    assert main(["distill", "--teacher", str(teacher), "--out", str(tmp_path / "refused"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_wan_22s_two_experts_are_one_teacher_that_switches_at_their_boundary(tmp_path, capsys):
    """A Wan 2.2 A14B pipeline (a high-noise expert, ``transformer``, and a low-noise one, ``transformer_2``,
    switched at boundary_ratio T) is one teacher: Euler with CFG through it reproduces its pipeline's sampler,
    which takes both experts here (times 964 above the boundary 900, 818 and 562 below), sample by sample;
    the main job distils it into a LoRA student of both experts, and a step-conditioned student, whose one
    input would reach only one expert, is refused in one line."""
    from distill_core.solvers import euler
    from distill_core.teacher import CFGTeacher

    root = multi_encoder_pipeline_dir(tmp_path / "wan", "wan")
    pipe = diffusers.DiffusionPipeline.from_pretrained(root, local_files_only=True)
    low = randomise(diffusers.WanTransformer3DModel.from_config(pipe.transformer.config), seed=1)
    diffusers.WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                          scheduler=pipe.scheduler, transformer=pipe.transformer, transformer_2=low,
                          boundary_ratio=0.9).save_pretrained(tmp_path / "a14b", safe_serialization=True)
    teacher = tmp_path / "a14b"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\nan owl\n")
    source = diffusers_source(teacher, prompts=prompts, resolution=16)
    experts = source.denoiser.inner.net.transformer
    assert type(experts).__name__ == "WanExperts" and experts.boundary == pytest.approx(900)

    x = torch.randn(2, *source.shape, generator=torch.Generator().manual_seed(0))
    pipe = diffusers.DiffusionPipeline.from_pretrained(teacher, local_files_only=True)
    set_timesteps = pipe.scheduler.set_timesteps
    pipe.scheduler.set_timesteps = lambda steps, device=None: set_timesteps(sigmas=[0.9, 0.6, 0.3], device=device)
    expected = pipe(prompt="a red fox", latents=x[:, :, None], num_inference_steps=3, height=16, width=16,
                    num_frames=1, guidance_scale=2.0, output_type="latent").frames[:, :, 0]
    times = pipe.scheduler.sigmas.double()
    assert (times[:3] * 1000 >= 900).tolist() == [True, False, False]
    with torch.no_grad():
        ours = euler(CFGTeacher(source.denoiser, 2.0, source.uncond), x / (1 - float(times[0])), times / (1 - times),
                     torch.tensor([0, 0]))
        one = diffusers_source(tmp_path / "wan" / "pipeline", prompts=prompts, resolution=16)
        high_only = euler(CFGTeacher(one.denoiser, 2.0, one.uncond), x / (1 - float(times[0])), times / (1 - times),
                          torch.tensor([0, 0]))
    torch.testing.assert_close(ours.double(), expected.double(), atol=1e-4, rtol=1e-4)
    assert (ours - high_only).abs().max() > 0.1  # the low-noise expert took the last two steps

    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--prompts", str(prompts), "--resolution", "16", "--student",
                 "lora", "--steps", "2", "--iters", "2", "--batch", "2", "--eval-samples", "4",
                 "--reference-steps", "8", "--out", str(out), "--no-progress"]) == 0
    with safe_open(out / "student.safetensors", "pt") as f:
        layers = {k.split(".lora_down")[0] for k in f.keys() if ".lora_down" in k}
    assert any(".high." in k for k in layers) and any(".low." in k for k in layers)
    assert main(["distill", "--teacher", str(teacher), "--prompts", str(prompts), "--resolution", "16", "--method",
                 "sfd-v", "--out", str(tmp_path / "v"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "networks with their own time embeddings (experts)" in err and "Traceback" not in err
    assert_index_refused(teacher, {"boundary_ratio": None}, "names a transformer_2 but no boundary_ratio", tmp_path,
                         capsys)


@pytest.mark.parametrize("time_shift", ["exponential", "linear"])
def test_the_students_shift_is_the_time_shift_of_the_schedulers_token_count(time_shift):
    """A scheduler with dynamic shifting moves each time t to s t / (1 + (s - 1) t), s = e^mu (exponential, as
    Flux and Qwen-Image) or s = mu (linear), mu from the image's token count: the denoiser's shift is that s."""
    import math

    from distill_core.denoisers.diffusers_flow import flow_denoiser
    from distill_core.schedules import flux_shift

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type=time_shift)
    scheduler.set_timesteps(sigmas=[0.9, 0.5, 0.2], mu=math.log(flux_shift(16)))  # 8 x 8 latents: 16 tokens
    s = flow_denoiser(torch.nn.Identity(), dict(scheduler.config), (16, 8, 8)).shift
    t = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    torch.testing.assert_close(scheduler.sigmas[:3].double(), s * t / (1 + (s - 1) * t), atol=1e-6, rtol=0)


def test_a_pipeline_distils_at_another_resolution_that_its_students_name(tmp_path, capsys):
    """--resolution sets the side of a directory teacher's images (its latent: the side over the VAE's scale;
    Flux's shift follows the token count), --width their width where it differs; a side its network cannot take is
    refused with the nearest that fit, a width without a height in one line; the student file names the size and
    compare rebuilds the teacher at it."""
    from distill_core.schedules import flux_shift
    from distill_core.sources import as_trained, teacher_source

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\nan owl\n")
    flux = multi_encoder_pipeline_dir(tmp_path / "flux", "flux")
    source = diffusers_source(flux, prompts=prompts, resolution=32)
    assert source.shape == (16, 16, 16) and source.denoiser.shift == pytest.approx(flux_shift(64))
    assert source.card == {"embedded_guidance": 3.5, "resolution": 32}
    wide = diffusers_source(flux, prompts=prompts, resolution=32, width=48)
    assert wide.shape == (16, 16, 24) and wide.denoiser.shift == pytest.approx(flux_shift(96))
    assert wide.card == {"embedded_guidance": 3.5, "resolution": 32, "width": 48}

    sd3 = multi_encoder_pipeline_dir(tmp_path / "sd3", "sd3")
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(sd3), "--prompts", str(prompts), "--resolution", "24", "--width", "32",
                 "--steps", "2", "--iters", "1", "--batch", "2", "--eval-samples", "4", "--reference-steps", "8",
                 "--out", str(out), "--no-progress"]) == 0
    card = read_card(out / "student.safetensors")
    assert (card["resolution"], card["width"]) == (24, 32)
    cmp = tmp_path / "cmp"
    assert main(["compare", str(out / "student.safetensors"), "--prompts", str(prompts), "--count", "1",
                 "--reference-steps", "2", "--out", str(cmp)]) == 0
    png = (cmp / "compare.png").read_bytes()
    assert int.from_bytes(png[20:24], "big") > 3 * 24  # three rows of 24-pixel images (and their labels)
    assert teacher_source(str(sd3), encode=False, **as_trained(card)).shape[-2:] == (12, 16)  # as compare builds it
    for flags, message in [(["--teacher", str(sd3), "--prompts", str(prompts), "--resolution", "26"],
                            "--resolution 26: this model takes sides in multiples of 4 pixels; give 24 or 28"),
                           (["--teacher", str(sd3), "--prompts", str(prompts), "--resolution", "24", "--width", "30"],
                            "--width 30: this model takes sides in multiples of 4 pixels; give 28 or 32"),
                           (["--teacher", str(sd3), "--prompts", str(prompts), "--width", "32"],
                            "--width 32 sets the images' width beside their height: give the height with "
                            "--resolution"),
                           (["--width", "64"], "--resolution and --width are for teachers from directories")]:
        assert main(["distill", *flags, "--out", str(tmp_path / "r"), "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_text_encoders_load_in_the_precision_their_files_hold(tmp_path):
    """A text encoder saved in bf16 (as SD3's and Flux's T5 ship) encodes in bf16, half of float32's memory:
    its tables are the float32 encoder's up to bf16 rounding, and not equal to them. They are held in bf16, half
    the bytes, and the teacher reads them as the float32 numbers they are (a table with a value bf16 does not
    hold stays float32)."""
    import transformers

    from distill_core.text_pipeline import encode_prompts, exact_narrowing, stored_dtypes

    teacher = text_pipeline_dir(tmp_path / "sd")
    index = json.loads((teacher / "model_index.json").read_text())
    full = encode_prompts(teacher, index, ["a red fox"], (4, 8, 8))["encoder_hidden_states"]
    assert stored_dtypes(teacher) == {"text_encoder": torch.float32} and full.dtype == torch.float32
    encoder = transformers.CLIPTextModel.from_pretrained(teacher / "text_encoder")
    encoder.to(torch.bfloat16).save_pretrained(teacher / "text_encoder", safe_serialization=True)
    assert stored_dtypes(teacher) == {"text_encoder": torch.bfloat16}
    half = encode_prompts(teacher, index, ["a red fox"], (4, 8, 8))["encoder_hidden_states"]
    assert half.dtype == torch.bfloat16 and not torch.equal(half.float(), full)
    torch.testing.assert_close(half.float(), full, atol=0.1, rtol=0.05)
    assert exact_narrowing(full, {torch.bfloat16}) is full  # float32 values bf16 cannot hold

    source = diffusers_source(teacher, prompts=["a red fox", "an owl"])
    table = source.denoiser.encoder_hidden_states
    assert table.dtype == torch.bfloat16
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(source.denoiser(x, 2.0, torch.tensor([0, 2])),
                                   source.denoiser.inner(x, 2.0, {"encoder_hidden_states": table[[0, 2]].float()}),
                                   atol=0, rtol=0)


@pytest.mark.parametrize("free_mib, expected", [(64, "enable_model_cpu_offload"),
                                                (4, "enable_sequential_cpu_offload")])
def test_an_encoder_larger_than_the_gpus_free_memory_runs_layer_by_layer(monkeypatch, free_mib, expected):
    """On a GPU, a pipeline's models run there one whole model at a time, unless the largest one's weights pass
    the share of the free memory a whole model may take: then layer by layer (Flux.2 dev's 48 GB Mistral on a
    24 GB card)."""
    from distill_core.text_pipeline import WHOLE_MODEL_SHARE, encoding_device, offload

    called = []

    class Pipe:  # a pipeline of one 2-million-parameter encoder in float32, 8 MiB, and a tokenizer
        components = {"text_encoder": torch.nn.Linear(1024, 2048, bias=False), "tokenizer": object()}

        def enable_model_cpu_offload(self, device):
            called.append(("enable_model_cpu_offload", device))

        def enable_sequential_cpu_offload(self, device):
            called.append(("enable_sequential_cpu_offload", device))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free_mib * 2**20, 80 * 2**30))
    assert encoding_device(Pipe()) == torch.device("cuda", 0)
    assert called == [(expected, torch.device("cuda", 0))]
    weights = 8 * 2**20
    assert offload(weights, int(weights / WHOLE_MODEL_SHARE) + 1) == "model"
    assert offload(weights, int(weights / WHOLE_MODEL_SHARE) - 1) == "sequential"


def test_a_runs_encoded_prompts_are_read_back_until_its_prompts_or_encoders_change(tmp_path, monkeypatch, capsys):
    """A pipeline's prompt tables are kept in the run's cache/ and read back by a later start of the run (its
    resumption) without loading the text encoders, the same tensors; other prompts, another negative or a changed
    text encoder file are encoded again. The main job keeps them in its cache/ and its resumption says it reads
    them."""
    import os

    import distill_core.text_pipeline as text_pipeline

    teacher, cache = text_pipeline_dir(tmp_path / "sd"), tmp_path / "cache"
    encoded = []
    encode = text_pipeline.encode_prompts
    monkeypatch.setattr(text_pipeline, "encode_prompts", lambda *a, **k: encoded.append(a[2]) or encode(*a, **k))

    def tables(prompts, negative=None):
        source = diffusers_source(teacher, prompts=prompts, negative=negative, encodings=cache)
        return source.denoiser.encoder_hidden_states

    first = tables(["a red fox", "an owl"])
    again = tables(["a red fox", "an owl"])
    assert encoded == [["a red fox", "an owl"]] and torch.equal(first, again)
    assert [p.name.split("_")[1] for p in cache.iterdir()] == ["prompts"]
    tables(["a red fox", "a cat"])
    tables(["a red fox", "an owl"], negative="blurry")
    weights = next((teacher / "text_encoder").glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert torch.equal(tables(["a red fox", "an owl"]), first)  # the same weights, encoded again
    assert len(encoded) == 4 and len(list(cache.iterdir())) == 4

    out, prompts = tmp_path / "run", tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n")
    flags = ["distill", "--teacher", str(teacher), "--prompts", str(prompts), "--steps", "2", "--iters", "1",
             "--batch", "2", "--eval-samples", "4", "--reference-steps", "4", "--out", str(out)]
    assert main([*flags, "--no-progress"]) == 0 and len(list((out / "cache").glob("encoded_prompts_*"))) == 1
    capsys.readouterr()
    assert main([*flags, "--resume"]) == 0
    assert f"reading the encoded prompts from {out / 'cache'}" in capsys.readouterr().err

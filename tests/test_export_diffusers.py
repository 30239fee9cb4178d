"""Students of diffusers text-to-image pipeline directories exported for diffusers: the pipeline, with the exported
LoRA or network and scheduler, draws what the engine's student draws from the same noise; what it cannot
reproduce is refused in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import diffusers
import pytest
import torch
from conftest import hooks, randomise

from distill_core.cli import main
from distill_core.config import DistillConfig
from distill_core.diffusers_source import diffusers_source
from distill_core.export_diffusers import (
    EXPERT_ADAPTER,
    LORA_FILE,
    PIPELINES,
    export,
    exportable,
    pipeline_start,
    refusal,
    usage,
)
from distill_core.sampling import few_step, renoise_noise, sample
from distill_core.student_files import load_student
from distill_core.train.run import train_student
from tests.test_dit_pipelines import KINDS as DIT_KINDS
from tests.test_dit_pipelines import LATENT, PIPELINE_CALL, dit_pipeline_dir, flux2_latents, stock_pipeline
from tests.test_teacher_from_dir import multi_encoder_pipeline_dir, text_pipeline_dir


def pipeline_latents(teacher, out, settings: dict, z: torch.Tensor, student: bool = True,
                     switch: bool = True, prompt: str = "an owl", components: dict | None = None) -> torch.Tensor:
    """The pipeline's latents [1, C, H, W] for ``prompt`` from standard normal ``z``, with the exported
    student loaded (``student``) or the teacher's own network, on the exported scheduler and sigmas, its
    ``components`` given rather than loaded. A student of experts: each a named adapter, the next step's made active
    at each step's end (``switch``; else the first expert samples every step)."""
    pipe = stock_pipeline(teacher, **(components or {}))
    network = "unet" if hasattr(pipe, "unet") else "transformer"
    scheduler = diffusers.EulerDiscreteScheduler if network == "unet" else diffusers.FlowMatchEulerDiscreteScheduler
    pipe.scheduler = scheduler.from_pretrained(out, subfolder="scheduler")
    experts, step_end = settings.get("experts", []), {}
    if student and experts:
        adapters = [EXPERT_ADAPTER.format(k) for k in range(len(experts))]
        for name, adapter in zip(experts, adapters):
            pipe.load_lora_weights(out, weight_name=name, adapter_name=adapter)
        pipe.set_adapters(adapters[0])
        if switch:
            step_end["callback_on_step_end"] = lambda pipe, step, t, tensors: (
                pipe.set_adapters(adapters[min(step + 1, len(adapters) - 1)]), tensors)[1]
    elif student and settings["student"] == "lora" and PIPELINES[settings["pipeline"]].network_lora:
        pipe.transformer.load_lora_adapter(str(out), weight_name=LORA_FILE)
    elif student and settings["student"] == "lora":
        pipe.load_lora_weights(out)
    elif student:
        setattr(pipe, network, type(getattr(pipe, network)).from_pretrained(out, subfolder=network))
    b, c, h, w = z.shape
    target = PIPELINES[settings["pipeline"]]
    latents = settings["noise_scale"] * z
    latents = pipe._pack_latents(latents, b, c, h, w) if target.packed else latents
    call = {"prompt": prompt, "latents": latents, "sigmas": settings["sigmas"], "height": settings["height"],
            "width": settings["width"], target.guidance_keyword: settings["guidance_scale"], **settings["call"],
            **step_end}
    if target.takes_negative:
        call["negative_prompt"] = settings.get("negative_prompt")
    if settings["pipeline"].startswith("Flux2"):
        return flux2_latents(pipe, z.shape, **call)
    images = pipe(**call, output_type="latent").images
    if not target.packed:
        return images
    return pipe._unpack_latents(images, settings["height"], settings["width"], pipe.vae_scale_factor).view(b, c, h, w)


def pipeline_dir(root, pipeline: str):
    if pipeline in DIT_KINDS:
        return dit_pipeline_dir(root, pipeline)
    return text_pipeline_dir(root) if pipeline == "sd" else multi_encoder_pipeline_dir(root, pipeline)


#: the guidance scale each pipeline is exported with for a student without CFG and for one with CFG at the
#: pipeline's default w: Flux dev and Flux.2 dev their guidance input; Lumina 2 w = 4; SANA and LongCat-Image 4.5;
#: Z-Image g = w - 1 (0: no CFG, w = 6: 5)
EXPORTED_SCALE = {"flux": (3.5, 3.5), "flux2-dev": (4.0, 4.0), "lumina2": (1.0, 4.0), "sana": (1.0, 4.5),
                  "zimage": (0.0, 5.0), "longcat": (1.0, 4.5)}


@pytest.mark.parametrize("pipeline, kind", [("sd", "lora"), ("sd", "full"), ("sdxl", "lora"), ("sd3", "lora"),
                                            ("flux", "lora"), ("flux", "full"), ("qwen", "lora"), ("sd3", "lora-cfg"),
                                            ("auraflow", "lora"), ("chroma", "lora"), ("lumina2", "lora-cfg"),
                                            ("zimage", "lora"), ("zimage", "lora-cfg"), ("flux2-klein", "lora"),
                                            ("flux2-dev", "lora"), ("sana", "lora-cfg"), ("cogview4", "lora-cfg"),
                                            ("ovis", "lora-cfg"), ("longcat", "lora-cfg")])
def test_the_pipeline_with_the_exported_student_draws_the_students_images(tmp_path, monkeypatch, pipeline, kind):
    """The stock pipeline with the exported files takes the engine's Euler steps through the student: the same
    latents from the same noise (a flow pipeline's last step ends at 0, the student's at sigma_min); a student
    that samples with CFG (``lora-cfg``), at its w against the negative prompt it was distilled with."""
    teacher = pipeline_dir(tmp_path / pipeline, pipeline)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\nan owl\n")
    with_cfg = kind == "lora-cfg"
    _, pixels, grid = LATENT.get(pipeline, (16, 2, 8))
    side = 16 if pipeline == "qwen" else grid * pixels if pipeline in DIT_KINDS else None
    source = diffusers_source(teacher, prompts=prompts, resolution=side, negative="blurry" if with_cfg else None)
    cfg = DistillConfig(steps=2, iters=1, batch=2, lr=1e-2, seed=1, out=str(tmp_path / "run"), checkpoint_every=0,
                        student=kind.removesuffix("-cfg"), lora_rank=4, lora_alpha=2,  # one large step, at a
                        guidance_mode="cfg" if with_cfg else "distilled")  # LoRA scale alpha / r of 1/2
    path = train_student(cfg, source, progress=False).path
    out = tmp_path / "export"
    settings = export(path, out)
    assert json.loads((out / "sampling.json").read_text()) == settings
    network = "unet" if pipeline in ("sd", "sdxl") else "transformer"
    assert (out / LORA_FILE).is_file() == (kind != "full") and (out / network).is_dir() == (kind == "full")
    assert settings["guidance_scale"] == EXPORTED_SCALE.get(pipeline, (1.0, 5.0))[with_cfg]
    call = {key: value for key, value in settings["call"].items() if key != "timesteps"}  # CogView4's: its
    assert call == PIPELINE_CALL.get(pipeline, {})  # network's time before the shift, at each sigma
    assert ("timesteps" in settings["call"]) == (pipeline == "cogview4")
    assert settings["steps"] == 2 and settings.get("negative_prompt") == ("blurry" if with_cfg else None)
    student = load_student(path, source.denoiser, source.uncond)
    z = torch.randn(1, *source.shape, generator=torch.Generator().manual_seed(0))
    sigmas = student.sigmas()
    flow = pipeline in ("sd3", "flux", "qwen", *DIT_KINDS)
    if flow:  # the pipeline's times end at 0
        sigmas = torch.cat([sigmas[:-1], torch.zeros(1)])
    with torch.no_grad():
        ours = few_step(student.denoiser(), sigmas[0] * z, sigmas, torch.tensor([1]), afs=True)  # prompt 1: an owl
    theirs = pipeline_latents(teacher, out, settings, z)
    scale = float(ours.abs().max())  # float32 rounding, relative to the latents' size
    torch.testing.assert_close(theirs / scale, ours / scale, atol=2e-5, rtol=0)  # at sigma = 0 x_t is x
    if flow:  # within the student's last sigma_min of noise of its own images
        assert (theirs - sample(student, student.sigmas()[0] * z, torch.tensor([1]))).abs().max() < 0.01 * scale
    teachers = pipeline_latents(teacher, out, settings, z, student=False)
    assert (teachers - ours).abs().max() > 50 * 1e-4  # the student's own images, not the teacher's
    if kind == "lora":  # the printed lines run as written (Flux.2 dev's processor without its image part, which
        # needs torchvision)
        monkeypatch.setattr(diffusers.Flux2Pipeline, "from_pretrained",
                            classmethod(lambda cls, root, **parts: stock_pipeline(Path(root), **parts)))
        scope = {}
        exec(usage(settings, out).replace("'a prompt'", "'an owl', output_type='latent'"), scope)
        assert scope["image"].numel() == math.prod(source.shape)  # one image's latents (Flux's packed)


def test_a_lora_exports_from_a_16_bit_pipeline_without_a_float32_copy_of_its_network(tmp_path, monkeypatch):
    """The export loads a LoRA student's teacher only to check that the student is its own: a network whose files
    hold fp16 loads in fp16 (its fingerprint is the float32 load's), without its text encoders, and the adapters
    hook into that network rather than into a second copy of it."""
    import diffusers

    import distill_core.diffusers_source as ds

    teacher = pipeline_dir(tmp_path / "sd", "sd")
    diffusers.UNet2DConditionModel.from_pretrained(teacher / "unet").half().save_pretrained(teacher / "unet",
                                                                                             safe_serialization=True)
    source = diffusers_source(teacher, prompts=["a red fox"])  # the run's teacher, loaded in float32
    cfg = DistillConfig(steps=2, iters=1, batch=2, seed=1, out=str(tmp_path / "run"), checkpoint_every=0,
                        student="lora", lora_rank=4)
    path = train_student(cfg, source, progress=False).path
    loaded, load = [], ds.load_model
    monkeypatch.setattr(ds, "load_model", lambda *a: loaded.append(load(*a)) or loaded[-1])

    def no_encoders(*args, **kwargs):
        raise AssertionError("the export loaded the text encoders")

    import distill_core.text_pipeline

    monkeypatch.setattr(distill_core.text_pipeline, "encode_prompts", no_encoders)  # the network alone
    export(path, tmp_path / "export")
    assert {p.dtype for p in loaded[-1].parameters()} == {torch.float16}
    assert hooks(loaded[-1]) > 0  # the student's adapters: no copy
    network_only = diffusers_source(teacher, encode=False)
    with pytest.raises(ValueError, match="loaded without its prompts"):
        network_only.denoiser(torch.zeros(1, *network_only.shape), 1.0, torch.tensor([0]))
    assert (tmp_path / "export" / LORA_FILE).is_file()


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


@pytest.mark.parametrize("pipeline", ["sd3", "flux"])
def test_a_flow_pipeline_re_noises_as_a_dmd2_student_does(tmp_path, monkeypatch, pipeline):
    """A DMD2 student (re-noising between its steps) of a flow pipeline exports with its scheduler told to
    re-noise: given the engine's fresh noise draws, the pipeline draws the engine's image exactly (packed
    latents for Flux). A UNet pipeline's student of the same method is refused in one line."""
    teacher = pipeline_dir(tmp_path / pipeline, pipeline)
    source = diffusers_source(teacher, prompts=["a red fox", "an owl"])
    cfg = DistillConfig(method="dmd2", steps=2, iters=1, batch=2, lr=1e-2, seed=1, out=str(tmp_path / "run"),
                        checkpoint_every=0, student="lora", lora_rank=4, lora_alpha=2)
    path = train_student(cfg, source, progress=False).path
    settings = export(path, tmp_path / "export")
    scheduler = json.loads((tmp_path / "export" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["stochastic_sampling"] and settings["guidance_scale"] == (3.5 if pipeline == "flux" else 1.0)
    student = load_student(path, source.denoiser, source.uncond)
    z = torch.randn(1, *source.shape, generator=torch.Generator().manual_seed(0))
    start = student.sigmas()[0] * z
    with torch.no_grad():
        ours = sample(student, start, torch.tensor([1]))  # prompt 1: an owl
    fresh, draws = engine_draws(start, 2, PIPELINE_LAYOUT[pipeline]), scheduler_draws(monkeypatch)
    draws[:] = fresh
    theirs = pipeline_latents(teacher, tmp_path / "export", settings, z)
    assert not draws  # one draw a step, the last multiplied by t = 0
    scale = float(ours.abs().max())
    torch.testing.assert_close(theirs / scale, ours / scale, atol=2e-5, rtol=0)
    draws[:] = fresh
    teachers = pipeline_latents(teacher, tmp_path / "export", settings, z, student=False)
    assert (teachers - ours).abs().max() > 50 * 1e-4  # the student's own images, not the teacher's

    sd = pipeline_dir(tmp_path / "sd", "sd")
    path = train_student(DistillConfig(**{**cfg.to_dict(), "out": str(tmp_path / "sd-run")}),
                         diffusers_source(sd, prompts=["an owl"]), progress=False).path
    assert not exportable(path)
    with pytest.raises(ValueError, match="re-noises between its steps, which only a flow-matching pipeline's"):
        export(path, tmp_path / "sd-export")


def test_a_phased_dmd_student_exports_a_lora_per_expert_that_the_pipeline_switches_at_each_step(tmp_path,
                                                                                              monkeypatch):
    """Phased DMD's LoRA experts, one a step, export as named adapters: with a step-end callback that makes the
    next step's expert active, the flow pipeline re-noising on the engine's draws draws the engine's image; the
    first expert alone does not. The printed lines run as written. Full-weight experts are refused."""
    teacher = pipeline_dir(tmp_path / "sd3", "sd3")
    source = diffusers_source(teacher, prompts=["a red fox", "an owl"])
    cfg = DistillConfig(method="phased-dmd", steps=2, iters=2, batch=2, lr=1e-2, seed=1, out=str(tmp_path / "run"),
                        checkpoint_every=0, student="lora", lora_rank=4, lora_alpha=2)
    path = train_student(cfg, source, progress=False).path
    out = tmp_path / "export"
    settings = export(path, out)
    assert settings["experts"] == ["expert_0.safetensors", "expert_1.safetensors"] and not (out / LORA_FILE).exists()
    student = load_student(path, source.denoiser, source.uncond)
    z = torch.randn(1, *source.shape, generator=torch.Generator().manual_seed(0))
    start = student.sigmas()[0] * z
    with torch.no_grad():
        ours = sample(student, start, torch.tensor([1]))
    fresh, draws = engine_draws(start, 2, PIPELINE_LAYOUT["sd3"]), scheduler_draws(monkeypatch)
    draws[:] = fresh
    theirs = pipeline_latents(teacher, out, settings, z)
    scale = float(ours.abs().max())
    torch.testing.assert_close(theirs / scale, ours / scale, atol=2e-5, rtol=0)
    draws[:] = fresh
    first_only = pipeline_latents(teacher, out, settings, z, switch=False)
    assert (first_only - ours).abs().max() > 50 * 2e-5 * scale  # the second step is the second expert's
    draws[:] = fresh
    scope = {}
    exec(usage(settings, out).replace("'a prompt'", "'an owl', output_type='latent'"), scope)
    assert scope["image"].numel() == math.prod(source.shape)

    full = DistillConfig(**{**cfg.to_dict(), "student": "full", "out": str(tmp_path / "full")})
    with pytest.raises(ValueError, match="experts are full networks"):
        export(train_student(full, source, progress=False).path, tmp_path / "full-export")


#: a noise draw [B, C, H, W] in a pipeline's latent layout (Flux: its packed 2 x 2 patches)
PIPELINE_LAYOUT = {"sd3": lambda n, *shape: n,
                   "flux": lambda n, *shape: diffusers.FluxPipeline._pack_latents(n, *shape)}


def engine_draws(start: torch.Tensor, steps: int, layout) -> list[torch.Tensor]:
    """The engine's fresh noise of a re-noising student from ``start`` (``sampling.renoise_noise``), each draw in
    a pipeline's latent ``layout``."""
    from distill_core.sampling import renoise_noise

    return [layout(n, *start.shape) for n in renoise_noise(start, steps)]


def scheduler_draws(monkeypatch) -> list[torch.Tensor]:
    """The list the flow scheduler's noise draws now come from, first to last (fill it before each call)."""
    from diffusers.schedulers import scheduling_flow_match_euler_discrete as flow_scheduler

    draws = []
    monkeypatch.setattr(flow_scheduler, "randn_tensor", lambda *args, **kw: draws.pop(0))
    return draws


@pytest.mark.parametrize("card, message", [
    ({"method": "dmd2", "sampler": "renoise"}, "re-noises between its steps"),
    ({"method": "phased", "sampler": "solver"}, "samples with sampler 'solver'"),
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
    other = tmp_path / "kandinsky"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    assert main(["export-diffusers", str(path), "--teacher", str(other), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "the student's teacher is a KandinskyPipeline: export-diffusers writes files for" in err
    assert "sample it with python -m distill_core sample" in err and not (tmp_path / "x").exists()


def test_a_qwen_image_student_that_samples_with_cfg_is_refused_in_one_line(tmp_path, capsys):
    """Qwen-Image's pipeline rescales its guided velocities, which the engine's CFG does not: a student that
    samples with CFG would draw other images there, and is refused; its guidance-distilled twin exports."""
    teacher = pipeline_dir(tmp_path / "qwen", "qwen")
    source = diffusers_source(teacher, prompts=["an owl"], resolution=16)
    cfg = DistillConfig(steps=2, iters=1, batch=2, checkpoint_every=0, out=str(tmp_path / "run"), student="lora",
                        guidance_mode="cfg")
    path = train_student(cfg, source, progress=False).path
    assert not exportable(path)  # the main job does not print the export command
    assert main(["export-diffusers", str(path), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "this student samples with CFG, which QwenImagePipeline rescales where the engine does not" in err
    assert "Traceback" not in err and not (tmp_path / "x").exists()


def wan_a14b_dir(root, boundary: float):
    """A tiny Wan 2.2 A14B pipeline: the tiny Wan pipeline's transformer as its high-noise expert, one of other
    weights as its low-noise ``transformer_2``, switched at ``boundary`` of the training times."""
    from conftest import randomise

    pipe = diffusers.DiffusionPipeline.from_pretrained(multi_encoder_pipeline_dir(root / "wan", "wan"),
                                                       local_files_only=True)
    low = randomise(diffusers.WanTransformer3DModel.from_config(pipe.transformer.config), seed=1)
    diffusers.WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                          scheduler=pipe.scheduler, transformer=pipe.transformer, transformer_2=low,
                          boundary_ratio=boundary).save_pretrained(root / "a14b", safe_serialization=True)
    return root / "a14b"


@pytest.mark.parametrize("teacher, frames, method, kind", [("wan", 5, "sfd", "lora"), ("a14b", 1, "sfd", "lora"),
                                                          ("a14b", 1, "sfd", "full"), ("wan", 1, "dmd2", "lora"),
                                                          ("wan22-5b", 5, "sfd", "lora")])
def test_wan_pipelines_given_the_students_sigmas_draw_its_clips(tmp_path, capsys, monkeypatch, teacher, frames,
                                                                method, kind):
    """Wan's pipeline call takes no sigmas: the printed lines hand them to its scheduler and run as written, and
    the pipeline draws the student's latents from the same noise, a clip of 2 latent frames (5 video frames) of
    Wan 2.1's student and of Wan 2.2 TI2V 5B's (a time per latent patch in its pipeline, a VAE of 2 x 2
    patches); Wan 2.2 A14B's student exports a LoRA per expert, the low-noise one loaded into transformer_2, and
    its pipeline switches them where the teacher did (one step of each), a full student both networks' folders;
    a Phased DMD student of it, an expert per step on each network, is refused in one line.
    A DMD2 student's pipeline re-noises, and given the engine's fresh noise draws the engine's image."""
    root = (multi_encoder_pipeline_dir(tmp_path / teacher, teacher) if teacher != "a14b"
            else wan_a14b_dir(tmp_path, boundary=0.7))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\nan owl\n")
    source = diffusers_source(root, prompts=prompts, resolution=16, frames=frames)
    cfg = DistillConfig(method=method, steps=2, iters=1, batch=2, lr=1e-2, seed=1, out=str(tmp_path / "run"),
                        checkpoint_every=0, student=kind, lora_rank=4, lora_alpha=2, guidance_mode="distilled")
    path = train_student(cfg, source, progress=False).path
    out = tmp_path / "export"
    settings = export(path, out)
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["stochastic_sampling"] == (method == "dmd2")
    two = teacher == "a14b"
    assert settings["networks"] == (["transformer", "transformer_2"] if two else ["transformer"])
    assert (out / "pytorch_lora_weights_transformer_2.safetensors").is_file() == (two and kind == "lora")
    full = kind == "full"
    assert [(out / name).is_dir() for name in ("transformer", "transformer_2")] == [full, two and full]
    assert settings["call"] == {"num_frames": frames} and settings["guidance_scale"] == 1.0
    if two:  # the pipeline's times on both sides of its boundary (0.7 T)
        assert settings["sigmas"][0] >= 0.7 > settings["sigmas"][1]
    lines = usage(settings, out)
    assert "sigmas=" not in lines.splitlines()[-1] and "num_inference_steps=2" in lines

    student = load_student(path, source.denoiser, source.uncond)
    scope, fresh = {}, []

    def noise() -> torch.Tensor:  # the standard normal noise the printed lines drew
        return scope["latents"].view(1, *source.shape) / settings["noise_scale"]

    def fresh_noise(*args, **kw):  # the scheduler's re-noising draws: the engine's, from the printed lines' noise
        if not fresh:
            fresh.extend([n.view(scope["latents"].shape) for n in renoise_noise(student.sigmas()[0] * noise(), 2)])
            fresh.append(None)
        return fresh.pop(0)

    from diffusers.schedulers import scheduling_flow_match_euler_discrete as flow_scheduler

    monkeypatch.setattr(flow_scheduler, "randn_tensor", fresh_noise)
    exec(lines.replace("'a prompt'", "'an owl', output_type='latent'"), scope)
    assert fresh == ([None] if method == "dmd2" else [])  # one draw a step, the last multiplied by t = 0
    z = noise()
    sigmas = torch.cat([student.sigmas()[:-1], torch.zeros(1)])  # the pipeline's times end at 0
    with torch.no_grad():
        ours = (sample(student, student.sigmas()[0] * z, torch.tensor([1])) if method == "dmd2"
                else few_step(student.denoiser(), sigmas[0] * z, sigmas, torch.tensor([1]), afs=True))
    theirs = scope["video"].view(1, *source.shape)
    scale = float(ours.abs().max())
    torch.testing.assert_close(theirs / scale, ours / scale, atol=2e-5, rtol=0)
    pipe = diffusers.DiffusionPipeline.from_pretrained(root, local_files_only=True)  # the teacher, without the LoRA
    set_timesteps = pipe.scheduler.set_timesteps
    pipe.scheduler.set_timesteps = lambda steps, device=None: set_timesteps(sigmas=settings["sigmas"], device=device)
    teachers = pipe(prompt="an owl", latents=scope["latents"], num_inference_steps=2, height=16, width=16,
                    num_frames=frames, guidance_scale=1.0, output_type="latent").frames[0]
    assert (teachers.reshape(ours.shape) - ours).abs().max() > 50 * 1e-4  # the student's own latents
    if two and not full:  # a Phased DMD student, an expert per step on each network, which the pipeline cannot switch
        phased = train_student(DistillConfig(method="phased-dmd", steps=2, iters=1, batch=2, checkpoint_every=0,
                                             out=str(tmp_path / "phased"), student="lora"), source,
                               progress=False).path
        assert main(["export-diffusers", str(phased), "--out", str(tmp_path / "x")]) == 1
        err = capsys.readouterr().err
        assert "an expert per step on each of Wan 2.2's two networks" in err and "Traceback" not in err


def test_a_hidream_student_exports_at_its_pipelines_default_area_and_is_refused_at_another(tmp_path, capsys):
    """HiDream's pipeline scales every image to the area of its default size, 128 latent pixels a side (256 pixels
    with the tiny VAE of 2): a student distilled there exports, and the pipeline with its LoRA draws the engine's
    latents from the same noise, as do the printed lines; a student of 16 x 16 pixels, which the pipeline would
    draw at 256 x 256, is refused in one line, before any file is written."""
    from distill_core.text_pipeline import vae_scale

    teacher = dit_pipeline_dir(tmp_path / "hidream", "hidream")
    config = diffusers.HiDreamImageTransformer2DModel.load_config(teacher / "transformer")
    wide = diffusers.HiDreamImageTransformer2DModel.from_config({**config, "max_resolution": (64, 64)})
    randomise(wide, seed=0).save_pretrained(teacher / "transformer", safe_serialization=True)  # 64 x 64 patches
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\nan owl\n")
    side = 128 * vae_scale(teacher)

    def student(resolution: int, name: str):
        source = diffusers_source(teacher, prompts=prompts, resolution=resolution)
        cfg = DistillConfig(steps=2, iters=1, batch=2, lr=1e-2, seed=1, out=str(tmp_path / name), checkpoint_every=0,
                            student="lora", lora_rank=4, lora_alpha=2, guidance_mode="distilled")
        return source, train_student(cfg, source, progress=False).path

    source, path = student(side, "default")
    settings = export(path, tmp_path / "export")
    assert (settings["pipeline"], settings["height"], settings["width"]) == ("HiDreamImagePipeline", side, side)
    loaded = load_student(path, source.denoiser, source.uncond)
    z = torch.randn(1, *source.shape, generator=torch.Generator().manual_seed(0))
    sigmas = torch.cat([loaded.sigmas()[:-1], torch.zeros(1)])  # the pipeline's times end at 0
    with torch.no_grad():
        ours = few_step(loaded.denoiser(), sigmas[0] * z, sigmas, torch.tensor([1]), afs=True)  # prompt 1: an owl
    theirs = pipeline_latents(teacher, tmp_path / "export", settings, z)
    scale = float(ours.abs().max())
    torch.testing.assert_close(theirs / scale, ours / scale, atol=2e-5, rtol=0)
    scope = {}  # the printed lines run as written
    exec(usage(settings, tmp_path / "export").replace("'a prompt'", "'an owl', output_type='latent'"), scope)
    assert scope["image"].shape == source.shape

    _, small = student(16, "small")
    assert main(["export-diffusers", str(small), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert (f"HiDreamImagePipeline scales every image to the area of its default {side}x{side}: it would draw this "
            f"student's 16x16 images at {side}x{side}; distil at --resolution {side}") in err
    assert "Traceback" not in err and not (tmp_path / "x").exists()

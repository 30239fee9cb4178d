"""Video models distilled on clips: ``latent_shape``'s length, every method on [B, C, T, H, W] samples, and the
nodes' previews, samples and comparison of clips, on a stand-in ComfyUI video model whose frames see each other."""

from __future__ import annotations

import pytest
import torch
from test_comfy_adapter import (
    CONST,
    EPS,
    Cond,
    FakeBaseModel,
    FakePatcher,
    VideoBaseModel,
    _entry,
    few_step_draws,
    lora_student,
    stand_in_nodes,
)

from distill_core.config import DistillConfig
from distill_core.denoisers.base import per_sample
from distill_core.denoisers.comfy import ComfyDenoiser
from distill_core.denoisers.comfy_conditioning import encode_conditioning, start_rows
from distill_core.denoisers.comfy_family import frames_per_latent, latent_shape
from distill_core.memory_plan import activation_bytes, sample_activation_bytes
from distill_core.methods.registry import method_class, methods
from distill_core.options import settings
from distill_core.report import preview_pixels
from distill_core.safetensors_io import load
from distill_core.sampling import sample
from distill_core.sources import comfy_source
from distill_core.student_files import load_student
from distill_core.teacher import CFGTeacher
from distill_core.train.callbacks import Callback
from distill_core.train.run import train_student


class VideoLatent:
    """A video latent of the stand-in network's 4 channels."""

    latent_channels, latent_dimensions, latent_rgb_factors = 4, 3, None


class WAN21(VideoBaseModel):
    """Named like ComfyUI's Wan 2.1 BaseModel: a text-to-video model, 4 video frames per latent frame. Each frame
    also sees the clip's mean frame, so a clip is not a batch of independent images."""

    latent_format = VideoLatent()

    def apply_model(self, x, sigma, c_crossattn=None, y=None):
        per_frame = super().apply_model(x, sigma, c_crossattn, y)
        return per_frame + 0.1 * torch.tanh(x.mean(2, keepdim=True))


class WAN22(WAN21):
    """Wan 2.2 5B's BaseModel subclasses Wan 2.1's."""


class StartFrameWAN22(WAN22):
    """Wan 2.2 5B image-to-video's shape: ``extra_conds`` passes a LATENT's mask on as the model input
    ``denoise_mask``, and the network takes a time per latent frame, t times the mask's mean over that frame (0 on
    the start frame), as ComfyUI's WAN22.process_timestep makes it. The model's scale is half the LATENT's."""

    def process_latent_in(self, latent):
        return latent / 2

    def process_latent_out(self, latent):
        return latent * 2

    def extra_conds(self, cross_attn, device, noise, **options):
        out = super().extra_conds(cross_attn, device, noise, **options)
        if "denoise_mask" in options:
            out["denoise_mask"] = Cond(options["denoise_mask"])
        return out

    def apply_model(self, x, sigma, c_crossattn=None, y=None, denoise_mask=None):
        frames = x.shape[2]
        times = sigma[:, None] * (denoise_mask.mean((1, 3, 4)) if denoise_mask is not None else torch.ones(frames))
        image_model = FakeBaseModel.apply_model
        per_frame = [image_model(self, x[:, :, k], times[:, k], c_crossattn, y) for k in range(frames)]
        return torch.stack(per_frame, 2) + 0.1 * torch.tanh(x.mean(2, keepdim=True))


def start_latent(images: int, side: int = 8, frames: int = 3) -> dict:
    """A LATENT as Wan22ImageToVideoLatent writes it with a start image (here of one latent frame): the image's
    latent on the first frame, and a noise mask that is 0 there and 1 on the frames to generate."""
    samples = torch.zeros(images, 4, frames, side, side)
    samples[:, :, :1] = torch.randn(images, 4, 1, side, side, generator=torch.Generator().manual_seed(images))
    mask = torch.ones(1, 1, frames, side, side)
    mask[:, :, :1] = 0
    return {"samples": samples, "noise_mask": mask}


class QwenImage(VideoBaseModel):
    """An image model on a video latent (Qwen-Image): clips are refused."""

    latent_format = VideoLatent()


def clip_source(length: int = 9, side: int = 64):
    base = WAN21(CONST())
    return base, comfy_source(base, [_entry(3, 1), _entry(3, 2)], [_entry(3, 3)], side, side, 2.0, length=length)


def test_a_clip_of_a_video_model_is_its_latent_frames_as_comfyuis_empty_latent_counts_them():
    """(length - 1) // k + 1 latent frames, k = 4 for Wan (and its subclasses); a clip of one latent frame is an
    image; image models, and image networks on video latents, refuse clips in one line."""
    model = WAN21(CONST())
    assert frames_per_latent(model) == frames_per_latent(WAN22(CONST())) == 4
    assert latent_shape(model, 64, 32) == (4, 4, 8)
    assert latent_shape(model, 64, 32, length=81) == (4, 21, 4, 8)
    assert latent_shape(model, 64, 32, length=4) == (4, 4, 8)  # one latent frame: an image
    assert latent_shape(model, 64, 32, length=5) == (4, 2, 4, 8)
    for image_model in (FakeBaseModel(EPS()), QwenImage(CONST())):
        assert frames_per_latent(image_model) is None
        with pytest.raises(ValueError, match="is an image model: set length to 1"):
            latent_shape(image_model, 64, 64, length=5)


def test_a_clip_reaches_the_model_whole_and_its_conditions_are_built_for_its_frames():
    base = WAN21(CONST())
    encode_conditioning(base, [_entry(3, 1), _entry(3, 2)], (4, 3, 8, 8))
    assert base.noise_shape == (1, 4, 3, 8, 8)
    x, sigma = torch.randn(2, 4, 3, 8, 8), torch.tensor([0.5, 3.0])
    cond = {"c_crossattn": torch.randn(2, 3, 6), "y": torch.randn(2, 5)}
    out = ComfyDenoiser(base)(x, sigma, cond)
    torch.testing.assert_close(out, base.apply_model(x / (1 + per_sample(sigma, x)), sigma / (1 + sigma), **cond))
    frames = torch.stack([ComfyDenoiser(base)(x[:, :, k], sigma, cond) for k in range(3)], 2)
    assert not torch.allclose(out, frames)  # the frames of a clip see each other


class Previews(Callback):
    def __init__(self):
        self.shown = []

    def on_iteration(self, run, record):
        self.shown.append(run.preview(2))


#: settings that keep each method's teacher work small and suit a teacher without a data set or a built-in
#: network (each method takes those it has)
CLIP_SETTINGS = {"teacher_substeps": 2, "pairs": 4, "pair_steps": 2, "teacher_pool": 4, "probe_batch": 2,
                 "probe_steps": 4, "start_steps": 4, "student_width": 1.0, "student_depth": 1.0,
                 "phase_inputs": "trajectories"}


#: methods that refuse ComfyUI teachers whatever their shape (tested with their methods): LCM and SFD-v need an
#: input stock samplers cannot feed, SFDDM a data set
REFUSE_COMFYUI = {"lcm", "sfd-v", "sfddm"}


@pytest.mark.parametrize("name", sorted(set(methods()) - REFUSE_COMFYUI))
def test_every_method_trains_a_student_on_clips(tmp_path, name):
    """Each method's losses, noise draws and previews keep a clip's five axes (batch 3 against 4 channels and 3
    frames: a view for four axes would fail or mix samples)."""
    _, source = clip_source()
    assert source.shape == (4, 3, 8, 8)
    steps = 1 if name == "kd" else 2
    own = {s.name for s in settings(method_class(name).Config)}
    small = {k: v for k, v in CLIP_SETTINGS.items() if k in own}
    cfg = DistillConfig(teacher="fake", method=name, steps=steps, iters=2, batch=3, lr=1e-3, sigma_min=0.1,
                        guidance=2.0, student="lora", lora_rank=2, checkpoint_every=0, out=str(tmp_path), **small)
    previews = Previews()
    run = train_student(cfg, source, progress=False, callbacks=[previews])
    tensors, card = load(run.path)
    assert card["method"] == name and tensors
    assert [p.shape for p in previews.shown] == [(2, 4, 3, 8, 8)] * 2
    assert all(torch.isfinite(p).all() for p in previews.shown)
    student = load_student(run.path, CFGTeacher(source.denoiser, 2.0, source.uncond))
    noise = torch.randn(3, *source.shape) * source.denoiser.sigma_max
    with torch.no_grad():
        clips = sample(student, noise, source.draw_cond(3, torch.Generator().manual_seed(0)))
    assert clips.shape == (3, 4, 3, 8, 8) and torch.isfinite(clips).all()


def test_a_clip_preview_shows_one_row_of_evenly_spaced_frames_per_clip():
    clips = torch.zeros(2, 3, 7, 4, 4)
    clips[:, :, -1] = 1  # the last frame white
    grid = preview_pixels(clips, VideoLatent(), columns=3)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    assert (grid[1:5, 11:15] == 255).all() and (grid[1:5, 1:5] == 128).all()  # first frame grey, last white


def test_the_nodes_distil_sample_and_compare_clips(tmp_path, monkeypatch):
    """Teacher from MODEL with a length -> Distill to N steps -> Few-step sample gives the clips' LATENT
    [B, C, T, H, W] and every frame as an IMAGE; Compare shows each clip's middle frame."""
    from distill_core.workflow import node_pack
    from distill_nodes import host

    monkeypatch.setenv("DISTILL_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("DISTILL_OUTPUT_DIR", str(tmp_path / "output"))
    monkeypatch.setattr(host, "with_lora", lambda model, tensors: "M")
    nodes = node_pack().NODE_CLASS_MAPPINGS
    base = WAN21(CONST())
    base.process_latent_out = lambda x: x * 2
    positive, negative = [_entry(3, 1), _entry(3, 2)], [_entry(3, 3)]
    with pytest.raises(ValueError, match="is an image model"):
        nodes["DistillTeacherFromModel"]().run(FakePatcher(QwenImage(CONST())), positive, negative, 64, 64, 2.0,
                                               length=9)
    (teacher,) = nodes["DistillTeacherFromModel"]().run(FakePatcher(base), positive, negative, 64, 64, 2.0,
                                                        length=9)
    assert teacher.source().shape == (4, 3, 8, 8)
    args = dict(steps=2, method="sfd", iterations=2, learning_rate=1e-3, batch=2, seed=0, guidance_mode="auto",
                student="lora", lora_rank=2, save_name="clip", resume=False, preview_every=1, checkpoint_every=1)
    _, student, _ = nodes["DistillToSteps"]().run(teacher, **args)["result"]
    images, latent = nodes["DistillSample"]().run(student, seed=1, count=2, steps=0)["result"]
    assert latent["samples"].shape == (2, 4, 3, 8, 8) and images.shape == (6, 10, 10, 3)
    grid, summary, _ = nodes["DistillCompare"]().run(student, seed=0, count=2, steps=0, reference_steps=4)["result"]
    assert grid.ndim == 4 and "sfd" in summary


@pytest.mark.parametrize("start", [False, True])
def test_the_memory_plan_probes_a_clip_at_a_half_and_a_quarter_side_with_all_its_frames(start):
    """A 64 x 64 latent clip of 3 frames is probed at 32 and 16 pixels a side, 3 frames each, and extrapolated
    in the pixels to what it costs at its own size; so is a clip that starts from an image, whose start latent
    and mask (laid out as the sample) are cut to the probe's sides."""
    if start:
        base = StartFrameWAN22(CONST())
        source = comfy_source(base, [_entry(3, 1)], [_entry(3, 3)], 512, 512, 2.0, length=9,
                              start=start_latent(1, side=64))
    else:
        base, source = clip_source(length=9, side=512)
    denoiser = source.denoiser.requires_grad_(True)
    seen = []
    apply_model = base.apply_model
    base.apply_model = lambda x, *a, **kw: seen.append(tuple(x.shape)) or apply_model(x, *a, **kw)
    extrapolated = sample_activation_bytes(denoiser, source, None)
    assert seen == [(1, 4, 3, 32, 32), (1, 4, 3, 16, 16)]
    cond = source.draw_cond(1, torch.Generator().manual_seed(0))
    direct = activation_bytes(denoiser, torch.randn(1, *source.shape), 1.0, cond, None)
    assert abs(extrapolated - direct) / direct < 0.05, (extrapolated, direct)


def test_wan22_image_to_video_clips_start_from_the_start_latent_as_comfyuis_sampler_keeps_it(tmp_path, monkeypatch):
    """Wan 2.2 5B image-to-video: the start image lies in the LATENT (Wan22ImageToVideoLatent's, with a noise mask)
    that the sampler is given. The teacher node takes it as start_latent; every row holds its image's latent (in the
    model's scale) and mask, and the denoiser gives the model and takes from it the start frame clean, as ComfyUI's
    sampler does (its input there is replaced, its output there is the latent), so nothing it is handed on that frame
    matters. CFG's other side starts from the row's own image. Trained, Few-step sample's clips begin with the start
    image, and ComfyUI's way (the student's SIGMAS and SAMPLER on a model whose input and output keep the start frame,
    from the noise scaled onto the latent) gives the same clips. LTX-Video's mask, one value per latent frame, is
    laid out over the frame. Refused at the node, each in one line: another model, a LATENT without a start image,
    another size or length, a clip of one frame, a count of images that is neither 1 nor the prompts', and a mask
    of other frames."""
    nodes = stand_in_nodes(tmp_path, monkeypatch)
    base = StartFrameWAN22(CONST())
    positive, negative, latent = [_entry(3, 1), _entry(3, 2)], [_entry(3, 3)], start_latent(2)
    source = comfy_source(base, positive, negative, 64, 64, 2.0, length=9, start=latent)
    rows = source.draw_cond(4, torch.Generator().manual_seed(0))
    assert not {"denoise_mask", "kept_latent", "kept_mask"} & source.uncond.keys()
    assert rows["kept_latent"].shape == (4, 4, 3, 8, 8) and rows["denoise_mask"].shape == (4, 1, 3, 8, 8)
    assert torch.equal(rows["kept_mask"], rows["denoise_mask"])  # the mask the adapter keeps the start frame by
    starts = latent["samples"][:, :, :1] / 2  # each row starts from its own prompt's image, in the model's scale
    assert all(any(torch.equal(row[:, :1], s) for s in starts) for row in rows["kept_latent"])
    x, sigma = torch.randn(4, 4, 3, 8, 8), torch.tensor([0.5, 3.0, 9.0, 40.0])
    with torch.no_grad():
        x0 = source.denoiser(x, sigma, rows)
        other_start = x.clone()
        other_start[:, :, 0] += 5  # whatever the sample holds on the start frame, the model sees the image there
        torch.testing.assert_close(source.denoiser(other_start, sigma, rows), x0)
        torch.testing.assert_close(x0[:, :, :1], rows["kept_latent"][:, :, :1])
        guided = CFGTeacher(source.denoiser, 2.0, source.uncond)(x, sigma, rows)
    torch.testing.assert_close(guided[:, :, :1], rows["kept_latent"][:, :, :1])  # both sides keep the image

    teacher_node = nodes["DistillTeacherFromModel"]()
    refusals = [
        (dict(model=FakePatcher(WAN21(CONST()))),
         "a start latent is for Wan 2.2 5B, LTX-Video and HunyuanVideo v2 image-to-video"),
        (dict(start_latent={"samples": latent["samples"]}), "holds no start image"),
        (dict(width=128), r"start latent is \[4, 3, 8, 8\] .* teacher's clips are \[4, 3, 8, 16\]"),
        (dict(length=1), "a clip of one frame would be the start image itself"),
        (dict(start_latent=start_latent(3)), "holds 3 images for 2 prompts"),
        (dict(start_latent={**latent, "noise_mask": torch.ones(1, 1, 2, 1, 1)}), "not one per latent frame or pixel"),
    ]
    for change, says in refusals:
        args = dict(model=FakePatcher(base), positive=positive, negative=negative, width=64, height=64,
                    guidance=2.0, length=9, start_latent=latent)
        with pytest.raises(ValueError, match=says):
            teacher_node.run(**{**args, **change})
    # LTX-Video's LATENT holds one mask value per latent frame, 1 - strength on the image's
    per_frame = {**latent, "noise_mask": torch.tensor([0.2, 1.0, 1.0]).view(1, 1, 3, 1, 1)}
    kept, masks = start_rows(base, per_frame, (4, 3, 8, 8), 2)
    assert masks.shape == (2, 1, 3, 8, 8) and masks[:, :, 0].eq(0.2).all() and masks[:, :, 1:].eq(1).all()
    torch.testing.assert_close(kept, latent["samples"] / 2)
    (teacher,) = teacher_node.run(FakePatcher(base), positive, negative, 64, 64, 2.0, length=9,
                                  start_latent=start_latent(1))
    student, network, (sigmas, sampler, cfg), sampled = lora_student(nodes, teacher, base,
                                                                      tmp_path / "models" / "loras", preview_every=1)
    z, cond = few_step_draws(student)
    kept, mask = cond["kept_latent"], cond["denoise_mask"]
    model_inputs = {k: v for k, v in cond.items() if k not in ("kept_latent", "kept_mask", "lengths")}  # one token
    # count
    uncond = {k: v.expand(2, *v.shape[1:]) for k, v in student.teacher.source().uncond.items() if k != "lengths"}

    def comfy_model(x_t, t):  # ComfyUI's sampler: the start frame replaced in the input and the output
        inputs = x_t * mask + kept * (1 - mask)
        x0_c = network.apply_model(inputs, t, **model_inputs)
        x0_u = network.apply_model(inputs, t, **uncond, denoise_mask=mask)
        return (x0_u + cfg * (x0_c - x0_u)) * mask + kept * (1 - mask)

    t0, t_last = float(sigmas[0]), float(sigmas[-1])
    x_init = t0 * z + (1 - t0) * kept  # ComfyUI's noise scaled onto the latent at the first time
    with torch.no_grad():
        theirs = sampler(comfy_model, x_init, sigmas) / (1 - t_last)
    with student.loaded() as s:
        ours = sample(s, x_init / (1 - t0), cond)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (theirs[:, :, 1:] - theirs.flip(0)[:, :, 1:]).abs().max() > 1e-2  # two noises, two clips
    # Few-step sample starts the start frame from the noise alone (its latent is not added in), which leaves it
    # sigma_last / sigma_max of the latent apart at the end, and the clips' other frames as they are
    torch.testing.assert_close(sampled["samples"][:, :, 1:], base.process_latent_out(theirs[:, :, 1:]),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sampled["samples"][:, :, :1], base.process_latent_out(theirs[:, :, :1]),
                               atol=0.01, rtol=0)

"""The ComfyUI MODEL adapter without ComfyUI: a stand-in BaseModel with ComfyUI's interface
(``apply_model(x, sigma, c_crossattn=, y=)`` returning x0, ``extra_conds``, ``model_sampling``,
``diffusion_model``). The real thing runs in ``test_real_comfyui.py`` where a checkout exists."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distill_core.builtin import fingerprint
from distill_core.config import DistillConfig
from distill_core.denoisers.base import index_cond
from distill_core.denoisers.comfy import ComfyDenoiser, ComfyExperts, expert_loras, refuse_unsupported
from distill_core.denoisers.comfy_conditioning import encode_conditioning, row_text
from distill_core.denoisers.comfy_family import latent_downscale, latent_shape
from distill_core.denoisers.flow import FLOW_SIGMA_MAX
from distill_core.lora import merge
from distill_core.safetensors_io import load
from distill_core.sampling import comfy_sigmas, k_sampler, sampler_for
from distill_core.sources import comfy_source
from distill_core.student_files import load_student
from distill_core.teacher import CFGTeacher
from distill_core.train.run import train_student


class EPS:
    """Named like ComfyUI's eps-prediction ``model_sampling`` class."""

    sigma_min, sigma_max = 0.03, 14.6


class CONST:
    """Named like ComfyUI's flow-matching ``model_sampling`` class (SD3's: time t in [0.001 shifted, 1])."""

    sigma_min, sigma_max, shift = 0.003, 1.0, 3.0


class ModelSamplingFlux:
    """Flux's schedule: its ``shift`` is mu of e^mu / (e^mu + 1 / t - 1)."""

    sigma_min, sigma_max, shift = 0.0003, 1.0, 1.15


class FluxSampling(ModelSamplingFlux, CONST):
    """ComfyUI combines a schedule and a prediction class into one sampling class."""


class COSMOS_RFLOW:
    """Cosmos' rectified flow, which ComfyUI already feeds the variance-exploding sigma."""

    sigma_min, sigma_max = 0.002, 80.0


class Wan21:
    """Named like ComfyUI's latent format of Wan 2.1 and Qwen-Image: video latents [B, C, T, H, W]."""

    latent_channels, latent_dimensions = 16, 3


class Wan22(Wan21):
    """Wan 2.2 5B's latent: 48 channels, 16 image pixels per latent pixel (its format does not say so)."""

    latent_channels = 48


class OwnRatio:
    """A format that states its own downscale (``spacial_downscale_ratio``, as newer ComfyUI versions do)."""

    latent_channels, spacial_downscale_ratio = 128, 16


class Audio:
    latent_channels, latent_dimensions = 64, 1


class Cond:
    def __init__(self, cond: torch.Tensor):
        self.cond = cond


class TinyUNet(nn.Module):
    def __init__(self, context: int = 6, pooled: int = 5):
        super().__init__()
        self.conv_in, self.conv_out = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
        self.context, self.label = nn.Linear(context, 8), nn.Linear(pooled, 8)

    def forward(self, x, sigma, context, y):
        # mean over tokens: a tiled context (every token repeated k times) gives the same output
        h = self.conv_in(x / (1 + sigma**2).sqrt()) + (self.context(context).mean(1) + self.label(y))[..., None, None]
        return self.conv_out(torch.nn.functional.silu(h))


class FakeBaseModel(nn.Module):
    """ComfyUI's BaseModel interface: eps prediction turned into x0, conditions built by extra_conds."""

    def __init__(self, sampling=None):
        super().__init__()
        torch.manual_seed(0)
        self.diffusion_model = TinyUNet()
        self.model_sampling = sampling or EPS()
        self.calls: list[dict] = []

    def extra_conds(self, cross_attn, device, noise, **options):
        self.calls.append(options)
        return {"c_crossattn": Cond(cross_attn), "y": Cond(options["pooled_output"])}

    def apply_model(self, x, sigma, c_crossattn=None, y=None):
        s = sigma.view(-1, 1, 1, 1)
        return x - s * self.diffusion_model(x, s, c_crossattn, y)


def _entry(tokens: int, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, tokens, 6, generator=gen), {"pooled_output": torch.randn(1, 5, generator=gen)}]


def test_the_adapter_is_apply_model_with_sigma_and_conditions():
    base = FakeBaseModel()
    d = ComfyDenoiser(base)
    assert (d.sigma_min, d.sigma_max) == (0.03, 14.6)
    x = torch.randn(2, 4, 8, 8)
    cond = {"c_crossattn": torch.randn(2, 3, 6), "y": torch.randn(2, 5)}
    expected = base.apply_model(x, torch.full((2,), 1.5), **cond)
    torch.testing.assert_close(d(x, 1.5, cond), expected)
    with pytest.raises(TypeError, match="dict of model inputs"):
        d(x, 1.5, torch.tensor([1, 2]))


def test_flow_models_are_the_ve_denoiser_of_x_over_1_plus_sigma_at_time_sigma_over_1_plus_sigma():
    """ComfyUI's CONST models take x_t = x / (1 + sigma) at t = sigma / (1 + sigma) (the flow notes' change of
    variables); the range is converted and capped, the shift read (Flux's as e^mu); Cosmos' rectified flow
    already takes sigma."""
    base = FakeBaseModel(CONST())
    d = ComfyDenoiser(base)
    assert d.flow and d.prediction == "flow" and d.shift == 3.0
    assert d.sigma_min == pytest.approx(0.003 / 0.997) and d.sigma_max == FLOW_SIGMA_MAX
    x = torch.randn(2, 4, 8, 8)
    cond = {"c_crossattn": torch.randn(2, 3, 6), "y": torch.randn(2, 5)}
    sigma = torch.tensor([0.5, 3.0])
    expected = base.apply_model(x / (1 + sigma.view(-1, 1, 1, 1)), sigma / (1 + sigma), **cond)
    torch.testing.assert_close(d(x, sigma, cond), expected)
    assert ComfyDenoiser(FakeBaseModel(FluxSampling())).shift == pytest.approx(math.exp(1.15))
    cosmos = ComfyDenoiser(FakeBaseModel(COSMOS_RFLOW()))
    assert not cosmos.flow and (cosmos.sigma_min, cosmos.sigma_max) == (0.002, 80.0)
    assert d.settings()["prediction"] == "CONST" and ComfyDenoiser(FakeBaseModel()).settings()["prediction"] == "EPS"


def test_other_objects_bad_sizes_and_other_latents_are_refused():
    with pytest.raises(TypeError, match="Load Checkpoint"):
        refuse_unsupported(nn.Linear(2, 2))
    meanflow = FakeBaseModel(CONST())
    meanflow.model_config = SimpleNamespace(unet_config={"image_model": "hunyuan_video", "meanflow": True})
    with pytest.raises(ValueError, match=r"FakeBaseModel is a MeanFlow few-step model .* distil the base model"):
        refuse_unsupported(meanflow)
    with pytest.raises(ValueError, match="multiples of 8"):
        latent_shape(FakeBaseModel(), 500, 512)
    assert latent_shape(FakeBaseModel(), 512, 768) == (4, 96, 64)
    model = FakeBaseModel(CONST())
    model.latent_format = Audio()
    with pytest.raises(ValueError, match="1-dimensional latents"):
        latent_shape(model, 512, 512)


class PixArt(FakeBaseModel):
    """Named like ComfyUI's PixArt BaseModel: unpadded patches of 2 x 2 latent pixels, and a position table that
    fails on a mean latent side of 32 or less (as a real ComfyUI's does on latents of 40 x 24, not 36 x 30)."""


def test_pixart_sizes_too_small_for_its_position_table_are_refused():
    assert latent_shape(PixArt(), 272, 272) == (4, 34, 34) and latent_shape(PixArt(), 512, 16) == (4, 2, 64)
    with pytest.raises(ValueError, match="PixArt needs width \\+ height of at least 528 pixels"):
        latent_shape(PixArt(), 320, 192)
    with pytest.raises(ValueError, match="multiples of 16 for PixArt, .* unpadded patches of 2 x 2 latent pixels"):
        latent_shape(PixArt(), 264, 264)


def test_a_latent_that_spans_16_pixels_takes_sizes_in_16s():
    """Wan 2.2 5B's 48-channel latent (16 pixels a side, which its format does not state) and a format that
    states its own ratio: the latent of a 512 x 768 image, a size off the ratio refused at the node, and the
    pixel size the model's size conditions are given."""
    for latent_format, channels in ((Wan22(), 48), (OwnRatio(), 128)):
        model = FakeBaseModel(CONST())
        model.latent_format = latent_format
        assert latent_downscale(model) == 16
        assert latent_shape(model, 512, 768) == (channels, 48, 32)
        with pytest.raises(ValueError, match=r"multiples of 16 for FakeBaseModel, whose latent pixel spans 16 .*"
                                             r"got 520x512"):
            latent_shape(model, 520, 512)
    seen = {}
    model.extra_conds = lambda **options: seen.update(options) or {"c_crossattn": Cond(options["cross_attn"])}
    encode_conditioning(model, [[torch.zeros(1, 3, 6), {}]], (128, 48, 32))
    assert (seen["width"], seen["height"]) == (512, 768)
    assert latent_downscale(FakeBaseModel()) == 8


def test_an_input_comfyui_leaves_none_is_left_out():
    """Cosmos Predict2 gives ``fps`` as a constant None for an image: the model's own default, not an input."""
    model = FakeBaseModel()
    conds = model.extra_conds
    model.extra_conds = lambda **kw: {**conds(**kw), "fps": Cond(None)}
    cond = encode_conditioning(model, [_entry(4, 0), _entry(4, 1)], (4, 8, 8))
    assert "fps" not in cond and {"c_crossattn", "y"} <= set(cond)


def test_entries_that_give_different_model_inputs_are_refused_naming_the_inputs():
    """An input that some entries give and others do not (HunyuanImage 2.1's glyph tokens, for prompts with
    quoted text) is named in the refusal."""
    model = FakeBaseModel()
    conds = model.extra_conds
    model.extra_conds = lambda **kw: {**conds(**kw), **({"txt_byt5": Cond(kw["glyphs"])} if "glyphs" in kw else {})}
    quoted = [_entry(4, 1)[0], {**_entry(4, 1)[1], "glyphs": torch.zeros(1, 3, 8)}]
    with pytest.raises(ValueError, match=r"different model inputs \(txt_byt5 in some entries, not in others\)"):
        encode_conditioning(model, [_entry(4, 0), quoted], (4, 8, 8))


class MaskedBaseModel(FakeBaseModel):
    """HunyuanDiT's habit: a token mask [B, T] beside its tokens [B, T, C] (from the encoder's attention mask),
    the padded tokens left out of a masked mean: a tiled mask or tiled tokens would change nothing, a mask cut
    to another length would."""

    def extra_conds(self, cross_attn, device, noise, **options):
        return {**super().extra_conds(cross_attn, device, noise, **options),
                "text_embedding_mask": Cond(options["attention_mask"])}

    def apply_model(self, x, sigma, c_crossattn=None, y=None, text_embedding_mask=None):
        assert text_embedding_mask.shape == c_crossattn.shape[:2]
        weights = text_embedding_mask[..., None] / text_embedding_mask.sum(1)[:, None, None]
        return super().apply_model(x, sigma, (c_crossattn * weights).sum(1, keepdim=True), y)


def test_token_masks_of_other_lengths_run_each_row_on_its_own_tokens_and_mask():
    """Prompts past the text encoder's padding (HunyuanDiT's BERT pads to 77 tokens) give masks [1, T] of other
    lengths: stored tiled with their tokens, each row runs on its own tokens and mask, at the node as in
    training."""
    model = MaskedBaseModel()

    def entry(tokens: int, used: int, seed: int) -> list:
        text, options = _entry(tokens, seed)
        return [text, {**options, "attention_mask": (torch.arange(tokens) < used).float()[None]}]

    entries = [entry(8, 5, 0), entry(12, 10, 1), entry(8, 3, 2)]
    cond = encode_conditioning(model, entries, (4, 8, 8))
    assert cond["text_embedding_mask"].shape == (3, 24)
    assert cond["lengths"]["text_embedding_mask"].tolist() == [8, 12, 8]
    x, sigma = torch.randn(3, 4, 8, 8), torch.tensor([0.5, 1.0, 2.0])
    out = ComfyDenoiser(model)(x, sigma, cond)

    def alone(i, entry):
        tokens, options = entry
        return model.apply_model(x[i:i + 1], sigma[i:i + 1], tokens, options["pooled_output"],
                                 options["attention_mask"])

    for i, row in enumerate(entries):
        torch.testing.assert_close(out[i:i + 1], alone(i, row))
    negative = entry(12, 7, 3)  # CFG's batch of a prompt and a negative encoded apart, masks of other lengths
    guided = CFGTeacher(ComfyDenoiser(model), 3.0, encode_conditioning(model, [negative], (4, 8, 8)))(
        x[:1], sigma[:1], encode_conditioning(model, entries[:1], (4, 8, 8)))
    c, u = alone(0, entries[0]), alone(0, negative)
    torch.testing.assert_close(guided, u + 3.0 * (c - u))
    from distill_core.workflow import node_pack

    teacher_node = node_pack().NODE_CLASS_MAPPINGS["DistillTeacherFromModel"]()
    (teacher,) = teacher_node.run(FakePatcher(model), entries[:2], entries[2:], 64, 64, 5.0)
    assert teacher.source().shape == (4, 8, 8)


class VideoBaseModel(FakeBaseModel):
    """A flow model with video latents (Wan, Qwen-Image): ``apply_model`` takes [B, C, T, H, W] only."""

    latent_format = Wan21()

    def extra_conds(self, cross_attn, device, noise, **options):
        self.noise_shape = tuple(noise.shape)
        return super().extra_conds(cross_attn, device, noise, **options)

    def apply_model(self, x, sigma, c_crossattn=None, y=None):
        assert x.ndim == 5, "a video model gets a frame axis"
        image_model = super().apply_model
        return torch.stack([image_model(x[:, :, k], sigma, c_crossattn, y) for k in range(x.shape[2])], 2)


def test_a_video_model_distils_images_as_one_frame():
    """The engine holds an image of a video model as [B, C, H, W]; the adapter hands the model one frame,
    [B, C, 1, H, W], and the result is the image model's on that frame (and a 5-D input passes as it is)."""
    video, image = VideoBaseModel(CONST()), FakeBaseModel(CONST())
    image.load_state_dict(video.state_dict())
    assert latent_shape(video, 512, 256) == (16, 32, 64)
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 3.0])
    cond = {"c_crossattn": torch.randn(2, 3, 6), "y": torch.randn(2, 5)}
    out = ComfyDenoiser(video)(x, sigma, cond)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ComfyDenoiser(image)(x, sigma, cond))
    torch.testing.assert_close(ComfyDenoiser(video)(x.unsqueeze(2), sigma, cond), out.unsqueeze(2))
    encode_conditioning(video, [_entry(3, 1)], (4, 8, 8))
    assert video.noise_shape == (1, 4, 1, 8, 8)  # the model builds its inputs for one frame


class Constant(Cond):
    """Named like ComfyUI's ``CONDConstant``: a number, not a batch."""


class CountingBaseModel(FakeBaseModel):
    """A model that reads its text through a scalar input (Lumina 2's ``num_tokens``) and attends over every
    token it is given (tiled copies would change its output)."""

    def extra_conds(self, cross_attn, device, noise, **options):
        return {"c_crossattn": Cond(cross_attn), "y": Cond(options["pooled_output"]),
                "num_tokens": Constant(cross_attn.shape[1])}

    def apply_model(self, x, sigma, c_crossattn=None, y=None, num_tokens=None):
        assert isinstance(num_tokens, int) and c_crossattn.shape[1] == num_tokens
        s = sigma.view(-1, 1, 1, 1)
        return x - s * self.diffusion_model(x, s, c_crossattn.cumsum(1) / num_tokens, y)


def test_scalar_model_inputs_run_each_group_of_rows_on_its_own_untiled_tokens():
    base = CountingBaseModel()
    entries = [_entry(3, 1), _entry(5, 2), _entry(3, 3)]
    cond = encode_conditioning(base, entries, (4, 8, 8))
    assert cond["c_crossattn"].shape == (3, 15, 6)  # tiled to a common length for batching
    assert cond["constants"]["num_tokens"].tolist() == [3, 5, 3]
    x, sigma = torch.randn(3, 4, 8, 8), torch.tensor([0.5, 1.0, 2.0])
    out = ComfyDenoiser(base)(x, sigma, cond)
    for i, (text, options) in enumerate(entries):
        alone = base.apply_model(x[i:i + 1], sigma[i:i + 1], text, options["pooled_output"], text.shape[1])
        torch.testing.assert_close(out[i:i + 1], alone)
    negative = _entry(4, 4)
    guided = CFGTeacher(ComfyDenoiser(base), 3.0, encode_conditioning(base, [negative], (4, 8, 8)))(
        x[1:2], sigma[1:2], index_cond(cond, torch.tensor([1])))  # 5 and 4 tokens in one CFG batch
    c = base.apply_model(x[1:2], sigma[1:2], entries[1][0], entries[1][1]["pooled_output"], 5)
    u = base.apply_model(x[1:2], sigma[1:2], negative[0], negative[1]["pooled_output"], 4)
    torch.testing.assert_close(guided, u + 3.0 * (c - u))


class JoiningBaseModel(FakeBaseModel):
    """A DiT-like model that joins its text tokens, and a second token input where it has one (HiDream's Llama
    hidden states [B, layers, T, C]), into one sequence every token attends over: tiled copies of either
    would change its output."""

    def extra_conds(self, cross_attn, device, noise, **options):
        inputs = {"c_crossattn": Cond(cross_attn), "y": Cond(options["pooled_output"])}
        if "hidden_states" in options:
            inputs["hidden_states"] = Cond(options["hidden_states"])
        return inputs

    def apply_model(self, x, sigma, c_crossattn=None, y=None, hidden_states=None):
        joined = c_crossattn if hidden_states is None else torch.cat([c_crossattn, hidden_states.mean(1)], 1)
        s = sigma.view(-1, 1, 1, 1)
        return x - s * self.diffusion_model(x, s, joined.softmax(1).cumsum(1), y)


def _joined_entry(tokens: int, states: int | None, seed: int) -> list:
    text, options = _entry(tokens, seed)
    if states is not None:
        options["hidden_states"] = torch.randn(1, 2, states, 6, generator=torch.Generator().manual_seed(seed))
    return [text, options]


@pytest.mark.parametrize("states", [None, (4, 6, 4, 3)], ids=["text-tokens", "text-and-hidden-states"])
def test_rows_of_other_token_counts_run_in_groups_each_on_its_own_tokens(states):
    """Prompts of different lengths (Chroma, Qwen-Image: unpadded text; HiDream: Llama hidden states beside
    T5) are stored tiled and run in groups cut back to their own tokens: each row's result is the model's on
    that row alone, and a CFG batch of a prompt and a negative of other lengths is u + w (c - u)."""
    base = JoiningBaseModel()
    text = (3, 5, 3, 4) if states is None else (3, 3, 3, 5)
    states = states or (None,) * 4
    entries = [_joined_entry(text[i], states[i], i + 1) for i in range(3)]
    cond = encode_conditioning(base, entries, (4, 8, 8))
    assert cond["lengths"]["c_crossattn"].tolist() == list(text[:3])
    if states[0] is not None:
        assert cond["hidden_states"].shape == (3, 2, 12, 6) and cond["lengths"]["hidden_states"].tolist() == [4, 6, 4]
    x, sigma = torch.randn(3, 4, 8, 8), torch.tensor([0.5, 1.0, 2.0])
    out = ComfyDenoiser(base)(x, sigma, cond)

    def alone(i, entry):
        tokens, options = entry
        return base.apply_model(x[i:i + 1], sigma[i:i + 1], tokens, options["pooled_output"],
                                options.get("hidden_states"))

    for i, entry in enumerate(entries):
        torch.testing.assert_close(out[i:i + 1], alone(i, entry))
    tiled = {k: v[1:2] for k, v in cond.items() if k != "lengths"}
    assert not torch.allclose(out[1:2], base.apply_model(x[1:2], sigma[1:2], **tiled))  # tiling would change it
    negative = _joined_entry(text[3], states[3], 4)
    guided = CFGTeacher(ComfyDenoiser(base), 3.0, encode_conditioning(base, [negative], (4, 8, 8)))(
        x[1:2], sigma[1:2], index_cond(cond, torch.tensor([1])))
    c, u = alone(1, entries[1]), alone(1, negative)
    torch.testing.assert_close(guided, u + 3.0 * (c - u))


def test_token_inputs_that_differ_in_more_than_their_length_are_refused():
    base = JoiningBaseModel()
    mismatched = _joined_entry(3, 4, 5)
    mismatched[1]["hidden_states"] = torch.randn(1, 3, 4, 6)
    with pytest.raises(ValueError, match="differ in more than their token count"):
        encode_conditioning(base, [_joined_entry(3, 4, 1), mismatched], (4, 8, 8))


def test_a_plain_model_is_judged_by_its_own_sampling_not_a_flow_clones():
    """After a flow-patched clone of a checkpoint ran, the shared BaseModel holds the clone's flow sampling:
    the plain MODEL still gets its own eps convention and sigma range, the flow clone its own."""
    base = FakeBaseModel(EPS())
    plain = FakePatcher(base, EPS())
    flow = FakePatcher(base, CONST())
    base.model_sampling = flow.sampling  # the flow clone was loaded last
    d = ComfyDenoiser(plain.model, plain.get_model_object("model_sampling"))
    assert not d.flow and (d.sigma_min, d.sigma_max) == (float(EPS().sigma_min), float(EPS().sigma_max))
    assert ComfyDenoiser(flow.model, flow.get_model_object("model_sampling")).flow
    assert fingerprint(d) != fingerprint(ComfyDenoiser(flow.model, flow.get_model_object("model_sampling")))


def test_the_comfy_sampler_of_a_flow_student_solves_in_sigma_and_gives_back_x_t():
    """ComfyUI hands a flow model's SAMPLER times t and x_t = t0 n; the sampler's result, divided by
    1 - t_last as ComfyUI does, is the engine's own sample from x = sigma_max n."""
    base = FakeBaseModel(CONST())
    d = ComfyDenoiser(base)
    cond = {"c_crossattn": torch.randn(2, 3, 6), "y": torch.randn(2, 5)}
    card = {"sampler": "euler_afs", "afs": True, "comfy_noise": "flow"}
    sigmas = torch.tensor([80.0, 3.0, 0.8, 0.1])
    times = comfy_sigmas(card, sigmas)
    torch.testing.assert_close(times, sigmas / (1 + sigmas))
    n = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ours = sampler_for(card)(d, 80.0 * n, sigmas, cond)
        theirs = k_sampler(card)(lambda x, t: base.apply_model(x, t, **cond), times[0] * n, times)
    torch.testing.assert_close(theirs / (1 - times[-1]), ours, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="below t = 1"):
        k_sampler(card)(lambda x, t: x, n, torch.tensor([1.0, 0.5]))


def test_conditioning_entries_with_different_token_counts_are_tiled_without_changing_the_output():
    base = FakeBaseModel()
    short, long = _entry(3, 1), _entry(6, 2)
    cond = encode_conditioning(base, [short, long], (4, 8, 8))
    assert cond["c_crossattn"].shape == (2, 6, 6) and cond["y"].shape == (2, 5)
    assert base.calls[0]["width"] == 64 and base.calls[0]["height"] == 64  # sizes for SDXL's y, from the latent
    x = torch.randn(1, 4, 8, 8)
    alone = base.apply_model(x, torch.tensor([2.0]), c_crossattn=short[0], y=short[1]["pooled_output"])
    tiled = base.apply_model(x, torch.tensor([2.0]), c_crossattn=cond["c_crossattn"][:1], y=cond["y"][:1])
    torch.testing.assert_close(tiled, alone)
    with pytest.raises(ValueError, match="one prompt"):
        encode_conditioning(base, [[torch.randn(2, 3, 6), {"pooled_output": torch.randn(2, 5)}]], (4, 8, 8))
    with pytest.raises(ValueError, match="non-empty list"):
        encode_conditioning(base, [], (4, 8, 8))


def test_comfy_source_draws_positive_prompts_and_uses_the_negative_as_uncond():
    base = FakeBaseModel()
    positive, negative = [_entry(3, 1), _entry(3, 2)], [_entry(3, 3)]
    source = comfy_source(base, positive, negative, 64, 64, 5.0)
    assert source.shape == (4, 8, 8) and source.guidance == 5.0
    torch.testing.assert_close(source.uncond["c_crossattn"], negative[0][0])
    drawn = source.draw_cond(8, torch.Generator().manual_seed(0))
    assert drawn["c_crossattn"].shape == (8, 3, 6)
    for row in drawn["c_crossattn"]:
        assert any(torch.equal(row, p[0][0]) for p in positive)


def test_a_lora_student_of_a_comfy_model_merges_into_diffusion_model_keys(tmp_path):
    """The file's keys are ``diffusion_model.<layer>`` (ComfyUI's LoRA key map for UNets), and merging
    them into the teacher's weights reproduces the student's denoiser."""
    base = FakeBaseModel()
    source = comfy_source(base, [_entry(3, 1), _entry(3, 2)], [_entry(3, 3)], 64, 64, 1.0)
    cfg = DistillConfig(teacher="fake", steps=2, iters=3, batch=2, teacher_substeps=2, lr=1e-2, sigma_min=0.1,
                        guidance_mode="cfg", guidance=1.0, student="lora", lora_rank=2, out=str(tmp_path))
    run = train_student(cfg, source, progress=False)
    tensors, card = load(run.path)
    assert card["student"]["kind"] == "lora" and card["sigmas"]["2"][-1] == pytest.approx(0.1)
    assert tensors and all(k.startswith("diffusion_model.") for k in tensors)
    assert {k.rsplit(".", 2)[-2] if k.endswith("weight") else "alpha" for k in tensors} == {
        "lora_up", "lora_down", "alpha"}
    assert any(v.abs().max() > 0 for k, v in tensors.items() if k.endswith("lora_up.weight"))  # it trained

    merged = copy.deepcopy(base)  # training gave the teacher network back without hooks
    student = load_student(run.path, CFGTeacher(source.denoiser, 1.0, source.uncond), share=True)
    assert merge(merged, tensors) == len([k for k in tensors if k.endswith("lora_down.weight")])
    x, cond = torch.randn(2, 4, 8, 8), source.draw_cond(2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(student.denoiser()(x, torch.tensor(3.0), cond),
                                   ComfyDenoiser(merged)(x, torch.tensor(3.0), cond), atol=1e-5, rtol=1e-5)
    student.net.lora.detach()
    with torch.no_grad():  # detached: the shared teacher network is the teacher again
        torch.testing.assert_close(source.denoiser(x, torch.tensor(3.0), cond),
                                   ComfyDenoiser(FakeBaseModel())(x, torch.tensor(3.0), cond))


def _experts(boundary: float = 0.875) -> tuple[FakeBaseModel, FakeBaseModel, tuple]:
    """A high- and a low-noise flow model of one family (as Wan 2.2 14B's), with other weights, and the
    ``experts`` argument of ``comfy_source``."""
    high, low = FakeBaseModel(CONST()), FakeBaseModel(CONST())
    with torch.no_grad():
        for p in low.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return high, low, (low, low.model_sampling, boundary)


def test_two_experts_are_one_teacher_that_switches_sample_by_sample_at_the_boundary():
    high, low, _ = _experts()
    teacher = ComfyExperts(ComfyDenoiser(high), ComfyDenoiser(low), 0.875)
    sigma = torch.tensor([20.0, 7.0, 6.0, 0.5])  # t = 0.952, 0.875 (the boundary: high), 0.857, 0.333
    x, cond = torch.randn(4, 4, 8, 8), {"c_crossattn": torch.randn(4, 3, 6), "y": torch.randn(4, 5)}
    with torch.no_grad():
        out = teacher(x, sigma, cond)
        alone = [ComfyDenoiser(m)(x, sigma, cond) for m in (high, low)]
    for i, expert in enumerate((0, 0, 1, 1)):
        torch.testing.assert_close(out[i], alone[expert][i])
    assert not torch.allclose(alone[0], alone[1])
    assert teacher.settings()["expert_boundary"] == 0.875 and teacher.flow and teacher.shift == 3.0

    class Shifted(CONST):
        shift = 5.0

    refusals = [((FakeBaseModel(), low, 0.875), "flow models"), ((high, FakeBaseModel(Shifted()), 0.875), "shifts"),
                ((high, low, 1.0), "between 0 and 1")]
    for (h, lo, boundary), words in refusals:
        with pytest.raises(ValueError, match=words):
            ComfyExperts(ComfyDenoiser(h), ComfyDenoiser(lo), boundary)


def test_a_lora_student_of_two_experts_is_one_stock_lora_per_expert(tmp_path):
    """The student's two network evaluations lie on either side of the boundary (t = 0.85 and 0.61 after its
    analytic first step), so both experts' adapters train; each expert's part of the file, its prefix cut off,
    is a stock LoRA of that expert, and the two merged reproduce the student's denoiser."""
    high, low, experts = _experts(0.8)
    source = comfy_source(high, [_entry(3, 1), _entry(3, 2)], [_entry(3, 3)], 64, 64, 1.0, experts=experts)
    cfg = DistillConfig(teacher="fake", steps=2, iters=3, batch=4, teacher_substeps=2, lr=1e-2, sigma_min=0.1,
                        guidance_mode="cfg", guidance=1.0, student="lora", lora_rank=2, out=str(tmp_path))
    run = train_student(cfg, source, progress=False)
    tensors, card = load(run.path)
    assert card["comfy_experts"] == {"boundary": 0.8} and card["comfy_noise"] == "flow"
    parts = expert_loras(tensors)
    assert sum(map(len, parts.values())) == len(tensors)
    for part in parts.values():
        assert part and all(k.startswith("diffusion_model.") for k in part)
        assert any(v.abs().max() > 0 for k, v in part.items() if k.endswith("lora_up.weight"))  # it trained

    merged = {name: copy.deepcopy(m) for name, m in (("high", high), ("low", low))}
    for name, part in parts.items():
        assert merge(merged[name], part) == len([k for k in part if k.endswith("lora_down.weight")])
    student = load_student(run.path, CFGTeacher(source.denoiser, 1.0, source.uncond), share=True)
    x, cond = torch.randn(4, 4, 8, 8), source.draw_cond(4, torch.Generator().manual_seed(1))
    sigma = torch.tensor([20.0, 9.0, 2.0, 0.3])
    expected = ComfyExperts(ComfyDenoiser(merged["high"]), ComfyDenoiser(merged["low"]), 0.8)
    with torch.no_grad():
        torch.testing.assert_close(student.denoiser()(x, sigma, cond), expected(x, sigma, cond), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ the nodes on a stand-in MODEL
class FakePatcher:
    """A ComfyUI MODEL (ModelPatcher): the BaseModel is ``.model``; an object patch of ``model_sampling``
    is this clone's own, installed on the shared BaseModel only when the clone is loaded."""

    def __init__(self, base, sampling=None):
        self.model, self.sampling = base, sampling

    def get_model_object(self, name: str):
        assert name == "model_sampling"
        return self.sampling if self.sampling is not None else self.model.model_sampling


class FakeClip:
    """CLIP's node-facing interface: one [1, 3, 6] entry per text, a function of the text."""

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        gen = torch.Generator().manual_seed(sum(map(ord, tokens)))
        return [[torch.randn(1, 3, 6, generator=gen), {"pooled_output": torch.randn(1, 5, generator=gen)}]]


class LatentFormat:
    latent_rgb_factors = [[0.3, 0.2, 0.2], [0.2, 0.3, 0.2], [-0.1, 0.1, 0.3], [-0.2, -0.2, -0.3]]


def stand_in_nodes(tmp_path, monkeypatch) -> dict:
    """The pack's node classes with ComfyUI's host functions stood in: models and outputs under ``tmp_path``, a
    SAMPLER its sampling function, and a MODEL with a LoRA the pair (model, LoRA tensors)."""
    from distill_core.workflow import node_pack
    from distill_nodes import host

    monkeypatch.setenv("DISTILL_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("DISTILL_OUTPUT_DIR", str(tmp_path / "output"))
    monkeypatch.setattr(host, "ksampler", lambda function, **options: function)
    monkeypatch.setattr(host, "with_lora", lambda model, tensors: (model, tensors))
    return node_pack().NODE_CLASS_MAPPINGS


def test_the_nodes_distil_a_comfy_model_into_a_lora_for_the_stock_loader(tmp_path, monkeypatch):
    from distill_core.workflow import node_pack

    pack = node_pack()
    from distill_nodes import host

    monkeypatch.setenv("DISTILL_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("DISTILL_OUTPUT_DIR", str(tmp_path / "output"))
    applied = {}
    monkeypatch.setattr(host, "with_lora", lambda model, tensors: applied.update(model=model, tensors=tensors) or "M")
    monkeypatch.setattr(host, "ksampler", lambda function, **options: function)
    nodes = pack.NODE_CLASS_MAPPINGS

    positive, negative = nodes["DistillPromptList"]().run(FakeClip(), "a fox\n\n  a boat \n", "blurry")
    assert len(positive) == 2 and len(negative) == 1
    with pytest.raises(ValueError, match="prompt list is empty"):
        nodes["DistillPromptList"]().run(FakeClip(), " \n", "blurry")
    with pytest.raises(ValueError, match="multiples of 8"):
        nodes["DistillTeacherFromModel"]().run(FakePatcher(FakeBaseModel()), positive, negative, 60, 64, 5.0)
    with pytest.raises(ValueError, match="negative must be a non-empty"):
        nodes["DistillTeacherFromModel"]().run(FakePatcher(FakeBaseModel()), positive, [], 64, 64, 5.0)

    base = FakeBaseModel()
    base.latent_format = LatentFormat()
    base.process_latent_out = lambda x: x / 0.18215
    model = FakePatcher(base)
    (teacher,) = nodes["DistillTeacherFromModel"]().run(model, positive, negative, 64, 64, 5.0)
    probe = (torch.randn(1, 4, 8, 8), torch.tensor([2.0]), positive[0][0], positive[0][1]["pooled_output"])
    before = base.apply_model(*probe)
    args = dict(steps=2, method="sfd", iterations=2, learning_rate=1e-3, batch=2, seed=0, guidance_mode="auto",
                student="lora", lora_rank=2, save_name="fox", resume=False, preview_every=1, checkpoint_every=1)
    with pytest.raises(ValueError, match="SFD-v"):
        nodes["DistillToSteps"]().run(teacher, **{**args, "method": "sfd-v"})
    student_model, student, curve = nodes["DistillToSteps"]().run(teacher, **args)["result"]

    path = tmp_path / "models" / "loras" / "fox.safetensors"
    assert student.path == path.resolve() and student_model == "M" and applied["model"] is model
    assert set(applied["tensors"]) == set(load(path)[0]) and all(k.startswith("diffusion_model.") for k in
                                                                  applied["tensors"])
    card = student.card
    assert card["guidance"] == {"mode": "cfg", "w": 5.0} and card["student"]["kind"] == "lora"

    sigmas, sampler, cfg = nodes["DistillStudentSchedule"]().run("(connected student)", 0, student)
    assert cfg == 5.0 and sigmas[-1] == pytest.approx(0.1) and len(sigmas) == 4 and callable(sampler)
    images, latent = nodes["DistillSample"]().run(student, seed=1, count=2, steps=0)["result"]
    assert latent["samples"].shape == (2, 4, 8, 8) and images.shape[-1] == 3 and torch.isfinite(images).all()
    # the MODEL the user connected computes as before (training and sampling left no adapter behind)
    torch.testing.assert_close(base.apply_model(*probe), before, rtol=0, atol=0)


def test_a_guidance_distilled_flow_model_distils_at_its_guidance_input_into_a_student_sampled_in_time(
        tmp_path, monkeypatch):
    """Flux dev's shape: a flow model that takes guidance as input. The node trains without CFG (w = 1) with the
    guidance written into every condition, the file says so (embedded_guidance, comfy_noise), and the Student
    sigmas node gives ComfyUI times t = sigma / (1 + sigma) on the flow grid of the model's shift."""
    from types import SimpleNamespace

    from distill_core.workflow import node_pack
    from distill_nodes import host

    nodes = node_pack().NODE_CLASS_MAPPINGS
    monkeypatch.setenv("DISTILL_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("DISTILL_OUTPUT_DIR", str(tmp_path / "output"))
    monkeypatch.setattr(host, "with_lora", lambda model, tensors: "M")
    monkeypatch.setattr(host, "ksampler", lambda function, **options: function)
    base = FakeBaseModel(FluxSampling())
    base.model_config = SimpleNamespace(unet_config={"image_model": "flux", "guidance_embed": True})
    base.latent_format = LatentFormat()
    base.process_latent_out = lambda x: x
    positive, negative = nodes["DistillPromptList"]().run(FakeClip(), "a fox\na boat", "blurry")
    (teacher,) = nodes["DistillTeacherFromModel"]().run(FakePatcher(base), positive, negative, 64, 64, 3.5)
    assert teacher.guidance == 1.0
    args = dict(steps=2, method="sfd", iterations=2, learning_rate=1e-3, batch=2, seed=0, guidance_mode="auto",
                student="lora", lora_rank=2, save_name="flux_fox", resume=False, preview_every=1, checkpoint_every=1)
    _, student, _ = nodes["DistillToSteps"]().run(teacher, **args)["result"]
    assert base.calls and all(options["guidance"] == 3.5 for options in base.calls)
    card = student.card
    assert card["comfy_noise"] == "flow" and card["embedded_guidance"] == 3.5 and card["guidance"]["w"] == 1.0
    assert card["schedule"]["name"] == "flow" and card["schedule"]["shift"] == pytest.approx(math.exp(1.15))
    sigmas, _, cfg = nodes["DistillStudentSchedule"]().run("(connected student)", 0, student)
    assert cfg == 1.0 and float(sigmas[0]) == pytest.approx(FLOW_SIGMA_MAX / (1 + FLOW_SIGMA_MAX))
    torch.testing.assert_close(sigmas, torch.tensor(card["sigmas"]["2"]) / (1 + torch.tensor(card["sigmas"]["2"])))


class InPlaceBaseModel(FakeBaseModel):
    """A DiT block's habit (Flux's ``x += ...``): it adds into a tensor that an earlier op saved for backward."""

    in_place = True

    def apply_model(self, x, sigma, c_crossattn=None, y=None):
        net, s = self.diffusion_model, sigma.view(-1, 1, 1, 1)
        h = net.conv_in(x / (1 + s**2).sqrt())
        update = torch.nn.functional.layer_norm(h, h.shape[1:])  # saves h
        if self.in_place:
            h += update
        else:
            h = h + update
        return x - s * net.conv_out(torch.nn.functional.silu(h))


def test_backward_through_a_model_that_adds_in_place_gives_the_out_of_place_gradient():
    base = InPlaceBaseModel()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="inplace"):  # what autograd says without the adapter's copies
        base.apply_model(x, torch.tensor([1.0, 2.0])).square().sum().backward()
    ComfyDenoiser(base)(x, torch.tensor([1.0, 2.0])).square().sum().backward()
    ours, x.grad = x.grad, None
    base.in_place = False
    ComfyDenoiser(base)(x, torch.tensor([1.0, 2.0])).square().sum().backward()
    torch.testing.assert_close(ours, x.grad)


def _two_model_nodes(tmp_path, monkeypatch) -> tuple:
    """The node pack saving under ``tmp_path``, its SAMPLERs as their functions and its LoRA-applied MODELs as
    (model, tensors); two flow models as Wan 2.2 14B's high- and low-noise models (``_experts``); two prompts and
    a negative."""
    nodes = stand_in_nodes(tmp_path, monkeypatch)
    high, low, _ = _experts()
    for base in (high, low):
        base.latent_format, base.process_latent_out = LatentFormat(), lambda x: x
    positive, negative = nodes["DistillPromptList"]().run(FakeClip(), "a fox\na boat", "blurry")
    return nodes, high, low, positive, negative


def _chained(student, models: dict, high: tuple, low: tuple) -> torch.Tensor:
    """Two chained SamplerCustom runs from Few-step sample's noise and prompts at seed 1 (as a seeded workflow's):
    the high-noise part (its SAMPLER and SIGMAS) on ``models["high"]``, then the low-noise part on
    ``models["low"]`` from the first's output; ComfyUI's flow latent x_t at the last time."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn((2, 4, 8, 8), generator=gen)
    cond = {k: v for k, v in student.teacher.source().draw_cond(2, gen).items() if k != "lengths"}  # one length
    x = float(high[1][0]) * z  # ComfyUI's flow latent x_t = t n at the first time
    for (sampler, sigmas), name in ((high, "high"), (low, "low")):
        x = sampler(lambda x_t, t, base=models[name]: base.apply_model(x_t, t, **cond), x, sigmas)
    return x


def test_the_nodes_distil_two_models_into_a_lora_each_that_two_chained_samplers_apply(tmp_path, monkeypatch):
    """Wan 2.2 14B's shape: a high- and a low-noise flow model as one teacher. The training node writes one
    stock LoRA per model beside the student; the two-model schedule node splits the student's sigmas where
    its teacher switched models; the high-noise model with its LoRA merged, then the low-noise one, each on
    its part with its sampler (as two chained SamplerCustom nodes), give Few-step sample's latents."""
    nodes, high, low, positive, negative = _two_model_nodes(tmp_path, monkeypatch)
    teacher_node = nodes["DistillTeacherFromModel"]()
    with pytest.raises(ValueError, match="flow models"):
        teacher_node.run(FakePatcher(high), positive, negative, 64, 64, 1.0, low_noise_model=FakePatcher(
            FakeBaseModel()))
    (teacher,) = teacher_node.run(FakePatcher(high), positive, negative, 64, 64, 1.0,
                                  low_noise_model=FakePatcher(low), boundary=0.8)
    args = dict(steps=2, method="sfd", iterations=2, learning_rate=1e-2, batch=4, seed=0, guidance_mode="auto",
                student="lora", lora_rank=2, save_name="fox", resume=False, preview_every=0, checkpoint_every=1)
    with pytest.raises(ValueError, match="set student to lora"):
        nodes["DistillToSteps"]().run(teacher, **{**args, "student": "full"})
    student_model, student, _ = nodes["DistillToSteps"]().run(teacher, **args)["result"]
    assert student_model is None and student.card["comfy_experts"] == {"boundary": 0.8}
    folder = tmp_path / "models" / "loras"
    loras = {name: load(folder / f"fox_{name}_noise.safetensors") for name in ("high", "low")}
    assert {name: card["kind"] for name, (_, card) in loras.items()} == {"high": "expert_lora", "low": "expert_lora"}
    merged = {"high": copy.deepcopy(high), "low": copy.deepcopy(low)}
    for name, (tensors, _) in loras.items():
        assert tensors and all(k.startswith("diffusion_model.") for k in tensors)
        assert merge(merged[name], tensors) == len([k for k in tensors if k.endswith("lora_down.weight")])

    with pytest.raises(ValueError, match="Student sigmas for two models"):
        nodes["DistillStudentSchedule"]().run("(connected student)", 0, student)
    model_high, sigmas_high, sampler_high, model_low, sigmas_low, sampler_low, cfg = nodes[
        "DistillTwoModelSchedule"]().run("(connected student)", 0, student)
    for (model, tensors), name in ((model_high, "high"), (model_low, "low")):  # each MODEL with its own LoRA
        assert model.model is {"high": high, "low": low}[name] and tensors.keys() == loras[name][0].keys()
    assert nodes["DistillTwoModelSchedule"]().run("loras/fox.safetensors", 0)[::3] == (None, None, cfg)
    full = comfy_sigmas(student.card, torch.tensor(student.card["sigmas"]["2"]))
    torch.testing.assert_close(torch.cat([sigmas_high, sigmas_low[1:]]), full)
    assert cfg == 1.0 and len(sigmas_high) == 3 and float(sigmas_high[-2]) >= 0.8 > float(sigmas_low[0])

    _, latent = nodes["DistillSample"]().run(student, seed=1, count=2, steps=0)["result"]
    x = _chained(student, merged, (sampler_high, sigmas_high), (sampler_low, sigmas_low))
    torch.testing.assert_close(x / (1 - float(sigmas_low[-1])), latent["samples"], atol=1e-5, rtol=1e-5)

    other = folder / "fox_again_low_noise.safetensors"  # someone else's file where a LoRA of the save would go
    other.write_bytes(b"not ours")
    with pytest.raises(ValueError, match="fox_again_low_noise.safetensors exists already"):
        nodes["DistillSaveStudent"]().run(student, "fox_again")
    assert other.read_bytes() == b"not ours" and not (folder / "fox_again.safetensors").exists()
    other.unlink()
    saved = nodes["DistillSaveStudent"]().run(student, "fox_again")["ui"]["text"]  # with its two LoRAs beside it
    assert saved == [str(folder / f"fox_again{end}.safetensors") for end in ("", "_high_noise", "_low_noise")]
    assert load(folder / "fox_again_low_noise.safetensors")[0].keys() == loras["low"][0].keys()
    loaded_model, loaded = nodes["DistillLoadStudent"]().run(teacher, "loras/fox_again.safetensors")
    assert loaded_model is None and loaded.card["comfy_experts"] == {"boundary": 0.8}
    with pytest.raises(ValueError, match="not a student made by Distill"):  # a model's LoRA is for the stock loader
        nodes["DistillLoadStudent"]().run(teacher, "loras/fox_high_noise.safetensors")


def test_a_dmd2_student_of_two_models_samples_through_two_chained_samplers(tmp_path, monkeypatch):
    """A student that re-noises between its steps (DMD2) on Wan 2.2 14B's shape: the distribution node writes a
    LoRA per model, and the two-model schedule node hands both parts its re-noising sampler. The first part ends
    by noising its image to the first time below the boundary; the second goes on from there. With the fresh
    noise fixed (zero) the pair gives Few-step sample's latents; with it drawn, the second part draws its own. A
    student of a multistep solver, whose history a split would cut, is refused."""
    from distill_core import sampling

    nodes, high, low, positive, negative = _two_model_nodes(tmp_path, monkeypatch)
    (teacher,) = nodes["DistillTeacherFromModel"]().run(FakePatcher(high), positive, negative, 64, 64, 1.0,
                                                        low_noise_model=FakePatcher(low), boundary=0.9)
    args = dict(steps=4, method="dmd2", iterations=2, learning_rate=1e-2, batch=4, critic_updates=1, seed=0,
                student="lora", lora_rank=2, save_name="fox", resume=False, preview_every=0, checkpoint_every=1)
    _, student, _ = nodes["DistillDistributionMatching"]().run(teacher, **args)["result"]
    assert student.card["sampler"] == "renoise" and student.card["comfy_experts"] == {"boundary": 0.9}
    folder = tmp_path / "models" / "loras"
    merged = {"high": copy.deepcopy(high), "low": copy.deepcopy(low)}
    for name in merged:
        tensors, card = load(folder / f"fox_{name}_noise.safetensors")
        assert card["kind"] == "expert_lora" and merge(merged[name], tensors) > 0

    _, sigmas_high, sampler_high, _, sigmas_low, sampler_low, cfg = nodes["DistillTwoModelSchedule"]().run(
        "(connected student)", 0, student)
    assert cfg == 1.0 and float(sigmas_low[-1]) == 0 and len(sigmas_high) + len(sigmas_low) == 6
    assert len(sigmas_high) == len(sigmas_low) == 3 and float(sigmas_high[-2]) >= 0.9 > float(sigmas_low[0])

    solver = SimpleNamespace(card={**student.card, "sampler": "solver", "solver": "dpmpp_2m"})
    with pytest.raises(ValueError, match="multistep solver 'dpmpp_2m', whose history two chained samplers would cut"):
        nodes["DistillTwoModelSchedule"]().run("(connected student)", 0, solver)
    parts = (sampler_high, sigmas_high), (sampler_low, sigmas_low)
    drawn = _chained(student, merged, *parts)
    monkeypatch.setattr(sampling, "renoise_noise", lambda x, steps: [torch.zeros_like(x)] * steps)
    _, latent = nodes["DistillSample"]().run(student, seed=1, count=2, steps=0)["result"]
    torch.testing.assert_close(_chained(student, merged, *parts), latent["samples"], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(drawn).all() and (drawn - latent["samples"]).abs().max() > 1e-2  # the noise was drawn


def test_a_phased_dmd_student_of_comfyui_models_samples_with_few_step_sample(tmp_path, monkeypatch):
    """Phased DMD's student is an expert (a LoRA) per step, which no one MODEL holds: both schedule nodes refuse
    it in one line that names Few-step sample, which samples it; of one model and of Wan 2.2 14B's two."""
    nodes, high, low, positive, negative = _two_model_nodes(tmp_path, monkeypatch)
    args = dict(steps=2, method="phased-dmd", iterations=2, learning_rate=1e-2, batch=2, critic_updates=1, seed=0,
                student="lora", lora_rank=2, resume=False, preview_every=0, checkpoint_every=1)
    teacher_node = nodes["DistillTeacherFromModel"]()
    for name, schedule, models in (("one", "DistillStudentSchedule", {}),
                                   ("two", "DistillTwoModelSchedule", {"low_noise_model": FakePatcher(low)})):
        (teacher,) = teacher_node.run(FakePatcher(high), positive, negative, 64, 64, 1.0, **models)
        model, student, _ = nodes["DistillDistributionMatching"]().run(teacher, **args, save_name=name)["result"]
        assert model is None and student.card["experts"]["count"] == 2
        with pytest.raises(ValueError, match="is 2 experts, a LoRA for each step, which no one MODEL holds: sample "
                                             "it with the Few-step sample node"):
            nodes[schedule]().run("(connected student)", 0, student)
        _, latent = nodes["DistillSample"]().run(student, seed=1, count=2, steps=0)["result"]
        assert latent["samples"].shape == (2, 4, 8, 8) and torch.isfinite(latent["samples"]).all()


class FakeImageModel(FakeBaseModel):
    """An image-conditioned flow model (Wan 2.1 image-to-video's shape): ``extra_conds`` turns an entry's
    ``concat_latent_image`` and ``concat_mask`` into ``c_concat`` laid out as the sample (a blank one where the
    entry has none, as ComfyUI's models do) and its CLIP vision tokens into ``clip_fea``; the network adds
    projections of both to its input."""

    def __init__(self):
        super().__init__(CONST())
        self.image_in, self.vision_in = nn.Conv2d(5, 4, 1), nn.Linear(6, 4)

    def extra_conds(self, cross_attn, device, noise, **options):
        out = super().extra_conds(cross_attn, device, noise, **options)
        image = options.get("concat_latent_image", torch.zeros_like(noise))
        mask = options.get("concat_mask", torch.ones_like(noise[:, :1]))
        out["c_concat"] = Cond(torch.cat([1 - mask, image], dim=1))
        out["clip_fea"] = Cond(options.get("clip_vision_output", torch.zeros(1, 2, 6)))
        return out

    def apply_model(self, x, sigma, c_crossattn=None, y=None, c_concat=None, clip_fea=None):
        vision = self.vision_in(clip_fea).mean(1)[..., None, None]
        return super().apply_model(x + self.image_in(c_concat) + vision, sigma, c_crossattn, y)


def lora_student(nodes: dict, teacher, base, loras, preview_every: int = 0) -> tuple:
    """Distill to 2 steps (SFD, a LoRA of rank 2, two iterations) on ``teacher``, a stand-in model ``base``'s:
    (the student, a copy of ``base`` with its LoRA merged as the stock loader merges it, the student's (SIGMAS,
    SAMPLER, cfg), Few-step sample's LATENT of two samples from seed 1)."""
    args = dict(steps=2, method="sfd", iterations=2, learning_rate=1e-2, batch=2, seed=0, guidance_mode="auto",
                student="lora", lora_rank=2, save_name="student", resume=False, preview_every=preview_every,
                checkpoint_every=1)
    _, student, _ = nodes["DistillToSteps"]().run(teacher, **args)["result"]
    merged = copy.deepcopy(base)
    assert merge(merged, load(loras / "student.safetensors")[0]) > 0
    schedule = nodes["DistillStudentSchedule"]().run("(connected student)", 0, student)
    _, latent = nodes["DistillSample"]().run(student, seed=1, count=2, steps=0)["result"]
    return student, merged, schedule, latent


def few_step_draws(student) -> tuple[torch.Tensor, dict]:
    """Few-step sample's noise and conditions of two samples from seed 1, as a seeded workflow draws them."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn((2, *student.teacher.source().shape), generator=gen)
    return z, student.teacher.source().draw_cond(2, gen)


def _with_image(entry: list, seed: int, side: int = 8) -> list:
    """A CONDITIONING entry with a start image's latent, mask and CLIP vision tokens, as WanImageToVideo writes
    them."""
    gen = torch.Generator().manual_seed(seed)
    image, vision = torch.randn(1, 4, side, side, generator=gen), torch.randn(1, 2, 6, generator=gen)
    return [entry[0], {**entry[1], "concat_latent_image": image, "concat_mask": torch.zeros(1, 1, side, side),
                       "clip_vision_output": vision}]


def test_an_image_conditioned_model_distils_on_each_prompts_image(tmp_path, monkeypatch, capsys):
    """Wan image-to-video's shape: each CONDITIONING entry carries its image, which the model takes as c_concat
    laid out as the sample. Each row keeps its own image, and CFG's unconditional side takes the row's image too
    (ComfyUI's negative from WanImageToVideo carries the same one), and its CLIP vision tokens; so do two such
    models as one teacher (Wan 2.2 14B image-to-video), where the node points out boundary 0.9 when left at
    text-to-video's 0.875. An entry without an image (for an inpainting model,
    whose ComfyUI inputs would fail, before they are made), or with one of
    another size, is refused at the teacher node; trained, the student's SIGMAS and SAMPLER on the LoRA-merged
    model give Few-step sample's latents, and another image gives another sample."""
    nodes = stand_in_nodes(tmp_path, monkeypatch)
    base = FakeImageModel()
    base.latent_format, base.process_latent_out = LatentFormat(), lambda x: x
    positive = [_with_image(_entry(3, 1), 10), _with_image(_entry(3, 2), 11)]
    negative = [_with_image(_entry(3, 3), 10)]
    source = comfy_source(base, positive, negative, 64, 64, 3.0)
    rows = source.draw_cond(2, torch.Generator().manual_seed(0))
    images = torch.stack([e[1]["concat_latent_image"][0] for e in positive])
    assert not {"c_concat", "clip_fea"} & source.uncond.keys() and rows["c_concat"].shape == (2, 5, 8, 8)
    for row in range(2):  # each row its own entry's image (the mask channel first)
        assert any(torch.equal(rows["c_concat"][row, 1:], image) for image in images)
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([2.0, 2.0])
    teacher = CFGTeacher(source.denoiser, 3.0, source.uncond)
    with torch.no_grad():
        x0_u = source.denoiser(x, sigma, {**index_cond(source.uncond, torch.zeros(2, dtype=torch.long)),
                                          "c_concat": rows["c_concat"], "clip_fea": rows["clip_fea"]})
        x0_c = source.denoiser(x, sigma, rows)
        torch.testing.assert_close(teacher(x, sigma, rows), x0_u + 3.0 * (x0_c - x0_u))

    low = FakeImageModel()  # Wan 2.2 14B image-to-video: two such models, each row to its noise level's model
    with torch.no_grad():
        for p in low.parameters():
            p.add_(0.3 * torch.randn_like(p))
    experts = comfy_source(base, positive, negative, 64, 64, 3.0, experts=(low, low.model_sampling, 0.9))
    sigma = torch.tensor([20.0, 2.0])  # t = 0.95 (high), 0.67 (low)
    with torch.no_grad():
        both = CFGTeacher(experts.denoiser, 3.0, experts.uncond)(x, sigma, rows)
        alone = [CFGTeacher(comfy_source(m, positive, negative, 64, 64, 3.0).denoiser, 3.0, source.uncond)(
            x, sigma, rows) for m in (base, low)]
    torch.testing.assert_close(both, torch.stack([alone[0][0], alone[1][1]]))

    teacher_node = nodes["DistillTeacherFromModel"]()
    with pytest.raises(ValueError, match="CONDITIONING entry 1 has no image, and this model is conditioned on one"):
        teacher_node.run(FakePatcher(base), [positive[0], _entry(3, 2)], negative, 64, 64, 1.0)
    with pytest.raises(ValueError, match=r"makes a model input of \[4, 4\] latent pixels .* are \[8, 8\]"):
        teacher_node.run(FakePatcher(base), [_with_image(_entry(3, 1), 10, side=4)], negative, 64, 64, 1.0)
    inpainting = FakeImageModel()  # an SD inpainting model's inputs need the entry's image: ComfyUI's fail without
    inpainting.concat_keys = ("mask", "masked_image")
    inpainting.extra_conds = lambda **kwargs: pytest.fail("extra_conds called for an entry without an image")
    with pytest.raises(ValueError, match="CONDITIONING entry 0 has no image"):
        teacher_node.run(FakePatcher(inpainting), [_entry(3, 2)], negative, 64, 64, 1.0)
    for boundary, says in ((0.875, True), (0.9, False)):  # two such models: image-to-video's boundary, 0.9
        teacher_node.run(FakePatcher(base), positive, negative, 64, 64, 1.0, low_noise_model=FakePatcher(low),
                         boundary=boundary)
        assert ("hands over at t = 0.9, and boundary is text-to-video's 0.875" in capsys.readouterr().out) == says
    (handle,) = teacher_node.run(FakePatcher(base), positive, negative, 64, 64, 1.0)
    student, merged, (sigmas, sampler, cfg), latent = lora_student(nodes, handle, base, tmp_path / "models" / "loras")
    z, cond = few_step_draws(student)
    cond.pop("lengths")  # every prompt of one token count: the model inputs as they are
    out = sampler(lambda x_t, t: merged.apply_model(x_t, t, **cond), float(sigmas[0]) * z, sigmas)
    torch.testing.assert_close(out / (1 - float(sigmas[-1])), latent["samples"], atol=1e-5, rtol=1e-5)
    other = {**cond, "c_concat": cond["c_concat"].flip(0), "clip_fea": cond["clip_fea"].flip(0)}
    swapped = sampler(lambda x_t, t: merged.apply_model(x_t, t, **other), float(sigmas[0]) * z, sigmas)
    assert cfg == 1.0 and (swapped - out).abs().max() > 1e-2


class FakeEditModel(FakeBaseModel):
    """An editing model (Flux Kontext's, Qwen-Image-Edit's shape): ``extra_conds`` turns an entry's
    ``reference_latents`` into the list input ``ref_latents`` (ComfyUI's CONDList, in the model's scale), and the
    network adds a projection of each reference to its input."""

    def __init__(self):
        super().__init__(CONST())
        self.reference_in = nn.Conv2d(4, 4, 1)

    def extra_conds(self, cross_attn, device, noise, **options):
        out = super().extra_conds(cross_attn, device, noise, **options)
        if "reference_latents" in options:
            out["ref_latents"] = Cond([latent * 2 for latent in options["reference_latents"]])
            if "reference_latents_method" in options:  # FluxKontextMultiReferenceLatentMethod's, a CONDConstant
                out["ref_latents_method"] = Cond(options["reference_latents_method"])
        return out

    def apply_model(self, x, sigma, c_crossattn=None, y=None, ref_latents=None, ref_latents_method="offset"):
        assert isinstance(ref_latents_method, str)
        for k, latent in enumerate(ref_latents or []):  # "uxo" places the references elsewhere: other weights
            x = x + (k + 2 if ref_latents_method == "uxo" else 1) * self.reference_in(latent).mean((2, 3), keepdim=True)
        return super().apply_model(x, sigma, c_crossattn, y)


def _with_references(entry: list, seed: int, sides=((8, 8),)) -> list:
    """A CONDITIONING entry with reference images' latents, as ReferenceLatent or TextEncodeQwenImageEdit add them."""
    gen = torch.Generator().manual_seed(seed)
    return [entry[0], {**entry[1], "reference_latents": [torch.randn(1, 4, *side, generator=gen) for side in sides]}]


def test_an_editing_model_distils_on_each_prompts_reference_images(tmp_path, monkeypatch):
    """Flux Kontext and Qwen-Image-Edit take reference images as a list input: each row keeps its own prompt's list,
    item by item, and the model gets them back as a list; CFG's unconditional side takes the row's references (the
    Qwen-Image-Edit negative carries the same image). A negative without references (Flux Kontext's zeroed-out
    prompt) takes the first prompt's at CFG 1, where it does not count, and is refused above it; references of
    other sizes are refused. Trained, the student's SIGMAS and SAMPLER on the LoRA-merged model, given each row's
    references, give Few-step sample's latents."""
    nodes = stand_in_nodes(tmp_path, monkeypatch)
    base = FakeEditModel()
    base.latent_format, base.process_latent_out = LatentFormat(), lambda x: x
    two = ((8, 8), (4, 6))  # two references of other sizes, as TextEncodeQwenImageEditPlus gives them
    positive = [_with_references(_entry(3, 1), 10, two), _with_references(_entry(3, 2), 11, two)]
    negative = [_with_references(_entry(3, 3), 10, two)]
    source = comfy_source(base, positive, negative, 64, 64, 3.0)
    rows = source.draw_cond(3, torch.Generator().manual_seed(0))
    assert "ref_latents" not in source.uncond and list(rows["ref_latents"]) == ["0", "1"]
    assert rows["ref_latents"]["1"].shape == (3, 4, 4, 6)
    for row in range(3):  # each row its own entry's references, in the model's scale
        own = [e for e in positive if torch.equal(rows["ref_latents"]["0"][row], 2 * e[1]["reference_latents"][0][0])]
        assert len(own) == 1 and torch.equal(rows["ref_latents"]["1"][row], 2 * own[0][1]["reference_latents"][1][0])
    x, sigma = torch.randn(3, 4, 8, 8), torch.full((3,), 2.0)
    with torch.no_grad():
        ours = source.denoiser(x, sigma, rows)
        inputs = {k: v for k, v in rows.items() if k not in ("ref_latents", "lengths")}
        listed = [rows["ref_latents"]["0"], rows["ref_latents"]["1"]]
        torch.testing.assert_close(ours, base.apply_model(x / 3, sigma / 3, **inputs, ref_latents=listed))
        assert (ours - base.apply_model(x / 3, sigma / 3, **inputs)).abs().max() > 1e-3
        x0_u = source.denoiser(x, sigma, {**index_cond(source.uncond, torch.zeros(3, dtype=torch.long)),
                                          "ref_latents": rows["ref_latents"]})
        guided = CFGTeacher(source.denoiser, 3.0, source.uncond)(x, sigma, rows)
    torch.testing.assert_close(guided, x0_u + 3.0 * (ours - x0_u))

    teacher_node = nodes["DistillTeacherFromModel"]()
    bare_negative = [_entry(3, 3)]
    with pytest.raises(ValueError, match="the positive prompts carry reference images and the negative does not"):
        teacher_node.run(FakePatcher(base), positive, bare_negative, 64, 64, 3.0)
    with pytest.raises(ValueError, match=r"differ in count or size \(\[\(4, 8, 8\), \(4, 4, 6\)\], \[\(4, 8, 8\)\]"):
        teacher_node.run(FakePatcher(base), [positive[0], _with_references(_entry(3, 2), 11)], negative, 64, 64, 3.0)
    (handle,) = teacher_node.run(FakePatcher(base), positive, bare_negative, 64, 64, 1.0)  # CFG 1: filled in
    student, merged, (sigmas, sampler, cfg), latent = lora_student(nodes, handle, base, tmp_path / "models" / "loras")
    z, cond = few_step_draws(student)
    cond.pop("lengths")  # every prompt of one token count: the model inputs as they are
    cond["ref_latents"] = list(cond["ref_latents"].values())
    out = sampler(lambda x_t, t: merged.apply_model(x_t, t, **cond), float(sigmas[0]) * z, sigmas)
    assert cfg == 1.0
    torch.testing.assert_close(out / (1 - float(sigmas[-1])), latent["samples"], atol=1e-5, rtol=1e-5)


def _with_method(entry: list, method: str) -> list:
    """A CONDITIONING entry with a reference method, as FluxKontextMultiReferenceLatentMethod sets it."""
    return [entry[0], {**entry[1], "reference_latents_method": method}]


def test_an_editing_models_reference_method_is_each_rows_own_text(tmp_path, monkeypatch):
    """FluxKontextMultiReferenceLatentMethod sets a string model input (a CONDConstant): each row holds its own as
    UTF-8 bytes, and the model gets each row's string back, the rows of one method in one call. A negative without
    the method takes the first prompt's at CFG 1 (with its references) and is refused above it, naming the node;
    a text too long to hold is refused. Trained at CFG 1, the student's SIGMAS and SAMPLER on the LoRA-merged model,
    given the method, give Few-step sample's latents."""
    nodes = stand_in_nodes(tmp_path, monkeypatch)
    base = FakeEditModel()
    base.latent_format, base.process_latent_out = LatentFormat(), lambda x: x
    positive = [_with_method(_with_references(_entry(3, 1), 10), "uxo"),
                _with_method(_with_references(_entry(3, 2), 11), "index")]
    negative = [_with_method(_with_references(_entry(3, 3), 10), "offset")]
    source = comfy_source(base, positive, negative, 64, 64, 3.0)
    assert [row_text(row) for row in source.uncond["texts"]["ref_latents_method"]] == ["offset"]
    rows = source.draw_cond(4, torch.Generator().manual_seed(0))
    methods = [row_text(row) for row in rows["texts"]["ref_latents_method"]]
    assert rows["texts"]["ref_latents_method"].dtype == torch.uint8 and set(methods) == {"uxo", "index"}
    x, sigma = torch.randn(4, 4, 8, 8), torch.full((4,), 2.0)
    with torch.no_grad():
        ours = source.denoiser(x, sigma, rows)
        for row, method in enumerate(methods):
            inputs = {k: v[row:row + 1] for k, v in rows.items() if k not in ("ref_latents", "lengths", "texts")}
            alone = base.apply_model(x[row:row + 1] / 3, sigma[row:row + 1] / 3, **inputs,
                                     ref_latents=[rows["ref_latents"]["0"][row:row + 1]], ref_latents_method=method)
            torch.testing.assert_close(ours[row:row + 1], alone)
        assert (ours - source.denoiser(x, sigma, {k: v for k, v in rows.items() if k != "texts"})).abs().max() > 1e-3

    teacher_node = nodes["DistillTeacherFromModel"]()
    with pytest.raises(ValueError, match="carry a reference method and the negative does not.*"
                                         "FluxKontextMultiReferenceLatentMethod with the same method on it"):
        teacher_node.run(FakePatcher(base), positive, [_with_references(_entry(3, 3), 10)], 64, 64, 3.0)
    with pytest.raises(ValueError, match="carry reference images and a reference method and the negative does not"):
        teacher_node.run(FakePatcher(base), positive, [_entry(3, 3)], 64, 64, 3.0)
    with pytest.raises(ValueError, match="'ref_latents_method' is a text of more than 32 bytes"):
        teacher_node.run(FakePatcher(base), [_with_method(positive[0], "x" * 33)], [_entry(3, 3)], 64, 64, 1.0)
    (handle,) = teacher_node.run(FakePatcher(base), positive[:1], [_entry(3, 3)], 64, 64, 1.0)  # CFG 1: filled in
    student, merged, (sigmas, sampler, cfg), latent = lora_student(nodes, handle, base, tmp_path / "models" / "loras")
    z, cond = few_step_draws(student)
    assert [row_text(row) for row in student.teacher.source().uncond["texts"]["ref_latents_method"]] == ["uxo"]
    inputs = {k: v for k, v in cond.items() if k not in ("ref_latents", "lengths", "texts")}
    out = sampler(lambda x_t, t: merged.apply_model(x_t, t, **inputs, ref_latents=list(cond["ref_latents"].values()),
                                                     ref_latents_method="uxo"), float(sigmas[0]) * z, sigmas)
    assert cfg == 1.0
    torch.testing.assert_close(out / (1 - float(sigmas[-1])), latent["samples"], atol=1e-5, rtol=1e-5)


def test_editing_prompts_with_a_negative_each_are_guided_against_their_own(tmp_path, monkeypatch):
    """Qwen-Image-Edit encodes the negative with the image (TextEncodeQwenImageEdit), so training on several images
    takes one negative per prompt: as many negative entries as positive ones pair up in order, and CFG guides each
    row against its own prompt's negative (its text, its references), not the first. A trained student samples."""
    nodes = stand_in_nodes(tmp_path, monkeypatch)
    base = FakeEditModel()
    base.latent_format, base.process_latent_out = LatentFormat(), lambda x: x
    positive = [_with_references(_entry(3, 1), 10), _with_references(_entry(3, 2), 11)]
    negative = [_with_references(_entry(3, 3), 10), _with_references(_entry(3, 4), 11)]
    source = comfy_source(base, positive, negative, 64, 64, 3.0)
    rows = source.draw_cond(6, torch.Generator().manual_seed(0))
    own = rows["own_uncond"]
    assert "ref_latents" not in own and "own_uncond" not in source.uncond
    prompt = [0 if torch.equal(rows["ref_latents"]["0"][r], 2 * positive[0][1]["reference_latents"][0][0]) else 1
              for r in range(6)]
    assert set(prompt) == {0, 1}
    for r, k in enumerate(prompt):  # each row's negative is its prompt's: the text of negative entry k
        torch.testing.assert_close(own["c_crossattn"][r], negative[k][0][0])
    x, sigma = torch.randn(6, 4, 8, 8), torch.full((6,), 2.0)
    with torch.no_grad():
        guided = CFGTeacher(source.denoiser, 3.0, source.uncond)(x, sigma, rows)
        x0_c = source.denoiser(x, sigma, rows)
        x0_u = source.denoiser(x, sigma, {**own, "ref_latents": rows["ref_latents"]})
        first = source.denoiser(x, sigma, {**index_cond(source.uncond, torch.zeros(6, dtype=torch.long)),
                                           "ref_latents": rows["ref_latents"]})
    torch.testing.assert_close(guided, x0_u + 3.0 * (x0_c - x0_u))
    second = torch.tensor(prompt) == 1
    assert (x0_u - first)[second].abs().max() > 1e-3 and torch.equal(x0_u[~second], first[~second])
    assert len(comfy_source(base, positive, negative[:1], 64, 64, 3.0).draw_cond(2, torch.Generator())) == \
        len(rows) - 1  # one negative: every prompt's, no row of its own
    (handle,) = nodes["DistillTeacherFromModel"]().run(FakePatcher(base), positive, negative, 64, 64, 3.0)
    _, _, _, latent = lora_student(nodes, handle, base, tmp_path / "models" / "loras")
    assert latent["samples"].shape == (2, 4, 8, 8) and latent["samples"].isfinite().all()


def test_a_negative_without_its_prompts_image_takes_it_at_cfg_1_and_is_refused_above():
    """HunyuanImageToVideo gives only the positive its image: an image-conditioned model's negative without one
    takes its prompt's (image, mask, vision features) at CFG 1, where the negative does not count, as a guidance-
    distilled model samples; above CFG 1 it is refused in one line that names what the negative lacks."""
    base = FakeImageModel()
    base.latent_format, base.concat_keys = LatentFormat(), ("concat_image", "mask_inverted")
    positive, negative = [_with_image(_entry(3, 1), 10), _with_image(_entry(3, 2), 11)], [_entry(3, 3)]
    source = comfy_source(base, positive, negative, 64, 64, 1.0)
    assert source.guidance == 1.0 and "c_concat" not in source.uncond  # each row's own image on both sides
    with pytest.raises(ValueError, match="the positive prompts carry an image and its mask and CLIP vision features "
                                         "and the negative does not.*or set the guidance to 1"):
        comfy_source(base, positive, negative, 64, 64, 3.0)

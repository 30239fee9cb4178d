"""DiffusersDenoiser against diffusers' own conversions: DDPMScheduler's x0 at the training steps,
EulerDiscreteScheduler's x0 and ``_sigma_to_t`` between them, for every prediction type and for
UNet2DModel (class labels), UNet2DConditionModel (text) and an SDXL-like one (added_cond_kwargs)."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from distill_core.denoisers import Denoiser, DiffusersDenoiser
from tests.conftest import randomise

#: Stable Diffusion's training schedule.
TRAIN_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "beta_end": 0.012}
PREDICTIONS = ("epsilon", "v_prediction", "sample")
TINY = {"sample_size": 8, "in_channels": 2, "out_channels": 2, "block_out_channels": (8, 16), "layers_per_block": 1,
        "norm_num_groups": 4}


def tiny_unet(seed: int = 0) -> torch.nn.Module:
    """A class-conditional UNet2DModel on 2x8x8 with random weights, in float64."""
    unet = diffusers.UNet2DModel(**TINY, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
                                 num_class_embeds=10)
    return randomise(unet, seed).double().eval().requires_grad_(False)


def tiny_text_unet(seed: int = 1, added_cond: bool = False) -> torch.nn.Module:
    """A UNet2DConditionModel with 12-dim text tokens; with ``added_cond`` also SDXL's pooled text
    embedding and 6 time ids (``addition_embed_type="text_time"``)."""
    extra = {"addition_embed_type": "text_time", "addition_time_embed_dim": 4,
             "projection_class_embeddings_input_dim": 12 + 6 * 4} if added_cond else {}
    unet = diffusers.UNet2DConditionModel(**TINY, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                          cross_attention_dim=12, attention_head_dim=4, **extra)
    return randomise(unet, seed).double().eval().requires_grad_(False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


def model_and_cond(kind: str) -> tuple[torch.nn.Module, object, dict]:
    """(unet, our cond, the UNet keyword arguments diffusers' pipelines would pass) for a batch of 2."""
    gen = torch.Generator().manual_seed(7)
    if kind == "unet2d":
        labels = torch.tensor([3, 8])
        return tiny_unet(), labels, {"class_labels": labels}
    text = torch.randn(2, 5, 12, generator=gen, dtype=torch.float64)
    if kind == "text":
        return tiny_text_unet(), text, {"encoder_hidden_states": text}
    added = {"text_embeds": torch.randn(2, 12, generator=gen, dtype=torch.float64),
             "time_ids": torch.randn(2, 6, generator=gen, dtype=torch.float64)}
    kwargs = {"encoder_hidden_states": text, "added_cond_kwargs": added}
    return tiny_text_unet(added_cond=True), kwargs, kwargs


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("kind", ["unet2d", "text", "sdxl_like"])
def test_x0_matches_ddpm_scheduler_on_the_training_grid(kind: str, prediction_type: str):
    unet, cond, kwargs = model_and_cond(kind)
    sched = diffusers.DDPMScheduler(**TRAIN_SCHEDULE, prediction_type=prediction_type, clip_sample=False)
    denoiser = DiffusersDenoiser.from_scheduler(unet, sched)
    gen = torch.Generator().manual_seed(0)
    for t in (999, 500, 37, 0):
        abar = sched.alphas_cumprod[t].double()
        x_vp = torch.randn(2, 2, 8, 8, generator=gen, dtype=torch.float64)
        ref = sched.step(unet(x_vp, t, **kwargs).sample, t, x_vp, generator=gen).pred_original_sample
        sigma = denoiser.sigmas[t]
        assert denoiser.sigma_to_t(sigma).item() == t
        assert rel_err(denoiser(x_vp / abar.sqrt(), sigma, cond), ref) < 1e-5, (t, prediction_type)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_x0_matches_euler_scheduler_between_grid_points(prediction_type: str):
    unet, labels, kwargs = model_and_cond("unet2d")
    sched = diffusers.EulerDiscreteScheduler(**TRAIN_SCHEDULE, prediction_type=prediction_type)
    sched.set_timesteps(sigmas=[13.7, 4.21, 0.5, 0.0333, 0.0])
    denoiser = DiffusersDenoiser.from_scheduler(unet, sched)
    log_sigmas = np.log(denoiser.sigmas.numpy())
    gen = torch.Generator().manual_seed(1)
    for t_sched, sigma in zip(sched.timesteps, sched.sigmas[:-1]):
        x = sigma * torch.randn(2, 2, 8, 8, generator=gen, dtype=torch.float64)
        # diffusers' interpolation in float64 (set_timesteps ran it on float32 sigmas); a tensor, as a
        # Python float timestep would be truncated to an integer by the UNet.
        t = torch.from_numpy(sched._sigma_to_t(np.float64(sigma), log_sigmas))
        assert t.item() == pytest.approx(t_sched.item(), abs=1e-3) and t != t.round()
        ref = sched.step(unet(sched.scale_model_input(x, t_sched), t, **kwargs).sample, t_sched, x).pred_original_sample
        assert rel_err(denoiser(x, sigma.double(), labels), ref) < 1e-5, (float(sigma), prediction_type)


def test_sigma_to_t_is_diffusers_interpolation_and_t_to_sigma_inverts_it():
    sched = diffusers.EulerDiscreteScheduler(**TRAIN_SCHEDULE)
    denoiser = DiffusersDenoiser.from_scheduler(torch.nn.Identity(), sched)
    sigmas = torch.tensor([1e-4, 0.02, denoiser.sigma_min, 0.1, 0.77, 3.0, 14.0, denoiser.sigma_max, 50.0],
                          dtype=torch.float64)
    ref = sched._sigma_to_t(sigmas.numpy(), np.log(denoiser.sigmas.numpy()))
    t = denoiser.sigma_to_t(sigmas)
    torch.testing.assert_close(t, torch.from_numpy(ref), rtol=0, atol=1e-9)
    inside = (sigmas >= denoiser.sigma_min) & (sigmas <= denoiser.sigma_max)
    torch.testing.assert_close(denoiser.t_to_sigma(t)[inside], sigmas[inside], rtol=1e-12, atol=0)
    ends = denoiser.t_to_sigma(torch.tensor([0.0, 999.0])).tolist()
    assert ends == pytest.approx([denoiser.sigma_min, denoiser.sigma_max], rel=1e-14)


def test_grid_and_range_follow_alphas_cumprod():
    sched = diffusers.DDPMScheduler(**TRAIN_SCHEDULE)
    denoiser = DiffusersDenoiser(torch.nn.Identity(), sched.alphas_cumprod)
    abar = sched.alphas_cumprod.double()
    torch.testing.assert_close(denoiser.sigmas, ((1 - abar) / abar).sqrt())
    assert (denoiser.sigmas.diff() > 0).all()
    assert denoiser.sigma_min == pytest.approx(0.029166, rel=1e-4)
    assert denoiser.sigma_max == pytest.approx(14.6146, rel=1e-4)
    assert isinstance(denoiser, Denoiser)


def test_cond_forms_reach_the_unet():
    unet, labels, _ = model_and_cond("unet2d")
    denoiser = DiffusersDenoiser(unet, diffusers.DDPMScheduler(**TRAIN_SCHEDULE).alphas_cumprod)
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    as_tensor = denoiser(x, 1.5, labels)
    assert torch.equal(as_tensor, denoiser(x, 1.5, {"class_labels": labels}))
    assert not torch.allclose(as_tensor, denoiser(x, 1.5, labels.flip(0)))
    with pytest.raises(TypeError, match="cond must be"):
        denoiser(x, 1.5, [3, 8])


def test_clear_errors_for_what_the_adapter_cannot_serve():
    abar = diffusers.DDPMScheduler(**TRAIN_SCHEDULE).alphas_cumprod
    with pytest.raises(ValueError, match="flow adapter"):
        DiffusersDenoiser(torch.nn.Identity(), abar, "flow_prediction")
    with pytest.raises(TypeError, match="not a discrete DDPM scheduler"):
        DiffusersDenoiser.from_scheduler(torch.nn.Identity(), diffusers.FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="timestep_type='discrete'"):
        DiffusersDenoiser.from_scheduler(
            torch.nn.Identity(), diffusers.EulerDiscreteScheduler(timestep_type="continuous",
                                                                  prediction_type="v_prediction"))
    zero_snr = diffusers.DDPMScheduler(**TRAIN_SCHEDULE, rescale_betas_zero_snr=True).alphas_cumprod
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        DiffusersDenoiser(torch.nn.Identity(), zero_snr)

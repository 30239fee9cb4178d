"""Schedules: endpoints, spacing, nesting, and the discrete grids diffusers' schedulers use."""

from __future__ import annotations

import math

import pytest
import torch

from distill_core.schedules import (
    append_zero,
    discrete,
    discrete_timesteps,
    karras,
    log_snr_uniform,
    nest,
    sigmas_from_alphas_cumprod,
    vp_time_uniform,
)


@pytest.mark.parametrize("schedule", [karras, log_snr_uniform, vp_time_uniform])
def test_continuous_schedules_run_from_sigma_max_to_sigma_min(schedule):
    s = schedule(7, 0.002, 80.0)
    assert s.shape == (8,)
    assert s[0].item() == pytest.approx(80.0, rel=1e-5) and s[-1].item() == pytest.approx(0.002, rel=1e-4)
    assert (s[1:] < s[:-1]).all()


def test_karras_is_uniform_in_sigma_to_the_one_over_rho():
    roots = karras(10, 0.01, 50.0, rho=5.0).double() ** (1 / 5)
    assert torch.allclose(roots.diff(), roots.diff()[:1].expand(10), atol=1e-6)


def test_log_snr_uniform_has_equal_log_ratios():
    ratios = log_snr_uniform(6, 0.1, 10.0).log().diff()
    assert torch.allclose(ratios, torch.full((6,), -math.log(100) / 6), atol=1e-5)


def test_vp_time_uniform_is_uniform_in_vp_time():
    s = vp_time_uniform(5, 0.01, 50.0).double()
    log_term = torch.log1p(s**2)
    t = (torch.sqrt(0.1**2 + 2 * 19.9 * log_term) - 0.1) / 19.9
    assert torch.allclose(t.diff(), t.diff()[:1].expand(5), atol=1e-5)


@pytest.mark.parametrize("substeps", [1, 3, 4])
def test_nest_keeps_every_coarse_point_and_refines_karras_into_karras(substeps):
    coarse = karras(5, 0.006, 80.0)
    fine = nest(coarse, substeps)
    assert fine.shape == (5 * substeps + 1,)
    assert torch.equal(fine[::substeps], coarse)
    assert torch.allclose(fine, karras(5 * substeps, 0.006, 80.0), rtol=1e-5)


def test_nest_gives_each_interval_its_own_substeps():
    coarse = karras(3, 0.006, 80.0)
    fine = nest(coarse, [1, 3, 2])
    assert fine.shape == (1 + 3 + 2 + 1,) and (fine[1:] < fine[:-1]).all()
    assert torch.equal(fine[[0, 1, 4, 6]], coarse)
    assert torch.allclose(fine[1:5], nest(coarse[1:3], 3), rtol=1e-6)  # each interval refined on its own
    with pytest.raises(ValueError, match="name 2 intervals; the grid has 3"):
        nest(coarse, [1, 3])


def test_nest_handles_a_final_zero():
    fine = nest(append_zero(karras(3, 0.1, 10.0)), 2)
    assert fine[-1] == 0 and (fine[1:] < fine[:-1]).all()


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_discrete_grid_is_what_diffusers_visits(spacing, offset):
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   timestep_spacing=spacing, steps_offset=offset)
    sched.set_timesteps(10)
    assert torch.equal(discrete_timesteps(10, 1000, spacing, offset), sched.timesteps.long())
    ours = discrete(10, sched.alphas_cumprod, spacing, offset)
    assert torch.allclose(ours, sched.sigmas[:-1].float(), rtol=1e-5)


def test_training_grid_sigmas_are_diffusers():
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    # before set_timesteps the scheduler holds the whole training grid, descending, closed by 0
    ours = sigmas_from_alphas_cumprod(sched.alphas_cumprod).float()
    assert torch.allclose(ours.flip(0), sched.sigmas[:-1].float(), rtol=1e-5)

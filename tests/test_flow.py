"""Rectified-flow teachers in the engine's convention: the change of variables sigma = t / (1 - t), the
flow time grids, solvers on a flow model, and the shipped flow teacher (``--teacher builtin-flow``)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_UNET, bench_script, randomise

from distill_core import builtin
from distill_core.denoisers.edm import EDMDenoiser
from distill_core.denoisers.flow import FlowDenoiser, flow_matching_loss, sigma_to_t, t_to_sigma
from distill_core.eval.benchmark import builtin_samples
from distill_core.eval.frechet import class_accuracy
from distill_core.nets.unet import UNet
from distill_core.schedules import flow_time, flux_shift, shift_time
from distill_core.solvers import SOLVERS, parse_solver_label, solver_grids, solver_label, solver_sigmas
from distill_core.sources import teacher_source
from distill_core.student_files import architecture, from_architecture

S = 0.7  # data x0 ~ N(0, S^2 I)


class GaussianVelocity(torch.nn.Module):
    """The exact velocity of a rectified flow on N(0, S^2 I) data: x_t = (1 - t) x0 + t n has variance
    V = (1 - t)^2 S^2 + t^2, E[x0 | x_t] = (1 - t) S^2 / V x_t, E[n | x_t] = t / V x_t, v = E[n - x0 | x_t]."""

    def forward(self, x_t, t, cond=None):
        t = t.view(-1, 1, 1, 1)
        var = (1 - t) ** 2 * S**2 + t**2
        return (t - (1 - t) * S**2) / var * x_t


def test_sigma_and_time_are_inverse_maps():
    t = torch.tensor([1e-4, 0.2, 0.5, 0.9, 0.995], dtype=torch.float64)
    assert torch.allclose(sigma_to_t(t_to_sigma(t)), t)
    assert t_to_sigma(0.5) == 1.0


@pytest.mark.parametrize("sigma", [0.01, 0.5, 3.0, 79.0])
def test_the_flow_adapter_gives_the_exact_ve_denoiser_of_gaussian_data(sigma):
    """For N(0, S^2) data the VE denoiser is D(x, sigma) = S^2 / (S^2 + sigma^2) x: the adapter over the
    exact velocity must give it, which checks x_t = x / (1 + sigma), t = sigma / (1 + sigma) and x0 = x_t - t v."""
    d = FlowDenoiser(GaussianVelocity(), sigma_max=80.0)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    assert torch.allclose(d(x, sigma), S**2 / (S**2 + sigma**2) * x, atol=1e-10)


def test_a_solver_on_the_flow_adapter_solves_the_same_ode_as_on_the_ve_denoiser():
    """The probability-flow ODE of Gaussian data carries x_T = sqrt(S^2 + sigma_max^2) z to about S z: Heun over
    the adapter follows the VE denoiser's solve step for step."""
    flow = FlowDenoiser(GaussianVelocity(), sigma_min=0.002, sigma_max=80.0)

    def exact(x, sigma, cond=None):
        return S**2 / (S**2 + torch.as_tensor(sigma, dtype=x.dtype).view(-1, 1, 1, 1) ** 2) * x

    z = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    sigmas = solver_sigmas("heun", 128, 0.002, 80.0).double()
    x = SOLVERS["heun"](flow, math.sqrt(S**2 + 80.0**2) * z, sigmas, None)
    assert torch.allclose(x, SOLVERS["heun"](exact, math.sqrt(S**2 + 80.0**2) * z, sigmas, None), atol=1e-9)
    assert torch.allclose(x, S * z, rtol=1e-2)


def test_the_flow_matching_loss_is_lowest_at_the_true_velocity():
    x0 = torch.randn(4096, 1, 2, 2) * S

    def loss(scale: float) -> float:
        torch.manual_seed(0)
        return float(flow_matching_loss(FlowDenoiser(ScaledVelocity(scale)), x0, None))

    assert loss(1.0) < loss(0.8) and loss(1.0) < loss(1.25) and loss(1.0) < loss(0.0)


class ScaledVelocity(GaussianVelocity):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x_t, t, cond=None):
        return self.scale * super().forward(x_t, t, cond)


def test_flow_time_grid_ends_exactly_and_shift_spends_more_steps_at_high_noise():
    plain, shifted = flow_time(4, 0.002, 80.0), flow_time(4, 0.002, 80.0, shift=3.0)
    for grid in (plain, shifted):
        assert grid[0] == pytest.approx(80.0) and grid[-1] == pytest.approx(0.002) and (grid.diff() < 0).all()
    t = sigma_to_t(plain.double())
    assert torch.allclose(t.diff(), t.diff()[0].expand(4), rtol=1e-5)  # shift 1: uniform in t
    assert (shifted[1:-1] > plain[1:-1]).all()
    assert shift_time(torch.tensor(0.5), 3.0) == pytest.approx(0.75)
    assert flux_shift(256) == pytest.approx(math.exp(0.5)) and flux_shift(4096) == pytest.approx(math.exp(1.15))


def test_flow_teachers_compare_solvers_on_both_grids():
    flow = FlowDenoiser(GaussianVelocity())
    assert solver_grids(flow) == ("karras", "flow") and solver_grids(EDMDenoiser(torch.nn.Identity())) == ("karras",)
    label = solver_label("dpmpp_2m", "flow")
    assert parse_solver_label(label) == ("dpmpp_2m", "flow") and parse_solver_label("euler") == ("euler", "karras")
    assert torch.allclose(solver_sigmas(label, 4, 0.002, 80.0), flow_time(4, 0.002, 80.0))
    with pytest.raises(ValueError, match="unknown solver grid"):
        solver_sigmas("euler/linear", 4, 0.002, 80.0)


def test_the_fingerprint_tells_a_flow_teacher_from_an_edm_one_with_the_same_weights():
    net = randomise(UNet(TINY_UNET))
    assert builtin.fingerprint(FlowDenoiser(net)) != builtin.fingerprint(EDMDenoiser(net))


def test_a_lighter_student_of_a_flow_teacher_is_a_flow_model_and_its_card_rebuilds_it():
    flow = FlowDenoiser(randomise(UNet(TINY_UNET)), sigma_max=80.0)
    arch = architecture(flow)
    assert arch["preconditioning"] == "flow"
    rebuilt = from_architecture(arch)
    assert isinstance(rebuilt, FlowDenoiser) and rebuilt.settings() == flow.settings()


def test_the_shipped_flow_teacher_samples_the_requested_digits():
    """Its 16-step Heun samples at the default guidance are the requested digit at least 90 % of the time."""
    source = teacher_source("builtin-flow")
    assert isinstance(source.denoiser, FlowDenoiser) and source.name == "builtin-flow"
    images, labels = builtin_samples(builtin.DEFAULT_GUIDANCE, per_class=10, steps=16, seed=0,
                                     path=builtin.FLOW_TEACHER_PATH)
    assert class_accuracy(images, labels) >= 0.9


def test_the_target_benchmark_runs_on_the_flow_teacher_on_its_own_student_grid(tmp_path):
    """``bench/teacher_targets.py --teacher builtin-flow``: the targets on the flow time grid SFD trains on, and
    more teacher steps per interval land closer to the reference solve."""
    bench = bench_script("teacher_targets")
    rows = bench.main(["--teacher", "builtin-flow", "--solvers", "unipc", "--K", "1", "3", "--n", "8"])
    one, three = rows
    assert (one["substeps"], three["substeps"]) == (1, 3)
    assert three["teacher_network_evals"] == 3 * one["teacher_network_evals"] == 30  # 5 intervals, CFG
    assert three["psnr_db"] > one["psnr_db"] + 5, (one, three)
    assert len(three["psnr_at_points_db"]) == 5

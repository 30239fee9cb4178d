"""Phased score distillation: the score-matching weighting, partitions, phase weights and sampling, the
phase-aware schedule, the lighter student and its file, the config / CLI, and that training lowers the loss."""

from __future__ import annotations

import argparse
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TINY_UNET, randomise, tiny_source
from torch import nn

from distill_core.config import DistillConfig
from distill_core.denoisers.edm import EDMDenoiser
from distill_core.methods import build_method, phases
from distill_core.methods.base import MicroBatch
from distill_core.methods.phased import phased_loss
from distill_core.nets.surgery import clip_spectral_norms, enable_checkpointing, lighter_student, select_weights
from distill_core.nets.unet import UNet
from distill_core.schedules import phased
from distill_core.train.optim import lr_factor
from distill_core.train.trainer import Trainer

WIDE = replace(TINY_UNET, model_channels=16)


@pytest.fixture
def teacher16() -> EDMDenoiser:
    """A tiny random teacher twice as wide as the smallest UNet, so that width 0.5 is a real compression."""
    return EDMDenoiser(randomise(UNet(WIDE))).eval().requires_grad_(False)


def _phased(denoiser, tmp_path, **kw):
    cfg = DistillConfig(**{
        "method": "phased", "steps": 4, "phases": 4, "iters": 3, "batch": 8, "phase_inputs": "trajectories",
        "teacher_pool": 16, "probe_batch": 4, "probe_steps": 8, "checkpoint_every": 0, "out": str(tmp_path), **kw,
    })
    return build_method(tiny_source(denoiser), cfg)


def test_loss_is_the_weighted_score_matching_loss():
    x = torch.tensor([[0.3, -1.0], [2.0, 0.5]])
    d_student, d_teacher = torch.tensor([[0.1, -0.4], [0.9, 0.2]]), torch.tensor([[0.2, -0.5], [1.0, -0.1]])
    sigma, weights, sd = torch.tensor([0.5, 2.0]), torch.tensor([0.25, 0.75]), 0.5
    expected = 0.0
    for i in range(2):
        s_student = (d_student[i] - x[i]) / sigma[i] ** 2  # s = (D - x) / sigma^2
        s_teacher = (d_teacher[i] - x[i]) / sigma[i] ** 2
        lam = sigma[i] ** 2 * (sigma[i] ** 2 + sd**2) / sd**2
        expected += weights[i] * lam * (s_student - s_teacher).square().sum()
    # by hand in D: w(0.5) = (0.25 + 0.25) / (0.5 * 0.5)^2 = 8, w(2) = (4 + 0.25) / (2 * 0.5)^2 = 4.25
    assert float(expected) == pytest.approx(0.25 * 8 * 0.02 + 0.75 * 4.25 * 0.1, rel=1e-6)
    assert phased_loss(d_student, d_teacher, sigma, weights, sd).item() == pytest.approx(float(expected), rel=1e-6)


def _probe_with_drift_below(split_t: float) -> phases.Probe:
    """A probe whose teacher drifts only for t = log sigma below ``split_t``, the more the lower."""
    t = np.linspace(math.log(80.0), math.log(0.006), 401)
    density = np.clip(split_t - t, 0, None)
    steps = density[1:] * (t[:-1] - t[1:])
    return phases.Probe(t, np.concatenate([[0.0], np.cumsum(steps)]), np.ones_like(t))


@pytest.mark.parametrize("K", [4, 8, 16, 32])
def test_partitions_cover_the_horizon_monotonically(K):
    lo, hi = 0.006, 80.0
    uni = phases.partition("uniform", K, lo, hi)
    assert uni.K == K and uni.boundaries[0] == hi and uni.boundaries[-1] == lo
    steps = np.diff(np.log(uni.boundaries))
    assert np.allclose(steps, steps[0], rtol=1e-9, atol=0) and (steps < 0).all()
    ada = phases.partition("adaptive", K, lo, hi, _probe_with_drift_below(math.log(1.0)))
    b = np.array(ada.boundaries)
    assert ada.K == K and b[0] == hi and b[-1] == lo and (np.diff(b) < 0).all()
    assert (b < 1.0).sum() > (b > 1.0).sum()  # the drifting end gets most of the phases


def test_adaptive_bisects_the_phase_of_highest_drift_bound():
    lo, hi = math.log(0.006), math.log(80.0)
    mid = (lo + hi) / 2
    probe = _probe_with_drift_below(mid)  # all drift in the lower half, growing towards sigma_min
    seq = phases.partition("adaptive", 4, 0.006, 80.0, probe).refinement
    quarter = (mid + lo) / 2
    # the only phase; then the lower half (all the drift); then its lower quarter (3x the upper one's drift,
    # same length)
    assert np.allclose(np.log(seq[2:5]), [mid, quarter, (quarter + lo) / 2])
    assert probe.drift(hi, mid) == pytest.approx(0.0)
    assert probe.drift(mid, lo) == pytest.approx((mid - lo) ** 2 / 2, rel=2e-2)


def test_phase_weights_sum_to_one():
    probe = _probe_with_drift_below(0.0)
    probe.variance = np.linspace(1.0, 3.0, len(probe.t))
    part = phases.partition("adaptive", 8, 0.006, 80.0, probe)
    dt = phases.phase_weights(part, "dt")
    var = phases.phase_weights(part, "variance", probe)
    assert dt.sum().item() == pytest.approx(1.0) and var.sum().item() == pytest.approx(1.0)
    lengths = -np.diff(np.log(part.boundaries))
    assert np.allclose(dt.numpy(), lengths / lengths.sum(), atol=1e-6)
    assert var[-1] > var[0]  # the variance grows towards sigma_min in this probe


@pytest.mark.parametrize("batch", [64, 5])
def test_phase_sampling_hits_every_phase(batch):
    part = phases.partition("uniform", 16, 0.006, 80.0)
    gen = torch.Generator().manual_seed(0)
    seen = torch.zeros(16, dtype=torch.long)
    for _ in range(8 if batch >= 16 else 40):
        k = phases.draw_phases(16, batch, gen)
        counts = torch.bincount(k, minlength=16)
        assert counts.max() - counts.min() <= 1
        sigma = phases.draw_sigmas(part, k, gen)
        b = torch.tensor(part.boundaries)
        assert ((sigma <= b[k] * (1 + 1e-6)) & (sigma >= b[k + 1] * (1 - 1e-6))).all()
        w = phases.sample_weights(torch.full((16,), 1 / 16), k)
        assert w.sum().item() == pytest.approx(len(k.unique()) / 16)
        seen += counts
    assert (seen > 0).all()


def test_schedule_points_are_the_phase_boundaries():
    part = phases.partition("adaptive", 16, 0.006, 80.0, _probe_with_drift_below(0.0))
    assert torch.allclose(phased(16, part.refinement), torch.tensor(part.boundaries, dtype=torch.float32))
    for n in (4, 8):  # fewer points: the boundaries of the n-phase partition
        coarse = phases.partition("adaptive", n, 0.006, 80.0, _probe_with_drift_below(0.0))
        assert torch.allclose(phased(n, part.refinement), torch.tensor(coarse.boundaries, dtype=torch.float32))
    with pytest.raises(ValueError, match="intervals"):
        phased(len(part.refinement), part.refinement)


def test_lighter_student_selects_the_teachers_weights(teacher16):
    student = lighter_student(teacher16, width=0.5)
    assert student.net.cfg.model_channels == 8
    ours, theirs = student.state_dict(), teacher16.state_dict()
    name = "net.conv_in.weight"
    assert torch.equal(ours[name], theirs[name][:8])
    assert select_weights(student, teacher16) == len(ours)
    scratch = lighter_student(teacher16, width=0.5, init="scratch")
    assert not torch.equal(scratch.state_dict()[name], ours[name])
    with pytest.raises(ValueError, match="built-in UNet family"):
        lighter_student(nn.Linear(2, 2), width=0.5)


def test_spectral_clipping_and_checkpointing(teacher16):
    layer = nn.Linear(6, 5)
    with torch.no_grad():
        layer.weight.mul_(10)
    vectors: dict = {}
    for _ in range(30):
        clip_spectral_norms(layer, 1.0, vectors)
    assert torch.linalg.matrix_norm(layer.weight, 2).item() == pytest.approx(1.0, abs=0.02)

    student = lighter_student(teacher16, width=0.5)
    twin = lighter_student(teacher16, width=0.5)
    enable_checkpointing(twin)
    x, sigma, y = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 3.0]), torch.tensor([1, 2])
    grads = []
    for net in (student, twin):
        net(x, sigma, y).square().sum().backward()
        grads.append(net.net.conv_in.weight.grad)
    assert torch.allclose(*grads, atol=1e-5)


def test_student_file_round_trip_with_phases(teacher16, tmp_path):
    from distill_core.sampling import sample
    from distill_core.student_files import load_student
    from distill_core.train.run import train_student

    cfg = _phased(teacher16, tmp_path).cfg
    run = train_student(cfg, tiny_source(teacher16), progress=False)
    student = load_student(run.path, teacher16)
    card = student.card
    assert card["method"] == "phased" and card["solver"] == "dpmpp_2m"
    assert card["architecture"]["unet"]["model_channels"] == 8
    assert card["phases"]["K"] == 4 and len(card["phases"]["boundaries"]) == 5
    assert sum(card["phases"]["weights"]) == pytest.approx(1.0)
    assert card["sigmas"]["4"] == pytest.approx(phased(4, card["phases"]["refinement"]).tolist())
    trained = build_method(tiny_source(teacher16), cfg)  # same seed, same partition
    assert card["phases"]["boundaries"] == pytest.approx(trained.partition.boundaries)
    noise = torch.randn(2, 1, 8, 8) * 80
    out = sample(student, noise, torch.tensor([3, 4]))
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert sum(p.numel() for p in student.net.parameters()) < 0.4 * sum(p.numel() for p in teacher16.parameters())


def test_config_and_cli_accept_phased(tmp_path):
    from distill_core.main_job import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg, _ = config_from_args(p.parse_args(["--method", "phased", "--steps", "8"]))
    assert cfg.method == "phased" and cfg.steps == 8 and cfg.optimizer is None and cfg.lr_schedule is None
    path = tmp_path / "run.yaml"
    path.write_text("method: phased\nphases: 16\npartition: uniform\nphase_weights: variance\ntarget_ema: 0.9\n")
    loaded = DistillConfig.from_yaml(path)
    got = (loaded.phases, loaded.partition, loaded.phase_weights, loaded.target_ema)
    assert got == (16, "uniform", "variance", 0.9)
    with pytest.raises(ValueError, match="partition"):
        DistillConfig(partition="random")
    assert DistillConfig().method == "sfd" and DistillConfig().optimizer is None  # defaults unchanged
    assert [lr_factor("cosine", i, 4, 0.5) for i in (0, 2, 4)] == pytest.approx([1.0, 0.5, 0.0])
    assert [lr_factor("step", i, 4, 0.5) for i in (1, 2)] == [1.0, 0.1]


@pytest.mark.parametrize("ema", [0.0, 0.5])
def test_training_lowers_the_phased_loss(teacher16, tmp_path, ema):
    m = _phased(teacher16, tmp_path, iters=25, lr=2e-3, target_ema=ema)

    def loss() -> float:
        m._pool = None  # rebuilt from the config's seed: the same inputs and first-visit targets
        gen = torch.Generator().manual_seed(11)
        with torch.no_grad():
            return sum(s.loss.item() for _ in range(4) for s in m.losses({}, MicroBatch(0, 1, 8), gen))

    before = loss()
    trainer = Trainer(m, m.cfg)
    assert type(getattr(trainer.optimizers["student"], "optimizer", trainer.optimizers["student"])) is torch.optim.AdamW
    assert trainer.lr == pytest.approx(2e-3)  # no warmup: SFD's lr_warmup is SFD's own
    trainer.fit()
    after = loss()
    assert after < 0.7 * before, (before, after)


def test_smoothed_targets_average_the_teacher_at_one_noise_level_per_slot(teacher16, tmp_path):
    """With target_ema every pool slot keeps its sigma: the EMA averages the teacher's predictions at one noise
    level, never predictions taken at different sigmas."""
    m = _phased(teacher16, tmp_path, teacher_pool=4, target_ema=0.5)
    gen = torch.Generator().manual_seed(0)
    seen = {}
    for _ in range(6):
        x, sigma, k, cond, target = m.draw(16, gen, torch.device("cpu"))
        for s, phase in zip(sigma.tolist(), k.tolist()):
            seen.setdefault(s, set()).add(phase)
    assert len(seen) <= 4 and all(len(p) == 1 for p in seen.values())
    assert set(seen) == set(m._pool["sigma"].tolist())
    assert bool(m._pool["seen"].all())



def test_the_teacher_probe_is_kept_per_condition_distribution_not_per_weights_alone(teacher16):
    """Two sources on the same weights with other conditions (another prompt list on one model) probe apart;
    the same source again reads the kept probe."""
    from distill_core.methods.phased import teacher_probe
    from distill_core.teacher import CFGTeacher

    cfg = DistillConfig(method="phased", probe_batch=4, probe_steps=8, seed=123)
    digits, sevens = tiny_source(teacher16), tiny_source(teacher16)
    sevens.draw_cond = lambda b, g: torch.full((b,), 7)
    probe = teacher_probe(CFGTeacher(teacher16, 2.0, digits.uncond), digits, cfg, 80.0)
    assert teacher_probe(CFGTeacher(teacher16, 2.0, digits.uncond), digits, cfg, 80.0) is probe
    other = teacher_probe(CFGTeacher(teacher16, 2.0, sevens.uncond), sevens, cfg, 80.0)
    assert other is not probe and not np.allclose(other.cumulative_drift, probe.cumulative_drift)

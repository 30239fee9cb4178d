"""Evaluation: PSNR / RMSE, the Frechet distance against scipy's matrix square root, the shipped
classifier and reference statistics, NFE counting, and the errors for missing or stale assets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import hooks
from scipy.linalg import sqrtm

from distill_core import builtin, safetensors_io
from distill_core.data import load_mnist
from distill_core.eval import benchmark, frechet
from distill_core.eval.fidelity import psnr, reference_solve, rmse
from distill_core.eval.speed import CountingDenoiser
from distill_core.schedules import append_zero, karras
from distill_core.solvers import heun
from distill_core.teacher import CFGTeacher


@pytest.fixture(scope="module")
def test_digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_mnist("test")
    return images[:500], labels[:500]


def test_psnr_and_rmse_known_values():
    x, ref = torch.zeros(4, 1, 8, 8), torch.full((4, 1, 8, 8), 0.5)
    assert rmse(x, ref) == pytest.approx(0.5)
    assert psnr(x, ref) == pytest.approx(10 * math.log10(4 / 0.25))  # 12.04 dB
    half = ref.clone()
    half[:2] = 0.0  # the mean is over the whole batch: MSE = 0.125
    assert psnr(half, ref) == pytest.approx(10 * math.log10(32))
    assert psnr(ref, ref) == math.inf and rmse(ref, ref) == 0.0
    with pytest.raises(ValueError, match="shape"):
        psnr(x, ref[:2])


def _scipy_fd(mu1, s1, mu2, s2) -> float:
    covmean = sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("dim", [4, 32, 128])
def test_frechet_distance_matches_scipy_sqrtm(dim):
    gen = np.random.default_rng(dim)
    a, b = gen.normal(size=(dim, dim)), gen.normal(size=(dim, 2 * dim))
    s1, s2 = a @ a.T / dim, b @ b.T / (2 * dim) + 0.1 * np.eye(dim)
    mu1, mu2 = gen.normal(size=dim), gen.normal(size=dim)
    ours = frechet.frechet_distance(*(torch.from_numpy(t) for t in (mu1, s1, mu2, s2)))
    assert ours == pytest.approx(_scipy_fd(mu1, s1, mu2, s2), rel=1e-4)


def test_frechet_distance_of_a_set_to_itself_is_zero():
    feats = torch.randn(300, 64, generator=torch.Generator().manual_seed(0)) @ torch.randn(64, 64)
    mu, sigma = frechet.gaussian_fit(feats)
    assert torch.allclose(sigma, torch.from_numpy(np.cov(feats.double().numpy(), rowvar=False)))
    assert abs(frechet.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * sigma.trace().item()


@pytest.mark.parametrize("n1, n2", [(4, 300), (40, 20), (300, 200)])
def test_the_distance_of_two_feature_sets_is_the_frechet_distance_of_their_fits(n1, n2):
    """Fewer samples than feature dimensions take the cross-product form; it equals the covariance form (to
    1e-6: a rank-deficient covariance's zero eigenvalues come out of its decomposition as round-off, whose
    square roots add to the trace)."""
    gen = torch.Generator().manual_seed(n1)
    mix = torch.randn(64, 64, generator=gen)
    a, b = torch.randn(n1, 64, generator=gen) @ mix, torch.randn(n2, 64, generator=gen) @ mix + 0.5
    expected = frechet.frechet_distance(*frechet.gaussian_fit(a), *frechet.gaussian_fit(b))
    assert expected > 1
    assert frechet.feature_set_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert abs(frechet.feature_set_distance(a, a)) < 1e-9 * expected


def test_classifier_accuracy_on_test_digits(test_digits):
    assert frechet.class_accuracy(*test_digits) >= 0.97
    assert frechet.features(test_digits[0]).shape == (500, 128)


def test_fd_separates_digits_from_noise_and_real_digits_match_the_reference(test_digits):
    noise = torch.randn(500, 1, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    real_vs_noise = frechet.frechet_distance(*frechet.gaussian_fit(frechet.features(test_digits[0])),
                                             *frechet.gaussian_fit(frechet.features(noise)))
    train = load_mnist("train")[0][:2000]
    real = frechet.fd_to_reference(train)
    assert real < 0.5  # 0.13 for these 2000 training digits
    assert real_vs_noise > 100 * real
    assert frechet.fd_to_reference(noise) > 100 * real


def test_reference_stats_card_and_reproduction(tmp_path):
    shipped, card = safetensors_io.load(builtin.REFERENCE_STATS_PATH)
    assert card["n"] == 10000 and card["split"] == "test"
    assert card["classifier"] == builtin.fingerprint(frechet.classifier())
    remade, _ = safetensors_io.load(frechet.compute_reference_stats(tmp_path / "stats.safetensors"))
    assert torch.allclose(remade["mu"], shipped["mu"], atol=1e-5)
    assert torch.allclose(remade["sigma"], shipped["sigma"], atol=1e-5)


def test_missing_assets_name_the_command_that_rebuilds_them(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "REFERENCE_STATS_PATH", tmp_path / "stats.safetensors")
    with pytest.raises(FileNotFoundError, match=r"stats\.safetensors.*python -m distill_core reference-stats"):
        frechet.fd_to_reference(torch.zeros(4, 1, 16, 16))
    monkeypatch.setattr(builtin, "CLASSIFIER_PATH", tmp_path / "classifier.safetensors")
    with pytest.raises(FileNotFoundError, match=r"classifier\.safetensors.*python -m distill_core train-classifier"):
        frechet.features(torch.zeros(4, 1, 16, 16))


def test_stale_reference_stats_are_refused(tmp_path, monkeypatch):
    stale = safetensors_io.save_atomic({"mu": torch.zeros(128), "sigma": torch.eye(128)},
                                       tmp_path / "stale.safetensors", {"classifier": "0123456789abcdef"})
    monkeypatch.setattr(builtin, "REFERENCE_STATS_PATH", stale)
    with pytest.raises(ValueError, match="0123456789abcdef.*reference-stats"):
        frechet.reference_stats()


class Shrink:
    """x0 = x / (1 + sigma^2): the exact denoiser of N(0, I) data."""

    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self):
        self.batches = []

    def __call__(self, x, sigma, cond=None):
        self.batches.append(x.shape[0])
        return x / (1 + torch.as_tensor(sigma).view(-1, 1, 1, 1) ** 2)


def test_counting_denoiser_counts_evaluations_per_image():
    inner = Shrink()
    counter = CountingDenoiser(inner)
    assert (counter.sigma_min, counter.sigma_max, counter.nfe) == (0.002, 80.0, 0)
    sigmas = append_zero(karras(4, 0.002, 80.0))  # 5 Heun steps ending at 0: 9 evaluations
    x = torch.randn(6, 1, 4, 4)
    assert torch.equal(heun(counter, x, sigmas), heun(Shrink(), x, sigmas))
    assert counter.nfe == 9
    heun(counter, x[:2], sigmas)  # a second, smaller batch of new images
    heun(counter, x[:2], sigmas)
    assert (counter.nfe, counter.calls, counter.images) == (9, 27, 10)


def test_a_cfg_call_counts_once():
    inner = Shrink()
    counter = CountingDenoiser(CFGTeacher(inner, w=2.0, uncond=torch.tensor([10])))
    heun(counter, torch.randn(3, 1, 4, 4), append_zero(karras(2, 0.002, 80.0)), torch.tensor([0, 1, 2]))
    assert counter.nfe == 5 and inner.batches == [6] * 5  # one batched forward of 2B rows per evaluation


def test_reference_solve_is_heun_with_steps_steps():
    counter = CountingDenoiser(Shrink())
    x = torch.randn(2, 1, 4, 4) * 80.0
    out = reference_solve(counter, x, None, steps=64)
    assert counter.nfe == 2 * 64 - 1
    # exact flow of N(0, I) data: x(sigma) = x(sigma_max) sqrt(1 + sigma^2) / sqrt(1 + sigma_max^2)
    assert torch.allclose(out, x / math.sqrt(1 + 80.0**2), rtol=5e-3)


def test_shipped_reference_is_the_teachers_reference_solve(monkeypatch):
    """The main job's evaluation set ships its reference (the built-in teacher, seed 1, w = 2, 100
    samples): read, never solved, and equal to the solve itself (checked on the first samples)."""
    n = 100
    teacher = CFGTeacher(builtin.load_builtin_teacher(), builtin.DEFAULT_GUIDANCE, torch.tensor([10]))
    with monkeypatch.context() as m:
        m.setattr(benchmark, "reference_solve", lambda *a, **k: pytest.fail("the shipped reference was not used"))
        ev = benchmark.eval_set(teacher, n, seed=1)
    assert ev.reference.shape == (n, *builtin.SHAPE)
    with torch.no_grad():
        solved = reference_solve(teacher, ev.noise[:4], ev.labels[:4], steps=128)
    assert torch.allclose(ev.reference[:4], solved, atol=1e-4)


def test_a_smaller_set_of_the_shipped_seed_is_its_first_samples_read_not_solved(monkeypatch):
    teacher = CFGTeacher(builtin.load_builtin_teacher(), builtin.DEFAULT_GUIDANCE, torch.tensor([10]))
    shipped = benchmark.eval_set(teacher, 100, seed=1)
    with monkeypatch.context() as m:
        m.setattr(benchmark, "reference_solve", lambda *a, **k: pytest.fail("the shipped reference was not used"))
        small = benchmark.eval_set(teacher, 12, seed=1)
    assert torch.equal(small.reference, shipped.reference[:12]) and torch.equal(small.labels, shipped.labels[:12])
    drawn_alone = torch.randn((12, *builtin.SHAPE), generator=torch.Generator().manual_seed(1)) * teacher.sigma_max
    assert torch.equal(small.noise, shipped.noise[:12]) and torch.equal(small.noise, drawn_alone)
    with monkeypatch.context() as m:  # another seed, or more samples than shipped: solved
        m.setattr(benchmark, "reference_solve", lambda *a, **k: pytest.fail("solved"))
        for n, seed in ((12, 3), (101, 1)):
            with pytest.raises(pytest.fail.Exception, match="solved"):
                benchmark.eval_set(teacher, n, seed=seed)


def test_a_batch_that_runs_out_of_memory_is_split_and_the_rows_stay_the_same():
    """The evaluation runs on at half the batch where a chunk runs out of accelerator memory (simulated: a
    network that refuses more than 3 samples), with the same images, and the solver row counts its
    evaluations from a chunk that ran to the end."""
    teacher = CFGTeacher(builtin.load_builtin_teacher(), w=2.0, uncond=torch.tensor([builtin.NUM_CLASSES]))
    noise = torch.randn((10, *builtin.SHAPE), generator=torch.Generator().manual_seed(0)) * teacher.sigma_max
    ev = benchmark.EvalSet(noise, torch.arange(10) % 10, torch.zeros_like(noise))
    chunks = []

    class Small(torch.nn.Module):  # the teacher on a device that holds 3 samples at a time
        sigma_min, sigma_max = teacher.sigma_min, teacher.sigma_max

        def __init__(self):
            super().__init__()
            self.inner = teacher

        def forward(self, x, sigma, cond=None):
            if x.shape[0] > 3:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return self.inner(x, sigma, cond)

    def solve(denoiser, x, y):
        chunks.append(x.shape[0])
        return heun(denoiser, x, append_zero(karras(3, 0.006, 80.0)), y)

    whole, _ = benchmark.sample_in_batches(lambda x, y: solve(teacher, x, y), ev, batch=8)
    split, _ = benchmark.sample_in_batches(lambda x, y: solve(Small(), x, y), ev, batch=8)
    assert chunks == [8, 2, 8, 4, 2, 2, 2, 2, 2]  # whole: 8, 2; split: 8 and 4 fail, then 2 at a time
    # the same images to float32 rounding: CPUs may take other kernels at other batch sizes (6e-5 seen with
    # AVX-512), where a chunk given the wrong noise or labels would be off by the images' own size
    torch.testing.assert_close(split, whole, rtol=0, atol=2e-4)
    assert whole.abs().max() > 0.5

    row = benchmark.solver_row("euler", 4, CFGTeacher(Small(), w=1.0), ev)
    assert row["nfe"] == 4 and row["network_evals"] == 4
    with pytest.raises(torch.OutOfMemoryError):
        benchmark.in_batches(lambda x, y: (_ for _ in ()).throw(torch.OutOfMemoryError("no room")), ev, 4)


def test_a_lora_students_rows_are_drawn_on_the_teachers_own_network_and_leave_it_bare(tmp_path, monkeypatch):
    """The report's student rows hook a LoRA student's adapters into the teacher's network (no second copy of
    the base weights: the memory the run trained in) and take them out again, so the solver rows after them are
    the bare teacher's; the images are those of the student loaded on a copy."""
    import distill_core.sampling
    from distill_core.config import DistillConfig
    from distill_core.sources import builtin_source
    from distill_core.student_files import load_student
    from distill_core.train.run import train_student

    source = builtin_source()
    run = train_student(DistillConfig(steps=2, iters=1, batch=4, student="lora", lora_rank=2, checkpoint_every=0,
                                      out=str(tmp_path / "lora")), source, progress=False)
    teacher = CFGTeacher(source.denoiser, source.guidance, source.uncond)
    ev = benchmark.eval_set(teacher, 4, seed=1, steps=2)
    bare = benchmark.solver_rows(teacher, ev, 2, 0.006)
    on, draw = [], distill_core.sampling.sample
    monkeypatch.setattr(distill_core.sampling, "sample",
                        lambda student, *a, **kw: on.append(student.net.denoiser is source.denoiser) or
                        draw(student, *a, **kw))
    (row,) = benchmark.student_rows(run, teacher, ev)
    assert on == [True] and hooks(source.denoiser) == 0

    def untimed(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]

    assert untimed(benchmark.solver_rows(teacher, ev, 2, 0.006)) == untimed(bare)
    copied = load_student(run.path, teacher)  # on a copy of the teacher's network
    assert copied.net.denoiser is not source.denoiser
    images = draw(copied, ev.noise, ev.labels, steps=2).clamp(-1, 1)
    assert row["psnr_db"] == pytest.approx(psnr(images, ev.reference.clamp(-1, 1)), abs=1e-3)


def test_every_solver_row_costs_exactly_its_budget():
    """The report's solver rows, compare's and the solver bench's take the solvers that spend exactly the budget:
    Heun (two evaluations a step) has a row at even budgets only, every other solver at every budget."""
    from distill_core.solvers import SOLVERS, spends_exactly

    assert [n for n in range(1, 7) if spends_exactly("heun", n)] == [2, 4, 6]
    assert all(spends_exactly(name, n) for name in SOLVERS if name != "heun" for n in range(1, 7))
    teacher = CFGTeacher(builtin.load_builtin_teacher(), 2.0, torch.tensor([10]))
    ev = benchmark.eval_set(teacher, 2, seed=1, steps=2)
    for nfe in (3, 4):
        rows = benchmark.solver_rows(teacher, ev, nfe, 0.006, "heun,euler")
        assert {r["method"] for r in rows} == ({"euler", "heun"} if nfe == 4 else {"euler"})
        assert all(r["network_evals"] == 2 * nfe for r in rows)  # CFG: two evaluations a step

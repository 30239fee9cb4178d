"""SFD and SFD-v: the loss, the analytic first step, teacher targets on the nested grid, the
student's detached steps, guidance modes, the step embedding, and that training moves the student
towards the teacher."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill_core.config import DistillConfig
from distill_core.methods import build_method
from distill_core.methods.base import MicroBatch, TeacherSource
from distill_core.methods.sfd import distance, teacher_states, teacher_steps
from distill_core.safetensors_io import read_card
from distill_core.sampling import afs_direction, few_step, intervals_for
from distill_core.schedules import karras, nest
from distill_core.solvers import SOLVERS
from distill_core.students import StudentNet
from distill_core.teacher import CFGTeacher


def tiny_source(denoiser, w: float = 2.0, **tuned) -> TeacherSource:
    return TeacherSource(
        "tiny", denoiser, (1, 8, 8), lambda b, g: torch.randint(10, (b,), generator=g), torch.tensor([10]), w,
        tuned=tuned,
    )


def test_distances_are_per_element_sums_averaged_over_the_batch():
    x, y = torch.zeros(2, 1, 2, 2), torch.tensor([1.0, -2.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0]).view(2, 1, 2, 2)
    assert distance(x, y, "l1").item() == pytest.approx((3 + 3) / 2)
    assert distance(x, y, "l2").item() == pytest.approx((5 + 9) / 2)
    c = 0.5
    huber = sum((d**2 + c**2) ** 0.5 - c for d in (1.0, 2.0, 3.0)) / 2
    assert distance(x, y, "huber", c).item() == pytest.approx(huber)
    with pytest.raises(ValueError, match="unknown loss"):
        distance(x, y, "l3")


def test_default_distance_quiets_elements_already_near_their_target():
    """The default pseudo-Huber is L1 on errors well above c, but an element within c of its target
    pulls with |delta| / c of L1's unit gradient (the noise that L1 adds once most elements are right)."""
    cfg = DistillConfig()
    assert cfg.loss == "huber"
    delta = torch.tensor([cfg.huber_c / 10, 50 * cfg.huber_c]).requires_grad_(True)
    distance(delta.view(1, 2), torch.zeros(1, 2), cfg.loss, cfg.huber_c).backward()
    small, large = delta.grad.tolist()
    assert small == pytest.approx(0.1, rel=0.01)
    assert large == pytest.approx(1.0, abs=0.001)


def test_analytic_first_step_saves_one_evaluation():
    calls = []

    def denoiser(x, sigma, cond=None):
        calls.append(float(sigma))
        return torch.zeros_like(x)

    sigmas = karras(intervals_for(4, afs=True), 0.006, 80.0)
    x = torch.randn(3, 1, 4, 4) * 80
    few_step(denoiser, x, sigmas, afs=True)
    assert len(sigmas) - 1 == 5 and len(calls) == 4 and calls[0] == pytest.approx(float(sigmas[1]))
    assert intervals_for(4, afs=False) == 4
    # the AFS direction x / sqrt(1 + sigma^2) is the Euler direction of the zero denoiser up to O(1/sigma^2)
    d = afs_direction(x, 80.0)
    assert torch.allclose(d, x / 80.0, rtol=1e-4)


def test_teacher_states_land_on_the_student_points(tiny_edm):
    teacher = CFGTeacher(tiny_edm, 2.0, torch.tensor([10]))
    t = karras(3, 0.006, 80.0)
    x, y = torch.randn(2, 1, 8, 8) * 80, torch.tensor([1, 2])
    with torch.no_grad():
        states = teacher_states(teacher, x, t, y, substeps=4, solver="euler")
        grid = nest(t, 4)
        assert len(grid) == 13 and torch.allclose(grid[::4], t)
        for i, state in enumerate(states, start=1):
            expected = SOLVERS["euler"](teacher, x, grid[: 4 * i + 1], y)
            assert torch.allclose(state, expected, atol=1e-5)
        # the default DPM-Solver++(3M) run: its last state is the solver's own answer on the nested grid
        states = teacher_states(teacher, x, t, y, substeps=4)
        assert torch.allclose(states[-1], SOLVERS["dpmpp_3m"](teacher, x, grid, y), atol=1e-5)


def test_the_teacher_takes_one_step_on_intervals_above_the_threshold(tiny_edm):
    teacher = CFGTeacher(tiny_edm, 2.0, torch.tensor([10]))
    t = karras(5, 0.006, 80.0)  # 80, 26, 6.8, 1.3, 0.15, 0.006: the main job's schedule
    assert teacher_steps(t, 3, 20.0) == [1, 1, 3, 3, 3]
    assert teacher_steps(t, 3, None) == [3] * 5
    x, y = torch.randn(2, 1, 8, 8) * 80, torch.tensor([1, 2])
    with torch.no_grad():
        grid = nest(t, [1, 1, 3, 3, 3])
        states = teacher_states(teacher, x, t, y, [1, 1, 3, 3, 3], solver="unipc")
        assert torch.allclose(states[-1], SOLVERS["unipc"](teacher, x, grid, y), atol=1e-5)
        states = teacher_states(teacher, x, t, y, [1, 1, 3, 3, 3], solver="dpmpp_3m")
        assert torch.allclose(states[2], SOLVERS["dpmpp_3m"](teacher, x, grid[:6], y), atol=1e-5)  # at t_3
    m = _method(tiny_edm, steps=4, teacher_substeps=3, teacher_one_step_above=20.0)
    assert m.teacher_steps[4] == [1, 1, 3, 3, 3]
    assert m.card()["training"]["teacher_one_step_above"] == 20.0


def test_one_teacher_step_at_high_noise_is_a_setting_of_the_teacher_that_was_measured(tiny_edm):
    """A teacher with sigma_max 80 gets K steps everywhere unless it says its ODE is straight up there (the
    built-in teacher's ``tuned`` setting) or the run asks for one step; the run's value wins."""
    cfg = DistillConfig(iters=4, batch=4, steps=4, teacher_substeps=3)
    assert build_method(tiny_source(tiny_edm), cfg).teacher_steps[4] == [3] * 5
    tuned = build_method(tiny_source(tiny_edm, teacher_one_step_above=20.0), cfg)
    assert tuned.teacher_steps[4] == [1, 1, 3, 3, 3]
    everywhere = build_method(tiny_source(tiny_edm, teacher_one_step_above=20.0),
                              cfg.replace(teacher_one_step_above=float("inf")))
    assert everywhere.teacher_steps[4] == [3] * 5
    from distill_core.sources import builtin_source

    assert builtin_source().tuned == {"teacher_one_step_above": 20.0}


def _method(tiny_edm, **kw):
    cfg = DistillConfig(**{"iters": 4, "batch": 4, "steps": 3, **kw})
    return build_method(tiny_source(tiny_edm), cfg)


def test_student_steps_from_its_own_detached_output(tiny_edm):
    m = _method(tiny_edm)
    assert torch.equal(m.sigmas[3], karras(4, 0.006, 80.0))
    inputs_need_grad = []
    m.student.register_forward_pre_hook(lambda mod, args: inputs_need_grad.append(args[0].requires_grad))
    steps = list(m.losses(m.plan(torch.Generator()), MicroBatch(0, 1, 4), torch.Generator().manual_seed(0)))
    # AFS: 4 intervals, the first analytic -> 3 losses, one per evaluation, at indices 1..3
    assert [s.index for s in steps] == [1, 2, 3]
    assert inputs_need_grad == [False, False, False]
    assert all(s.loss.requires_grad and s.loss.ndim == 0 for s in steps)

    no_afs = _method(tiny_edm, afs=False)
    steps = list(no_afs.losses(no_afs.plan(torch.Generator()), MicroBatch(0, 1, 4), torch.Generator()))
    assert [s.index for s in steps] == [0, 1, 2]


def test_guidance_modes_choose_the_teacher_scale(tiny_edm):
    assert _method(tiny_edm).teacher.w == 2.0
    assert _method(tiny_edm, guidance=3.0).teacher.w == 3.0
    m = _method(tiny_edm, guidance_mode="cfg")
    assert m.teacher.w == 1.0 and m.card()["guidance"] == {"mode": "cfg", "w": 2.0}


def test_sfd_v_student_starts_as_the_teacher_and_draws_every_step_count(tiny_edm):
    m = _method(tiny_edm, method="sfd-v", nfe_range=(2, 4))
    x, sigma, y = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([3, 4])
    with torch.no_grad():
        for n in (2, 3, 4):
            assert torch.allclose(m.student(x, sigma, y, nfe=n), tiny_edm(x, sigma, y), atol=1e-6)
    gen = torch.Generator().manual_seed(0)
    assert {m.plan(gen)["nfe"] for _ in range(40)} == {2, 3, 4}
    assert set(m.card()["sigmas"]) == {"2", "3", "4"} and m.card()["nfe_range"] == [2, 4]


class _HookedNet(nn.Module):
    """A denoiser we do not own: its time embedding is a submodule named ``time_embedding``."""

    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self):
        super().__init__()
        self.time_embedding = nn.Sequential(nn.Linear(1, 16), nn.SiLU(), nn.Linear(16, 16))
        self.out = nn.Linear(16, 4)

    def forward(self, x, sigma, cond=None):
        emb = self.time_embedding(torch.as_tensor(sigma).float().expand(x.shape[0]).log()[:, None])
        return x + self.out(emb).view_as(x)


def test_step_embedding_through_a_time_embedding_hook():
    net = StudentNet(_HookedNet(), step_conditioned=True)
    assert net.injection == "time_embedding"
    x = torch.randn(2, 1, 2, 2)
    with torch.no_grad():
        assert torch.equal(net(x, 1.0, nfe=2), net(x, 1.0, nfe=5))
        nn.init.normal_(net.step_embed.mlp[-1].weight)
        assert not torch.allclose(net(x, 1.0, nfe=2), net(x, 1.0, nfe=5))
        assert torch.equal(
            net.denoiser(x, 1.0), net.denoiser(x, 1.0)
        )  # the hook is inert outside a step call
    with pytest.raises(ValueError, match="needs the step count"):
        net(x, 1.0)
    bare = nn.Linear(2, 2)
    bare.sigma_min, bare.sigma_max = 0.002, 80.0
    with pytest.raises(ValueError, match="cannot condition"):
        StudentNet(bare, step_conditioned=True)
    from distill_core.text_pipeline import PromptConditioned

    with pytest.raises(ValueError, match="cannot condition a Linear"):  # the network named, not its adapter
        StudentNet(PromptConditioned(bare, {"encoder_hidden_states": torch.zeros(2, 3)}), step_conditioned=True)


def test_training_moves_the_student_towards_the_teacher(tiny_edm, tmp_path):
    from distill_core.train.trainer import Trainer

    m = _method(tiny_edm, iters=12, batch=8, lr=2e-3, out=str(tmp_path), checkpoint_every=0)
    gen = torch.Generator().manual_seed(123)
    x, y = torch.randn(16, 1, 8, 8, generator=gen) * 80, torch.randint(10, (16,), generator=gen)
    with torch.no_grad():
        target = teacher_states(m.teacher, x, m.sigmas[3], y, 4)[-1]

    def err() -> float:  # the trainer may have moved the student to CUDA
        device = next(m.student.parameters()).device
        return (m.preview(x.to(device), y.to(device)).cpu() - target).square().mean().item()

    before = err()
    result = Trainer(m, m.cfg).fit()
    after = err()
    assert result.iteration == 12 and after < 0.7 * before, (before, after)


def test_teacher_pool_replays_trajectories_solved_once(tiny_edm):
    # a pool of 6 that serves 40 x 6 / 5 = 48 draws of 5: solved once for this test
    cfg = DistillConfig(steps=2, batch=5, teacher_substeps=2, teacher_pool=6, teacher_reuse=40,
                        teacher_one_step_above=20.0)
    sfd = build_method(tiny_source(tiny_edm), cfg)
    gen = torch.Generator().manual_seed(0)
    x, y, targets = sfd.pooled(2, MicroBatch(0, 1, 5), sfd.serve(2, gen), torch.device("cpu"))
    spent = sfd.teacher_evaluations
    # 6 trajectories x (1 step from sigma 80, K = 2 on the two intervals below sigma 20) x a CFG pair
    assert spent == 6 * (1 + 2 + 2) * 2
    sfd.pooled(2, MicroBatch(0, 1, 5), sfd.serve(2, gen), torch.device("cpu"))
    assert sfd.teacher_evaluations == spent  # the teacher ran once
    pool_x = sfd._pools[2][0]
    assert all(any(torch.equal(row, p) for p in pool_x) for row in x)
    assert len({tuple(row.flatten().tolist()) for row in x}) == 5  # drawn without replacement
    with torch.no_grad():
        fresh = teacher_states(sfd.teacher, x, sfd.sigmas[2], y, sfd.teacher_steps[2], cfg.teacher_solver)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fresh, targets))


def test_teacher_reuse_trains_on_every_trajectory_that_many_times(tiny_edm):
    cfg = DistillConfig(steps=2, batch=4, teacher_substeps=2, teacher_reuse=2, teacher_one_step_above=20.0)
    sfd = build_method(tiny_source(tiny_edm), cfg)
    gen = torch.Generator().manual_seed(0)
    draws = [sfd.pooled(2, MicroBatch(0, 1, 4), sfd.serve(2, gen), torch.device("cpu"))[0] for _ in range(4)]
    rows = [{tuple(r.flatten().tolist()) for r in x} for x in draws]
    # the pool is one batch: iterations 1 and 2 train on it, 3 and 4 on a fresh one
    assert rows[0] == rows[1] and rows[2] == rows[3] and not rows[0] & rows[2]
    assert sfd.teacher_evaluations == 2 * 4 * (1 + 2 + 2) * 2
    with pytest.raises(ValueError, match=r"teacher_reuse must lie in \[1, "):
        build_method(tiny_source(tiny_edm), cfg.replace(teacher_reuse=0.5))
    with pytest.raises(ValueError, match="teacher_pool must be 0 or at least the batch"):
        build_method(tiny_source(tiny_edm), cfg.replace(teacher_pool=3))


def test_micro_batches_of_one_iteration_train_on_different_trajectories(tiny_edm):
    """With gradient accumulation and reuse, an iteration's batch is drawn from the pool once and split:
    its micro-batches are disjoint, and together they are the batch a run without accumulation draws."""
    cfg = DistillConfig(steps=2, batch=4, grad_accum=2, teacher_substeps=2, teacher_reuse=2)
    sfd = build_method(tiny_source(tiny_edm), cfg)
    gen = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")
    iterations = []
    for _ in range(2):  # two iterations on one pool
        served = sfd.serve(2, gen)  # drawn once per iteration (in ``plan``)
        halves = [sfd.pooled(2, MicroBatch(k, 2, 2), served, cpu)[0] for k in range(2)]
        rows = [{tuple(r.flatten().tolist()) for r in x} for x in halves]
        assert len(rows[0]) == len(rows[1]) == 2 and not rows[0] & rows[1]
        iterations.append(rows[0] | rows[1])
    assert iterations[0] == iterations[1]  # the pool of one batch serves two iterations
    assert sfd.teacher_evaluations == 4 * 6 * 2  # one pool of 4 trajectories (K = 2 on 3 intervals, CFG pairs)
    whole = build_method(tiny_source(tiny_edm), cfg.replace(grad_accum=1))
    gen = torch.Generator().manual_seed(0)
    x = whole.pooled(2, MicroBatch(0, 1, 4), whole.serve(2, gen), cpu)[0]
    assert {tuple(r.flatten().tolist()) for r in x} == iterations[0]


def test_a_resumed_run_counts_the_teacher_work_of_the_whole_run(tiny_edm, tmp_path):
    from distill_core.train.callbacks import StopAt
    from distill_core.train.run import train_student

    cfg = DistillConfig(steps=2, iters=4, batch=4, teacher_substeps=2, teacher_reuse=1.0, checkpoint_every=1,
                        out=str(tmp_path / "whole"))
    whole = train_student(cfg, tiny_source(tiny_edm), progress=False)
    split = cfg.replace(out=str(tmp_path / "split"))
    assert train_student(split, tiny_source(tiny_edm), progress=False, callbacks=[StopAt(2)]) is None
    resumed = train_student(split, tiny_source(tiny_edm), resume=True, progress=False)
    assert whole.teacher_evaluations == 4 * 4 * 6 * 2  # 4 iterations x 4 trajectories x (K 2 on 3 intervals) x CFG
    assert resumed.teacher_evaluations == whole.teacher_evaluations
    assert read_card(resumed.path)["training"]["teacher_evaluations"] == whole.teacher_evaluations


def test_the_flow_grid_puts_the_student_on_the_flow_time_grid_and_says_so_in_its_card(tiny_edm):
    from distill_core.schedules import flow_time

    method = _method(tiny_edm, schedule="flow")
    sigmas = method.sigmas[method.nfes[0]]
    assert torch.allclose(sigmas, flow_time(len(sigmas) - 1, method.sigma_min, method.sigma_max))
    assert not torch.allclose(sigmas, _method(tiny_edm).sigmas[method.nfes[0]])
    card = method.card()
    assert card["schedule"]["name"] == "flow" and "rho" not in card["schedule"]
    assert _method(tiny_edm).card()["schedule"]["name"] == "karras"  # auto: Karras for an EDM teacher


def test_a_flow_teacher_gets_the_flow_grid_by_default():
    from conftest import TINY_UNET, randomise

    from distill_core.denoisers.flow import FlowDenoiser
    from distill_core.nets.unet import UNet

    flow = FlowDenoiser(randomise(UNet(TINY_UNET)), sigma_max=80.0).eval().requires_grad_(False)
    method = build_method(tiny_source(flow), DistillConfig(iters=4, batch=4, steps=3))
    assert method.grid == "flow" and method.card()["schedule"]["name"] == "flow"

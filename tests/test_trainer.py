"""The shared trainer: exact resume after Ctrl-C, NaN losses, non-finite gradients, EMA,
checkpoint encoding, metrics and sample grids."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from distill_core.config import DistillConfig
from distill_core.methods import build_method
from distill_core.methods.base import TeacherSource
from distill_core.train.callbacks import Callback, StopAt
from distill_core.train.checkpoint import flatten, load_checkpoint, save_checkpoint, unflatten
from distill_core.train.optim import lr_factor
from distill_core.train.trainer import Trainer, TrainingDiverged, micro_generator


def _sfd(tiny_edm, out, **kw):
    source = TeacherSource(
        "tiny",
        tiny_edm,
        (1, 8, 8),
        lambda b, g: torch.randint(10, (b,), generator=g),
        torch.tensor([10]),
        2.0,
    )
    cfg = DistillConfig(
        **{
            "iters": 6,
            "batch": 4,
            "steps": 2,
            "teacher_substeps": 2,
            "lr": 1e-3,
            "checkpoint_every": 2,
            "out": str(out),
            **kw,
        }
    )
    return build_method(source, cfg)


def test_checkpoint_structure_round_trips():
    state = {"a": {0: torch.arange(3), 5: (1.5, None, [True, "x"])}, "b": torch.ones(2, 2)}
    tensors: dict = {}
    desc = flatten(state, tensors)
    json.dumps(desc)
    back = unflatten(desc, tensors)
    assert set(back["a"]) == {0, 5} and back["a"][5] == (1.5, None, [True, "x"])
    assert torch.equal(back["a"][0], torch.arange(3)) and torch.equal(back["b"], torch.ones(2, 2))
    with pytest.raises(TypeError):
        flatten({"f": object()}, {})


class _SigintAt(Callback):
    def __init__(self, at: int):
        self.at = at

    def on_iteration(self, trainer, record):
        if trainer.iteration == self.at:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("pool", [{}, {"teacher_pool": 6, "teacher_reuse": 3}, {"teacher_reuse": 2}])
def test_resume_after_ctrl_c_continues_exactly(tiny_edm, tmp_path, pool):
    # with teacher pools the resume falls inside a pool: the resumed run must solve the same one again
    # the resume at iteration 3 falls inside a 4-iteration lr warmup
    m = _sfd(tiny_edm, tmp_path / "a", method="sfd-v", nfe_range=(1, 3), lr_warmup=4, **pool)
    straight = Trainer(m, m.cfg).fit()

    m1 = _sfd(tiny_edm, tmp_path / "b", method="sfd-v", nfe_range=(1, 3), lr_warmup=4, **pool)
    first = Trainer(m1, m1.cfg, callbacks=[_SigintAt(3)]).fit()
    assert first.status == "interrupted" and first.iteration == 3
    assert load_checkpoint(tmp_path / "b" / "checkpoints")[1]["iteration"] == 3
    m2 = _sfd(tiny_edm, tmp_path / "b", method="sfd-v", nfe_range=(1, 3), lr_warmup=4, **pool)
    resumed = Trainer(m2, m2.cfg).fit(resume=True)
    assert resumed.status == "done" and resumed.iteration == 6

    a, b = straight.student.state_dict(), resumed.student.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lines_b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines_b] == list(range(1, 7))
    assert [r["loss"] for r in lines_a] == [r["loss"] for r in lines_b]
    # warmup and SFD's cosine continue across the resume: lr_k = lr min(1, (k + 1) / 4) (1 + cos(pi k / 6)) / 2
    assert [r["lr"] for r in lines_a] == [r["lr"] for r in lines_b]
    expected = [2.5e-4, 0.5 * 0.5 * (1 + 3**0.5 / 2) * 1e-3, 5.625e-4, 5e-4]
    assert [r["lr"] for r in lines_a[:4]] == pytest.approx(expected)


def test_a_resumed_run_keeps_the_warmup_it_started_with(tiny_edm, tmp_path):
    # 20 iterations cap SFD's own warmup at 2; resumed inside it with iters 200 (a cap of 10), the run
    # keeps 2: iteration 3 (k = 2) runs at the full cosine factor, not at 3 / 10 of it
    m = _sfd(tiny_edm, tmp_path, iters=20, checkpoint_every=1)
    first = Trainer(m, m.cfg, callbacks=[_SigintAt(1)]).fit()
    assert first.status == "interrupted" and load_checkpoint(tmp_path / "checkpoints")[1]["lr_warmup"] == {"student": 2}
    m = _sfd(tiny_edm, tmp_path, iters=200, checkpoint_every=1)
    resumed = Trainer(m, m.cfg, callbacks=[_SigintAt(3)])
    assert resumed.fit(resume=True).iteration == 3 and resumed.warmup == {"student": 2}
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines] == [1, 2, 3]
    assert lines[2]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 200)))


def test_resume_refuses_a_different_configuration(tiny_edm, tmp_path):
    m = _sfd(tiny_edm, tmp_path, iters=2)
    Trainer(m, m.cfg).fit()
    m = _sfd(tiny_edm, tmp_path, iters=4, steps=3)
    with pytest.raises(ValueError, match="steps: 2 -> 3"):
        Trainer(m, m.cfg).fit(resume=True)


def test_the_lr_warms_up_over_the_methods_iterations_unless_configured(tiny_edm, tmp_path):
    # SFD's own warmup is 10 iterations: iteration k runs at lr (k + 1) / 10 times the cosine factor
    assert [lr_factor("cosine", k, 220, 0.5, 10) for k in (0, 4, 9, 10)] == pytest.approx(
        [0.1, 0.5 * 0.5 * (1 + math.cos(math.pi * 4 / 220)), 0.5 * (1 + math.cos(math.pi * 9 / 220)),
         0.5 * (1 + math.cos(math.pi * 10 / 220))]
    )
    assert [lr_factor("step", k, 4, 0.5, 2) for k in (0, 1, 2)] == [0.5, 1.0, 0.1]
    m = _sfd(tiny_edm, tmp_path / "a", iters=100)
    assert Trainer(m, m.cfg).lr == pytest.approx(1e-4)  # 1e-3 / 10 at the first iteration
    m = _sfd(tiny_edm, tmp_path / "b", iters=100, lr_warmup=0)
    assert Trainer(m, m.cfg).lr == pytest.approx(1e-3)
    # the method's own warmup is at most a tenth of the run; a configured one is kept as it is
    m = _sfd(tiny_edm, tmp_path / "c", iters=20)
    assert Trainer(m, m.cfg).lr == pytest.approx(5e-4)  # 2 iterations of warmup
    m = _sfd(tiny_edm, tmp_path / "d", iters=4)
    assert Trainer(m, m.cfg).lr == pytest.approx(1e-3)  # none: a 4-iteration run trains at its lr
    m = _sfd(tiny_edm, tmp_path / "e", iters=4, lr_warmup=10)
    assert Trainer(m, m.cfg).lr == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="lr_warmup"):
        DistillConfig(lr_warmup=-1)


@pytest.mark.parametrize(
    "key, old, message",
    [("teacher_reuse", 1.0, "teacher_reuse: 1.0 -> 2.0"), ("lr_warmup", 0, "lr_warmup: 0 -> None")],
)
def test_a_checkpoint_from_before_a_key_resumes_only_with_what_it_did(tiny_edm, tmp_path, key, old, message):
    # teacher_reuse: every batch was fresh; lr_warmup: no warmup
    m = _sfd(tiny_edm, tmp_path, iters=2, **{key: old})
    Trainer(m, m.cfg).fit()
    state, info = load_checkpoint(tmp_path / "checkpoints")
    del info["config"][key]  # as written before the key existed
    save_checkpoint(tmp_path / "checkpoints", state, info)
    m = _sfd(tiny_edm, tmp_path, iters=3)  # today's defaults
    with pytest.raises(ValueError, match=message):
        Trainer(m, m.cfg).fit(resume=True)
    m = _sfd(tiny_edm, tmp_path, iters=3, **{key: old})
    assert Trainer(m, m.cfg).fit(resume=True).iteration == 3


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_edm, tmp_path):
    m = _sfd(tiny_edm, tmp_path, checkpoint_every=1)
    good = m.losses
    calls = {"n": 0}

    def poisoned(plan, batch, gen):
        calls["n"] += 1
        for step in good(plan, batch, gen):
            yield step._replace(loss=step.loss * float("nan")) if calls["n"] == 3 else step

    m.losses = poisoned
    trainer = Trainer(m, m.cfg)
    with pytest.raises(TrainingDiverged, match="loss became nan at iteration 3.*last good checkpoint"):
        trainer.fit()
    state, info = load_checkpoint(tmp_path / "checkpoints")
    assert info["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["nets"]["student"].values())


class _BadGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g.view(-1)[0] = float("inf")
        return g


def test_nonfinite_gradients_are_zeroed_and_counted(tiny_edm, tmp_path):
    m = _sfd(tiny_edm, tmp_path, iters=2, checkpoint_every=0)
    good = m.losses

    def bad_grads(plan, batch, gen):
        for step in good(plan, batch, gen):
            weight = next(m.student.parameters())
            yield step._replace(loss=step.loss + _BadGrad.apply(weight).sum())

    m.losses = bad_grads
    result = Trainer(m, m.cfg).fit()
    assert result.nonfinite_grads == 2 * 2  # 2 updates per iteration (NFE 2 with AFS), 2 iterations
    assert all(torch.isfinite(p).all() for p in result.student.parameters())
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert record["nonfinite_grads"] == 2 and set(record["loss"]) == {"1", "2"}
    assert all(math.isfinite(v) for v in record["grad_norm"].values())  # the norm of the zeroed gradients


def test_ema_grid_accumulation_and_stop(tiny_edm, tmp_path):
    m = _sfd(tiny_edm, tmp_path, iters=4, batch=4, grad_accum=2, ema=0.5, sample_every=2)
    trainer = Trainer(m, m.cfg, callbacks=[StopAt(2)])
    result = trainer.fit()
    assert result.status == "interrupted" and result.iteration == 2
    live = trainer.unwrapped().state_dict()
    ema = result.student.state_dict()
    assert any(not torch.equal(live[k].cpu(), ema[k]) for k in live)  # live on the training device
    png = (tmp_path / "samples" / "iter_000002.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (3 * (16 * 9 + 1), 3 * (3 * 9 + 1))  # rows: teacher reference, solver, student


def test_a_lora_students_ema_keeps_its_adapters_not_a_second_base(tiny_edm, tmp_path):
    """The EMA copy shares the frozen base (the teacher) and copies what trains; its adapters follow the live
    ones at the decay, the base stays the teacher's, and the exported EMA student differs from the live one."""
    m = _sfd(tiny_edm, tmp_path, iters=2, batch=4, ema=0.5, student="lora", lora_rank=2, checkpoint_every=0)
    trainer = Trainer(m, m.cfg)
    live, ema = trainer.unwrapped(), trainer.ema["student"]
    pairs = list(zip(live.parameters(), ema.parameters(), strict=True))
    assert all(e is p for p, e in pairs if not p.requires_grad) and any(not p.requires_grad for p, _ in pairs)
    assert all(e is not p and e.data_ptr() != p.data_ptr() for p, e in pairs if p.requires_grad)
    start = {n: t.clone() for n, t in ema.saved_state().items()}
    result = trainer.fit()
    moved = [n for n, t in result.student.saved_state().items() if not torch.equal(t.cpu(), start[n].cpu())]
    assert moved and all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(result.student.denoiser.parameters(),
                                                                         tiny_edm.parameters(), strict=True))
    # the exported student holds the teacher's own weights (no second copy of the base), and its own adapters
    teacher = [*m.source.denoiser.parameters(), *m.source.denoiser.buffers()]
    assert all(any(t is u for u in teacher) for t in (*result.student.denoiser.parameters(),
                                                      *result.student.denoiser.buffers()))
    assert not any(a is b for a, b in zip(result.student.lora.parameters(), ema.lora.parameters()))
    live_state = live.saved_state()
    assert any(not torch.equal(live_state[n].cpu(), t) for n, t in result.student.saved_state().items())


def test_a_full_students_export_is_a_copy_of_its_weights_made_on_the_cpu(tiny_edm, tmp_path):
    """The exported full student: parameters (not plain tensors) on the CPU, equal to the trained ones but not
    them, in eval mode; the trained network keeps its mode and weights."""
    m = _sfd(tiny_edm, tmp_path, iters=2, batch=4, checkpoint_every=0)
    trainer = Trainer(m, m.cfg)
    result = trainer.fit()
    live = trainer.unwrapped()
    pairs = list(zip(live.parameters(), result.student.parameters(), strict=True))
    assert pairs and all(isinstance(e, torch.nn.Parameter) and e.device.type == "cpu" for _, e in pairs)
    assert all(torch.equal(p.detach().cpu(), e) and p.data_ptr() != e.data_ptr() for p, e in pairs)
    assert all(torch.equal(a.cpu(), b) and a.data_ptr() != b.data_ptr()
               for a, b in zip(live.buffers(), result.student.buffers(), strict=True))
    assert not result.student.training and live.training
    with torch.no_grad():
        next(result.student.parameters()).add_(1.0)
    assert not torch.equal(next(live.parameters()).cpu(), next(result.student.parameters()))


def test_runs_in_one_process_may_change_mixed_precision(tiny_edm, tmp_path):
    # accelerate's process-wide state refuses a second Accelerator with another precision; a ComfyUI
    # session or a benchmark trains several runs in one process
    for i, precision in enumerate(("no", "bf16", "no")):
        m = _sfd(tiny_edm, tmp_path / str(i), iters=1, mixed_precision=precision, checkpoint_every=0)
        trainer = Trainer(m, m.cfg)
        assert trainer.acc.mixed_precision == precision
        assert trainer.fit().iteration == 1
        losses = json.loads((tmp_path / str(i) / "metrics.jsonl").read_text())["loss"]
        assert set(losses) == {"1", "2"} and all(math.isfinite(v) for v in losses.values())


def test_a_schedule_below_the_teachers_trained_range_ends_at_its_lowest_sigma(tiny_edm, tmp_path, capsys):
    from distill_core.safetensors_io import read_card
    from distill_core.train.run import train_student

    tiny_edm.sigma_min = 0.03  # as a DDPM model whose first training step is sigma 0.03
    source = TeacherSource("tiny", tiny_edm, (1, 8, 8), lambda b, g: torch.randint(10, (b,), generator=g),
                           torch.tensor([10]), 2.0)
    cfg = DistillConfig(iters=2, batch=2, steps=2, teacher_substeps=1, sigma_min=0.006, checkpoint_every=0,
                        out=str(tmp_path / "run"))
    run = train_student(cfg, source, progress=False)
    assert "sigma_min 0.006 is below the teacher's trained range (its lowest sigma is 0.03)" in capsys.readouterr().out
    assert DistillConfig.from_yaml(tmp_path / "run" / "config.yaml").sigma_min == 0.03
    card = read_card(run.path)
    assert min(min(s for s in sigmas if s > 0) for sigmas in card["sigmas"].values()) == pytest.approx(0.03)


def test_training_seeds_its_generators_above_every_evaluation_seed(tiny_edm, tmp_path):
    """Training's noise and plans come from generators seeded in [TRAINING_SEED_BASE, 2^32), evaluation sets
    refuse seeds there: a student is never trained on the noise it is evaluated on. The main job evaluates on
    seed + 1, whose stream the training data shared when its generator was seeded seed * 1000003 + 1."""
    from distill_core.config import TRAINING_SEED_BASE
    from distill_core.eval.benchmark import eval_set
    from distill_core.teacher import CFGTeacher

    m = _sfd(tiny_edm, tmp_path, seed=0)
    trainer = Trainer(m, m.cfg)
    data = micro_generator(m.cfg.seed, 0, 0)  # the first micro-batch of the first iteration
    for gen in (data, trainer.plan_gen, micro_generator(2**40, 10**6, 63)):
        assert TRAINING_SEED_BASE <= gen.initial_seed() < 1 << 32  # torch keeps a seed's low 32 bits
    first = torch.randn((4, 1, 8, 8), generator=data)
    evaluation = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(m.cfg.seed + 1))
    assert not torch.equal(first, evaluation)
    with pytest.raises(ValueError, match="evaluation seed"):
        eval_set(CFGTeacher(tiny_edm, 1.0, torch.tensor([10])), 4, seed=TRAINING_SEED_BASE, shape=(1, 8, 8))

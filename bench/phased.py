"""Phased score distillation on the built-in teacher: an ablation over its choices, the phase-aware
schedule against Karras on the teacher itself, and SFD on top of a phased student.

    python bench/phased.py [--quick] [--K 4 8 16 32] [--partitions uniform adaptive] [--alphas dt variance]
                           [--smoothing 0 0.9] [--S 8 16] [--iters N] [--n 100] [--ref-steps 128] [--out FILE.json]
                           [--sfd-iters N]

Every (K, partition, alpha, smoothing) trains one half-width student (a quarter of the teacher's FLOPs);
a score student samples at any step count, so each is evaluated at every S of ``--S`` with its solver on
its own phase-aware schedule. Rows (the solver benchmark's format, ``method`` = ``phased``) add ``K``,
``partition``, ``alpha``, ``smoothing``, ``flops_ratio`` (FlopCounterMode, one forward at batch 1, student
over teacher), ``params`` and ``train_seconds``. Reference rows: the teacher's 64-step Heun solve with CFG
(the images/s baseline) and the best training-free solvers at 8 steps on Karras vs the phase-aware grid.
``--sfd-iters N`` distils the best student at S = 8 further with SFD to 4 steps and reports its gain over
the best 4-step solver on that student (PSNR against the teacher's and against the student's own
reference solve). ``--quick`` is a smoke run (a few minutes on 2 CPU cores).

Every student's rows are kept in its run folder under ``--work`` with its settings (``eval.kept``): the same
command run again trains only the students it lacks, and a student stopped part way goes on from its
checkpoint. The SFD student notes in its config the phased student it distils (``extra``), so that another
best student trains anew.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill_core.builtin import fingerprint  # noqa: E402
from distill_core.config import DistillConfig  # noqa: E402
from distill_core.eval.benchmark import (  # noqa: E402
    TABLE_KEYS,
    EvalSet,
    eval_set,
    evaluate,
    format_table,
    report_rows,
    sample_in_batches,
    solver_row,
    solver_rows,
    student_rows,
)
from distill_core.eval.kept import CHECKPOINT_EVERY, finished, kept_rows  # noqa: E402
from distill_core.methods.base import TeacherSource  # noqa: E402
from distill_core.methods.phased import teacher_probe  # noqa: E402
from distill_core.methods.phases import partition  # noqa: E402
from distill_core.options import positive  # noqa: E402
from distill_core.schedules import phased  # noqa: E402
from distill_core.solvers import SOLVERS  # noqa: E402
from distill_core.sources import builtin_source  # noqa: E402
from distill_core.student_files import load_student  # noqa: E402
from distill_core.students import Student  # noqa: E402
from distill_core.teacher import CFGTeacher  # noqa: E402
from distill_core.train.run import STUDENT_FILE, train_student  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SCHEDULE_SOLVERS = ("dpmpp_2m", "unipc", "ipndm")


def flops(denoiser, shape: tuple[int, ...]) -> int:
    """Floating-point operations of one denoiser forward at batch 1 (class 0, sigma 1)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        denoiser(torch.zeros(1, *shape), torch.ones(1), torch.zeros(1, dtype=torch.long))
    return counter.get_total_flops()


def phased_rows(student: Student, ev: EvalSet, steps: list[int], **extra) -> list[dict]:
    """A phased student sampled with its solver on its phase-aware schedule at every S of ``steps``."""
    card = student.card
    rows = []
    for s in steps:
        sigmas, solver = phased(s, card["phases"]["refinement"]), SOLVERS[card["solver"]]
        images, seconds = sample_in_batches(lambda x, y, g=sigmas, f=solver: f(student.denoiser(), x, g, y), ev)
        rows.append(evaluate("phased", s, images, ev, seconds, network_evals=s, **extra))
    return rows


def schedule_rows(teacher: CFGTeacher, source: TeacherSource, ev: EvalSet, base: DistillConfig, nfe: int) -> list[dict]:
    """Training-free solvers on the teacher at ``nfe`` steps: Karras (rho 7) vs the adaptive phase grid."""
    probe = teacher_probe(teacher, source, base, teacher.sigma_max)
    grid = phased(nfe, partition("adaptive", nfe, base.sigma_min, teacher.sigma_max, probe).refinement)
    rows = []
    for name in SCHEDULE_SOLVERS:
        rows.append(solver_row(name, nfe, teacher, ev, base.sigma_min) | {"schedule": "karras"})
        images, seconds = sample_in_batches(lambda x, y, name=name: SOLVERS[name](teacher, x, grid, y), ev)
        rows.append(evaluate(name, nfe, images, ev, seconds, network_evals=2 * nfe, schedule="phased"))
    return rows


def trained_rows(cfg: DistillConfig, source: TeacherSource, teacher: CFGTeacher, ev: EvalSet, steps: list[int],
                 teacher_flops: int, resume: bool, **labels) -> list[dict]:
    """Train ``cfg``'s phased student (from its checkpoint when ``resume``); its rows at every S of ``steps``
    with ``labels``, its FLOPs over the teacher's, its parameters and its training seconds."""
    run = finished(train_student(cfg, source, resume=resume, progress=False), cfg)
    student = load_student(run.path, teacher)
    net = student.net.denoiser
    return phased_rows(student, ev, steps, **labels, flops_ratio=round(flops(net, source.shape) / teacher_flops, 4),
                       params=sum(q.numel() for q in net.parameters()), train_seconds=round(run.train_seconds, 1))


def sfd_on_student(path: Path, source: TeacherSource, teacher: CFGTeacher, ev: EvalSet, iters: int, batch: int,
                   work: Path, cache: Path) -> list[dict]:
    """SFD to 4 steps with the phased student as its teacher (guidance already distilled: w = 1); rows of
    the SFD student and the best 4-step solvers on the phased student, against the teacher's reference
    and against the phased student's own reference solve (``reference``; as many Heun steps as the teacher's)."""
    inner = load_student(path, teacher).net.denoiser
    src = TeacherSource("phased-student", inner, source.shape, source.draw_cond, source.uncond, 1.0)
    cfg = DistillConfig(steps=4, iters=iters, batch=batch, guidance=1.0, checkpoint_every=CHECKPOINT_EVERY,
                        out=str(work / "sfd"), extra={"teacher_student": fingerprint(inner)})
    as_teacher = CFGTeacher(inner, 1.0, source.uncond)

    def rows_of(resume: bool) -> list[dict]:
        run = finished(train_student(cfg, src, resume=resume, progress=False), cfg)
        own = eval_set(as_teacher, ev.noise.shape[0], seed=1, steps=ev.steps, cache_dir=cache)
        rows = []
        for ref, label in ((ev, "teacher"), (own, "phased student")):
            found = student_rows(run, as_teacher, ref) + solver_rows(as_teacher, ref, 4, cfg.sigma_min)[:2]
            rows += [r | {"base": "phased student", "reference": label} for r in found]
        return rows

    evaluation = {"teacher": fingerprint(teacher.denoiser), "n": ev.noise.shape[0], "steps": ev.steps}
    return kept_rows(cfg, evaluation, rows_of)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: K 8, both partitions, short training")
    p.add_argument("--K", type=positive, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--partitions", nargs="+", default=["uniform", "adaptive"], choices=["uniform", "adaptive"])
    p.add_argument("--alphas", nargs="+", default=["dt", "variance"], choices=["dt", "variance"])
    p.add_argument("--smoothing", type=float, nargs="+", default=[0.0, 0.9], help="target_ema values (0: none)")
    p.add_argument("--S", type=positive, nargs="+", default=[8, 16], help="sampling steps of every student")
    p.add_argument("--iters", type=positive, default=600)
    p.add_argument("--batch", type=positive, default=64)
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (cosine schedule)")
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the student's weights (0: none)")
    p.add_argument("--targets", default="data", choices=["data", "trajectories"],
                   help="the student's inputs: forward-noised digits, or the teacher's own trajectories (data-free, "
                   "as the shipped workflow)")
    p.add_argument("--n", type=positive, default=100, help="evaluation samples")
    p.add_argument("--ref-steps", type=positive, default=128, help="Heun steps of the reference solves")
    p.add_argument("--sfd-iters", type=int, default=0, help="> 0: SFD to 4 steps on the best student at S = 8")
    p.add_argument("--no-reference", action="store_true", help="skip the teacher and schedule rows")
    p.add_argument("--cache", default=str(RESULTS / "cache"), help="where reference solves are cached")
    p.add_argument("--work", default=str(RESULTS / "phased_runs"), help="where the students are trained")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.K, args.alphas, args.smoothing, args.iters, args.n = [8], ["dt"], [0.0], 40, 50

    start = time.time()
    source = builtin_source()
    teacher = CFGTeacher(source.denoiser, source.guidance, source.uncond)
    ev = eval_set(teacher, args.n, seed=1, steps=args.ref_steps, cache_dir=args.cache)
    base = DistillConfig(method="phased", iters=args.iters, batch=args.batch, student_width=args.width, lr=args.lr,
                         ema=args.ema or None, phase_inputs=args.targets, checkpoint_every=CHECKPOINT_EVERY)
    rows = [] if args.no_reference else [solver_row("heun", 128, teacher, ev) | {"method": "teacher-heun-64"}]
    rows += [] if args.no_reference else schedule_rows(teacher, source, ev, base, 8)
    teacher_flops = flops(source.denoiser, source.shape)
    work, trained = Path(args.work), []
    evaluation = {"teacher": fingerprint(source.denoiser), "n": args.n, "steps": args.ref_steps, "S": args.S}
    for k, part, alpha, ema in itertools.product(args.K, args.partitions, args.alphas, args.smoothing):
        name = f"K{k}-{part}-{alpha}-ema{ema:g}"
        cfg = base.replace(phases=k, partition=part, phase_weights=alpha, target_ema=ema, steps=min(args.S),
                           out=str(work / name))
        labels = {"K": k, "partition": part, "alpha": alpha, "smoothing": "ema" if ema else "none"}
        found = kept_rows(cfg, evaluation, lambda resume, cfg=cfg, labels=labels: trained_rows(
            cfg, source, teacher, ev, args.S, teacher_flops, resume, **labels))
        trained.append((found[0]["fd"], Path(cfg.out) / STUDENT_FILE))
        rows += found
        print(format_table(found), file=sys.stderr, flush=True)
    if args.sfd_iters and trained:
        rows += sfd_on_student(min(trained)[1], source, teacher, ev, args.sfd_iters, args.batch, work,
                               Path(args.cache))

    report_rows(rows, TABLE_KEYS, f"built-in teacher, w = {teacher.w:g}, {args.n} samples; {args.iters} iterations x "
                f"batch {args.batch} per student, width {args.width:g}, lr {args.lr:g}, EMA {args.ema:g}", start,
                args.out)
    return rows


if __name__ == "__main__":
    main()

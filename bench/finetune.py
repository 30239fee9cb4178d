"""A generic few-step student on a fine-tune, against a student distilled from the fine-tune itself.

    python bench/finetune.py [--quick] [--steps 4] [--n 2000] [--ref-steps 32] [--out FILE.json] [--picture FILE.png]

The fine-tune is the built-in teacher's bold-digits LoRA (``distill_core.finetune_builtin``). Two SFD LoRA
students at ``--steps`` and the same budget (the main job's iterations and batch):

* ``generic``: distilled from the base teacher and applied to the fine-tune, as a downloaded few-step LoRA
  is applied to an artist's own checkpoint;
* ``own``: distilled from the fine-tune itself.

Every row is measured on the fine-tune's evaluation set: PSNR against its reference solve from the same
noise and classes, ``fd_teacher`` / precision / recall against its own many-step samples (independent
noise), and ``ink``, the fraction of pixels above mid-grey, the style the fine-tune doubles (the rows
``base teacher`` and ``fine-tune`` give the two styles' ink from the same noise). The training-free
solvers at ``--steps`` on the fine-tune are the baseline. The picture holds the same noise through the
base teacher, the fine-tune, the generic and the own student.

Each student's row is kept in its run folder under ``--work`` with its settings (``eval.kept``): the same
command run again trains only the students it lacks, and a student stopped part way goes on from its
checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill_core.builtin import fingerprint  # noqa: E402
from distill_core.compare import pixels  # noqa: E402
from distill_core.config import DistillConfig  # noqa: E402
from distill_core.eval.benchmark import (  # noqa: E402
    EvalSet,
    benchmark_set,
    eval_set,
    evaluate,
    report_rows,
    sample_in_batches,
    solver_rows,
    teacher_row,
)
from distill_core.eval.kept import CHECKPOINT_EVERY, finished, kept_rows  # noqa: E402
from distill_core.finetune_builtin import ink  # noqa: E402
from distill_core.methods.base import TeacherSource  # noqa: E402
from distill_core.options import positive  # noqa: E402
from distill_core.plot import labelled_grid  # noqa: E402
from distill_core.report import write_png  # noqa: E402
from distill_core.sampling import sample  # noqa: E402
from distill_core.sources import builtin_source, finetuned_source  # noqa: E402
from distill_core.student_files import load_student  # noqa: E402
from distill_core.teacher import CFGTeacher  # noqa: E402
from distill_core.train.run import STUDENT_FILE, train_student  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = ("method", "nfe", "psnr_db", "fd_teacher", "precision", "recall", "ink", "train_seconds")
QUICK = {"iters": 8, "batch": 16}
#: students' samples in the picture
PICTURED = 10


def trained_row(name: str, cfg: DistillConfig, source: TeacherSource, teacher: CFGTeacher, ev: EvalSet,
                resume: bool) -> list[dict]:
    """Train ``cfg``'s student of ``source`` (from its checkpoint when ``resume``); its row on the fine-tune's
    evaluation set, labelled ``name``."""
    run = finished(train_student(cfg, source, resume=resume, progress=False), cfg)
    student = load_student(run.path, teacher, any_teacher=True)
    images, seconds = sample_in_batches(lambda x, y: sample(student, x, y, steps=cfg.steps), ev)
    return [evaluate(name, cfg.steps, images, ev, seconds, network_evals=cfg.steps, ink=round(ink(images), 4),
                     train_seconds=round(run.train_seconds, 1), teacher_evaluations=run.teacher_evaluations)]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short training, 100 samples (a smoke run)")
    p.add_argument("--steps", type=positive, default=4, help="the students' step count")
    p.add_argument("--n", type=positive, help="evaluation samples (default 2000, quick 100)")
    p.add_argument("--ref-steps", type=positive, default=32, help="Heun steps of the reference solves")
    p.add_argument("--cache", default=str(RESULTS / "cache"), help="where reference solves are cached")
    p.add_argument("--work", default=str(RESULTS / "finetune_runs"), help="where the students are trained")
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--picture", help="write the same-noise picture here (PNG)")
    args = p.parse_args(argv)
    start = time.time()
    n = args.n or (100 if args.quick else 2000)
    cfg = DistillConfig(method="sfd", steps=args.steps, student="lora", checkpoint_every=CHECKPOINT_EVERY)
    if args.quick:
        cfg = cfg.replace(**QUICK)

    base, tuned = builtin_source(), finetuned_source()
    base_teacher = CFGTeacher(base.denoiser, base.guidance, base.uncond)
    teacher = CFGTeacher(tuned.denoiser, tuned.guidance, tuned.uncond)
    ev = benchmark_set(teacher, n, args.ref_steps, args.cache)
    base_reference = eval_set(base_teacher, n, seed=1, steps=args.ref_steps, cache_dir=args.cache).reference
    rows = [{**teacher_row(teacher, ev), "method": "fine-tune", "ink": round(ink(ev.reference), 4)},
            {"method": "base teacher", "nfe": ev.steps * 2 - 1, "ink": round(ink(base_reference), 4)}]
    rows += solver_rows(teacher, ev, args.steps, cfg.sigma_min)

    evaluation = {"teacher": fingerprint(tuned.denoiser), "n": n, "steps": args.ref_steps}
    pictured = {}
    for name, source in (("generic", base), ("own", tuned)):
        student_cfg = cfg.replace(out=str(Path(args.work) / name), teacher=source.name)
        rows += kept_rows(student_cfg, evaluation, lambda resume, name=name, c=student_cfg, s=source: trained_row(
            name, c, s, teacher, ev, resume))
        if args.picture:
            student = load_student(Path(student_cfg.out) / STUDENT_FILE, teacher, any_teacher=True)
            with torch.no_grad():
                pictured[name] = sample(student, ev.noise[:PICTURED], ev.labels[:PICTURED], steps=args.steps)

    report_rows(rows, KEYS, f"fine-tune: {tuned.name}; SFD LoRA students at {args.steps} steps, {cfg.iters} "
                f"iterations x batch {cfg.batch}; {n} samples", start, args.out)
    if args.picture:
        shown = [("base teacher", base_reference), ("fine-tune", ev.reference), (f"generic, {args.steps} steps",
                 pictured["generic"]), (f"own, {args.steps} steps", pictured["own"])]
        write_png(labelled_grid([(label, pixels(x[:PICTURED])) for label, x in shown]), args.picture)
    return rows


if __name__ == "__main__":
    main()

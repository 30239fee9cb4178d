"""Distillation on the built-in teacher against the training-free solvers, at NFE 2, 3, 4, 5.

    python bench/distill.py [--quick] [--methods sfd sfd-v ...] [--out FILE.json]

For every NFE: the three best training-free solvers, and the students of every chosen method (any
registered method; each says which students it trains for the NFEs, ``Method.bench_runs``: SFD one per
NFE, SFD-v one for the whole range at twice the iterations). Each row: PSNR against the teacher's reference solve
from the same noise, Frechet distance, class accuracy, images/s, and for students the distillation
wall time (``train_seconds``) and the teacher evaluations spent (per image). All rows come from one
evaluation set, so solvers and students compare directly. ``--quick`` is a smoke run (about 10
minutes on 2 CPU cores); the default trains each student as the main job does. Every student's rows are kept
in its run folder (``eval.kept``): the same command run again trains only the students it lacks, and one
stopped part way goes on from its last checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill_core.builtin import fingerprint  # noqa: E402
from distill_core.config import DistillConfig  # noqa: E402
from distill_core.eval.benchmark import eval_set, format_table, solver_rows, student_rows, write_rows  # noqa: E402
from distill_core.eval.kept import CHECKPOINT_EVERY, finished, kept_rows  # noqa: E402
from distill_core.methods.registry import method_class, methods  # noqa: E402
from distill_core.options import positive  # noqa: E402
from distill_core.sources import builtin_source  # noqa: E402
from distill_core.teacher import CFGTeacher  # noqa: E402
from distill_core.train.run import train_student  # noqa: E402

NFES = (2, 3, 4, 5)
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short training, few samples (a smoke run)")
    p.add_argument("--nfe", type=positive, nargs="+", default=list(NFES))
    p.add_argument("--n", type=positive, help="evaluation samples (default 500, quick 50)")
    p.add_argument("--iters", type=positive, help="iterations per SFD student (default: the main job's)")
    p.add_argument("--methods", nargs="+", default=["sfd", "sfd-v"], choices=list(methods()),
                   help="the methods to train (default: sfd sfd-v)")
    p.add_argument("--batch", type=positive)
    p.add_argument("--guidance-mode", choices=("distilled", "cfg"), default="distilled")
    p.add_argument("--work", default=str(RESULTS / "distill_runs"), help="where the students are trained")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)

    base = DistillConfig(guidance_mode=args.guidance_mode, checkpoint_every=CHECKPOINT_EVERY)
    if args.quick:
        base = base.replace(iters=12, batch=16)
    base = base.replace(iters=args.iters, batch=args.batch)
    n = args.n or (50 if args.quick else 500)

    source = builtin_source()
    teacher = CFGTeacher(source.denoiser, source.guidance, source.uncond)
    ev = eval_set(teacher, n, seed=1, cache_dir=RESULTS / "cache")
    rows: list[dict] = []
    for nfe in args.nfe:
        rows += solver_rows(teacher, ev, nfe, base.sigma_min)[:3]
    work, evaluation = Path(args.work), {"teacher": fingerprint(source.denoiser), "n": n, "seed": 1}
    for method in args.methods:
        for name, settings in method_class(method).bench_runs(list(args.nfe), base.iters):
            cfg = base.replace(method=method, out=str(work / name), **settings)
            rows += kept_rows(cfg, evaluation, lambda resume, cfg=cfg: student_rows(
                finished(train_student(cfg, source, resume=resume, progress=False), cfg), teacher, ev))

    rows.sort(key=lambda r: (r["nfe"], r["method"] not in args.methods, -r["psnr_db"]))
    print(format_table(rows))
    if args.out:
        write_rows(rows, args.out)
    return rows


if __name__ == "__main__":
    main()

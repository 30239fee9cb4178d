"""The main job: distil a teacher into a few-step student and report how close it gets.

    python -m distill_core distill [--config run.yaml] [--teacher builtin] [--method sfd|sfd-v]
                                   [--steps 4] [--iters N] [--out DIR] [--quality] [--resume]

Writes to ``--out``: ``student.safetensors``; ``grid.png`` (same noise and classes in every row:
the teacher's reference solve, the best training-free solver at the student's NFE, the student);
``report.json`` (with ``rows`` in the benchmark format) and ``report.md``; ``metrics.jsonl``;
``checkpoints/``. The default run distils the built-in teacher to 4 steps in under 10 minutes on
2 CPU cores; ``--quality`` trains about 4x longer.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from distill_core.config import QUALITY, DistillConfig
from distill_core.methods import build_method
from distill_core.methods.base import TeacherSource
from distill_core.train.callbacks import TqdmProgress
from distill_core.train.trainer import Trainer, TrainingDiverged

TEACHERS = ("builtin",)


def builtin_source() -> TeacherSource:
    """The shipped 16x16 MNIST teacher: classes 0-9 drawn uniformly, class 10 is the null class."""
    from distill_core import builtin

    def draw_cond(batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(builtin.NUM_CLASSES, (batch,), generator=generator)

    return TeacherSource(
        "builtin",
        builtin.load_builtin_teacher(),
        builtin.SHAPE,
        draw_cond,
        torch.tensor([builtin.NUM_CLASSES]),
        builtin.DEFAULT_GUIDANCE,
    )


def teacher_source(name: str) -> TeacherSource:
    if name == "builtin":
        return builtin_source()
    raise ValueError(
        f"unknown teacher {name!r}; available here: {list(TEACHERS)} "
        "(diffusers and ComfyUI teachers come through the nodes)"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with DistillConfig fields (flags override it)")
    p.add_argument("--teacher", choices=TEACHERS, help="teacher to distil (default: builtin)")
    p.add_argument(
        "--method", choices=("sfd", "sfd-v"), help="sfd: one student per NFE; sfd-v: one for a range"
    )
    p.add_argument("--steps", type=int, help="network evaluations per sample of the student (default 4)")
    p.add_argument(
        "--nfe-range", type=int, nargs=2, metavar=("LO", "HI"), help="SFD-v's NFE range (default 2 5)"
    )
    p.add_argument("--iters", type=int, help="training iterations (teacher trajectories per batch)")
    p.add_argument("--batch", type=int, help="trajectories per iteration")
    p.add_argument("--guidance", type=float, help="CFG scale w (default: the teacher's)")
    p.add_argument(
        "--guidance-mode",
        choices=("distilled", "cfg"),
        help="distil w into the student, or apply CFG when sampling",
    )
    p.add_argument("--loss", choices=("l1", "l2", "huber"))
    p.add_argument("--lr", type=float)
    p.add_argument("--eval-samples", type=int, help="samples for the report's metrics")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="output directory (default runs/main)")
    p.add_argument(
        "--quality",
        action="store_true",
        help="the longer preset: " + ", ".join(f"{k}={v}" for k, v in QUALITY.items()),
    )
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    cfg = DistillConfig.from_yaml(args.config) if args.config else DistillConfig()
    if args.quality:
        cfg = cfg.replace(**QUALITY)
    return cfg.replace(
        teacher=args.teacher,
        method=args.method,
        steps=args.steps,
        nfe_range=tuple(args.nfe_range) if args.nfe_range else None,
        iters=args.iters,
        batch=args.batch,
        guidance=args.guidance,
        guidance_mode=args.guidance_mode,
        loss=args.loss,
        lr=args.lr,
        eval_samples=args.eval_samples,
        seed=args.seed,
        out=args.out,
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        report = distill(cfg, resume=args.resume, progress=not args.no_progress)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if report is None:
        return 0
    from distill_core.eval.benchmark import format_table

    print(format_table(report["rows"]))
    files = "student.safetensors, grid.png, report.json, report.md"
    print(f"wrote {files} to {cfg.out} in {report['total_seconds']:.0f} s")
    return 0


def distill(cfg: DistillConfig, resume: bool = False, progress: bool = True) -> dict | None:
    """Train, save the student, evaluate it against the training-free solvers, write the report.
    Returns the report (``None`` when training was interrupted: resume with ``resume=True``)."""
    from distill_core.students import save_student

    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(out / "config.yaml")
    source = teacher_source(cfg.teacher)
    method = build_method(source, cfg)
    trainer = Trainer(
        method, cfg, out, [TqdmProgress(f"{cfg.method} to {cfg.steps} steps")] if progress else []
    )
    result = trainer.fit(resume=resume)
    if result.status != "done":
        print(
            f"stopped at iteration {result.iteration}/{cfg.iters}; the checkpoint is in {trainer.ckpt_dir}: "
            f"continue with --resume --out {out}"
        )
        return None
    card = method.card()
    card["training"].update(
        seconds=round(result.seconds, 1),
        iterations=result.iteration,
        nonfinite_grads=result.nonfinite_grads,
        teacher_evaluations=method.teacher_evaluations,
    )
    student_path = save_student(out / "student.safetensors", result.student, card)
    report = evaluate_student(student_path, source, cfg, result.seconds, method.teacher_evaluations, out)
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    from distill_core.report import write_report

    write_report(out, report, report.pop("grid_rows"))
    return report


def evaluate_student(
    student_path: Path,
    source: TeacherSource,
    cfg: DistillConfig,
    train_seconds: float,
    teacher_evaluations: int,
    out: Path,
) -> dict:
    """Benchmark rows for the student and the training-free solvers at the student's NFE (and at twice
    it), and the grid."""
    from distill_core.eval.benchmark import eval_set, evaluate, sample_in_batches, solver_row, solver_sigmas
    from distill_core.report import save_grid
    from distill_core.sampling import sample
    from distill_core.solvers import SOLVERS
    from distill_core.students import load_student
    from distill_core.teacher import CFGTeacher

    w = source.guidance if cfg.guidance is None else cfg.guidance
    teacher = CFGTeacher(source.denoiser.cpu(), w, source.uncond)
    student = load_student(student_path, teacher)
    ev = eval_set(teacher, cfg.eval_samples, seed=cfg.seed + 1, cache_dir=out / "cache")
    per_eval = 2 if student.card["guidance"]["mode"] == "cfg" and w != 1 else 1
    rows, student_rows = [], []
    for n in student.nfe_choices:
        images, seconds = sample_in_batches(lambda x, y, n=n: sample(student, x, y, steps=n), ev)
        student_rows.append(
            evaluate(
                cfg.method,
                n * per_eval,
                images,
                ev,
                seconds,
                steps=n,
                train_seconds=round(train_seconds, 1),
                teacher_evaluations=teacher_evaluations,
            )
        )
        solvers = [solver_row(name, n * per_eval, teacher, ev) for name in SOLVERS]
        rows += sorted(solvers, key=lambda r: -r["psnr_db"]) + [student_rows[-1]]
    nfe = student.nfe_choices[-1] * per_eval
    best = max((r for r in rows if r["method"] in SOLVERS and r["nfe"] == nfe), key=lambda r: r["psnr_db"])
    rows += sorted((solver_row(name, 2 * nfe, teacher, ev) for name in SOLVERS), key=lambda r: -r["psnr_db"])

    k = min(10, cfg.eval_samples)
    noise, labels = ev.noise[:k], ev.labels[:k]
    with torch.no_grad():
        solver_images = SOLVERS[best["method"]](
            teacher, noise, solver_sigmas(best["method"], nfe, teacher.sigma_min, teacher.sigma_max), labels
        )
        student_images = sample(student, noise, labels)
    save_grid([ev.reference[:k], solver_images, student_images], out / "grid.png")

    best_8 = max(
        (r for r in rows if r["method"] in SOLVERS and r["nfe"] == 2 * nfe), key=lambda r: r["psnr_db"]
    )
    top = student_rows[-1]
    return {
        "method": cfg.method,
        "steps": student.nfe_choices[-1],
        "teacher": cfg.teacher,
        "guidance": w,
        "guidance_mode": cfg.guidance_mode,
        "train_seconds": round(train_seconds, 1),
        "iterations": cfg.iters,
        "teacher_evaluations": teacher_evaluations,
        "eval_samples": cfg.eval_samples,
        "student_psnr_db": top["psnr_db"],
        "best_solver": f"{best['method']} ({best['psnr_db']} dB at {nfe} NFE)",
        "gain_over_best_solver_db": round(top["psnr_db"] - best["psnr_db"], 3),
        "best_solver_at_2x_nfe": f"{best_8['method']} ({best_8['psnr_db']} dB at {2 * nfe} NFE)",
        "rows": rows,
        "grid_rows": [
            "teacher reference solve (Heun, 128 steps)",
            f"{best['method']} at {nfe} NFE",
            f"{cfg.method} student at {nfe} NFE",
        ],
        "config": cfg.to_dict(),
    }

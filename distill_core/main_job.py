"""The main job: distil a teacher into a few-step student and report how close it gets.

    python -m distill_core distill [--config run.yaml] [--teacher builtin] [--method sfd|sfd-v]
                                   [--steps 4] [--iters N] [--out DIR] [--quality] [--resume]

Writes to ``--out``: ``student.safetensors``; ``grid.png`` (same noise and classes in every row:
the teacher's reference solve, the best training-free solver at the student's NFE, the student);
``report.json`` (with ``rows`` in the benchmark format) and ``report.md``; ``metrics.jsonl``;
``checkpoints/``. The default run distils the built-in teacher to 4 steps in under 10 minutes on
2 CPU cores; ``--quality`` trains 600 iterations on fresh teacher trajectories (4x the compute).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from distill_core.config import METHODS, QUALITY, DistillConfig
from distill_core.methods import build_method
from distill_core.methods.base import TeacherSource
from distill_core.sources import TEACHERS, builtin_source, teacher_source  # noqa: F401 (builtin_source: re-exported)
from distill_core.teacher import CFGTeacher
from distill_core.train.callbacks import Callback, TqdmProgress
from distill_core.train.trainer import Trainer, TrainingDiverged


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with DistillConfig fields (flags override it)")
    p.add_argument("--teacher", choices=TEACHERS, help="teacher to distil (default: builtin)")
    p.add_argument(
        "--method", choices=METHODS,
        help="sfd: one student per NFE; sfd-v: one for a range; phased: a lighter score student (docs in README)",
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


@dataclass
class StudentRun:
    """A trained student file and what it cost."""

    path: Path
    train_seconds: float
    teacher_evaluations: int


def train_student(
    cfg: DistillConfig, source: TeacherSource, resume: bool = False, progress: bool = True,
    callbacks: tuple[Callback, ...] = (),
) -> StudentRun | None:
    """Train ``cfg.method`` on ``source`` into ``cfg.out`` and save ``student.safetensors`` there
    (``None`` when training was interrupted: continue with ``resume=True``). ``callbacks`` see every
    iteration (progress bars of a host; one that raises stops the run after a checkpoint). The trainer
    moves the teacher to its device (CUDA when there is one); it is moved back where it was."""
    from distill_core.students import save_student

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(out / "config.yaml")
    method = build_method(source, cfg)
    home = next(source.denoiser.parameters()).device
    bar = [TqdmProgress(f"{cfg.method} to {cfg.steps} steps")] if progress else []
    trainer = Trainer(method, cfg, out, [*bar, *callbacks])
    try:
        result = trainer.fit(resume=resume)
    finally:
        release_teacher(trainer.unwrapped())
        method.to(home)
    if result.status != "done":
        print(f"stopped at iteration {result.iteration}/{cfg.iters}; the checkpoint is in {trainer.ckpt_dir}")
        return None
    card = method.card()
    card["training"].update(
        seconds=round(result.seconds, 1),
        iterations=result.iteration,
        nonfinite_grads=result.nonfinite_grads,
        teacher_evaluations=method.teacher_evaluations,
    )
    path = save_student(out / "student.safetensors", result.student, card, method.file_tensors())
    return StudentRun(path, result.seconds, method.teacher_evaluations)


def release_teacher(student: torch.nn.Module) -> None:
    """Detach a LoRA student's adapters from the teacher network they were hooked into."""
    adapters = getattr(student, "lora", None)
    if adapters is not None:
        adapters.detach()


def student_rows(run: StudentRun, teacher: CFGTeacher, ev) -> list[dict]:
    """Benchmark rows of a student file, one per NFE it serves (``network_evals`` counts CFG's two)."""
    from distill_core.eval.benchmark import evaluate, network_evals_per_call, sample_in_batches
    from distill_core.sampling import sample
    from distill_core.students import load_student

    student = load_student(run.path, teacher)
    per_step = network_evals_per_call(teacher) if student.card["guidance"]["mode"] == "cfg" else 1
    rows = []
    for n in student.nfe_choices:
        images, seconds = sample_in_batches(lambda x, y, n=n: sample(student, x, y, steps=n), ev)
        extra = {"network_evals": n * per_step, "train_seconds": round(run.train_seconds, 1)}
        extra["teacher_evaluations"] = run.teacher_evaluations
        rows.append(evaluate(student.card["method"], n, images, ev, seconds, **extra))
    return rows


def solver_rows(teacher: CFGTeacher, ev, nfe: int, sigma_min: float) -> list[dict]:
    """Every training-free solver at ``nfe`` on the Karras grid to ``sigma_min``, best PSNR first."""
    from distill_core.eval.benchmark import solver_row
    from distill_core.solvers import SOLVERS

    rows = (solver_row(name, nfe, teacher, ev, sigma_min) for name in SOLVERS)
    return sorted(rows, key=lambda r: -r["psnr_db"])


def distill(cfg: DistillConfig, resume: bool = False, progress: bool = True) -> dict | None:
    """Train, save the student, evaluate it against the training-free solvers, write the report.
    Returns the report (``None`` when training was interrupted: resume with ``resume=True``)."""
    from distill_core.eval.benchmark import eval_set, solver_sigmas
    from distill_core.report import save_grid, write_report
    from distill_core.sampling import sample
    from distill_core.solvers import SOLVERS
    from distill_core.students import load_student

    start = time.perf_counter()
    out = Path(cfg.out)
    source = teacher_source(cfg.teacher)
    run = train_student(cfg, source, resume, progress)
    if run is None:
        print(f"continue with: python -m distill_core distill --resume --out {out}")
        return None

    w = source.guidance if cfg.guidance is None else cfg.guidance
    teacher = CFGTeacher(source.denoiser.cpu(), w, source.uncond)
    ev = eval_set(teacher, cfg.eval_samples, seed=cfg.seed + 1, cache_dir=out / "cache")
    ours = student_rows(run, teacher, ev)
    rows = []
    for row in ours:
        rows += solver_rows(teacher, ev, row["nfe"], cfg.sigma_min) + [row]
    top = ours[-1]
    nfe = top["nfe"]
    best = next(r for r in rows if r["nfe"] == nfe and r["method"] in SOLVERS)
    at_twice = solver_rows(teacher, ev, 2 * nfe, cfg.sigma_min)
    rows += at_twice

    k = min(10, cfg.eval_samples)
    noise, labels = ev.noise[:k], ev.labels[:k]
    sigmas = solver_sigmas(best["method"], nfe, cfg.sigma_min, teacher.sigma_max)
    with torch.no_grad():
        solver_images = SOLVERS[best["method"]](teacher, noise, sigmas, labels)
        student_images = sample(load_student(run.path, teacher), noise, labels)
    save_grid([ev.reference[:k], solver_images, student_images], out / "grid.png")
    grid_rows = [
        "teacher reference solve (Heun, 128 steps)",
        f"{best['method']}, the best training-free solver at {nfe} NFE",
        f"{cfg.method} student at {nfe} NFE",
    ]
    report = {
        "method": cfg.method,
        "steps": top["nfe"],
        "teacher": cfg.teacher,
        "guidance": w,
        "guidance_mode": cfg.guidance_mode,
        "iterations": cfg.iters,
        "train_seconds": round(run.train_seconds, 1),
        "teacher_evaluations": run.teacher_evaluations,
        "eval_samples": cfg.eval_samples,
        "student_psnr_db": top["psnr_db"],
        "best_solver": f"{best['method']} ({best['psnr_db']} dB at {nfe} NFE)",
        "gain_over_best_solver_db": round(top["psnr_db"] - best["psnr_db"], 3),
        "best_solver_at_2x_nfe": f"{at_twice[0]['method']} ({at_twice[0]['psnr_db']} dB at {2 * nfe} NFE)",
        "total_seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
        "config": cfg.to_dict(),
    }
    write_report(out, report, grid_rows)
    return report

"""The main job: distil a teacher into a few-step student and report how close it gets.

    python -m distill_core distill [--config run.yaml] [--teacher builtin] [--method sfd|sfd-v|auto|...]
                                   [--steps 4] [--iters N] [--out DIR] [--quality] [--resume]

Writes to ``--out``: ``student.safetensors``; ``grid.png`` (same noise and classes in every row:
the teacher's reference solve, the best training-free solver at the student's NFE, the student);
``report.json`` (with ``rows`` in the benchmark format) and ``report.md``; ``metrics.jsonl``;
``checkpoints/``. The default run distils the built-in teacher to 4 steps in under 10 minutes on
2 CPU cores; ``--quality`` trains 600 iterations on fresh teacher trajectories (4x the compute).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from pathlib import Path

import torch
import yaml

from distill_core.config import QUALITY, DistillConfig
from distill_core.denoisers.base import move_cond
from distill_core.methods import auto
from distill_core.methods.base import TeacherSource
from distill_core.methods.registry import methods
from distill_core.options import add_flags, flag_values, settings
from distill_core.sources import teacher_source
from distill_core.stages import announce, counted
from distill_core.teacher import CFGTeacher
from distill_core.train.run import StudentRun, refuse_replacing, train_student, within_trained_range
from distill_core.train.runlock import CACHE


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of config fields (flags override it)")
    p.add_argument(
        "--quality",
        action="store_true",
        help="the longer preset: " + ", ".join(f"{k}={v}" for k, v in QUALITY.items()),
    )
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out (with the run's own config.yaml unless --config "
                   "is given)")
    p.add_argument("--overwrite", action="store_true",
                   help="start the run anew in an --out that holds another run (its student and checkpoints are "
                   "replaced); without it such a folder is refused")
    p.add_argument("--no-progress", action="store_true", help="no progress bar and no line per loading or "
                   "evaluation step")
    run = p.add_argument_group("the run")
    add_flags(run, DistillConfig, skip={"method"})
    run.add_argument("--method", choices=["auto", *methods()], default=None,
                     help="auto: the method, settings and training length that won at --steps in the benchmark on "
                     "this teacher (SFD for a teacher without a benchmark); "
                     + "; ".join(f"{name}: {cls.summary}" for name, cls in methods().items()))
    for name, cls in methods().items():
        add_flags(p.add_argument_group(f"{name} options"), cls.Config, skip=RUN_FIELDS)


#: the run's own config fields (a method's field of the same name would be shadowed)
RUN_FIELDS = {s.name for s in settings(DistillConfig)}
#: the fields that name the teacher and its conditions
TEACHER_FIELDS = ("teacher", "classes", "null_class", "prompts", "images", "pairing", "negative", "resolution",
                  "width", "frames", "guidance")


def add_teacher_flags(p: argparse.ArgumentParser) -> None:
    """The main job's flags that name the teacher and its conditions (``TEACHER_FIELDS``), for a benchmark that
    takes any teacher the main job takes."""
    add_flags(p.add_argument_group("the teacher, as the main job takes it"), DistillConfig,
              skip=RUN_FIELDS - set(TEACHER_FIELDS))


def teacher_from_flags(args: argparse.Namespace, base: DistillConfig | None = None
                       ) -> tuple[DistillConfig, TeacherSource]:
    """``base`` (default: the defaults) with the teacher flags given, its sigma_min raised into the teacher's
    trained range, and the teacher loaded; a bad teacher exits with its one line."""
    cfg = (base or DistillConfig()).replace(**flag_values(args, TEACHER_FIELDS))
    try:
        source = source_of(cfg)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(str(e)) from None
    return within_trained_range(cfg, source.denoiser), source


def config_from_args(args: argparse.Namespace) -> tuple[DistillConfig, str | None]:
    """The run's config: the defaults, ``--method auto``'s preset, the YAML file's settings, ``--quality``, then
    the flags given, each over the ones before; and with ``--method auto``, the line that says what it chose
    (else None)."""
    path = args.config
    if path is None and args.resume:  # the run's own settings: what it was started with
        path = Path(args.out or DistillConfig.out) / "config.yaml"
        if not path.is_file():
            raise ValueError(f"nothing to resume in {path.parent}: it has no config.yaml (is --out right?)")
    cfg = DistillConfig.from_yaml(path) if path else DistillConfig()
    names = set(RUN_FIELDS) | {s.name for cls in methods().values() for s in settings(cls.Config)}
    given = flag_values(args, names)
    choice = None
    if given.get("method") == "auto":
        steps, teacher = given.get("steps", cfg.steps), given.get("teacher", cfg.teacher)
        given["method"], preset, choice = auto.resolve("auto", steps, teacher)
        in_file = set(yaml.safe_load(Path(path).read_text()) or {}) if path else set()
        cfg = cfg.replace(method=given["method"], **{k: v for k, v in preset.items() if k not in in_file})
    if args.quality:
        cfg = cfg.replace(**{k: v for k, v in QUALITY.items() if k in RUN_FIELDS or k in cfg.to_dict()})
    cfg = cfg.replace(**given)
    if choice and any(cfg.to_dict()[k] != v for k, v in preset.items()):
        choice += f" (this run: {cfg.iters} iterations x batch {cfg.batch}, as given)"
    return cfg, choice


def run(args: argparse.Namespace) -> int:
    cfg, choice = config_from_args(args)
    if not (args.resume or args.overwrite):
        refuse_replacing(cfg.out, "continue it with --resume, replace it with --overwrite, or give another --out")
    if choice:
        print(choice)
    report = distill(cfg, resume=args.resume, progress=not args.no_progress, method_choice=choice)
    if report is None:
        from accelerate import PartialState

        from distill_core.cli import INTERRUPTED

        return 0 if not PartialState().is_main_process else INTERRUPTED  # under a launcher, one process reports
    from distill_core.eval.benchmark import format_table

    print(format_table(report["rows"]))
    files = "student.safetensors, grid.png, report.json, report.md"
    print(f"wrote {files} to {cfg.out} in {report['total_seconds']:.0f} s")
    from distill_core.export_diffusers import exportable

    student = Path(cfg.out) / "student.safetensors"
    if exportable(student):
        print(f"to sample it in diffusers: python -m distill_core export-diffusers {student} --out "
              f"{Path(cfg.out) / 'diffusers'}")
    return 0


def run_precompute(args: argparse.Namespace) -> int:
    """Solve a run's teacher targets into ``--teacher-cache`` (the run's own flags pick which)."""
    from distill_core.train.run import precompute_targets

    cfg, _ = config_from_args(args)
    written, seconds = precompute_targets(cfg, source_of(cfg))
    print(f"wrote {written} teacher solves to {cfg.teacher_cache} in {seconds:.0f} s; the distill command with the "
          "same flags reads them instead of solving")
    return 0


def reference_steps(source: TeacherSource, steps: int | None = None) -> int:
    """Heun steps of a teacher's reference solves: ``steps`` where given, else 128 for the digits teachers (the
    shipped ones' 128-step solves ship) and 32 for a teacher from a directory (on the built-in teachers a 32-step
    solve lands 54 dB from a 256-step one, where students land near 30 dB: ``bench/reference_steps.py``)."""
    return steps or (128 if source.digits else 32)


def eval_space(source: TeacherSource) -> dict:
    """How a teacher's samples are evaluated (``eval_set``'s keywords): their shape and classes (a prompt table's
    rows: with their images' where the teacher reads them, ``prompt_condition``), and the metric space, the
    classifier's features for the digits teachers, else pooled pixels."""
    from distill_core.eval.benchmark import DIGITS, PIXELS
    from distill_core.text_pipeline import prompt_condition

    return {"shape": source.shape, "classes": source.classes, "space": DIGITS if source.digits else PIXELS,
            **({"condition": functools.partial(prompt_condition, source.denoiser)} if source.prompt_table else {})}


def source_of(cfg: DistillConfig) -> TeacherSource:
    """The teacher a run's config names, loaded; a pipeline's encoded prompts and images kept in the run's
    ``cache/`` (``encoding_cache``), so that its resumption reads them back."""
    return teacher_source(cfg.teacher, cfg.classes, cfg.null_class, cfg.prompts, cfg.guidance, cfg.resolution,
                          cfg.negative, cfg.frozen_precision, frames=cfg.frames, images=cfg.images,
                          pairing=cfg.pairing, width=cfg.width, encodings=Path(cfg.out) / CACHE)


def distill(cfg: DistillConfig, resume: bool = False, progress: bool = True,
            source: TeacherSource | None = None, method_choice: str | None = None) -> dict | None:
    """Train on ``source`` (default: the teacher ``cfg.teacher`` names), save the student, evaluate it
    against the training-free solvers, write the report (with ``method_choice``, method auto's line, where it
    chose). Returns the report (``None`` when training or the report was interrupted: resume with
    ``resume=True``, which goes on from the last checkpoint, or from the saved student to its report; and in
    every process but the main one of a multi-process launch, which evaluates and reports)."""
    start = time.perf_counter()
    out = Path(cfg.out)
    if cfg.shard_teacher and source is not None:
        raise ValueError("shard_teacher splits a teacher the run loads itself (--teacher) and loads it again, whole, "
                         "for the report")
    source = source or source_of(cfg)
    cfg = within_trained_range(cfg, source.denoiser)  # the student's schedule and the solvers' end at one floor
    run = train_student(cfg, source, resume, progress)
    hint = f"continue with: python -m distill_core distill --resume --config {out / 'config.yaml'}"
    if run is None:
        print(hint)
        return None
    if not run.main_process:  # a multi-process launch: the main process evaluates and reports
        return None
    if cfg.shard_teacher:  # the trained one is in shards over processes that have finished
        source = source_of(cfg)
    try:
        return write_run_report(cfg, source, run, start, method_choice)
    except KeyboardInterrupt:
        print(f"\nCtrl-C: stopped writing the report; the student is saved in {run.path}", flush=True)
        print(hint)
        return None


def write_run_report(cfg: DistillConfig, source: TeacherSource, run: StudentRun, start: float,
                     method_choice: str | None = None) -> dict:
    """Evaluate the trained student of ``run`` against the training-free solvers on ``source``'s teacher and
    write ``grid.png``, ``report.json`` and ``report.md`` into ``cfg.out``; returns the report (``total_seconds``
    counted from ``start``)."""
    from distill_core.eval.benchmark import (
        METRIC_SPACES,
        PIXELS,
        eval_set,
        solver_rows,
        student_rows,
        teacher_target,
    )
    from distill_core.report import as_images, save_grid, write_report
    from distill_core.sampling import sample
    from distill_core.solvers import SOLVERS, parse_solver_label, solver_names, solver_sigmas
    from distill_core.student_files import borrowing

    out = Path(cfg.out)
    w = source.scale(cfg.guidance)
    teacher = CFGTeacher(source.denoiser.to(run.device), w, source.uncond)  # evaluated where it trained
    steps = reference_steps(source, cfg.reference_steps)
    kw = {**eval_space(source), "device": run.device, "steps": steps, "cache_dir": out / CACHE}
    space = kw["space"]
    noises = counted(cfg.eval_samples, "evaluation noise")
    announce(f"report: the teacher's reference solves (Heun, {steps} steps) of {noises}"
             + (", and its samples from as many other noises" if space == PIXELS else ""))
    ev = eval_set(teacher, cfg.eval_samples, seed=cfg.seed + 1, **kw)
    if space == PIXELS:  # no classifier fits this data: compare with the teacher's own samples from other noise
        target = teacher_target(teacher, cfg.eval_samples, seed=cfg.seed + 2, **kw)
        ev = dataclasses.replace(ev, target=target)
    announce("report: the student and the training-free solvers on the same noises")
    ours = student_rows(run, teacher, ev)
    solvers_at = {row["nfe"]: solver_rows(teacher, ev, row["nfe"], cfg.sigma_min, cfg.report_solvers) for row in ours}
    rows = [r for row in ours for r in (*solvers_at[row["nfe"]], row)]
    top = ours[-1]
    nfe = top["nfe"]
    best = solvers_at[nfe][0]
    at_twice = solver_rows(teacher, ev, 2 * nfe, cfg.sigma_min, cfg.report_solvers)
    among = "" if cfg.report_solvers is None else f", the best of {', '.join(solver_names(cfg.report_solvers))}"
    rows += at_twice

    k = min(10, cfg.eval_samples)
    noise, labels = ev.noise[:k].to(run.device), move_cond(ev.rows(0, k), run.device)
    sigmas = solver_sigmas(best["method"], nfe, cfg.sigma_min, teacher.sigma_max).to(run.device)
    with torch.no_grad():
        solver_images = SOLVERS[parse_solver_label(best["method"])[0]](teacher, noise, sigmas, labels).cpu()
        with borrowing(run.path, teacher) as student:  # a LoRA's adapters on the teacher's network, no copy
            student_images = sample(student, noise, labels).cpu()
    save_grid([as_images(source.decode(r) if source.decode else r) for r in (ev.reference[:k], solver_images,
                                                                             student_images)],
              out / "grid.png")
    grid_rows = [
        f"teacher reference solve (Heun, {steps} steps)",
        f"{best['method']}, the best training-free solver at {nfe} NFE{among}",
        f"{cfg.method} student at {nfe} NFE",
    ]
    report = {
        "method": cfg.method,
        **({"method_choice": method_choice} if method_choice else {}),
        "steps": top["nfe"],
        "teacher": cfg.teacher,
        "guidance": w,
        "guidance_mode": cfg.guidance_mode,
        **{key: source.card[key] for key in ("embedded_guidance", "negative") if key in source.card},
        "iterations": cfg.iters,
        "device": str(run.device),  # where it trained and was evaluated
        "train_seconds": round(run.train_seconds, 1),
        "teacher_evaluations": run.teacher_evaluations,
        "memory_plan": run.memory_plan.summary(),  # the main process's, made before training
        "eval_samples": cfg.eval_samples,
        "metric_space": METRIC_SPACES[space],
        "student_psnr_db": top["psnr_db"],
        "best_solver": f"{best['method']} ({best['psnr_db']} dB at {nfe} NFE{among})",
        "gain_over_best_solver_db": round(top["psnr_db"] - best["psnr_db"], 3),
        "best_solver_at_2x_nfe": f"{at_twice[0]['method']} ({at_twice[0]['psnr_db']} dB at {2 * nfe} NFE)",
        "total_seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
        "config": cfg.to_dict(),
    }
    write_report(out, report, grid_rows)
    return report

"""Every distillation method against every training-free solver on one teacher, at NFE 1, 2, 4, 8.

    python bench/methods.py [--quick] [--teacher builtin|builtin-flow|DIR] [--methods sfd phased ...]
                            [--nfe 1 2 4 8] [--student-nfe 1 2 4] [--n N] [--steps 128|32]
                            [--set KEY=V1,V2 ...] [--out FILE.json]

The teacher is any the main job takes, with the same flags: a built-in one, or a local diffusers model or
pipeline directory (``--classes``, ``--null-class``, ``--prompts``, ``--negative``, ``--resolution``,
``--guidance``). A directory's samples are measured as the main job measures them: ``fd_teacher``,
``precision`` and ``recall`` in pooled pixels (``eval.benchmark.PIXELS``), no ``fd`` or ``class_acc``; its
cached solves go in a folder of ``--cache`` named by its conditions (shape, classes, prompts), as the
network's fingerprint alone does not hold them. Its evaluation defaults to 200 samples and 32-step reference
solves (54 dB from a 256-step solve on the built-in teachers, ``bench/reference_steps.py``), so that a large
teacher's two reference sets cost 2 x 200 x 63 guided evaluations, not 2 x 2,000 x 255.

One evaluation set (noise of seed 1, balanced classes) serves every row, so rows compare directly. Students
train, and every row is sampled, on CUDA where there is one (the metrics run on the CPU). Rows:
every training-free solver at every NFE it can take a step in (Heun needs two), the students of every
registered method (each method says which students it trains for the NFEs, ``Method.bench_runs``; with
``--methods auto``, also the student the *Distill to N steps* node's ``auto`` would train at each NFE: a
student of the same method and settings as one already in the run is trained once, and its rows appear under
both names), and
``teacher``: the teacher's reference solve (128 Heun steps, 255 evaluations) of the evaluation noise, the
baseline of the distribution metrics. Each row (``eval.benchmark``'s format):

* ``psnr_db``: PSNR against the teacher's reference solve from the same noise. It judges trajectory
  methods (SFD, SFD-v, phased score matching, any student that learns the teacher's noise-to-image map):
  a distribution-matching student (DMD-style) draws a different good sample from the same noise, so a low
  PSNR says nothing against it;
* ``fd_teacher``, ``precision``, ``recall``: the distribution of the samples against the distillation
  target, the teacher's own many-step samples at the same guidance from independent noise (seed 2, as
  many as the evaluation set, cached in bench/results/cache), in the metric classifier's feature space:
  the Frechet distance, and improved precision and recall (``eval.coverage``, k = 3): precision the
  fraction of samples that land on the teacher's sample manifold (fidelity), recall the fraction of the
  teacher's samples that the student's manifold covers (diversity; a collapsed student loses it). They
  judge every family, distribution-matching methods above all; the ``teacher`` row shows what two
  independent teacher sets of this size score (their noise floor);
* ``fd``: Frechet distance to the data's (MNIST test) statistics, ``class_acc``: the classifier's accuracy
  on the requested classes (guidance), ``images_per_s``: sampling throughput;
* ``straightness`` (the teacher, and students of methods that straighten the ODE: reflow): how far the
  ODE paths of 256 evaluation noises, solved by 32 Euler steps, stray from straight lines: the mean
  squared gap between the x0 predictions along a path and its image, over the images' variance
  (``reflow.straightness``; 0: straight, one Euler step is exact);
* students only: ``train_seconds``, ``iters`` and ``batch`` (the training budget), ``teacher_evaluations``
  (the teacher's network evaluations of the training run), ``trained_params`` (trainable parameters of
  every network it trains) and ``peak_memory_mb`` (``eval.memory``: CUDA allocator peak, or the process's
  peak RSS on CPU).

``--set`` overrides config fields of every student (``KEY=VALUE``, a number or YAML); a key given several
values (``seed=0,1,2``) trains every student once per combination of the values given, and each student row
carries the ``--set`` values it was trained with.

Every student's rows are kept in its run folder under ``--work`` with its settings (``eval.kept``): the same
command run again (after a stop, or with more methods or values) reads the students it has already evaluated
and trains only the others; a student stopped part way goes on from its last checkpoint
(``--checkpoint-every``) to the rows of a student trained in one go. The teacher's row and the solver rows of
each NFE are kept beside the reference solves in ``--cache``, keyed by the teacher and the evaluation.

``--quick`` is a smoke run (8 iterations of batch 16 per student, 100 samples: every registered method and
solver at NFE 1, 2, 4 and 8 in about 9 minutes on 2 CPU cores, the reference solves included); the default
trains every student for the main job's iterations and evaluates 2,000 samples (the first run solves the
2 x 2,000 reference samples, about 25 minutes on 2 CPU cores, then reads them from the cache). The table is
sorted by NFE, then by ``fd_teacher``; the run prints its wall time.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill_core.builtin import fingerprint  # noqa: E402
from distill_core.config import DistillConfig  # noqa: E402
from distill_core.denoisers.base import move_cond  # noqa: E402
from distill_core.eval.benchmark import (  # noqa: E402
    METRIC_SPACES,
    benchmark_set,
    report_rows,
    solver_rows,
    student_rows,
    teacher_row,
)
from distill_core.eval.kept import CHECKPOINT_EVERY, finished, kept, kept_rows  # noqa: E402
from distill_core.eval.memory import with_peak_memory  # noqa: E402
from distill_core.main_job import add_teacher_flags, eval_space, reference_steps, teacher_from_flags  # noqa: E402
from distill_core.methods import auto  # noqa: E402
from distill_core.methods.reflow import straightness  # noqa: E402
from distill_core.methods.registry import method_class, methods  # noqa: E402
from distill_core.options import positive, sweep  # noqa: E402
from distill_core.sources import TEACHERS  # noqa: E402
from distill_core.student_files import load_student  # noqa: E402
from distill_core.teacher import CFGTeacher  # noqa: E402
from distill_core.train.run import train_student  # noqa: E402

NFES = (1, 2, 4, 8)
RESULTS = Path(__file__).resolve().parent / "results"
KEYS = ("method", "nfe", "network_evals", "psnr_db", "fd", "fd_teacher", "precision", "recall", "class_acc",
        "images_per_s", "train_seconds", "iters", "batch", "teacher_evaluations", "trained_params", "peak_memory_mb",
        "straightness")
#: evaluation samples whose ODE paths the straightness column measures
STRAIGHTNESS_SAMPLES = 256
QUICK = {"iters": 8, "batch": 16}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short training, 100 samples (a smoke run)")
    p.add_argument("--methods", nargs="+", choices=[*methods(), "auto"],
                   help="the methods to train (default: all registered; auto: the Distill to N steps node's "
                   "choice at each student NFE, rows named auto with the method in auto_method)")
    add_teacher_flags(p)
    p.add_argument("--nfe", type=positive, nargs="+", default=list(NFES))
    p.add_argument("--student-nfe", type=positive, nargs="+", help="the NFEs students are trained for (default: --nfe; "
                   "a method may add its natural step counts, e.g. kd's 1); every student and solver is "
                   "evaluated at each --nfe it serves")
    p.add_argument("--n", type=positive, help="evaluation samples, and teacher samples of the target (default 2000 "
                   "on a built-in teacher, 200 on one from a directory; quick 100)")
    p.add_argument("--iters", type=positive, help="iterations per student (default: the main job's; quick 8)")
    p.add_argument("--batch", type=positive, help="samples per iteration (default: the main job's; quick 16)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=V1,V2",
                   help="config settings for every student (gan_weight=0.003); several values train a student "
                   "for each (seed=0,1,2)")
    p.add_argument("--steps", type=positive, help="Heun steps of the teacher's reference solves (default 128 on a "
                   "built-in teacher, 32 on one from a directory: see bench/reference_steps.py)")
    p.add_argument("--cache", default=str(RESULTS / "cache"), help="where reference solves are cached")
    p.add_argument("--work", default=str(RESULTS / "methods_runs"), help="where the students are trained")
    p.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY, metavar="N",
                   help="checkpoint each student every N iterations: a stopped run goes on from there (default "
                   f"{CHECKPOINT_EVERY})")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)

    start = time.time()
    base = DistillConfig(checkpoint_every=args.checkpoint_every)
    if args.quick:
        base = base.replace(**QUICK)
    base = base.replace(iters=args.iters, batch=args.batch)
    try:
        grid = sweep(args.set)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    chosen = args.methods or list(methods())

    base, source = teacher_from_flags(args, base)  # the students and the solvers end at one floor
    builtin = source.name in TEACHERS
    n = args.n or (100 if args.quick else 2000 if builtin else 200)
    steps = reference_steps(source, args.steps)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the students train
    teacher = CFGTeacher(source.denoiser.to(device), source.scale(base.guidance), source.uncond)
    space = eval_space(source)
    cache = Path(args.cache) if builtin else Path(args.cache) / conditions_key(source)
    ev = benchmark_set(teacher, n, steps, cache, device=device, **space)
    measured = {"teacher": fingerprint(source.denoiser), "n": n, "steps": steps}
    stem = f"{measured['teacher']}-w{teacher.w:g}-n{n}-s{steps}"
    solved = {**measured, "w": teacher.w, "sigma_min": base.sigma_min}  # what the teacher's and solver rows depend on
    rows = kept(cache / f"teacher-{stem}.json", solved, lambda: [{
        **teacher_row(teacher, ev), "straightness": path_straightness(teacher, ev, base.sigma_min, teacher.sigma_max)}])
    for nfe in args.nfe:
        rows += kept(cache / f"solvers-{stem}-nfe{nfe}.json", {**solved, "nfe": nfe},
                     lambda nfe=nfe: solver_rows(teacher, ev, nfe, base.sigma_min))
    evaluated: dict[str, list[dict]] = {}  # a student's rows by its method and settings: each is trained once
    swept = [key for key, values in grid.items() if len(values) > 1]
    for chosen_method in chosen:
        for name, method, settings, label in bench_runs(chosen_method, list(args.student_nfe or args.nfe),
                                                        base.iters, source.name):
            for combo in itertools.product(*grid.values()):
                overrides = dict(zip(grid, combo))
                run = name + "".join(f"-{key}{overrides[key]}" for key in swept)
                cfg = base.replace(method=method, out=str(Path(args.work) / run), **{**settings, **overrides})
                student = f"{method} {sorted(settings.items())} {sorted(overrides.items())}"
                if student not in evaluated:
                    evaluation = {**measured, "nfes": list(args.nfe)}
                    evaluated[student] = kept_rows(cfg, evaluation, lambda resume, cfg=cfg: trained_rows(
                        cfg, source, teacher, ev, args.nfe, resume))
                rows += [{**row, **overrides, **label} for row in evaluated[student]]

    rows.sort(key=lambda r: (r["nfe"], r["fd_teacher"]))
    if "auto" in chosen:
        print("\n".join(auto_against_methods(rows)))
    report_rows(rows, KEYS, f"teacher {source.name}, w = {teacher.w:g}, {n} samples, metrics in "
                f"{METRIC_SPACES[space['space']]}; {base.iters} iterations x batch {base.batch} per trajectory student "
                "(each student's own: its iters and batch)", start, args.out)
    return rows


def conditions_key(source) -> str:
    """A short hash of what a directory teacher's solves depend on beyond its network: the sample shape, the
    classes, the run's conditions (its card: size, negative, guidance input) and the encoded prompts."""
    h = hashlib.sha256(json.dumps([source.shape, source.classes, source.card], sort_keys=True).encode())
    for name, table in sorted(source.denoiser.named_buffers()):
        h.update(name.encode())
        h.update(table.detach().cpu().float().contiguous().numpy().tobytes())
    return "conditions-" + h.hexdigest()[:12]


def bench_runs(method: str, nfes: list[int], iters: int, teacher: str = "builtin") -> list[tuple[str, str, dict, dict]]:
    """(run name, registered method, settings, what its rows are labelled with) of each student ``method``
    trains for ``nfes``; ``auto`` trains the preset the node would choose at each NFE, at the bench's own
    budget (the presets' budget is the bench's default)."""
    if method != "auto":
        return [(name, method, settings, {}) for name, settings in method_class(method).bench_runs(nfes, iters)]
    runs = []
    for n in nfes:
        chosen, settings, _ = auto.resolve("auto", n, teacher)
        settings = {k: v for k, v in settings.items() if k not in ("iters", "batch")}
        runs.append((f"auto-{n}", chosen, {"steps": n, **settings}, {"method": "auto", "auto_method": chosen}))
    return runs


def trained_rows(cfg: DistillConfig, source, teacher: CFGTeacher, ev, nfes: list[int], resume: bool = False
                 ) -> list[dict]:
    """Train ``cfg``'s student (from its checkpoint when ``resume``); its rows at every NFE of ``nfes`` it serves,
    with its training budget."""
    if cfg.frozen_precision != "as-loaded":  # a cast is in place: the students after this one keep the teacher
        source = dataclasses.replace(source, denoiser=copy.deepcopy(source.denoiser))
    run, peak = with_peak_memory(lambda: train_student(cfg, source, resume=resume, progress=False))
    finished(run, cfg)
    extra = {"iters": cfg.iters, "batch": cfg.batch}
    if peak is not None:
        extra["peak_memory_mb"] = round(peak, 1)
    if method_class(cfg.method).straightens:
        student = load_student(run.path, teacher).denoiser()
        extra["straightness"] = path_straightness(student, ev, cfg.sigma_min, teacher.sigma_max)
    return student_rows(run, teacher, ev, nfes, **extra)


def auto_against_methods(rows: list[dict]) -> list[str]:
    """One line per NFE with an auto row: auto's fd_teacher against the best single method's at that NFE."""
    solvers_and_teacher = {r["method"] for r in rows if "train_seconds" not in r}
    lines = []
    for nfe in sorted({r["nfe"] for r in rows if r["method"] == "auto"}):
        auto_row = next(r for r in rows if r["method"] == "auto" and r["nfe"] == nfe)
        others = [r for r in rows if r["nfe"] == nfe and r["method"] not in solvers_and_teacher | {"auto"}]
        best = min(others, key=lambda r: r["fd_teacher"], default=None)
        if best is None:
            continue
        verdict = "at least as good" if auto_row["fd_teacher"] <= best["fd_teacher"] else "WORSE"
        lines.append(f"NFE {nfe}: auto ({auto_row['auto_method']}) fd_teacher {auto_row['fd_teacher']:g}, best single "
                     f"method {best['method']} {best['fd_teacher']:g}: {verdict}")
    return lines


def path_straightness(denoiser, ev, sigma_min: float, sigma_max: float) -> float:
    """``reflow.straightness`` of ``denoiser``'s ODE paths from the first evaluation noises."""
    noise = (ev.noise[:STRAIGHTNESS_SAMPLES] / sigma_max).to(ev.device)
    labels = move_cond(ev.rows(0, STRAIGHTNESS_SAMPLES), ev.device)
    return round(straightness(denoiser, noise, labels, sigma_min, sigma_max), 4)


if __name__ == "__main__":
    main()

"""SFD training recipes for the 4-step student of the built-in teacher, at a fixed teacher budget.

    python bench/sfd_recipes.py [--set KEY=V1,V2 ...] [--seeds S] [--trajectories T] [--n 100] [--shard I N]
                                [--out FILE.json]
    python bench/sfd_recipes.py --merge FILE.json ... [--out FILE.json]

Every combination of the ``--set`` values (any ``DistillConfig`` field: lr, batch, loss, teacher_substeps,
teacher_pool, lr_decay_at, ema, ...) trains one SFD student for ``--steps`` NFE; without ``--set``, one
student of the main job's default config. ``--trajectories T``
keeps the student's work fixed: iters = T / batch (the main job's default is 220 x 64, ``--quality``
600 x 64). Each row is the student evaluated on the main job's evaluation set (seed 1, ``--n`` samples,
PSNR against the teacher's 128-step Heun solve), with ``gain_db`` over the best training-free solver at
the same NFE and the config values that vary. Reference rows: the three best training-free solvers at that
NFE and the teacher's 64-step Heun solve (``teacher-heun-64``, the Frechet distance the students aim at).

``cpu_units`` estimates a recipe's cost on the CPU in network forward passes per image: the teacher's
steps over the n + AFS intervals (K each, one on intervals above ``teacher_one_step_above``), each a CFG
pair (2 forwards) per solved trajectory (``teacher_reuse`` and ``teacher_pool`` solve fewer than the
student trains on), plus the student's n - 1 + 1 Euler steps per trajectory at about 3 forwards each
(forward and backward). The main job's default, every teacher batch serving 2 iterations:
(2 (1 + 1 + 3 + 3 + 3) / 2 + 12) x 220 x 64 = 323840, plus 11 x 100 for the first step's class-mean table
(fresh trajectories at 160 iterations: 34 x 160 x 64 = 348160; SFD's recipe: 52 x 90 x 64 = 299520). The
units do not see the per-forward cost: channels_last makes the teacher's forwards about 17 % cheaper on
the clock.

``--seeds S`` trains every recipe with the training seeds 0 .. S - 1 (the evaluation set stays the same).
Whenever a recipe has rows for more than one seed (also across ``--merge``d files), a second table gives
its mean PSNR, the spread between its seeds (min and max), the mean gain and the mean FD: single-seed
differences smaller than that spread say nothing.

``--shard I N`` trains every N-th combination from the I-th (parallel workers on one GPU); shard 0 adds
the reference rows. ``--merge`` prints the rows of several shards as one table.

Every student's rows are kept in its run folder (``eval.kept``): the same command run again trains only the
recipes it lacks, and a student stopped part way goes on from its last checkpoint.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill_core.afs import CLASS_MEAN_SAMPLES, resolve_center  # noqa: E402
from distill_core.builtin import fingerprint  # noqa: E402
from distill_core.config import DistillConfig  # noqa: E402
from distill_core.eval.benchmark import (  # noqa: E402
    eval_set,
    format_table,
    solver_row,
    solver_rows,
    student_rows,
    write_rows,
)
from distill_core.eval.kept import CHECKPOINT_EVERY, finished, kept_rows  # noqa: E402
from distill_core.methods.sfd import SFDConfig, pool_serves, teacher_steps  # noqa: E402
from distill_core.options import positive, settings, sweep  # noqa: E402
from distill_core.sampling import intervals_for  # noqa: E402
from distill_core.schedules import karras  # noqa: E402
from distill_core.sources import BUILTIN_TUNED, builtin_source  # noqa: E402
from distill_core.teacher import CFGTeacher  # noqa: E402
from distill_core.train.run import train_student  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = ("method", "nfe", "psnr_db", "gain_db", "fd", "class_acc", "train_seconds", "cpu_units")
SUMMARY_KEYS = ("recipe", "seeds", "psnr_mean", "psnr_min", "psnr_max", "gain_mean", "fd_mean")


def parse_sets(items: list[str]) -> dict[str, list]:
    """``["lr=2e-4,5e-4", "loss=l1"]`` -> {"lr": [0.0002, 0.0005], "loss": ["l1"]} (``options.sweep``), each key
    a field of DistillConfig or SFDConfig."""
    known = {s.name for s in [*settings(DistillConfig), *settings(SFDConfig)]}
    try:
        grid = sweep(items)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    for key in grid:
        if key not in known:
            raise SystemExit(f"unknown config field {key!r}")
    return grid


def cpu_units(cfg: DistillConfig, sigma_max: float, classes: int = 0) -> int:
    """Forward passes per run (see the module docstring): teacher trajectories + student steps, on the
    student schedule that ends at the teacher's ``sigma_max`` (unless the config sets its own), plus
    the class-mean table of the first step's centre for a teacher of ``classes`` class labels."""
    intervals = intervals_for(cfg.steps, cfg.afs)
    if cfg.teacher_pool or cfg.teacher_reuse > 1:  # pools, each serving r x pool / batch iterations
        pool, serves = pool_serves(cfg.options, cfg.batch)
        trajectories = math.ceil(cfg.iters / serves) * pool
    else:
        trajectories = cfg.iters * cfg.batch
    sigmas = karras(intervals, cfg.sigma_min, cfg.sigma_max or sigma_max, cfg.rho)
    one_step_above = cfg.teacher_one_step_above
    if one_step_above is None:  # the built-in teacher's own setting
        one_step_above = BUILTIN_TUNED["teacher_one_step_above"]
    teacher = sum(teacher_steps(sigmas, cfg.teacher_substeps, one_step_above))
    centred = cfg.afs and resolve_center(cfg.afs_center, classes) == "class_mean"
    table = (classes + 1) * CLASS_MEAN_SAMPLES if centred else 0
    return trajectories * teacher * 2 + cfg.iters * cfg.batch * cfg.steps * 3 + table


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=V1,V2", help="config values to combine")
    p.add_argument("--seeds", type=positive, default=1, help="train every recipe with seeds 0 .. S - 1")
    p.add_argument("--trajectories", type=positive, help="teacher trajectories per run: iters = T / batch")
    p.add_argument("--steps", type=positive, default=4)
    p.add_argument("--n", type=positive, default=100, help="evaluation samples (the main job's default: 100)")
    p.add_argument("--shard", type=int, nargs=2, default=(0, 1), metavar=("I", "N"))
    p.add_argument("--merge", nargs="+", help="print the rows of these result files as one table")
    p.add_argument("--work", default=str(RESULTS / "sfd_recipe_runs"))
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)

    if args.merge:
        rows = [r for f in args.merge for r in json.loads(Path(f).read_text())]
    else:
        rows = run_grid(args)
    rows.sort(key=lambda r: (r["method"] == "sfd", r.get("psnr_db", 0)))
    print(format_table(rows, KEYS))
    summary = seed_summary(rows)
    if summary:
        print("\nper recipe over training seeds:")
        print(format_table(summary, SUMMARY_KEYS))
    if args.out:
        write_rows(rows, args.out)
    return rows


def seed_summary(rows: list[dict]) -> list[dict]:
    """One row per student recipe trained with more than one seed: mean, min and max PSNR, mean gain
    and FD. A recipe is a row's config values other than the seed (missing ones at their defaults);
    it is named by the values that differ from the defaults."""
    defaults = DistillConfig().to_dict()
    students = [r for r in rows if r["method"] in ("sfd", "sfd-v")]
    keys = sorted({k for r in students for k in r if k in defaults and k != "seed"})
    groups: dict[tuple, list[dict]] = {}
    for r in students:
        recipe = (r["nfe"], *((k, r.get(k, defaults[k])) for k in keys))
        groups.setdefault(recipe, []).append(r)
    summary = []
    for (nfe, *recipe), group in groups.items():
        seeds = {r.get("seed", defaults["seed"]) for r in group}
        if len(seeds) < 2:
            continue
        psnr = [r["psnr_db"] for r in group]
        differs = [f"{k}={v}" for k, v in recipe if v != defaults[k]]
        summary.append({
            "recipe": " ".join(differs) or "default",
            "nfe": nfe,
            "seeds": len(seeds),
            "psnr_mean": round(sum(psnr) / len(psnr), 3),
            "psnr_min": min(psnr),
            "psnr_max": max(psnr),
            "gain_mean": round(sum(r["gain_db"] for r in group) / len(group), 3),
            "fd_mean": round(sum(r["fd"] for r in group) / len(group), 4),
        })
    return sorted(summary, key=lambda r: -r["psnr_mean"])


def run_grid(args: argparse.Namespace) -> list[dict]:
    grid = parse_sets(args.set)
    if args.seeds > 1:
        grid["seed"] = list(range(args.seeds))
    source = builtin_source()
    teacher = CFGTeacher(source.denoiser, source.guidance, source.uncond)
    base = DistillConfig(steps=args.steps, checkpoint_every=CHECKPOINT_EVERY, eval_samples=args.n)
    ev = eval_set(teacher, args.n, seed=base.seed + 1, cache_dir=RESULTS / "cache")
    evaluation = {"teacher": fingerprint(source.denoiser), "n": args.n, "seed": base.seed + 1}
    solvers = solver_rows(teacher, ev, args.steps, base.sigma_min)
    best = solvers[0]["psnr_db"]
    index, count = args.shard
    rows = []
    if index == 0:
        rows += solvers[:3] + [solver_row("heun", 128, teacher, ev) | {"method": "teacher-heun-64"}]
    combos = list(itertools.product(*grid.values()))
    for combo in combos[index::count]:
        values = dict(zip(grid, combo))
        cfg = base.replace(**values)
        if args.trajectories:
            cfg = cfg.replace(iters=max(1, args.trajectories // cfg.batch))
        name = "-".join(f"{k}{v}" for k, v in values.items()) or "default"
        cfg = cfg.replace(out=str(Path(args.work) / name))
        found = kept_rows(cfg, evaluation, lambda resume, cfg=cfg: student_rows(
            finished(train_student(cfg, source, resume=resume, progress=False), cfg), teacher, ev))
        for row in found:
            row.update(values, iters=cfg.iters, batch=cfg.batch, gain_db=round(row["psnr_db"] - best, 3),
                       cpu_units=cpu_units(cfg, teacher.sigma_max, source.classes))
            rows.append(row)
            print(format_table([row], KEYS), file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    main()

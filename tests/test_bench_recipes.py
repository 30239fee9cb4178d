"""The recipe benchmark's per-seed summary (``bench/sfd_recipes.py``): rows of one recipe trained with
several seeds are grouped into mean and spread; single-seed recipes and solver rows are left out."""

import pytest
from conftest import bench_script


@pytest.fixture(scope="module")
def recipes():
    return bench_script("sfd_recipes")


def student(psnr, fd, **values):
    return {"method": "sfd", "nfe": 4, "psnr_db": psnr, "gain_db": round(psnr - 24.0, 3), "fd": fd, **values}


def test_seed_summary_groups_a_recipe_over_its_seeds(recipes):
    rows = [
        {"method": "unipc", "nfe": 4, "psnr_db": 24.0, "fd": 1.1},
        student(29.0, 0.90),  # the default recipe, seed 0 (no seed key: the default seed)
        student(30.0, 1.00, seed=1, lr_decay_at=0.5),  # the same recipe, its values spelled out
        student(31.0, 0.95, seed=1, lr_decay_at=0.75),  # another recipe, one seed only
        student(28.0, 0.80, seed=2),
    ]
    summary = recipes.seed_summary(rows)
    assert summary == [{
        "recipe": "default", "nfe": 4, "seeds": 3, "psnr_mean": 29.0, "psnr_min": 28.0, "psnr_max": 30.0,
        "gain_mean": 5.0, "fd_mean": 0.9,
    }]


def test_seed_summary_names_a_recipe_by_what_differs_from_the_defaults(recipes):
    rows = [student(29.5, 0.9, seed=s, lr_schedule="cosine", lr=2e-4) for s in (0, 1)]
    (row,) = recipes.seed_summary(rows)
    assert row["recipe"] == "lr_schedule=cosine" and row["seeds"] == 2


def test_cpu_units_count_teacher_pairs_once_per_solved_trajectory(recipes):
    from distill_core.config import DistillConfig

    cfg = DistillConfig()  # teacher_reuse 2: 110 batches solved for 220 iterations
    assert recipes.cpu_units(cfg, 80.0) == (22 * 110 + 12 * 220) * 64 == 323840
    assert recipes.cpu_units(cfg.replace(teacher_reuse=1.0, iters=160), 80.0) == 34 * 160 * 64
    # SFD's recipe: DPM-Solver++(3M), K = 4 on all 5 intervals (a CFG pair each), fresh trajectories
    paper = cfg.replace(teacher_substeps=4, teacher_reuse=1.0, iters=90, teacher_one_step_above=float("inf"))
    assert recipes.cpu_units(paper, 80.0) == (2 * 20 + 12) * 90 * 64
    # one pool of 7680 trajectories serving the whole 240 iterations
    assert recipes.cpu_units(cfg.replace(teacher_pool=7680, iters=240), 80.0) == 7680 * 22 + 240 * 64 * 12
    # the built-in teacher's 10 classes: the first step's class-mean table (11 rows x 100 noises) once
    assert recipes.cpu_units(cfg, 80.0, classes=10) == 323840 + 1100
    assert recipes.cpu_units(cfg.replace(afs_center="zero"), 80.0, classes=10) == 323840

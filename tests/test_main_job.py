"""The main job end to end on the built-in teacher (a tiny run), and its configuration."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from distill_core import cli
from distill_core.config import QUALITY, DistillConfig
from distill_core.main_job import add_arguments, config_from_args
from distill_core.sources import builtin_source


def test_config_yaml_round_trip_and_flag_overrides(tmp_path):
    cfg = DistillConfig(method="sfd-v", nfe_range=(2, 4), lr=1e-4)
    assert DistillConfig.from_yaml(cfg.to_yaml(tmp_path / "c.yaml")) == cfg
    (tmp_path / "bad.yaml").write_text("stpes: 4\n")
    with pytest.raises(ValueError, match=r"unknown config keys \['stpes'\]"):
        DistillConfig.from_yaml(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="loss must be one of"):
        DistillConfig(loss="l5")

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--config", str(tmp_path / "c.yaml"), "--steps", "3", "--quality"])
    got, choice = config_from_args(args)
    assert (got.method, got.steps, got.lr, got.iters, got.teacher_reuse, got.nfe_range) == (
        "sfd-v",
        3,
        1e-4,
        QUALITY["iters"],
        1.0,
        (2, 4),
    )
    assert choice is None


@pytest.mark.parametrize("flags, method, iters, batch", [
    ([], "kd", 220, 64),  # the benchmark's winner at 1 step, at its budget
    (["--iters", "30"], "kd", 30, 64),  # a flag given beats the preset
    (["--quality"], "kd", QUALITY["iters"], 64),  # and so does the longer preset
    (["--teacher", "builtin-flow"], "sfd", 220, 64),  # the flow teacher's own table
    (["--teacher", "tests/data/none"], "sfd", 220, 64),  # no table: SFD at the run's own budget
])
def test_method_auto_on_the_command_line_takes_the_presets_the_node_takes(flags, method, iters, batch):
    from distill_core.methods import auto

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg, choice = config_from_args(p.parse_args(["--method", "auto", "--steps", "1", *flags]))
    assert (cfg.method, cfg.steps, cfg.iters, cfg.batch) == (method, 1, iters, batch)
    assert choice.startswith(f"auto chose {method}")
    assert ("as given" in choice) == bool(flags and flags[0] in ("--iters", "--quality"))
    assert ("docs/results.md#" in choice) == (cfg.teacher in auto.TABLES)


def test_a_setting_in_the_config_file_beats_method_autos_preset(tmp_path):
    (tmp_path / "run.yaml").write_text("batch: 16\n")
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg, choice = config_from_args(p.parse_args(["--method", "auto", "--steps", "1", "--config",
                                                 str(tmp_path / "run.yaml")]))
    assert (cfg.method, cfg.iters, cfg.batch) == ("kd", 220, 16) and choice.startswith("auto chose kd")
    assert choice.endswith("(this run: 220 iterations x batch 16, as given)")


def test_main_job_writes_student_grid_and_report(tmp_path, capsys):
    from distill_core.sampling import sample
    from distill_core.student_files import load_student

    (tmp_path / "run.yaml").write_text(
        "iters: 2\nbatch: 4\nsteps: 2\neval_samples: 10\ncheckpoint_every: 0\n"
    )
    out = tmp_path / "run"
    assert (
        cli.main(["distill", "--config", str(tmp_path / "run.yaml"), "--out", str(out), "--no-progress",
                  "--method", "auto"]) == 0  # SFD at 2 steps, at the file's budget
    )

    printed = capsys.readouterr().out
    assert f"wrote student.safetensors, grid.png, report.json, report.md to {out}" in printed
    assert printed.startswith("auto chose sfd, 220 iterations x batch 64: docs/results.md#")
    assert "(this run: 2 iterations x batch 4, as given)" in printed.splitlines()[0]
    assert "export-diffusers" not in printed  # the built-in teacher is no diffusers pipeline
    report = json.loads((out / "report.json").read_text())
    assert printed.startswith(report["method_choice"]) and report["method"] == "sfd"
    rows = report["rows"]
    ours = [r for r in rows if r["method"] == "sfd"]
    # 2 iterations on one batch of 4 trajectories (teacher_reuse 2) x teacher steps (1 on the interval
    # from sigma 80, K = 3 on the two below sigma 20) x 2 (a CFG pair), and the first step's class-mean
    # table (10 classes and the null class x 100 noises)
    assert len(ours) == 1 and ours[0]["nfe"] == 2
    assert ours[0]["teacher_evaluations"] == 4 * (1 + 3 + 3) * 2 + 11 * 100
    assert {2, 4} <= {r["nfe"] for r in rows} and {"dpmpp_3m", "euler"} <= {r["method"] for r in rows}
    for key in ("psnr_db", "fd", "class_acc", "images_per_s", "train_seconds"):
        assert isinstance(ours[0][key], float)
    assert report["device"] == "cpu"  # where it trained and was evaluated
    md = (out / "report.md").read_text()
    assert "gain_over_best_solver_db" in md and "\nsfd " in md
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2

    png = (out / "grid.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (3 * (10 * 17 + 1), 3 * (3 * 17 + 1))  # 3 rows of 10 16x16 images, scale 3

    source = builtin_source()
    student = load_student(out / "student.safetensors", source.denoiser, source.uncond)
    assert student.card["nfe"] == 2 and student.card["guidance"] == {
        "mode": "distilled",
        "w": source.guidance,
    }
    # the built-in teacher's conditions are class labels: the first step is centred on its class means
    assert student.card["afs_center"] == "class_mean" and student.afs_means.shape == (11, 1, 16, 16)
    images = sample(student, torch.randn(2, 1, 16, 16) * 80, torch.tensor([3, 7]))
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()


@pytest.mark.parametrize("flow", [False, True])
def test_a_teacher_file_that_train_teacher_wrote_distils_as_a_digits_teacher(tmp_path, capsys, monkeypatch, flow):
    """``train-teacher --out FILE`` (a few steps here), then ``distill --teacher FILE``: the report measures it in
    the metric classifier's features, the student file names the file as its teacher, ``sample`` rebuilds it
    from there, and a flow teacher's student takes the flow time grid. The file given relative to the working
    folder: from another folder ``sample`` refuses in one line, naming the flag that gives the teacher."""
    from distill_core.safetensors_io import read_card

    monkeypatch.chdir(tmp_path)
    teacher = "mine.safetensors"
    assert cli.main(["train-teacher", "--out", teacher, "--steps", "2", *(["--flow"] if flow else [])]) == 0
    assert read_card(teacher)["preconditioning"] == ("flow" if flow else "edm")
    out = tmp_path / "run"
    assert cli.main(["distill", "--teacher", teacher, "--iters", "1", "--batch", "2", "--eval-samples", "4",
                     "--checkpoint-every", "0", "--report-solvers", "euler", "--reference-steps", "8", "--out",
                     str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"] == teacher and report["metric_space"].startswith("the metric classifier's features")
    card = read_card(out / "student.safetensors")
    assert card["teacher"] == teacher
    second = card["sigmas"]["4"][1]  # the flow grid's first interval ends at t = 0.79: sigma 3.79
    assert (abs(second - 3.79) < 0.01) == flow
    capsys.readouterr()
    assert cli.main(["sample", str(out / "student.safetensors"), "--out", str(tmp_path / "samples")]) == 0
    assert "40 images of 10 conditions" in capsys.readouterr().out
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.main(["sample", str(out / "student.safetensors"), "--out", "samples"]) == 1
    assert capsys.readouterr().err == (f"error: the student's teacher {teacher} (as its card names it) is not there "
                                       f"from {elsewhere}: run from the folder distill ran in, or give the teacher "
                                       "with --teacher\n")
    assert not (elsewhere / "samples").exists()


def test_a_file_that_is_no_teacher_is_refused_as_the_teacher_in_one_line(tmp_path, capsys):
    from distill_core.finetune_builtin import FINETUNE_PATH

    assert cli.main(["distill", "--teacher", str(FINETUNE_PATH), "--out", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err == (f"error: {FINETUNE_PATH} is not a teacher file (its card says "
                                       "kind='teacher_lora'): give a file that python -m distill_core train-teacher "
                                       "--out wrote, or a diffusers model directory\n")
    assert not (tmp_path / "run").exists()


def test_the_report_compares_only_the_solvers_named(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["distill", "--iters", "1", "--batch", "2", "--steps", "1", "--eval-samples", "4",
                     "--checkpoint-every", "0", "--report-solvers", "unipc, heun", "--out", str(out),
                     "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    solvers = {(r["method"], r["nfe"]) for r in report["rows"] if r["method"] != "sfd"}
    assert solvers == {("unipc", 1), ("unipc", 2), ("heun", 2)}  # Heun takes no step within one evaluation
    assert report["best_solver"].endswith("at 1 NFE, the best of heun, unipc)")
    assert "the best of heun, unipc" in (out / "report.md").read_text()


@pytest.mark.parametrize("flags, problem", [
    (["--report-solvers", "unipc,rk4"], "unknown solver rk4; name some of euler, ddim,"),
    (["--report-solvers", " , "], "unknown solver ' , '"),
    (["--report-solvers", "heun"], "Heun alone has no row at an odd budget"),
    (["--sigma-min", "100"], "sigma_min 100 lies at or above the schedule's top, sigma_max 80"),
    (["--teacher", "builtin-flow", "--classes", "5"], "--classes and --null-class are for class-conditional models "
                                                       "from directories; the builtin-flow teacher has its own"),
])
def test_bad_run_settings_are_refused_in_one_line_before_the_run_starts(flags, problem, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["distill", *flags, "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert problem in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()

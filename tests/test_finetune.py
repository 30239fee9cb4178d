"""The bold fine-tune of the built-in teacher, students put on a teacher they were not distilled from, and
bench/finetune.py end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import bench_script

from distill_core import builtin, safetensors_io
from distill_core.config import DistillConfig
from distill_core.finetune_builtin import bold, finetune_teacher, ink, load_finetuned_teacher
from distill_core.solvers import SOLVERS, solver_sigmas
from distill_core.sources import builtin_source, finetuned_source, teacher_source
from distill_core.student_files import load_student
from distill_core.teacher import CFGTeacher
from distill_core.train.run import train_student


def test_bold_dilates_every_stroke_by_one_pixel():
    x = torch.full((1, 1, 8, 8), -1.0)
    x[0, 0, 4, 4] = 1.0
    thick = bold(x)
    assert (thick[0, 0, 3:6, 3:6] == 1).all() and int((thick > 0).sum()) == 9
    assert ink(thick) == pytest.approx(9 / 64) and ink(x) == pytest.approx(1 / 64)


def test_the_shipped_fine_tune_draws_bolder_digits_than_its_base_from_the_same_noise():
    noise = torch.randn((20, *builtin.SHAPE), generator=torch.Generator().manual_seed(0)) * 80.0
    labels = torch.arange(20) % 10
    inks = []
    for source in (builtin_source(), finetuned_source()):
        teacher = CFGTeacher(source.denoiser, source.guidance, source.uncond)
        images = SOLVERS["dpmpp_2m"](teacher, noise, solver_sigmas("dpmpp_2m", 16, 0.002, 80.0), labels)
        inks.append(ink(images))
    assert inks[1] > 1.4 * inks[0], inks
    assert teacher_source("builtin-bold").name == "builtin-bold"


def test_the_fine_tune_command_writes_a_lora_for_this_teacher_and_refuses_other_bases(tmp_path):
    path = finetune_teacher(tmp_path / "bold.safetensors", steps=2, batch=4)
    tensors, card = safetensors_io.load(path)
    base = builtin.load_builtin_teacher()
    assert card["kind"] == "teacher_lora" and card["base_fingerprint"] == builtin.fingerprint(base.net)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)
    tuned = load_finetuned_teacher(path)
    assert builtin.fingerprint(tuned.net) != builtin.fingerprint(base.net)
    assert builtin.fingerprint(builtin.load_builtin_teacher().net) == builtin.fingerprint(base.net)  # base intact

    safetensors_io.save_atomic(tensors, tmp_path / "other.safetensors", {**card, "base_fingerprint": "0" * 16})
    with pytest.raises(ValueError, match="fine-tunes another teacher"):
        load_finetuned_teacher(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="finetune-teacher"):
        load_finetuned_teacher(tmp_path / "missing.safetensors")


def test_a_student_goes_on_another_teacher_only_when_asked(tmp_path):
    cfg = DistillConfig(steps=2, iters=2, batch=4, student="lora", checkpoint_every=0, out=str(tmp_path / "run"))
    run = train_student(cfg, builtin_source(), progress=False)
    tuned = finetuned_source()
    with pytest.raises(ValueError, match="distilled from a different teacher"):
        load_student(run.path, tuned.denoiser, tuned.uncond)
    student = load_student(run.path, tuned.denoiser, tuned.uncond, any_teacher=True)
    assert student.card["method"] == "sfd"


def test_the_finetune_bench_runs_end_to_end_and_keeps_its_students(tmp_path, capsys):
    bench = bench_script("finetune")
    out, picture = tmp_path / "rows.json", tmp_path / "drift.png"
    argv = ["--quick", "--n", "12", "--ref-steps", "4", "--steps", "2", "--cache", str(tmp_path / "cache"),
            "--work", str(tmp_path / "runs"), "--out", str(out), "--picture", str(picture)]
    first = bench.main(argv)
    rows = {r["method"]: r for r in json.loads(out.read_text())}
    assert {"fine-tune", "base teacher", "generic", "own", "euler"} <= set(rows)
    assert rows["generic"]["nfe"] == rows["own"]["nfe"] == 2 and "fd_teacher" in rows["own"]
    assert rows["fine-tune"]["ink"] > rows["base teacher"]["ink"]
    drawn = picture.read_bytes()
    assert drawn[:8] == b"\x89PNG\r\n\x1a\n"

    capsys.readouterr()
    picture.unlink()
    students = [r for r in bench.main(argv) if r["method"] in ("generic", "own")]
    assert students == [r for r in first if r["method"] in ("generic", "own")]  # training seconds too: read back
    assert capsys.readouterr().out.count("its rows are read from") == 2
    assert picture.read_bytes() == drawn  # the same students drawn again


def test_the_main_job_distils_the_fine_tune_by_name(tmp_path):
    from distill_core import cli

    (tmp_path / "run.yaml").write_text("teacher: builtin-bold\niters: 2\nbatch: 4\nsteps: 2\neval_samples: 4\n"
                                       "report_solvers: euler\nreference_steps: 8\ncheckpoint_every: 0\n")
    out = tmp_path / "run"
    assert cli.main(["distill", "--config", str(tmp_path / "run.yaml"), "--out", str(out), "--no-progress"]) == 0
    card = safetensors_io.read_card(out / "student.safetensors")
    assert card["teacher_fingerprint"] == builtin.fingerprint(finetuned_source().denoiser)
    assert "teacher: builtin-bold" in (out / "config.yaml").read_text()

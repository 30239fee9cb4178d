"""Students of several methods side by side with their teacher: the comparison, its CLI, its refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import hooks

from distill_core import cli
from distill_core.compare import OnTeacher, compare, one_teacher
from distill_core.config import DistillConfig
from distill_core.eval.fidelity import psnr
from distill_core.sources import builtin_source, flow_source
from distill_core.train.run import train_student


@pytest.fixture(scope="module")
def student_files(tmp_path_factory):
    """Two tiny students of the built-in teacher: SFD at 2 steps, progressive at 4."""
    root = tmp_path_factory.mktemp("students")
    source = builtin_source()
    runs = [DistillConfig(method="sfd", steps=2, iters=2, batch=4, checkpoint_every=0, out=str(root / "sfd2")),
            DistillConfig(method="progressive", steps=4, iters=4, batch=4, checkpoint_every=0,
                          out=str(root / "progressive4"))]
    return [train_student(cfg, source, progress=False).path for cfg in runs]


def test_rows_go_by_step_count_with_the_best_solver_before_its_students(student_files):
    source = builtin_source()
    students = [OnTeacher(p, source) for p in student_files]
    result = compare(source, students[::-1], count=3, seed=1, reference_steps=8)
    kinds = [(row.kind, row.nfe) for row in result.rows]
    assert kinds == [("teacher", 15), ("solver", 2), ("student", 2), ("solver", 4), ("student", 4)]
    assert [row.label for row in result.rows if row.kind == "student"] == ["sfd, 2 steps", "progressive, 4 steps"]
    reference = result.rows[0].images
    for row in result.rows[1:]:
        assert row.images.shape == reference.shape == (3, 1, 16, 16)
        assert row.psnr_db == pytest.approx(psnr(row.images, reference))
    again = compare(source, students[:1], count=3, seed=1, reference_steps=8)
    torch.testing.assert_close(again.rows[2].images, result.rows[2].images)  # same noise whoever is compared
    summary = result.summary()
    assert summary.splitlines()[0].split() == ["row", "kind", "NFE", "PSNR", "dB"]
    assert "progressive, 4 steps: " in summary and "dB against the teacher's reference solve" in summary


def test_students_of_another_teacher_or_guidance_are_refused(student_files):
    source = builtin_source()
    student, other = OnTeacher(student_files[0], source), OnTeacher(student_files[0], source)
    other.card = {**other.card, "guidance": {**other.card["guidance"], "w": 5.0}}
    with pytest.raises(ValueError, match="different guidance scales"):
        one_teacher([student, other])
    other.card = {**student.card, "teacher_fingerprint": "0" * 16}
    with pytest.raises(ValueError, match="different teachers"):
        one_teacher([student, other])
    with pytest.raises(ValueError, match="at least one student"):
        one_teacher([])
    with pytest.raises(ValueError, match="distilled from a different teacher"):  # before any sampling
        OnTeacher(student_files[0], flow_source())


def test_lora_students_sample_one_after_another_on_the_teachers_one_network(tmp_path):
    """Compared LoRA students hook their adapters into the teacher's own network while each samples (no copy
    of it), and leave it bare: the teacher's reference and solver rows, drawn before and between them, are the
    bare teacher's."""
    source = builtin_source()
    paths = [train_student(DistillConfig(method="sfd", steps=2, iters=2, batch=4, seed=seed, checkpoint_every=0,
                                         student="lora", lora_rank=2, out=str(tmp_path / f"lora{seed}")),
                           source, progress=False).path for seed in (0, 1)]
    students = [OnTeacher(p, source) for p in paths]
    with students[0].loaded() as loaded:
        assert loaded.net.denoiser is source.denoiser
        assert hooks(source.denoiser) > 0
    assert hooks(source.denoiser) == 0
    result = compare(source, students, count=2, seed=0, reference_steps=4)
    assert hooks(source.denoiser) == 0
    alone = compare(builtin_source(), students[1:], count=2, seed=0, reference_steps=4)
    torch.testing.assert_close(result.rows[0].images, alone.rows[0].images)  # the bare teacher's reference
    torch.testing.assert_close(result.rows[-1].images, alone.rows[-1].images)  # the second student alone
    assert not torch.equal(result.rows[-2].images, result.rows[-1].images)  # two students, two sets of adapters


def test_the_cli_writes_a_labelled_grid_a_table_and_json(student_files, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli.main(["compare", *map(str, student_files), "--count", "2", "--reference-steps", "8",
                     "--out", str(out)]) == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["label"] for r in rows if r["kind"] == "student"] == ["student (sfd), 2 steps",
                                                                     "student (progressive), 4 steps"]
    for name in ("compare.png", "compare_table.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "dB against the teacher's reference solve" in capsys.readouterr().out

    assert cli.main(["compare", str(tmp_path / "missing.safetensors"), "--out", str(out)]) == 1
    assert "no student file" in capsys.readouterr().err
    assert cli.main(["compare", *map(str, student_files), "--steps", "2", "--out", str(out)]) == 1
    assert "one step count per student" in capsys.readouterr().err
    for flags, problem in ((["--count", "0"], "--count 0: give 1 or more images per row"),
                           (["--reference-steps", "1"], "--reference-steps 1: the reference solve takes 2 or more")):
        assert cli.main(["compare", *map(str, student_files), *flags, "--out", str(out)]) == 1
        assert capsys.readouterr().err.startswith("error: " + problem)


def test_the_cli_takes_the_teacher_the_files_name(tmp_path, capsys):
    """A student of the built-in flow teacher compares without flags; files naming no teacher ask for it."""
    from distill_core import safetensors_io
    from distill_core.sources import flow_source

    run = train_student(DistillConfig(steps=2, iters=1, batch=2, checkpoint_every=0, out=str(tmp_path / "flow")),
                        flow_source(), progress=False)
    assert cli.main(["compare", str(run.path), "--count", "2", "--reference-steps", "4",
                     "--out", str(tmp_path / "cmp")]) == 0
    assert "dB against the teacher's reference solve" in capsys.readouterr().out

    tensors, card = safetensors_io.load(run.path)
    card.pop("teacher")
    unnamed = tmp_path / "unnamed.safetensors"
    safetensors_io.save_atomic(tensors, unnamed, card)
    assert cli.main(["compare", str(unnamed), "--out", str(tmp_path / "cmp")]) == 1
    assert "name no teacher" in capsys.readouterr().err
    assert cli.main(["compare", str(unnamed), "--teacher", "builtin-flow", "--count", "2", "--reference-steps", "4",
                     "--out", str(tmp_path / "cmp")]) == 0


def test_a_flow_teachers_best_solver_is_sought_on_its_time_grid_too():
    """The compare rows' solvers are the report's: on the built-in flow teacher the best 4-step solver runs on
    the flow time grid, 2.3 dB above Karras's grid on the report's 100 samples (docs/results.md)."""
    from distill_core.compare import best_solver
    from distill_core.eval.fidelity import reference_solve
    from distill_core.teacher import CFGTeacher

    source = flow_source()
    teacher = CFGTeacher(source.denoiser, source.guidance, source.uncond)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn((8, *source.shape), generator=gen) * source.denoiser.sigma_max
    cond = source.draw_cond(8, gen)
    reference = reference_solve(teacher, noise, cond, steps=32)
    row = best_solver(teacher, noise, cond, reference, 4, sigma_min=0.006)
    assert row.label.endswith("/flow, 4 NFE") and row.nfe == 4

"""A benchmark's students, kept (``eval.kept``): rows read back across bookkeeping changes, trained anew for
other settings or another evaluation, a checkpoint in the folder resumed only when it is of the same run, and a
stopped student's benchmark ends saying how to go on."""

import pytest

from distill_core.config import DistillConfig
from distill_core.eval.kept import finished, kept_rows, resumable
from distill_core.train.checkpoint import CHECKPOINT


def test_rows_are_read_back_across_bookkeeping_and_trained_anew_for_other_settings(tmp_path):
    calls = []

    def rows_of(resume):
        calls.append(resume)
        return [{"method": "sfd", "nfe": 4, "psnr_db": float(len(calls))}]

    cfg, evaluation = DistillConfig(out=str(tmp_path / "run"), iters=4), {"teacher": "abc", "n": 10}
    assert kept_rows(cfg, evaluation, rows_of)[0]["psnr_db"] == 1
    moved = cfg.replace(out=str(tmp_path / "run"), checkpoint_every=7, sample_every=3)
    assert kept_rows(moved, evaluation, rows_of)[0]["psnr_db"] == 1  # read, not trained
    assert kept_rows(cfg.replace(iters=5), evaluation, rows_of)[0]["psnr_db"] == 2
    assert kept_rows(cfg.replace(iters=5), {**evaluation, "n": 20}, rows_of)[0]["psnr_db"] == 3
    assert calls == [False, False, False]  # no checkpoint in the folder: nothing to resume


def test_a_student_file_trained_again_in_place_is_another_start(tmp_path):
    calls = []

    def rows_of(resume):
        calls.append(resume)
        return [{"method": "dmd2", "nfe": 1, "fd_teacher": float(len(calls))}]

    start = tmp_path / "kd" / "student.safetensors"
    start.parent.mkdir()
    start.write_bytes(b"the first student")
    cfg, evaluation = DistillConfig(out=str(tmp_path / "run"), init_from=str(start)), {"teacher": "abc", "n": 10}
    assert kept_rows(cfg, evaluation, rows_of)[0]["fd_teacher"] == 1
    assert kept_rows(cfg, evaluation, rows_of)[0]["fd_teacher"] == 1  # the same file: read back
    start.write_bytes(b"the student trained again")
    assert kept_rows(cfg, evaluation, rows_of)[0]["fd_teacher"] == 2
    assert calls == [False, False]


def test_an_unreadable_checkpoint_is_not_resumed(tmp_path):
    cfg = DistillConfig(out=str(tmp_path / "run"))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / CHECKPOINT).write_bytes(b"not a checkpoint")
    assert not resumable(cfg)


def test_a_student_stopped_at_a_checkpoint_ends_the_benchmark_with_how_to_go_on(tmp_path):
    cfg = DistillConfig(out=str(tmp_path / "run"))
    with pytest.raises(SystemExit, match="run: stopped at a checkpoint; the same command goes on from it"):
        finished(None, cfg)

"""What the trainer leaves for readers in other processes (the panel): ``status.json`` through a
run's life, and sample grids whose teacher and solver rows stay fixed while the student row moves."""

from __future__ import annotations

import json
import os

import pytest
import torch

from distill_core.config import DistillConfig
from distill_core.methods import build_method
from distill_core.methods.base import TeacherSource
from distill_core.train.callbacks import Callback, StopAt
from distill_core.train.checkpoint import load_checkpoint
from distill_core.train.status import STOP, request_stop
from distill_core.train.trainer import Trainer


def _method(tiny_edm, out, **kw):
    source = TeacherSource(
        "tiny", tiny_edm, (1, 8, 8), lambda b, g: torch.randint(10, (b,), generator=g), torch.tensor([10]), 2.0
    )
    cfg = DistillConfig(
        **{"iters": 4, "batch": 2, "steps": 2, "teacher_substeps": 2, "lr": 1e-2, "out": str(out), **kw}
    )
    return build_method(source, cfg)


def _status(out) -> dict:
    return json.loads((out / "status.json").read_text())


class _Watch(Callback):
    """Records status.json as seen during training."""

    def __init__(self, out):
        self.out, self.seen = out, []

    def on_iteration(self, trainer, record):
        self.seen.append(_status(self.out))


def test_status_running_then_finished(tiny_edm, tmp_path):
    m = _method(tiny_edm, tmp_path)
    watch = _Watch(tmp_path)
    Trainer(m, m.cfg, callbacks=[watch]).fit()
    assert watch.seen[0]["state"] == "running" and watch.seen[0]["pid"] == os.getpid()
    done = _status(tmp_path)
    assert done["state"] == "finished" and done["iteration"] == done["iters"] == 4
    assert done["started"] <= done["updated"] and "error" not in done


def test_status_interrupted_and_failed(tiny_edm, tmp_path):
    m = _method(tiny_edm, tmp_path / "stop")
    Trainer(m, m.cfg, callbacks=[StopAt(2)]).fit()
    assert _status(tmp_path / "stop")["state"] == "interrupted" and _status(tmp_path / "stop")["iteration"] == 2

    class Boom(Callback):
        def on_iteration(self, trainer, record):
            raise RuntimeError("disk on fire")

    m = _method(tiny_edm, tmp_path / "fail")
    with pytest.raises(RuntimeError):
        Trainer(m, m.cfg, callbacks=[Boom()]).fit()
    failed = _status(tmp_path / "fail")
    assert failed["state"] == "failed" and failed["error"] == "RuntimeError: disk on fire"


def test_a_stop_file_stops_after_the_iteration_with_a_checkpoint_and_a_stale_one_is_ignored(tiny_edm, tmp_path):
    """Another process writes ``STOP`` into the run folder after iteration 2: the run stops there with a
    checkpoint and removes the request, so the resume goes on to the end; a request left from an earlier
    process (written before the run started) does not stop the next one."""

    class StopFromOutside(Callback):
        def on_iteration(self, run, record):
            if run.iteration == 2:
                request_stop(tmp_path / "run")

    m = _method(tiny_edm, tmp_path / "run")
    result = Trainer(m, m.cfg, callbacks=[StopFromOutside()]).fit()
    assert result.status == "interrupted" and result.iteration == 2 and not (tmp_path / "run" / STOP).exists()
    assert _status(tmp_path / "run")["state"] == "interrupted"
    assert load_checkpoint(tmp_path / "run" / "checkpoints")[1]["iteration"] == 2

    request_stop(tmp_path / "run")  # left by a process that died before it answered
    m = _method(tiny_edm, tmp_path / "run")
    result = Trainer(m, m.cfg).fit(resume=True)
    assert result.status == "done" and result.iteration == 4 and not (tmp_path / "run" / STOP).exists()


def test_a_host_cancel_is_interrupted_with_a_checkpoint(tiny_edm, tmp_path):
    """A host's cancel exception (ComfyUI's interrupt) raised from a callback that declares it."""

    class Cancelled(Exception):
        pass

    class Cancel(Callback):
        cancels = (Cancelled,)

        def on_iteration(self, trainer, record):
            if trainer.iteration == 3:
                raise Cancelled("Cancel pressed")

    m = _method(tiny_edm, tmp_path)
    with pytest.raises(Cancelled):
        Trainer(m, m.cfg, callbacks=[Cancel()]).fit()
    status = _status(tmp_path)
    assert status["state"] == "interrupted" and status["iteration"] == 3
    assert load_checkpoint(tmp_path / "checkpoints")[1]["iteration"] == 3


def _rows(png_path) -> list[bytes]:
    """The decoded scanlines of a grid written by ``report.write_png`` (filter byte 0 on every row)."""
    import zlib

    data = png_path.read_bytes()
    width = int.from_bytes(data[16:20], "big")
    idat = data.index(b"IDAT")
    length = int.from_bytes(data[idat - 4 : idat], "big")
    raw = zlib.decompress(data[idat + 4 : idat + 4 + length])
    return [raw[i + 1 : i + 1 + width] for i in range(0, len(raw), width + 1)]


def test_grids_keep_teacher_and_solver_rows_and_move_the_student(tiny_edm, tmp_path):
    m = _method(tiny_edm, tmp_path, sample_every=2)
    Trainer(m, m.cfg).fit()
    first, second = _rows(tmp_path / "samples" / "iter_000002.png"), _rows(tmp_path / "samples" / "iter_000004.png")
    band = 3 * 9  # one image row of the grid at scale 3: 8 pixels and 1 of padding
    top, fixed = 3, 3 + 2 * band  # the top padding; the end of the solver row
    assert len(first) == len(second) == 3 * (3 * 9 + 1)
    assert first[:fixed] == second[:fixed]  # teacher reference and solver: computed once
    assert first[fixed:] != second[fixed:]  # the student trained in between
    assert first[top : top + band] != first[top + band : fixed]  # the solver at 2 steps is not the reference

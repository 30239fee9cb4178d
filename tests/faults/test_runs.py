"""Fault injection on training runs: kills, full disks, damaged files, two runs on one folder, resumes that
need the run's own config or a recovery change. Every case checks the message the user sees and that
nothing the user had was changed."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill_core.atomic import copy_file
from distill_core.cli import main as cli_main
from distill_core.config import DistillConfig
from distill_core.methods import build_method
from distill_core.methods.base import TeacherSource
from distill_core.train import checkpoint as ckpt
from distill_core.train.callbacks import Callback, StopAt
from distill_core.train.run import train_student
from distill_core.train.runlock import LOCK, RunBusy
from distill_core.train.trainer import Trainer, TrainingDiverged

ROOT = Path(__file__).resolve().parents[2]


def _source(denoiser) -> TeacherSource:
    return TeacherSource("tiny", denoiser, (1, 8, 8), lambda b, g: torch.randint(10, (b,), generator=g),
                         torch.tensor([10]), 2.0)


def _cfg(out: Path, **kw) -> DistillConfig:
    return DistillConfig(**{"steps": 2, "iters": 6, "batch": 4, "teacher_substeps": 2, "checkpoint_every": 2,
                            "out": str(out), **kw})


def _digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the hash of its bytes (what "nothing changed" compares)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _interrupted(tiny_edm, out: Path, at: int = 3, **kw):
    assert train_student(_cfg(out, **kw), _source(tiny_edm), progress=False, callbacks=[StopAt(at)]) is None


# ------------------------------------------------------------------ writes that fail
def test_a_copy_that_fails_on_a_full_disk_leaves_the_file_it_replaces(tmp_path, monkeypatch):
    target, source = tmp_path / "kept.safetensors", tmp_path / "new.safetensors"
    target.write_bytes(b"the student the user saved before")
    source.write_bytes(b"x" * 4096)

    def full_disk(src, dst, *a, **k):
        Path(dst).write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    with pytest.raises(OSError, match="No space left"):
        copy_file(source, target)
    assert target.read_bytes() == b"the student the user saved before"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.safetensors", "new.safetensors"]


def test_a_checkpoint_that_fails_to_write_keeps_both_earlier_ones(tiny_edm, tmp_path, monkeypatch):
    _interrupted(tiny_edm, tmp_path, at=4)  # checkpoints at iterations 2 and 4
    before = _digest(tmp_path / "checkpoints")
    assert set(before) == {ckpt.CHECKPOINT, ckpt.PREVIOUS, ckpt.SIDECAR}

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    cfg = _cfg(tmp_path)
    trainer = Trainer(build_method(_source(tiny_edm), cfg), cfg)
    with pytest.raises(OSError, match="No space left"):
        trainer.fit(resume=True)  # iteration 6 would checkpoint
    assert _digest(tmp_path / "checkpoints") == before


# ------------------------------------------------------------------ damaged files left by a kill
def test_a_half_written_metrics_line_does_not_stop_a_resume(tiny_edm, tmp_path):
    _interrupted(tiny_edm, tmp_path, at=4)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"nfe": 2, "lr": 0.0001, "loss": {"1": 0.3')  # what a kill mid-write leaves
    run = train_student(_cfg(tmp_path), _source(tiny_edm), resume=True, progress=False)
    assert run is not None
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iter"] for line in lines] == [1, 2, 3, 4, 5, 6]


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(tiny_edm, tmp_path, capsys):
    _interrupted(tiny_edm, tmp_path, at=4)
    current = tmp_path / "checkpoints" / ckpt.CHECKPOINT
    current.write_bytes(current.read_bytes()[: current.stat().st_size // 2])
    run = train_student(_cfg(tmp_path), _source(tiny_edm), resume=True, progress=False)
    said = capsys.readouterr().out
    assert f"{current} is unreadable" in said and "resuming from the previous checkpoint" in said
    assert "(iteration 2)" in said and run is not None
    iters = [json.loads(line)["iter"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert iters == [1, 2, 3, 4, 5, 6]  # lines 3 and 4 were written again from iteration 2


def test_two_damaged_checkpoints_are_named_and_nothing_is_written(tiny_edm, tmp_path):
    _interrupted(tiny_edm, tmp_path, at=4)
    for name in (ckpt.CHECKPOINT, ckpt.PREVIOUS):
        (tmp_path / "checkpoints" / name).write_bytes(b"not a safetensors file")
    before = _digest(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="no readable checkpoint in .*checkpoints"):
        train_student(_cfg(tmp_path), _source(tiny_edm), resume=True, progress=False)
    assert _digest(tmp_path) == before


def test_leftover_temporary_files_of_a_kill_are_removed(tiny_edm, tmp_path):
    _interrupted(tiny_edm, tmp_path, at=2)
    leftovers = [tmp_path / ".config.yaml.abc.tmp", tmp_path / "checkpoints" / ".checkpoint.safetensors.x.tmp"]
    for p in leftovers:
        p.write_bytes(b"partial")
    train_student(_cfg(tmp_path), _source(tiny_edm), resume=True, progress=False)
    assert not any(p.exists() for p in leftovers)


#: a real run that checkpoints every iteration, in a child process: ``run.py OUT start|resume|straight``
KILLED_RUN = f"""
import sys, time, torch
sys.path.insert(0, {str(ROOT / 'tests')!r}); sys.path.insert(0, {str(ROOT)!r})
from conftest import TINY_UNET, randomise
from distill_core.denoisers.edm import EDMDenoiser
from distill_core.nets.unet import UNet
from distill_core.config import DistillConfig
from distill_core.methods.base import TeacherSource
from distill_core.train.run import train_student
from distill_core.train.callbacks import Callback
class Slow(Callback):  # room to be killed in: the run being killed waits after each iteration
    def on_iteration(self, run, record):
        time.sleep(0.2)
torch.set_num_threads(1)
teacher = EDMDenoiser(randomise(UNet(TINY_UNET))).eval().requires_grad_(False)
source = TeacherSource("tiny", teacher, (1, 8, 8), lambda b, g: torch.randint(10, (b,), generator=g),
                       torch.tensor([10]), 2.0)
cfg = DistillConfig(steps=2, iters=12, batch=4, teacher_substeps=2, checkpoint_every=1, out=sys.argv[1])
slow = [Slow()] if sys.argv[2] == "start" else []
train_student(cfg, source, resume=sys.argv[2] == "resume", progress=False, callbacks=slow)
"""


@pytest.fixture(scope="module")
def killed_run_script(tmp_path_factory) -> tuple[Path, Path]:
    """``KILLED_RUN`` as a file, and the folder of its run that was never interrupted (trained once for every
    kill below)."""
    folder = tmp_path_factory.mktemp("killed_run")
    script = folder / "run.py"
    script.write_text(KILLED_RUN)
    subprocess.run([sys.executable, str(script), str(folder / "straight"), "straight"], check=True)
    return script, folder / "straight"


@pytest.mark.parametrize("delay", [0.0, 0.13, 0.41])
def test_a_killed_run_resumes_bit_exactly(killed_run_script, tmp_path, delay):
    """SIGKILL at points in the middle of a real run that checkpoints every iteration (a child process), then
    resume: the student equals the one of a run that was never interrupted."""
    script, straight = killed_run_script
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(killed), "start"])
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoints" / ckpt.PREVIOUS).is_file():
        time.sleep(0.05)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / LOCK).is_file() and not (killed / "student.safetensors").exists()
    subprocess.run([sys.executable, str(script), str(killed), "resume"], check=True)
    from distill_core.safetensors_io import load

    a, b = load(killed / "student.safetensors")[0], load(straight / "student.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (killed / LOCK).exists()


# ------------------------------------------------------------------ two runs, one folder
def test_a_second_run_on_a_busy_folder_is_refused_and_changes_nothing(tiny_edm, tmp_path):
    _interrupted(tiny_edm, tmp_path, at=2)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(str(holder.pid))
        before = _digest(tmp_path)
        with pytest.raises(RunBusy, match=f"in use by another run \\(process {holder.pid}\\)"):
            train_student(_cfg(tmp_path, iters=8), _source(tiny_edm), progress=False)
        assert _digest(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_dead_process_is_taken_over(tiny_edm, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / LOCK).write_text(str(dead.pid))
    assert train_student(_cfg(tmp_path), _source(tiny_edm), progress=False) is not None
    assert f"process {dead.pid}) ended without releasing it" in capsys.readouterr().out
    assert not (tmp_path / LOCK).exists()


class FakeKernel32:
    """Windows' kernel32 as ``windows_pid_alive`` calls it: a process handle (0: none), the exit code it reports."""

    def __init__(self, handle: int, exit_code: int = 0):
        self.handle, self.exit_code, self.opened, self.closed = handle, exit_code, [], []

    def OpenProcess(self, access, inherit, pid):  # noqa: N802 - Windows' own name
        self.opened.append((access, inherit, pid))
        return self.handle

    def GetExitCodeProcess(self, handle, code):  # noqa: N802
        code._obj.value = self.exit_code
        return 1

    def CloseHandle(self, handle):  # noqa: N802
        self.closed.append(handle)


@pytest.mark.parametrize(("handle", "exit_code", "last_error", "alive"), [
    (7, 259, 0, True),   # running: STILL_ACTIVE
    (7, 0, 0, False),    # exited, its handle still held by someone
    (0, 0, 87, False),   # no such process (invalid parameter)
    (0, 0, 5, True),     # another user's: access denied
])
def test_on_windows_a_process_is_asked_whether_it_runs_not_sent_a_signal(handle, exit_code, last_error, alive):
    from distill_core.train.runlock import QUERY_LIMITED_INFORMATION, windows_pid_alive

    kernel32 = FakeKernel32(handle, exit_code)
    assert windows_pid_alive(4242, kernel32, lambda: last_error) is alive
    assert kernel32.opened == [(QUERY_LIMITED_INFORMATION, False, 4242)]
    assert kernel32.closed == ([handle] if handle else [])


@pytest.mark.parametrize("work", ["student.safetensors", "checkpoints/checkpoint.safetensors"])
def test_a_new_run_in_a_folder_holding_another_is_refused_unless_told_to_replace_it(tmp_path, capsys, monkeypatch,
                                                                                    work):
    """distill without --resume into a folder with a run's student or checkpoints: one line, nothing changed;
    --overwrite starts the run."""
    from distill_core import main_job

    out = tmp_path / "run"
    (out / work).parent.mkdir(parents=True, exist_ok=True)
    (out / work).write_bytes(b"what the user trained")
    before = _digest(out)
    args = ["distill", "--iters", "1", "--out", str(out), "--no-progress"]
    assert cli_main(args) == 1
    held = "student.safetensors" if work == "student.safetensors" else "checkpoints/"
    assert capsys.readouterr().err == (f"error: {out} holds a run ({held}), which a new run would replace: continue "
                                       "it with --resume, replace it with --overwrite, or give another --out\n")
    assert _digest(out) == before
    started = []
    monkeypatch.setattr(main_job, "distill", lambda cfg, **kw: started.append(cfg.out))
    assert cli_main([*args, "--overwrite"]) == 130 and started == [str(out)]  # the run starts (here: a stand-in)


# ------------------------------------------------------------------ resume that does what it says
def test_resume_without_a_checkpoint_is_refused_and_deletes_nothing(tiny_edm, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "metrics.jsonl").write_text('{"iter": 1, "loss": {"1": 0.5}}\n')
    (tmp_path / "config.yaml").write_text("steps: 2\n")
    before = _digest(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="nothing to resume"):
        train_student(_cfg(tmp_path), _source(tiny_edm), resume=True, progress=False)
    assert _digest(tmp_path) == before


def test_a_refused_resume_leaves_the_runs_config_as_it_was(tiny_edm, tmp_path):
    _interrupted(tiny_edm, tmp_path)
    before = _digest(tmp_path)
    with pytest.raises(ValueError, match=r"configured differently \(steps: 2 -> 3\).*--config .*config.yaml"):
        train_student(_cfg(tmp_path, steps=3), _source(tiny_edm), resume=True, progress=False)
    assert _digest(tmp_path) == before


def test_resume_after_divergence_may_lower_the_lr_and_add_clipping_and_says_so(tiny_edm, tmp_path):
    _interrupted(tiny_edm, tmp_path)
    cfg = _cfg(tmp_path, lr=5e-5, clip_grad=1.0)
    assert train_student(cfg, _source(tiny_edm), resume=True, progress=False) is not None
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    notes = [r for r in records if "note" in r]
    assert len(notes) == 1 and notes[0]["iter"] == 3  # the stop checkpointed at iteration 3
    assert "clip_grad None -> 1.0" in notes[0]["note"] and "lr 0.0002 -> 5e-05" in notes[0]["note"]
    after = [r for r in records if "note" not in r and r["iter"] > 3]
    assert all(r["lr"] <= 5e-5 for r in after) and max(r["lr"] for r in after) > 1e-5


def test_the_nan_stop_before_any_checkpoint_says_to_start_again(tiny_edm, tmp_path):
    cfg = _cfg(tmp_path, checkpoint_every=50)
    m = build_method(_source(tiny_edm), cfg)
    good = m.losses
    m.losses = lambda plan, micro, gen: (s._replace(loss=s.loss * float("nan")) for s in good(plan, micro, gen))
    with pytest.raises(TrainingDiverged, match="before any checkpoint was written. Start the run again"):
        Trainer(m, cfg).fit()
    assert not (tmp_path / "checkpoints").exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill_core", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_the_resume_hint_works_and_an_interrupted_run_exits_130(tmp_path):
    """Ctrl-C on the command line: exit status 130 and a hint; following the hint resumes with the run's
    own settings (not the defaults) and finishes."""
    out = tmp_path / "run"
    args = ["distill", "--steps", "2", "--iters", "8", "--batch", "4", "--afs-center", "zero", "--eval-samples", "4",
            "--report-solvers", "euler", "--reference-steps", "8", "--checkpoint-every", "1", "--out", str(out),
            "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "distill_core", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / ckpt.CHECKPOINT).is_file():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    said, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, said
    hint = said.strip().splitlines()[-1]
    assert hint == f"continue with: python -m distill_core distill --resume --config {out / 'config.yaml'}"
    config = (out / "config.yaml").read_text()
    resumed = _cli("distill", "--resume", "--out", str(out), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "config.yaml").read_text() == config and "steps: 2" in config and "afs_center: zero" in config
    assert json.loads((out / "report.json").read_text())["iterations"] == 8


def test_ctrl_c_while_the_report_is_written_keeps_the_student_and_the_hint_finishes_the_report(
        tmp_path, capsys, monkeypatch):
    """Ctrl-C after training, while the report samples: exit status 130, the student saved and named, the
    resume hint; following it writes the report without training again."""
    from distill_core import main_job

    out = tmp_path / "run"
    args = ["distill", "--steps", "2", "--iters", "2", "--batch", "4", "--eval-samples", "4", "--report-solvers",
            "euler", "--reference-steps", "8", "--out", str(out), "--no-progress"]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(main_job, "write_run_report", interrupted)
        assert cli_main(args) == 130
    said = capsys.readouterr().out.strip().splitlines()
    assert said[-2:] == [f"Ctrl-C: stopped writing the report; the student is saved in {out / 'student.safetensors'}",
                         f"continue with: python -m distill_core distill --resume --config {out / 'config.yaml'}"]
    student = (out / "student.safetensors").read_bytes()
    assert not (out / "report.json").exists()
    assert cli_main(["distill", "--resume", "--out", str(out), "--no-progress"]) == 0
    assert (out / "student.safetensors").read_bytes() == student  # the same student
    assert json.loads((out / "report.json").read_text())["iterations"] == 2


def test_ctrl_c_in_any_command_is_one_line_and_status_130(capsys, monkeypatch):
    from distill_core import sample_command

    def sampling(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_command, "run", sampling)
    assert cli_main(["sample", "student.safetensors"]) == 130
    assert capsys.readouterr().err == "\nstopped (Ctrl-C)\n"


# ------------------------------------------------------------------ bad input: one line, no traceback
@pytest.mark.parametrize(("yaml_text", "message"), [
    ("steps: four\n", "steps must be a int, got 'four'"),
    ("sigma_min: 5\nsigma_max: 2\n", "sigma_min 5.0 must lie below sigma_max 2.0"),
    ("rho: 0\n", r"rho must lie in \[0.1, inf\], got 0.0"),
    ("ema: 1.0\n", r"ema must lie in \[0, 0.999999\], got 1.0"),
    ("lr: .nan\n", "lr must be a float, got nan"),
    ("lr: -1\n", r"lr must lie in \[1e-09, 1\], got -1.0"),
    ("lr: 0\n", r"lr must lie in \[1e-09, 1\], got 0.0"),
    ("guidance: -2\n", r"guidance must lie in \[0, inf\], got -2.0"),
    ("eval_samples: 0\n", r"eval_samples must lie in \[1, inf\], got 0"),
    ("steps: [1\n", "not valid YAML at line"),
    ("stepz: 2\n", "unknown config keys \\['stepz'\\]"),
])
def test_bad_config_values_are_one_line_naming_the_file_and_field(tmp_path, capsys, yaml_text, message):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    assert cli_main(["distill", "--config", str(path), "--out", str(tmp_path / "out")]) == 1
    said = capsys.readouterr().err
    assert said.startswith(f"error: {path}: ") and len(said.strip().splitlines()) == 1
    assert re.search(message, said), said
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["missing.yaml", "."])
def test_a_config_that_cannot_be_read_is_one_line_naming_it(tmp_path, capsys, where):
    path = tmp_path / where
    assert cli_main(["distill", "--config", str(path), "--out", str(tmp_path / "out")]) == 1
    said = capsys.readouterr().err
    assert said.startswith(f"error: {path}: cannot read it (") and len(said.strip().splitlines()) == 1
    assert "such as a run's config.yaml" in said and not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 0\n")
    done = _cli("--debug", "distill", "--config", str(path))
    assert done.returncode != 0 and "Traceback" in done.stderr and "steps must lie in [1, 1000]" in done.stderr


class _Cancel(Exception):
    pass


class _CancelAt(Callback):
    """A host's cancel, raised by its poll at the ``n``-th network evaluation of the run."""

    cancels = (_Cancel,)

    def __init__(self, n: int):
        self.n, self.polls = n, 0

    def poll(self):
        self.polls += 1
        if self.polls == self.n:
            raise _Cancel


def test_a_cancel_is_answered_within_one_network_evaluation_and_resumes_exactly(tiny_edm, tmp_path):
    straight = train_student(_cfg(tmp_path / "a", teacher_reuse=1.0), _source(tiny_edm), progress=False)
    probe = _CancelAt(10**9)
    train_student(_cfg(tmp_path / "probe", iters=1, teacher_reuse=1.0), _source(tiny_edm), progress=False,
                  callbacks=[probe])
    per_iteration = probe.polls  # the teacher's solve, then the student's steps
    cancel = _CancelAt(3 * per_iteration + 2)  # inside the fourth iteration's teacher solve
    with pytest.raises(_Cancel):
        train_student(_cfg(tmp_path / "b", teacher_reuse=1.0), _source(tiny_edm), progress=False, callbacks=[cancel])
    assert cancel.polls == 3 * per_iteration + 2
    assert ckpt.checkpoint_info(tmp_path / "b" / "checkpoints")["iteration"] == 3
    assert json.loads((tmp_path / "b" / "status.json").read_text())["state"] == "interrupted"
    resumed = train_student(_cfg(tmp_path / "b", teacher_reuse=1.0), _source(tiny_edm), resume=True,
                            progress=False)
    from distill_core.safetensors_io import load

    a, b = load(straight.path)[0], load(resumed.path)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_written_files_are_readable_by_a_comfyui_running_as_another_user(tiny_edm, tmp_path):
    old = os.umask(0o022)
    try:
        run = train_student(_cfg(tmp_path), _source(tiny_edm), progress=False)
    finally:
        os.umask(old)
    for path in (run.path, tmp_path / "config.yaml", tmp_path / "status.json",
                 tmp_path / "checkpoints" / ckpt.CHECKPOINT, tmp_path / "checkpoints" / ckpt.SIDECAR):
        assert path.stat().st_mode & 0o777 == 0o644, path


@pytest.mark.parametrize("site", ["config", "report", "grid", "rows", "student", "status", "sidecar"])
def test_a_full_disk_at_any_write_site_leaves_the_previous_file(tmp_path, monkeypatch, site):
    """Every write goes through ``atomic.atomic_path``: a disk that fills up before the data reaches it
    (here: the flush to disk fails) leaves the file that was there, and no temporary file."""
    from distill_core import atomic
    from distill_core.eval.benchmark import write_rows
    from distill_core.report import save_grid, write_report
    from distill_core.safetensors_io import save_atomic
    from distill_core.train.status import write_status

    writes = {
        "config": (tmp_path / "config.yaml", lambda: DistillConfig().to_yaml(tmp_path / "config.yaml")),
        "report": (tmp_path / "report.json",
                   lambda: write_report(tmp_path, {"method": "sfd", "steps": 2, "rows": [], "config": {}})),
        "grid": (tmp_path / "grid.png", lambda: save_grid([torch.zeros(2, 1, 4, 4)], tmp_path / "grid.png")),
        "rows": (tmp_path / "rows.json", lambda: write_rows([{"method": "sfd"}], tmp_path / "rows.json")),
        "student": (tmp_path / "s.safetensors",
                    lambda: save_atomic({"w": torch.zeros(3)}, tmp_path / "s.safetensors", {"kind": "student"})),
        "status": (tmp_path / "status.json", lambda: write_status(tmp_path, "running")),
        "sidecar": (tmp_path / "checkpoint.json",
                    lambda: ckpt.write_json(tmp_path / "checkpoint.json", {"iteration": 9})),
    }
    path, write = writes[site]
    path.write_bytes(b"what the user had")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        write()
    assert path.read_bytes() == b"what the user had"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_folder_is_written_whole_in_place_of_the_previous_one_or_not_at_all(tmp_path):
    """``atomic.atomic_dir`` (folders a library saves, such as a diffusers export's ``unet/``): a save that fails
    leaves the previous folder as it was and nothing else; one that succeeds replaces it whole."""
    from distill_core.atomic import atomic_dir

    target = tmp_path / "unet"
    target.mkdir()
    (target / "old.safetensors").write_bytes(b"what the user had")
    with pytest.raises(OSError, match="No space left"):
        with atomic_dir(target) as tmp:
            (tmp / "half.safetensors").write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == ["unet"]
    assert [p.name for p in target.iterdir()] == ["old.safetensors"]
    with atomic_dir(target) as tmp:
        (tmp / "new.safetensors").write_bytes(b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["unet"]
    assert [p.name for p in target.iterdir()] == ["new.safetensors"]


@pytest.mark.parametrize("windows", [True, False])
def test_a_rename_over_a_file_a_reader_holds_waits_for_it_on_windows_only(tmp_path, monkeypatch, windows):
    """On Windows a file another process holds open (the panel reading ``status.json``) cannot be replaced for that
    moment: the rename is retried until the reader lets go, or gives up after ``WINDOWS_RETRY_S`` with the previous
    file whole. Elsewhere the error is the system's answer at once."""
    from distill_core import atomic

    path = tmp_path / "status.json"
    path.write_text("before")
    held = {"renames": 2}
    rename = os.replace

    def held_open(source, target):
        if held["renames"] > 0:
            held["renames"] -= 1
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        rename(source, target)

    monkeypatch.setattr(atomic, "ON_WINDOWS", windows)
    monkeypatch.setattr(atomic.os, "replace", held_open)
    if windows:
        atomic.write_text(path, "after")
        assert path.read_text() == "after" and held["renames"] == 0
        held["renames"] = 10**9  # a reader that never lets go
        monkeypatch.setattr(atomic, "WINDOWS_RETRY_S", 0.2)
    with pytest.raises(PermissionError):
        atomic.write_text(path, "lost")
    assert path.read_text() == ("after" if windows else "before")
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]

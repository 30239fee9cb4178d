"""The monitoring panel: reading run directories (malformed and half-written ones included), confinement
to the runs root, the API of a launched panel over a finished run and a run being written
(``gradio_client``), and starting and stopping a real distillation from it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from panel_fixtures import dead_pid, fake_run, metrics_line

from distill_core.panel import runs

# ----------------------------------------------------------------- reading run directories


def test_summaries_of_finished_running_and_stale_runs(tmp_path):
    fake_run(tmp_path, "done", 20, state="finished", report=True)
    fake_run(tmp_path, "live", 8, pid=os.getpid())
    fake_run(tmp_path, "gone", 8, pid=dead_pid())
    (tmp_path / "not-a-run").mkdir()
    assert runs.list_runs(tmp_path) == ["done", "gone", "live"]

    done = runs.summarize(tmp_path / "done")
    assert (done.state, done.method, done.steps, done.iteration, done.total) == ("finished", "sfd", "3", 20, 20)
    assert done.wall_s == 10.0 and done.eta_s is None and done.problems == []
    live = runs.summarize(tmp_path / "live")
    assert live.state == "running" and live.iteration == 8
    assert live.eta_s == pytest.approx((20 - 8) * 0.5)  # 0.5 s per iteration so far
    assert runs.summarize(tmp_path / "gone").state == "stale"  # "running", but its process is gone
    assert [it for it, _ in runs.grids(tmp_path / "done")] == [5, 10, 15, 20]


def test_malformed_and_half_written_files_are_reported_not_raised(tmp_path):
    run = fake_run(tmp_path, "bad", 4)
    with open(run / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
        f.write('["a list"]\n')
        f.write('{"iter": "five"}\n')
        f.write(metrics_line(5))
        f.write(metrics_line(6)[:25])  # the writer is mid-line
    metrics, problem = runs.read_metrics(run)
    assert [r["iter"] for r in metrics.records] == [1, 2, 3, 4, 5]
    assert metrics.malformed == [5, 6, 7] and metrics.partial
    assert problem == "metrics.jsonl: 3 malformed line(s) (5, 6, 7) skipped"

    (run / "status.json").write_text('{"state": "runn')
    (run / "config.yaml").write_text("iters: [unclosed\n")
    s = runs.summarize(run)
    assert s.state == "unknown" and s.iteration == 5 and s.method is None
    assert "status.json: malformed (JSONDecodeError)" in s.problems
    assert "config.yaml: malformed (ParserError)" in s.problems
    assert any(p.startswith("metrics.jsonl: 3 malformed") for p in s.problems)
    (run / "report.json").write_text("[1, 2]")
    assert runs.read_json(run, "report.json") == (None, "report.json: malformed (not a JSON object)")


def test_names_and_files_outside_the_root_are_refused(tmp_path):
    root = tmp_path / "runs"
    fake_run(root, "ok", 2)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "metrics.jsonl").write_text(metrics_line(1))
    (root / "link-out").symlink_to(secret)
    for name in ["../secret", "..", ".", "", str(secret), "ok/../../secret", "ok/samples", "link-out", None, 3]:
        with pytest.raises(runs.OutsideRoot):
            runs.run_dir(root, name)
    assert runs.list_runs(root) == ["ok"]
    (root / "ok" / "metrics.jsonl").unlink()
    (root / "ok" / "metrics.jsonl").symlink_to(secret / "metrics.jsonl")  # a file linked out of the run
    metrics, problem = runs.read_metrics(root / "ok")
    assert metrics.records == [] and problem.startswith("refused")


def test_a_run_the_panel_starts_cannot_name_files_or_folders_or_what_the_forms_fields_set(tmp_path):
    from distill_core.panel.jobs import Jobs

    jobs = Jobs(tmp_path / "runs")
    outside = tmp_path / "elsewhere"
    for options in (f"teacher_cache: {outside}", f"prompts: {outside / 'prompts.txt'}", f"lr: 1e-4\nout: {outside}",
                    f"init_from: {outside / 'student.safetensors'}"):
        with pytest.raises(ValueError, match=r"refused: the options cannot name files or folders \("):
            jobs.start("r", "builtin", "sfd", 2, 2, 2, options)
    with pytest.raises(ValueError, match="refused: the panel distils the built-in teachers"):
        jobs.start("r", str(tmp_path), "sfd", 2, 2, 2)
    with pytest.raises(ValueError, match="refused: the form's own fields set iters, steps; the options hold"):
        jobs.start("r", "builtin", "sfd", 2, 2, 2, "steps: 4\niters: 100\n")  # which the fields would override
    assert not (tmp_path / "runs" / "r").exists() and not outside.exists()


def test_the_start_form_offers_the_teacher_files_in_the_roots_teachers_folder(tmp_path, monkeypatch):
    """``runs/teachers/*.safetensors`` whose cards say teacher are offered beside the built-in teachers; another
    kind of file, an unreadable one and a link out of the folder are not, and a run cannot name them. The run's
    config names the chosen file by its absolute path."""
    import shutil

    from distill_core.builtin import FLOW_TEACHER_PATH
    from distill_core.config import DistillConfig
    from distill_core.finetune_builtin import FINETUNE_PATH
    from distill_core.panel import jobs as panel_jobs

    root = tmp_path / "runs"
    folder = root / "teachers"
    folder.mkdir(parents=True)
    shutil.copy(FLOW_TEACHER_PATH, folder / "mine.safetensors")
    shutil.copy(FINETUNE_PATH, folder / "lora.safetensors")  # a teacher LoRA, not a teacher
    (folder / "garbled.safetensors").write_bytes(b"not a safetensors file")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(FLOW_TEACHER_PATH, outside)
    (folder / "linked.safetensors").symlink_to(outside)
    assert panel_jobs.teacher_choices(root) == ["builtin", "builtin-flow", "builtin-bold", "teachers/mine.safetensors"]

    launched = []
    monkeypatch.setattr(panel_jobs.subprocess, "Popen", lambda args, **kw: launched.append(args))
    jobs = panel_jobs.Jobs(root)
    for name in ("teachers/lora.safetensors", "teachers/linked.safetensors", "teachers/../teachers/mine.safetensors",
                 str(folder / "mine.safetensors")):
        with pytest.raises(ValueError, match="refused: the panel distils the built-in teachers .* and the teacher "
                                             "files in teachers/ under the runs root"):
            jobs.start("r", name, "sfd", 2, 2, 2)
    assert not (root / "r").exists() and not launched
    out = jobs.start("r", "teachers/mine.safetensors", "auto", 4, 2, 2)
    assert DistillConfig.from_yaml(out / "config.yaml").teacher == str((folder / "mine.safetensors").resolve())
    assert len(launched) == 1


def test_the_start_form_opens_on_autos_choice_and_follows_the_step_count(tmp_path, monkeypatch):
    """The form shows what auto trains (its method's settings, its preset's budget, its line); a method picked
    by name keeps what was typed for it; a run started on auto prints and reports the choice."""
    import argparse

    from distill_core import main_job
    from distill_core.config import DistillConfig
    from distill_core.panel import jobs as panel_jobs
    from distill_core.panel.app import form_update

    options, iters, batch, line = panel_jobs.start_form("auto", 1, "builtin")
    assert line.startswith("auto chose kd, 220 iterations x batch 64: docs/results.md#")
    assert (options, iters, batch) == (panel_jobs.method_options("kd"), 220, 64)
    assert panel_jobs.start_form("auto", 4, "builtin")[3].startswith("auto chose sfd")
    assert panel_jobs.start_form("auto", 4, "builtin-bold")[1:3] == (None, None)  # no benchmark: the form's budget
    assert panel_jobs.start_form("lcm", 4, "builtin") == (panel_jobs.method_options("lcm"), None, None, "")
    assert form_update("lcm", 2, "builtin", False) == ({"__type__": "update"},) * 4  # typed settings stay
    assert form_update("auto", 1, "builtin", False) == (options, 220, 64, line)

    launched = []
    monkeypatch.setattr(panel_jobs.subprocess, "Popen", lambda args, **kw: launched.append(args))
    out = panel_jobs.Jobs(tmp_path / "runs").start("a", "builtin", "auto", 1, 30, 8, "")
    cfg = DistillConfig.from_yaml(out / "config.yaml")
    assert (cfg.method, cfg.steps, cfg.iters, cfg.batch) == ("kd", 1, 30, 8)  # the form's budget stands
    assert cfg.sample_every == 3  # a grid every tenth of the run, unless the options say otherwise:
    own = panel_jobs.Jobs(tmp_path / "runs").start("own", "builtin", "sfd", 2, 30, 8, "sample_every: 1\n")
    assert DistillConfig.from_yaml(own / "config.yaml").sample_every == 1
    assert launched[0][-2:] == ["--method", "auto"]
    parser = argparse.ArgumentParser()
    main_job.add_arguments(parser)
    command = launched[0][launched[0].index("distill") + 1:]
    child, choice = main_job.config_from_args(parser.parse_args(command))  # as the run reads its command
    assert child == cfg and choice == line + " (this run: 30 iterations x batch 8, as given)"
    panel_jobs.Jobs(tmp_path / "runs").start("b", "builtin", "sfd", 2, 30, 8, "")
    assert "auto" not in launched[2]


def test_smoothing():
    assert runs.smooth([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]
    assert runs.smooth([4.0, 4.0, 4.0], 0.9) == pytest.approx([4.0, 4.0, 4.0])  # bias-corrected
    assert runs.smooth([0.0, 10.0], 0.5) == pytest.approx([0.0, 10 * 0.5 / 0.75])


def test_curves_are_labelled_by_student_step_or_network_group():
    from distill_core.panel.app import update_label

    assert update_label("2") == "step 2" and update_label("critic:0") == "critic 0"


# ----------------------------------------------------------------- a launched panel


@pytest.fixture(scope="module")
def panel(tmp_path_factory):
    """A panel over a finished run and a run being written, served on 127.0.0.1; its client."""
    from gradio_client import Client

    from distill_core.panel.app import build
    from distill_core.panel.launch import serve_options

    root = tmp_path_factory.mktemp("runs")
    fake_run(root, "done", 20, state="finished", report=True)
    fake_run(root, "live", 6, pid=os.getpid())
    app = build(root)
    _, url, _ = app.launch(prevent_thread_lock=True, quiet=True, **serve_options())
    assert url.startswith("http://127.0.0.1:")
    yield root, Client(url, verbose=False)
    app.close()


def test_api_runs_table(panel):
    _, client = panel
    table = {row["run"]: row for row in client.predict(api_name="/runs")}
    assert table["done"]["status"] == "finished" and table["done"]["step / total"] == "20 / 20"
    assert table["live"]["status"] == "running" and table["live"]["step / total"] == "6 / 20"
    assert table["live"]["ETA"] == "0:00:07" and table["done"]["method"] == "sfd"


def test_api_finished_run_curves_report_and_grids(panel):
    _, client = panel
    note, loss, lr, grad, report, config = client.predict("done", 0.0, api_name="/run")
    assert note.startswith("**done**: finished at 20 / 20")
    points = {(it, step): v for it, v, step in loss["data"]}
    assert len(points) == 40 and points[(4, "step 1")] == 2.5 and points[(4, "step 2")] == 1.25
    assert len(lr["data"]) == 20 and len(grad["data"]) == 40
    assert report["headers"] == ["method", "nfe", "psnr_db", "fd"] and report["data"][1][:3] == ["sfd", 3, 25.1]
    assert config["iters"] == 20 and config["sample_every"] == 5
    smoothed = client.predict("done", 0.9, api_name="/run")[1]
    assert {(it, step): v for it, v, step in smoothed["data"]}[(4, "step 1")] > 2.5  # lags the falling loss

    from PIL import Image

    slider, image, caption = client.predict("done", 1, api_name="/grid")
    assert slider["value"] == 1 and slider["maximum"] == 3 and caption.startswith("iteration 10 (grid 2 of 4)")
    assert Image.open(image).size == (3 * (8 * 17 + 1), 3 * (3 * 17 + 1))  # 8 columns, 3 rows of 16x16


def test_api_sees_a_run_being_written(panel):
    root, client = panel
    before = client.predict("live", 0.0, api_name="/run")[1]["data"]
    assert max(it for it, _, _ in before) == 6
    with open(root / "live" / "metrics.jsonl", "a") as f:
        f.write(metrics_line(7) + metrics_line(8)[:30])  # iteration 8 is half-written
    note, loss, *_ = client.predict("live", 0.0, api_name="/run")
    assert max(it for it, _, _ in loss["data"]) == 7 and "still being written" in note
    with open(root / "live" / "metrics.jsonl", "a") as f:
        f.write(metrics_line(8)[30:] + "garbage\n")
    note, loss, *_ = client.predict("live", 0.0, api_name="/run")
    assert max(it for it, _, _ in loss["data"]) == 8
    assert "malformed: metrics.jsonl: 1 malformed line(s) (9) skipped" in note
    live = {row["run"]: row for row in client.predict(api_name="/runs")}["live"]
    assert live["step / total"] == "8 / 20" and "malformed" in live["note"]


@pytest.mark.parametrize("name", ["../..", "/etc", "live/../..", "..", "live/samples"])
def test_api_refuses_paths_outside_the_root(panel, name):
    _, client = panel
    note, loss, lr, grad, report, config = client.predict(name, 0.0, api_name="/run")
    assert note.startswith("refused") and loss["data"] == [] and config in ({}, None)
    slider, image, caption = client.predict(name, 0, api_name="/grid")
    assert image is None and caption.startswith("refused")
    assert client.predict(name, api_name="/stop").startswith("refused")
    assert client.predict(name, "builtin", "sfd", 2, 2, 2, api_name="/start").startswith("refused")


def test_a_foreign_host_header_is_refused(panel):
    """DNS rebinding: a page elsewhere reaching the panel under its own name gets nothing and starts nothing."""
    import urllib.error
    import urllib.request

    root, client = panel
    for path, data in (("/gradio_api/info", None), ("/gradio_api/call/runs", b'{"data": []}'),
                       ("/gradio_api/call/start", b'{"data": ["evil", "builtin", "sfd", 2, 2, 2, ""]}')):
        request = urllib.request.Request(client.src.rstrip("/") + path, data=data,
                                         headers={"Host": "attacker.example", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10)
        assert err.value.code == 400
    assert not (root / "evil").exists()
    ok = urllib.request.Request(client.src.rstrip("/") + "/gradio_api/info", headers={"Host": "localhost"})
    assert urllib.request.urlopen(ok, timeout=10).status == 200


def test_auth_keeps_the_api_behind_a_login(tmp_path):
    import urllib.error
    import urllib.request

    from distill_core.panel.app import build
    from distill_core.panel.launch import serve_options

    fake_run(tmp_path, "done", 20, state="finished", report=True)
    app = build(tmp_path)
    _, url, _ = app.launch(prevent_thread_lock=True, quiet=True, **serve_options(auth=("ann", "secret")))
    try:
        for path in ("/gradio_api/info", "/config"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(url.rstrip("/") + path, timeout=10)
            assert err.value.code == 401
    finally:
        app.close()


def test_start_and_stop_leave_a_resumable_checkpoint(panel):
    """A real distillation process started through the API, stopped with SIGINT, resumed here."""
    from distill_core.config import DistillConfig
    from distill_core.methods import build_method
    from distill_core.sources import builtin_source
    from distill_core.train.trainer import Trainer

    root, client = panel
    assert client.predict("tiny", "builtin", "sfd", 2, 1000, 2, api_name="/start").startswith("started")
    assert client.predict("tiny", "builtin", "sfd", 2, 1000, 2, api_name="/start").startswith("refused")
    run = root / "tiny"
    deadline = time.time() + 120
    while len(runs.read_metrics(run)[0].records) < 2:
        assert time.time() < deadline, (run / "log.txt").read_text()
        time.sleep(0.2)
    assert {row["run"]: row for row in client.predict(api_name="/runs")}["tiny"]["status"] == "running"
    assert client.predict("tiny", api_name="/stop").startswith("stopping")
    while runs.summarize(run).state == "stopping":  # until the iteration ends
        assert time.time() < deadline, (run / "log.txt").read_text()
        time.sleep(0.2)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and status["iteration"] >= 2 and not (run / "STOP").exists()

    cfg = DistillConfig.from_yaml(run / "config.yaml")
    trainer = Trainer(build_method(builtin_source(), cfg), cfg.replace(iters=status["iteration"] + 1), run)
    result = trainer.fit(resume=True)
    assert result.status == "done" and result.iteration == status["iteration"] + 1
    assert [r["iter"] for r in runs.read_metrics(run)[0].records] == list(range(1, result.iteration + 1))


def test_stop_ends_a_run_that_is_still_loading_its_teacher(tmp_path):
    """Before its first iteration a run has nothing to checkpoint: Stop ends the process."""
    from distill_core.panel.jobs import Jobs

    jobs = Jobs(tmp_path)
    jobs.start("early", "builtin", "sfd", 2, 1000, 2)
    assert jobs.stop("early").startswith("stopped 'early': it was not training (loading the teacher")
    jobs.procs["early"].wait(timeout=60)
    assert not jobs.alive("early") and not (tmp_path / "early" / "checkpoints").exists()
    assert jobs.stop("early") == "'early' is not training"


def test_stop_asks_any_run_that_trains_under_the_root_and_no_other(tmp_path):
    """Stop is a file in the run folder, so it reaches a run whichever process trains it (another terminal's,
    a ComfyUI node's): one that trains gets the request; a finished run, one whose process is gone and a
    name outside the root get none."""
    from distill_core.panel.jobs import Jobs

    jobs = Jobs(tmp_path)
    elsewhere = fake_run(tmp_path, "elsewhere", 6)  # trained by another live process (here: this one)
    assert jobs.stop("elsewhere") == "stopping 'elsewhere': it saves a checkpoint after this iteration (resume " \
                                     "with --resume)"
    assert (elsewhere / "STOP").is_file() and runs.summarize(elsewhere).state == "stopping"
    assert jobs.stop("elsewhere") == "'elsewhere' is stopping: it saves a checkpoint after this iteration"
    for name, settings in (("stale", {"pid": dead_pid()}), ("done", {"state": "finished", "report": True})):
        fake_run(tmp_path, name, 6, **settings)
        assert jobs.stop(name) == f"{name!r} is not training" and not (tmp_path / name / "STOP").exists()
    assert jobs.stop("nothing") == "'nothing' is not training"
    assert jobs.stop("../elsewhere").startswith("refused") and jobs.stop(None) == "choose the run to stop"


def test_a_run_process_imports_the_package_the_panel_runs_from_even_in_an_isolated_python(tmp_path, monkeypatch):
    """The panel's child command names the package's folder itself: a Python that ignores PYTHONPATH and the
    user's site (``-I``; ComfyUI's Windows portable build, through its ``._pth`` file) imports the package the
    panel was loaded from (here a marked copy), not an installed one."""
    import shutil
    import subprocess

    import distill_core
    from distill_core.panel import jobs

    copy = tmp_path / "custom_nodes" / "pack" / "distill_core"
    shutil.copytree(Path(distill_core.__file__).parent, copy, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    cli = copy / "cli.py"
    cli.write_text(cli.read_text().replace("Command line:", "Command line of the copy in custom_nodes:", 1))
    monkeypatch.setattr(distill_core, "__file__", str(copy / "__init__.py"))
    executable, *rest = jobs.command_line()
    done = subprocess.run([executable, "-I", *rest, "--help"], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "nothing")}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Command line of the copy in custom_nodes" in done.stdout


def test_the_panel_command_serves_on_localhost(tmp_path):
    """docs/panel.md's ``python -m distill_core panel --runs DIR`` (with a port), stopped with Ctrl-C (SIGINT),
    also when started as a background job that inherits SIGINT ignored (``nohup ... &``), and in an environment
    that names a proxy (one that refuses every connection), which requests to this machine go past."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    from gradio_client import Client

    fake_run(tmp_path, "done", 20, state="finished", report=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "distill_core", "panel", "--runs", str(tmp_path),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
                            env={**os.environ, "HTTP_PROXY": "http://127.0.0.1:9", "ALL_PROXY": "http://127.0.0.1:9",
                                 "NO_PROXY": "example.org"})
    try:
        line, deadline = "", time.time() + 120
        while "Running on local URL" not in line:
            assert time.time() < deadline and proc.poll() is None, line
            line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in line
        client = Client(line.split()[-1], verbose=False)
        assert [row["run"] for row in client.predict(api_name="/runs")] == ["done"]
        client.close()  # its open heartbeat stream would hold the server's graceful shutdown
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        finally:
            proc.kill()  # never left running, whatever failed (a no-op once it has exited)


def test_a_port_out_of_range_is_refused_by_the_parser(tmp_path, capsys):
    from distill_core.cli import main

    with pytest.raises(SystemExit):
        main(["panel", "--runs", str(tmp_path), "--port", "99999"])
    assert "argument --port: 99999: give a port from 1 to 65535" in capsys.readouterr().err


def test_a_port_another_server_holds_is_one_line_that_names_it(tmp_path, capsys):
    import socket

    from distill_core.cli import main

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["panel", "--runs", str(tmp_path), "--port", str(port)]) == 1
    assert capsys.readouterr().err == (f"error: port {port} cannot be bound on 127.0.0.1 (another server holds it, or "
                                       "the system reserves it): give another --port, or none for the first free one "
                                       "from 7860\n")

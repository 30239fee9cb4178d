"""Fault injection on files the user hands over: damaged student files, hostile run folders for the panel,
malformed workflow graphs. Each case checks the message and that nothing on disk was changed."""

from __future__ import annotations

import copy
import hashlib
import json
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import distill_core.workflow as wf
from distill_core.builtin import fingerprint
from distill_core.panel import runs
from distill_core.safetensors_io import CARD_KEY, load, read_card
from distill_core.student_files import check_fits, load_student, save_student, student_card
from distill_core.students import StudentNet

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from panel_fixtures import fake_run  # noqa: E402


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def student_file(tiny_edm, tmp_path) -> Path:
    net = StudentNet(copy.deepcopy(tiny_edm))
    sigmas = {2: torch.tensor([80.0, 1.0, 0.006])}
    card = student_card("sfd", "euler_afs", [2], sigmas, {"name": "karras"}, "distilled", 2.0,
                        fingerprint(tiny_edm), afs=True, afs_center="zero")
    return save_student(tmp_path / "s.safetensors", net, card)


def _rewrite(path: Path, tensors: dict, card_text: str) -> None:
    save_file(tensors, str(path), metadata={CARD_KEY: card_text})


@pytest.mark.parametrize(("damage", "message"), [
    ("truncate", "is not a readable safetensors file"),
    ("pickle", "is not a readable safetensors file"),
    ("card_not_json", "its comfyui-distill metadata is not JSON"),
    ("card_not_object", "its comfyui-distill metadata is not a JSON object"),
    ("card_without_sigmas", "its student card lacks or garbles sigmas"),
    ("card_without_guidance", "lacks or garbles guidance"),
])
def test_a_damaged_student_file_is_named_with_what_is_wrong(tiny_edm, student_file, damage, message):
    tensors, card = load(student_file)
    if damage == "truncate":
        data = student_file.read_bytes()
        student_file.write_bytes(data[: len(data) // 2])
    elif damage == "pickle":
        student_file.write_bytes(b"\x80\x04\x95" + b"\0" * 64)
    elif damage == "card_not_json":
        _rewrite(student_file, tensors, "{not json")
    elif damage == "card_not_object":
        _rewrite(student_file, tensors, "[1, 2]")
    else:
        key = damage.removeprefix("card_without_")
        _rewrite(student_file, tensors, json.dumps({k: v for k, v in card.items() if k != key}))
    before = student_file.read_bytes()
    with pytest.raises(ValueError, match=message) as err:
        load_student(student_file, tiny_edm, torch.tensor([10]))
    assert str(student_file) in str(err.value)
    assert student_file.read_bytes() == before


def test_weights_that_do_not_fit_are_refused_when_loaded_not_later(tiny_edm, student_file):
    tensors, card = load(student_file)
    first = next(iter(tensors))
    _rewrite(student_file, {k: v for k, v in tensors.items() if k != first}, json.dumps(card))
    with pytest.raises(ValueError, match=f"{student_file}: its weights do not fit this teacher's network"):
        check_fits(student_file, tiny_edm)
    with pytest.raises(ValueError, match=f"{student_file}: its weights do not fit the teacher's network"):
        load_student(student_file, tiny_edm, torch.tensor([10]))
    assert read_card(student_file) == card


# ------------------------------------------------------------------ hostile run folders for the panel
def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def test_one_hostile_run_never_breaks_the_table_or_the_others(tmp_path):
    from distill_core.panel.app import open_image, runs_rows
    from distill_core.panel.jobs import Jobs

    fake_run(tmp_path, "good", done=10)
    bad = fake_run(tmp_path, "bad", done=10)
    (bad / "metrics.jsonl").write_text('{"iter": 1, "time": NaN, "lr": Infinity, "loss": {"1": NaN}}\n'
                                       '{"iter": 1e999, "loss": {}}\n')
    (bad / "status.json").write_text(json.dumps({"state": "running", "pid": 10**30, "iteration": 1e300}))
    (bad / "config.yaml").write_text("a: &x [*x]\nmethod: sfd\n")
    (bad / "samples" / "iter_000005.png").write_bytes(_png_header(200_000, 200_000))
    before = _digest(tmp_path)
    rows = {r[0]: r for r in runs_rows(tmp_path, Jobs(tmp_path))}
    assert rows["good"][1] == "running" and rows["good"][4] == "10 / 20"
    assert rows["bad"][1] == "stale" and "config.yaml: malformed (recursive aliases" in rows["bad"][7]
    metrics, problem = runs.read_metrics(bad)
    assert [r["time"] for r in metrics.records] == [None] and metrics.records[0]["loss"] == {}
    assert "1 malformed line" in problem
    assert open_image(bad / "samples" / "iter_000005.png") is None
    assert _digest(tmp_path) == before


# ------------------------------------------------------------------ malformed workflow graphs
@pytest.mark.parametrize(("graph", "message"), [
    ([{"class_type": "DistillBuiltinTeacher"}], "a JSON object of nodes by id, not a list"),
    ({"1": {"class_type": "DistillBuiltinTeacher"}}, "node 1: a node is an object with 'class_type' and 'inputs'"),
    ({"1": {"inputs": {}}}, "node 1: a node is an object with 'class_type' and 'inputs'"),
    ({"1": "DistillBuiltinTeacher"}, "node 1: a node is an object"),
])
def test_malformed_workflow_graphs_get_a_clear_error(graph, message):
    with pytest.raises(ValueError, match=message):
        wf.run_graph(graph)


def test_the_workflow_command_prints_one_line(tmp_path, capsys):
    from distill_core.cli import main

    path = tmp_path / "graph.json"
    path.write_text("[1, 2")
    assert main(["run-workflow", str(path)]) == 1
    said = capsys.readouterr().err
    assert said.startswith(f"error: {path} is not JSON") and len(said.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["run-workflow", "ui-workflow"])
@pytest.mark.parametrize(("content", "message"), [
    (None, "no workflow file {path}: give an API-format workflow JSON"),
    ('{"nodes": [], "links": []}', "{path} is a UI-format workflow: give its API-format twin"),
    ("{}", "invalid workflow:\n  it has no nodes: an API-format workflow is a JSON object of nodes by id"),
    ("[]", "invalid workflow:\n  an API-format workflow is a JSON object of nodes by id, not a list"),
])
def test_the_workflow_commands_refuse_a_missing_or_ui_format_file(tmp_path, capsys, command, content, message):
    from distill_core.cli import main

    path = tmp_path / "graph.json"
    if content is not None:
        path.write_text(content)
    extra = [str(tmp_path / "ui.json")] if command == "ui-workflow" else []
    assert main([command, str(path), *extra]) == 1
    said = capsys.readouterr().err
    assert said.startswith("error: " + message.format(path=path)), said
    assert len(said.strip().splitlines()) == message.count("\n") + 1 and not (tmp_path / "ui.json").exists()


def test_a_folder_that_cannot_be_made_is_named_in_one_line_before_the_run_trains(tmp_path, capsys):
    """A teacher cache under a file: the system's error, as one line naming the path and the fix, before the
    first iteration (no metrics written)."""
    from distill_core.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = tmp_path / "run"
    assert main(["distill", "--teacher-cache", str(blocker / "cache"), "--iters", "1", "--batch", "2",
                 "--out", str(out), "--no-progress"]) == 1
    said = capsys.readouterr().err
    assert said == (f"error: {blocker / 'cache'}: not a directory (give a path whose folder exists and that this "
                    "user may read and write)\n")
    assert not (out / "metrics.jsonl").exists()


def test_a_file_in_place_of_the_run_folder_is_named_in_one_line(tmp_path, capsys):
    from distill_core.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("what the user had")
    assert main(["distill", "--iters", "1", "--batch", "2", "--out", str(blocker), "--no-progress"]) == 1
    assert capsys.readouterr().err == f"error: {blocker}: file exists (a file stands where a folder goes: give a " \
                                      "folder's path)\n"
    assert blocker.read_text() == "what the user had"


def test_a_full_disk_is_one_line_that_says_how_to_go_on(tmp_path, capsys, monkeypatch):
    """The system's refusal to write (no space, no filename in the error) as one line with the fix, not a
    traceback."""
    import errno

    from distill_core import atomic
    from distill_core.cli import main

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    assert main(["distill", "--iters", "1", "--batch", "2", "--out", str(tmp_path / "run"), "--no-progress"]) == 1
    assert capsys.readouterr().err == ("error: no space left on device (free some space and run it again: with "
                                       "--resume a run goes on from its last checkpoint)\n")


@pytest.mark.parametrize("command", [["sample"], ["compare"], ["export-diffusers", "--out", "{tmp}/export"]])
def test_a_teacher_file_given_as_a_student_is_named_in_one_line(tmp_path, capsys, command):
    """sample, compare and export-diffusers read the file's card as a student's before anything else."""
    from distill_core.builtin import TEACHER_PATH
    from distill_core.cli import main

    args = [command[0], str(TEACHER_PATH), *(a.format(tmp=tmp_path) for a in command[1:])]
    assert main(args) == 1
    assert capsys.readouterr().err == f"error: {TEACHER_PATH} is not a student file (its card says kind='teacher')\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, shipped", [(["train-teacher"], "TEACHER_PATH"),
                                              (["train-teacher", "--flow"], "FLOW_TEACHER_PATH"),
                                              (["train-classifier"], "CLASSIFIER_PATH"),
                                              (["finetune-teacher"], None)])
def test_the_asset_commands_refuse_to_write_over_a_file_before_training(capsys, command, shipped):
    """train-teacher, train-classifier and finetune-teacher write the shipped assets by default: written over,
    they would change what every student of them is checked against, so an existing file is refused in one
    line (before the first step) unless --replace says so."""
    from distill_core import builtin
    from distill_core.cli import main
    from distill_core.finetune_builtin import FINETUNE_PATH

    path = getattr(builtin, shipped) if shipped else FINETUNE_PATH
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    assert main(command) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} exists (")
    assert err.endswith("give --out with a new file's path, or --replace to write over it\n")
    assert err.count("\n") == 1
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_replace_lets_finetune_teacher_write_over_its_out_file(tmp_path):
    """With --replace the command trains and writes over the file at --out."""
    from distill_core.cli import main
    from distill_core.safetensors_io import read_card

    out = tmp_path / "bold.safetensors"
    out.write_bytes(b"an earlier file")
    assert main(["finetune-teacher", "--out", str(out), "--steps", "1"]) == 1
    assert out.read_bytes() == b"an earlier file"
    assert main(["finetune-teacher", "--out", str(out), "--steps", "1", "--replace"]) == 0
    assert read_card(out)["steps"] == 1

"""Several processes: ``accelerate launch --multi_gpu --num_processes 2`` runs the trainer on the CPU (gloo),
and two processes with the same global batch train the student one process trains with as many
micro-batches (each micro-batch's draws depend on the seed, the iteration and its index alone; shared draws
come from ``plan``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_source
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "train_builtin.py"
#: two processes on the CPU over gloo (``--multi_gpu`` is accelerate's multi-process launcher; without CUDA
#: the processes train on the CPU)
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]

#: the same launch from the config file the docs give for a sharded teacher
SHARDED_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(ROOT / "docs" / "accelerate" / "sharded_teacher.yaml"), "--dynamo_backend", "no"]


#: one thread per process, and the CPU even on a CUDA machine (two processes on one GPU is not the point)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}


def run(*commands: list[str]) -> list[str]:
    """What each command printed; they run side by side (independent runs: a launch's processes wait on each
    other's collectives, so a third process beside them costs less than running after them)."""
    logs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in commands]  # no pipe to fill
    started = [subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=out, stderr=err, text=True)
               for command, (out, err) in zip(commands, logs)]
    printed = []
    for process, (out, err) in zip(started, logs):
        process.wait(timeout=600)
        out.seek(0)
        err.seek(0)
        text = out.read()
        assert process.returncode == 0, text[-2000:] + err.read()[-4000:]
        printed.append(text)
    return printed


def test_two_processes_train_the_student_of_one_process_with_two_micro_batches(tmp_path):
    printed, _ = run([*LAUNCH, str(SCRIPT), str(tmp_path / "two"), "1"], [sys.executable, str(SCRIPT),
                                                                           str(tmp_path / "one"), "2"])
    assert "process 0:" in printed and "process 1:" in printed  # two processes trained
    two = load_file(tmp_path / "two" / "student.safetensors")
    one = load_file(tmp_path / "one" / "student.safetensors")
    assert two.keys() == one.keys()
    for name, weight in one.items():
        assert torch.allclose(two[name], weight, rtol=1e-4, atol=1e-6), (name, (two[name] - weight).abs().max())
    # the metrics (written by the main process) hold the loss of the whole global batch, as one process's do
    losses = {k: [json.loads(line)["loss"] for line in (tmp_path / k / "metrics.jsonl").read_text().splitlines()]
              for k in ("one", "two")}
    assert len(losses["two"]) == 3
    for a, b in zip(losses["one"], losses["two"]):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-4 * abs(a[k]) for k in a), (a, b)


def test_a_stop_request_that_the_main_process_reads_stops_every_process_after_the_same_iteration(tmp_path):
    """Only the main process reads the run's ``STOP`` file; the processes agree on it before each iteration, so
    the other one stops too (without that it would wait in the next iteration's collectives for ever)."""
    (printed,) = run([*LAUNCH, str(SCRIPT), str(tmp_path / "stop"), "1", "8", "stop"])
    assert "process 0: stopped" in printed and "process 1: stopped" in printed
    assert json.loads((tmp_path / "stop" / "checkpoints" / "checkpoint.json").read_text())["iteration"] == 1
    assert not (tmp_path / "stop" / "STOP").exists()


def test_a_global_batch_that_the_processes_do_not_divide_is_refused(tmp_path):
    done = subprocess.run([*LAUNCH, str(SCRIPT), str(tmp_path / "odd"), "2", "6"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "batch 6 over 2 processes leaves 3 each, which 2 micro-batches do not divide" in done.stderr


def test_a_teacher_sharded_over_two_processes_trains_the_lora_student_of_one_process(tmp_path):
    """``shard_teacher`` from the command line, launched with the config file the docs give: each process holds
    half the teacher's weights (the main process plans memory for its half), the two train, preview and save
    the LoRA student one unsharded process trains, and the main process reports on the teacher loaded again,
    whole. Gathered weights give the teacher's outputs bit for bit (the UNet lays out its convolutions' inputs
    so that the kernels do not depend on the weights' layout); the sums over micro-batches and processes round
    differently (about 1e-7), which three steps of Adam, whose first updates normalise each gradient entry,
    grow to about 5e-7 here: the tolerance leaves room for an entry whose gradient is that small."""
    sharded = tmp_path / "sharded"
    _, alone = run([*SHARDED_LAUNCH, "-m", "distill_core", "distill", "--shard-teacher", "--student", "lora",
                    "--steps", "4", "--iters", "3", "--batch", "8", "--checkpoint-every", "2", "--seed", "0",
                    "--sample-every", "2", "--eval-samples", "8", "--report-solvers", "euler", "--reference-steps", "8",
                    "--no-progress", "--out", str(sharded)],
                   [sys.executable, str(SCRIPT), str(tmp_path / "one"), "2", "8", "lora", "samples"])
    whole, total, planned = map(int, re.search(r"held (\d+) of (\d+); memory plan frozen (\d+)", alone).groups())
    report = json.loads((sharded / "report.json").read_text())
    assert whole == total and report["iterations"] == 3 and report["student_psnr_db"] > 0
    assert abs(report["memory_plan"]["frozen_bytes"] - planned / 2) < 0.01 * planned  # the main process's half
    students = [load_file(folder / "student.safetensors") for folder in (sharded, tmp_path / "one")]
    assert students[0].keys() == students[1].keys() and any(k.endswith("lora_up.weight") for k in students[1])
    for name, weight in students[1].items():
        got = students[0][name]
        assert torch.allclose(got, weight, rtol=1e-3, atol=1e-5), (name, (got - weight).abs().max())
    grids = [np.asarray(Image.open(folder / "samples" / "iter_000002.png"), dtype=int)
             for folder in (sharded, tmp_path / "one")]
    assert grids[0].shape == grids[1].shape and np.abs(grids[0] - grids[1]).max() <= 2


def test_a_sharded_teacher_is_refused_in_one_process_and_beside_ema(tmp_path, tiny_edm):
    from distill_core.config import DistillConfig
    from distill_core.train.run import train_student

    source = tiny_source(tiny_edm)
    for settings, refusal in (({}, "this run has one process"), ({"ema": 0.99}, "train without ema"),
                              ({"teacher_cache": str(tmp_path / "c")}, "train without teacher_cache")):
        cfg = DistillConfig(teacher="tiny", student="lora", steps=2, iters=1, batch=4, shard_teacher=True,
                            out=str(tmp_path / "run"), **settings)
        with pytest.raises(ValueError, match=refusal):
            train_student(cfg, source, progress=False)


def test_accelerates_own_fsdp_mode_is_refused_with_the_way_to_shard(tmp_path, tiny_edm):
    """accelerate's FSDP mode shards the networks accelerate prepares (the trained ones), not the teacher a
    full-weight student learns from; the trainer refuses it and names --shard-teacher."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from distill_core.config import DistillConfig
    from distill_core.methods.registry import build_method
    from distill_core.train.trainer import Trainer

    source = tiny_source(tiny_edm)
    cfg = DistillConfig(teacher="tiny", steps=2, iters=1, batch=4, out=str(tmp_path))
    with pytest.raises(ValueError, match="give --shard-teacher"):
        Trainer(build_method(source, cfg), cfg, accelerator=SimpleNamespace(distributed_type=DistributedType.FSDP))

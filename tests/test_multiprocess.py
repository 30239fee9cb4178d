"""Several processes: ``accelerate launch --multi_gpu --num_processes 2`` runs the trainer on the CPU (gloo),
and two processes with the same global batch train the student one process trains with as many
micro-batches (each micro-batch's draws depend on the seed, the iteration and its index alone; shared draws
come from ``plan``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "train_builtin.py"
#: two processes on the CPU over gloo (``--multi_gpu`` is accelerate's multi-process launcher; without CUDA
#: the processes train on the CPU)
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


#: one thread per process, and the CPU even on a CUDA machine (two processes on one GPU is not the point)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}


def run(command: list[str]) -> str:
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_two_processes_train_the_student_of_one_process_with_two_micro_batches(tmp_path):
    printed = run([*LAUNCH, str(SCRIPT), str(tmp_path / "two"), "1"])
    assert "process 0:" in printed and "process 1:" in printed  # two processes trained
    run([sys.executable, str(SCRIPT), str(tmp_path / "one"), "2"])
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


def test_a_global_batch_that_the_processes_do_not_divide_is_refused(tmp_path):
    done = subprocess.run([*LAUNCH, str(SCRIPT), str(tmp_path / "odd"), "2", "6"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "batch 6 over 2 processes leaves 3 each, which 2 micro-batches do not divide" in done.stderr

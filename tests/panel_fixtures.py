"""Tiny run directories for the panel's tests, written file by file as the trainer and the main job
would (no training): config, status, metrics lines, sample grids, report."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from distill_core.config import DistillConfig
from distill_core.report import save_grid, write_report
from distill_core.train.status import write_status


def metrics_line(it: int) -> str:
    """A metrics.jsonl line of an SFD run at NFE 3 with AFS (student steps 1 and 2)."""
    loss = {"1": round(10 / it, 4), "2": round(5 / it, 4)}
    return json.dumps({"nfe": 3, "lr": 2e-4, "loss": loss, "grad_norm": {"1": 1.0, "2": 0.5},
                       "nonfinite_grads": 0, "iter": it, "time": 0.5 * it}) + "\n"


def grid(out: Path, it: int) -> Path:
    """A 3-row sample grid like the trainer's, with pixels that depend on ``it``."""
    gen = torch.Generator().manual_seed(it)
    rows = [torch.rand((8, 1, 16, 16), generator=gen) * 2 - 1 for _ in range(3)]
    return save_grid(rows, out / "samples" / f"iter_{it:06d}.png")


def fake_run(root: Path, name: str, done: int, iters: int = 20, state: str = "running",
             pid: int | None = None, report: bool = False) -> Path:
    """A run of ``iters`` iterations with ``done`` of them logged (a grid every 5) in ``state``."""
    out = root / name
    DistillConfig(method="sfd", steps=3, iters=iters, sample_every=5, out=str(out)).to_yaml(
        _mkdir(out) / "config.yaml"
    )
    write_status(out, state, iteration=done, iters=iters, started=time.time() - done)
    if pid is not None:  # write_status stamps the writer's pid; a run owned by another process
        status = json.loads((out / "status.json").read_text())
        (out / "status.json").write_text(json.dumps({**status, "pid": pid}))
    (out / "metrics.jsonl").write_text("".join(metrics_line(i) for i in range(1, done + 1)))
    for it in range(5, done + 1, 5):
        grid(out, it)
    if report:
        rows = [{"method": "dpmpp_2m", "nfe": 3, "psnr_db": 21.5, "fd": 1.2},
                {"method": "sfd", "nfe": 3, "psnr_db": 25.1, "fd": 0.6}]
        write_report(out, {"method": "sfd", "steps": 3, "rows": rows, "config": {"iters": iters}})
        save_grid([torch.zeros(4, 1, 16, 16)] * 3, out / "grid.png")
    return out


def dead_pid() -> int:
    """The id of a process that has exited."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path

"""Progress callbacks: how the trainer reports to whoever runs it (tqdm on the command line;
ComfyUI's progress bar and the panel plug in the same way). A callback sees the run through a narrow
``RunView`` (iteration, total, output folder, ``preview(count)``) and can ask it to stop after the current
iteration with ``run.request_stop()``; the trainer then checkpoints and returns its ``TrainResult``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from distill_core.memory_plan import MemoryPlan


class RunView(Protocol):
    """What callbacks see of a run: its iteration and total, its folder, its memory plan (made before its first
    iteration), a preview of the student, and a way to ask it to stop after the current iteration
    (checkpointing first)."""

    @property
    def iteration(self) -> int: ...

    @property
    def total(self) -> int: ...

    @property
    def out(self) -> Path: ...

    @property
    def memory_plan(self) -> MemoryPlan: ...

    def preview(self, count: int = 4) -> torch.Tensor:
        """``count`` samples of the current student from fixed noise (model space: latents or pixels)."""

    def request_stop(self) -> None: ...


@dataclass
class TrainResult:
    """How a run ended (``Trainer.fit``), as ``on_end`` sees it."""

    status: str  # "done" or "interrupted"
    iteration: int
    seconds: float  # training wall time, summed over resumed runs
    nonfinite_grads: int  # updates in which non-finite gradient entries were zeroed
    teacher_evaluations: int  # the teacher's network evaluations of the whole run
    student: nn.Module  # the trained student (EMA weights when EMA is on), unwrapped (``Trainer.export_student``)


class Callback:
    """Hooks called by the trainer on the main process; override the ones you need. A callback may
    raise its host's cancel exception (ComfyUI's interrupt); the trainer checkpoints first, and records
    the run as interrupted when the exception's type is one of ``cancels`` (else as failed)."""

    cancels: tuple[type[BaseException], ...] = ()

    def poll(self) -> None:
        """Before every network evaluation of the run; raise a cancel exception here to stop within one
        evaluation (the trainer keeps the run resumable, ``Trainer._cancellable_iteration``)."""

    def on_start(self, run: RunView) -> None:
        pass

    def on_iteration(self, run: RunView, record: dict) -> None:
        """After every iteration; ``record`` is the line written to metrics.jsonl."""

    def on_end(self, run: RunView, result: TrainResult) -> None:
        pass


class TqdmProgress(Callback):
    """A tqdm bar over iterations with the iteration's last loss."""

    def __init__(self, desc: str = "distill"):
        self.desc, self.bar = desc, None

    def on_start(self, run: RunView) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=run.total, initial=run.iteration, desc=self.desc, unit="it", dynamic_ncols=True)

    def on_iteration(self, run: RunView, record: dict) -> None:
        losses = record["loss"]
        if losses:
            self.bar.set_postfix(loss=f"{list(losses.values())[-1]:.4g}", nfe=record.get("nfe"))
        self.bar.update(1)

    def on_end(self, run: RunView, result: TrainResult) -> None:
        if self.bar is not None:
            self.bar.close()


class StopAt(Callback):
    """Stop (checkpoint and return) once ``iteration`` iterations are done, as Ctrl-C would."""

    def __init__(self, iteration: int):
        self.at = iteration

    def on_iteration(self, run: RunView, record: dict) -> None:
        if run.iteration >= self.at:
            run.request_stop()

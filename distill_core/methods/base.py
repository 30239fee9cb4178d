"""What a distillation method is, for the trainer, the student files, the CLI and the nodes.

A method owns its student (an ``nn.Module``; the trainer prepares, optimises and checkpoints it)
and describes one training iteration as a stream of losses: the trainer back-propagates each one
and takes an optimizer step after it. SFD, for example, yields one loss per student step and
needs an update after each; a method with one update per iteration yields once.

An iteration has two parts so that gradient accumulation and multi-process training stay in
lockstep: ``plan(generator)`` draws what every micro-batch and every process must share (SFD-v's
step count; the trainer seeds this generator identically on every process), and
``losses(plan, batch, generator)`` draws one micro-batch (noise, conditions) and yields its losses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from distill_core.denoisers.base import Cond


@dataclass
class TeacherSource:
    """A teacher ready for distillation: its denoiser (frozen), the sample shape, a sampler of
    training conditions, the unconditional condition for CFG, the default guidance scale, and
    ``classes``: how many class labels its conditions are drawn from (labels 0 .. classes - 1, the null
    condition is label ``classes``), or 0 when they are not class labels (prompts)."""

    name: str
    denoiser: nn.Module
    shape: tuple[int, ...]
    draw_cond: Callable[[int, torch.Generator], Cond]
    uncond: Cond
    guidance: float
    classes: int = 0


class StepLoss(NamedTuple):
    """The loss of one update; ``index`` says which step of the iteration it belongs to (for metrics)."""

    index: int
    loss: torch.Tensor


@runtime_checkable
class Method(Protocol):
    name: str
    student: nn.Module
    source: TeacherSource
    sigma_max: float  # the noise level x_N = sigma_max z starts from

    def to(self, device: torch.device) -> Method:
        """Move the frozen parts (teacher) to ``device``; the trainer places the student."""
        ...

    def plan(self, generator: torch.Generator) -> dict:
        """Choices shared by every micro-batch and process of one iteration."""
        ...

    def losses(self, plan: dict, batch: int, generator: torch.Generator) -> Iterator[StepLoss]:
        """Draw a micro-batch and yield one loss per optimizer update."""
        ...

    def preview(self, noise: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Sample images with the current student (for grids during training)."""
        ...

    def card(self) -> dict:
        """The metadata of the student file this method produces."""
        ...

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors the student file carries besides the network (SFD's class-mean table)."""
        ...

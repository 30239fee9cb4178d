"""Where phased score distillation's inputs x ~ p_t come from: forward-noised data of the built-in data
set, or states of teacher trajectories solved once (data-free)."""

from __future__ import annotations

import torch

from distill_core.data import load_mnist
from distill_core.denoisers.base import Cond, index_cond, move_cond, per_sample
from distill_core.methods import phases
from distill_core.methods.base import TeacherSource
from distill_core.schedules import log_snr_uniform


class DataInputs:
    """Forward-noised MNIST: a draw is (x0, n) with x0's class; x(sigma) = x0 + sigma n."""

    def __init__(self, shape: tuple[int, ...]):
        self.images, self.labels = load_mnist("train")
        if tuple(self.images.shape[1:]) != tuple(shape):
            raise ValueError(f"data inputs are MNIST {tuple(self.images.shape[1:])}; the teacher's shape is {shape}")

    def draw(self, n: int, generator: torch.Generator) -> tuple[tuple[torch.Tensor, ...], Cond]:
        idx = torch.randint(self.images.shape[0], (n,), generator=generator)
        noise = torch.randn((n, *self.images.shape[1:]), generator=generator)
        return (self.images[idx], noise), self.labels[idx]

    def redraw(self, base: tuple[torch.Tensor, ...], generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """The same images with fresh noise."""
        x0, noise = base
        return x0, torch.randn(noise.shape, generator=generator).to(noise)

    def at(self, base: tuple[torch.Tensor, ...], sigma: torch.Tensor) -> torch.Tensor:
        x0, noise = base
        return x0 + per_sample(sigma.to(x0), x0) * noise


class TrajectoryInputs:
    """States of teacher trajectories solved once (DPM-Solver++(2M), log-uniform grid): a draw is a
    trajectory; x(sigma) = D_i + (sigma / sigma_i)(x_i - D_i) from the stored state at the grid point
    sigma_i >= sigma just above (a DDIM step with the teacher's stored x0 prediction)."""

    def __init__(self, teacher, source: TeacherSource, n: int, sigma_min: float, sigma_max: float, steps: int,
                 generator: torch.Generator, chunk: int = 64):
        self.grid = log_snr_uniform(steps, sigma_min, sigma_max)
        device = next(source.denoiser.parameters()).device
        xs, ds, conds = [], [], []
        for start in range(0, n, chunk):
            b = min(chunk, n - start)
            noise = torch.randn((b, *source.shape), generator=generator) * sigma_max
            cond = source.draw_cond(b, generator)
            x, d = phases.trajectory(teacher, noise.to(device), self.grid, move_cond(cond, device))
            xs.append(x)
            ds.append(d)
            conds.append(cond)
        self.xs, self.ds = torch.cat(xs), torch.cat(ds)
        self.conds = torch.cat(conds) if isinstance(conds[0], torch.Tensor) else conds[0]
        self.evaluations = n * (steps + 1)

    def draw(self, n: int, generator: torch.Generator) -> tuple[tuple[torch.Tensor, ...], Cond]:
        idx = torch.randint(self.xs.shape[0], (n,), generator=generator)
        return (idx,), index_cond(self.conds, idx)

    def redraw(self, base: tuple[torch.Tensor, ...], generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """A trajectory's state at a noise level is fixed: nothing to draw again."""
        return base

    def to(self, device: torch.device) -> None:
        self.xs, self.ds = self.xs.to(device), self.ds.to(device)

    def at(self, base: tuple[torch.Tensor, ...], sigma: torch.Tensor) -> torch.Tensor:
        (idx,) = base
        grid = self.grid.to(sigma.device)
        i = ((grid[None] >= sigma[:, None] * (1 - 1e-6)).sum(1) - 1).clamp(0, len(grid) - 1)
        x, d = self.xs[idx, i], self.ds[idx, i]
        return d + per_sample(sigma / grid[i], x) * (x - d)

"""The teacher's noise-to-image pairs: the fixed data set of knowledge distillation (Luhman & Luhman 2021)
and rectified flow (Liu et al. 2022), and the data-free images of methods that noise images (consistency
distillation without a data set).

A pool of ``size`` pairs (z_i, c_i, x0_i): noise z ~ N(0, I), a condition c drawn from the teacher source,
and the guided teacher's ODE solution from x_N = sigma_max z,

    x0_i = Phi(sigma_max z_i; c_i),   ``solver`` with ``steps`` steps on the Karras grid from sigma_max
                                      to sigma_min (the solution at sigma_min is the image),

solved on first use in chunks, each chunk from its own generator seeded by (seed, chunk index), so the
pool is a function of the run's seed: a resumed run solves the same pool again (nothing to store in the
checkpoint), and a run with a ``teacher_cache`` reads the chunks it holds. Draws are uniform with
replacement, from the caller's generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill_core.denoisers.base import Cond, cat_all, index_cond, move_cond
from distill_core.methods.base import TeacherSource
from distill_core.options import option
from distill_core.schedules import karras
from distill_core.solvers import SOLVERS
from distill_core.teacher import CFGTeacher
from distill_core.teacher_cache import TeacherCache, source_fingerprint

#: pairs solved at once (bounds the memory of a solve)
CHUNK = 64


@dataclass
class PairsConfig:
    """The settings of a method that trains on the teacher's pairs."""

    pairs: int = option(1024, "teacher pairs (noise, the teacher's image from it) in the pool, solved once at the "
                        "start of the run", min=1, max=10_000_000)
    pair_solver: str = option("heun", "the solver of the teacher's images", choices=tuple(SOLVERS))
    pair_steps: int = option(16, "steps of that solver per teacher image", min=1, max=1000)


class TeacherPairs:
    """The pool of pairs (z, c, x0) of ``teacher`` on ``source``'s conditions (see the module docstring):
    ``opts.pairs`` of them, or ``draws`` where a run draws fewer (no pair is solved that it cannot draw)."""

    def __init__(self, teacher: CFGTeacher, source: TeacherSource, opts: PairsConfig, sigma_min: float,
                 sigma_max: float, seed: int, cache: str | None = None, precision: str = "no",
                 draws: int | None = None):
        self.teacher, self.source, self.opts, self.seed = teacher, source, opts, seed
        self.size = opts.pairs if draws is None else min(opts.pairs, draws)
        self.sigmas = karras(opts.pair_steps, sigma_min, sigma_max)
        self.sigma_max = sigma_max
        self.solver = SOLVERS[opts.pair_solver]
        self.cache = TeacherCache(cache, lambda: {  # ``cache``: the run's teacher_cache folder
            "solve": "teacher pairs", "teacher": source_fingerprint(source), "w": teacher.w,
            "sigmas": self.sigmas.tolist(), "solver": opts.pair_solver, "precision": precision})
        self._pool: tuple[torch.Tensor, Cond, torch.Tensor] | None = None
        self.evaluations = 0  # the teacher's network evaluations spent on the pool

    @torch.no_grad()
    def solve_chunk(self, index: int, n: int, device: torch.device) -> tuple[torch.Tensor, Cond, torch.Tensor]:
        """Pairs ``index * CHUNK`` .. + n: their noise, conditions and the teacher's images."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)

        def solve() -> tuple[tuple, int]:
            z = torch.randn((n, *self.source.shape), generator=gen)
            cond = self.source.draw_cond(n, gen)
            counted = _Counted(self.teacher)
            x0 = self.solver(counted, (z * self.sigma_max).to(device), self.sigmas.to(device), move_cond(cond, device))
            return (z, cond, x0.float().cpu()), counted.calls

        pairs, spent = self.cache.solve(gen, solve, torch.device("cpu"), n=n)
        self.evaluations += spent
        return pairs

    def pool(self, device: torch.device) -> tuple[torch.Tensor, Cond, torch.Tensor]:
        """Every pair (solved on first use)."""
        if self._pool is None:
            chunks = [self.solve_chunk(i, min(CHUNK, self.size - start), device)
                      for i, start in enumerate(range(0, self.size, CHUNK))]
            self._pool = (torch.cat([c[0] for c in chunks]), cat_all([c[1] for c in chunks]),
                          torch.cat([c[2] for c in chunks]))
        return self._pool

    def draw(self, n: int, generator: torch.Generator, device: torch.device
             ) -> tuple[torch.Tensor, Cond, torch.Tensor]:
        """``n`` pairs drawn uniformly with replacement: noise z, conditions c, the teacher's images x0, on
        ``device``."""
        z, cond, x0 = self.pool(device)
        idx = torch.randint(self.size, (n,), generator=generator)
        return z[idx].to(device), move_cond(index_cond(cond, idx), device), x0[idx].to(device)


class PoolCounted:
    """A method's teacher evaluations when it may hold a pool of pairs (``pairs``; None without one): the
    pool's, and those its updates spend besides (``spent``). The trainer sets the count of a resumed run."""

    pairs: TeacherPairs | None = None
    spent: int = 0

    @property
    def teacher_evaluations(self) -> int:
        return self.spent + (0 if self.pairs is None else self.pairs.evaluations)

    @teacher_evaluations.setter
    def teacher_evaluations(self, value: int) -> None:
        self.spent = value - (0 if self.pairs is None else self.pairs.evaluations)


def training_images(source: TeacherSource, pairs: TeacherPairs | None, batch: int, generator: torch.Generator,
                    device: torch.device) -> tuple[torch.Tensor, Cond, int]:
    """x0 and its conditions for methods that train on images: the teacher's data where ``pairs`` is None,
    else the teacher's own images from the pool; and the teacher evaluations the draw spent (the pool is
    solved on its first use)."""
    if pairs is None:
        x0, cond = source.draw_data(batch, generator)
        return x0.to(device), move_cond(cond, device), 0
    spent = pairs.evaluations
    _, cond, x0 = pairs.draw(batch, generator, device)
    return x0, cond, pairs.evaluations - spent


class _Counted:
    """A teacher that counts its network evaluations (per sample, with CFG's two passes)."""

    def __init__(self, teacher: CFGTeacher):
        self.teacher, self.calls = teacher, 0

    def __call__(self, x: torch.Tensor, sigma, cond: Cond = None) -> torch.Tensor:
        self.calls += x.shape[0] * self.teacher.evaluations(sigma)
        return self.teacher(x, sigma, cond)

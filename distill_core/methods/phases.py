"""Phases of the diffusion horizon for phased score distillation: partitions, phase weights, and
noise levels drawn phase by phase.

Time is t = log sigma throughout: the horizon [sigma_min, sigma_max] is split into K phases
I_k = [t_{k+1}, t_k] (k = 0 at the noisy end).

* **uniform**: equal lengths in t.
* **adaptive**: a probe batch is solved by the teacher on a fine log-sigma grid and the drift of its
  score along those trajectories is measured by finite differences. The score is read in the units a
  solver integrates, the x0 form D_T = x + sigma^2 s_T, so the drift density is

      r(t) = || dD_T / dt ||  (RMS per element over the probe batch)  = sigma || d(sigma s_T) / dt ||,

  the quantity that sets the local error of an exponential-integrator step (DPM-Solver++); the raw
  |d s_T / d sigma| grows like sigma^-3 and would put every split at sigma_min. A first-order step
  across phase k errs by at most int_{I_k} ||D_T(t) - D_T(t_k)|| dt <= Delta t_k R_k, with
  R_k = int_{I_k} r dt the phase's integrated drift; the phase with the largest drift bound
  Delta t_k R_k is bisected in t until K phases exist (a constant r gives the uniform partition for K
  a power of two). Splitting by R_k alone leaves long, slowly drifting phases whole: on the built-in
  teacher its 8-point grid ends with one step from 0.69 to 0.006 and loses 10 dB against Karras.
  Every split is recorded in order: the first n + 1 points of that *refinement sequence* are the
  boundaries of the n-phase partition, which is what ``schedules.phased`` samples on.

Phase weights alpha_k, normalised to sum to 1: proportional to the phase length Delta t_k (the loss is
then the plain integral over t) or to V_k, the per-element variance over the probe batch of the
teacher's score in noise units, sigma s_T = (D_T - x) / sigma, averaged over the phase (the raw score's
variance ~ 1 / sigma^2 would hand all the weight to the last phase).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from distill_core.denoisers.base import Cond
from distill_core.schedules import log_snr_uniform
from distill_core.solvers import SOLVERS

PARTITIONS = ("uniform", "adaptive")
PHASE_WEIGHTS = ("dt", "variance")


@dataclass
class Probe:
    """What the teacher's probe trajectories tell about the horizon, on a descending grid of t = log sigma:
    the cumulative drift C(t_i) = sum_{j < i} ||D_{j+1} - D_j|| and the score variance v(t_i)."""

    t: np.ndarray
    cumulative_drift: np.ndarray
    variance: np.ndarray

    def drift(self, hi: float, lo: float) -> float:
        """R = int_lo^hi r dt, with r piecewise constant between grid points."""
        t, c = self.t[::-1], self.cumulative_drift[::-1]  # ascending t for np.interp
        return float(np.interp(lo, t, c) - np.interp(hi, t, c))

    def mean_variance(self, hi: float, lo: float, points: int = 9) -> float:
        """v averaged over a phase (interpolated, so that phases narrower than the grid have one)."""
        return float(np.interp(np.linspace(lo, hi, points), self.t[::-1], self.variance[::-1]).mean())


@torch.no_grad()
def trajectory(teacher, noise: torch.Tensor, sigmas: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's DPM-Solver++(2M) solve from ``noise`` over ``sigmas``: states x_i and x0 predictions
    D_T(x_i, sigma_i) at every grid point, shaped [B, len(sigmas), ...] (one more evaluation at the end)."""
    xs, ds = [], []

    def record(info: dict) -> None:
        xs.append(info["x"])
        ds.append(info["denoised"])

    final = SOLVERS["dpmpp_2m"](teacher, noise, sigmas.to(noise.device), cond, callback=record)
    xs.append(final)
    ds.append(teacher(final, sigmas[-1], cond))
    return torch.stack(xs, 1), torch.stack(ds, 1)


def probe(teacher, noise: torch.Tensor, cond: Cond, sigma_min: float, sigma_max: float, steps: int = 64) -> Probe:
    """Drift and variance along the teacher's trajectories from ``noise`` (x at sigma_max) on ``steps``
    log-uniform intervals: ||D_{i+1} - D_i|| (RMS per element) and the variance of sigma s_T = (D - x) / sigma."""
    sigmas = log_snr_uniform(steps, sigma_min, sigma_max)
    xs, ds = (a.float().transpose(0, 1) for a in trajectory(teacher, noise, sigmas, cond))
    step_drift = (ds[1:] - ds[:-1]).flatten(1).square().mean(1).sqrt()
    score = (ds - xs) / sigmas.view(-1, *([1] * (xs.ndim - 1))).to(xs)
    variance = score.flatten(2).var(1).mean(1)
    cumulative = np.concatenate([[0.0], np.cumsum(step_drift.cpu().double().numpy())])
    return Probe(sigmas.double().log().numpy(), cumulative, variance.cpu().double().numpy())


@dataclass
class Partition:
    """K phases as K + 1 descending sigmas, and the refinement sequence they came from."""

    kind: str
    boundaries: list[float]  # sigma_max = b_0 > b_1 > ... > b_K = sigma_min
    refinement: list[float]  # sigma_max, sigma_min, then split points in insertion order

    @property
    def K(self) -> int:
        return len(self.boundaries) - 1

    def log_bounds(self) -> torch.Tensor:
        return torch.tensor(self.boundaries, dtype=torch.float64).log()

    def to_dict(self) -> dict:
        return {"kind": self.kind, "K": self.K, "boundaries": self.boundaries, "refinement": self.refinement}


def refine(cost, sigma_min: float, sigma_max: float, n: int) -> list[float]:
    """Bisect (in t = log sigma) the phase of highest ``cost(hi, lo)`` until ``n`` phases exist; the
    refinement sequence [sigma_max, sigma_min, split_1, ..., split_{n-1}]. Ties go to the noisier phase."""
    phases = [(math.log(sigma_max), math.log(sigma_min))]
    splits = []
    while len(phases) < n:
        k = max(range(len(phases)), key=lambda i: (cost(*phases[i]), -i))
        hi, lo = phases.pop(k)
        mid = (hi + lo) / 2
        phases[k:k] = [(hi, mid), (mid, lo)]
        splits.append(math.exp(mid))
    return [sigma_max, sigma_min, *splits]


def partition(kind: str, K: int, sigma_min: float, sigma_max: float, probe: Probe | None = None,
              refine_to: int = 64) -> Partition:
    """The ``kind`` partition into ``K`` phases; its refinement sequence runs to ``max(K, refine_to)``
    phases so that schedules with more points than phases stay on (finer) phase boundaries."""
    if kind not in PARTITIONS:
        raise ValueError(f"partition must be one of {list(PARTITIONS)}, got {kind!r}")
    if K < 1:
        raise ValueError(f"K must be at least 1, got {K}")
    n = max(K, refine_to)
    if kind == "uniform":
        sequence = refine(lambda hi, lo: hi - lo, sigma_min, sigma_max, n)
        bounds = np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), K + 1)).tolist()
        bounds[0], bounds[-1] = sigma_max, sigma_min
        return Partition(kind, bounds, sequence)
    if probe is None:
        raise ValueError("an adaptive partition needs the teacher's probe (methods.phases.probe)")
    sequence = refine(lambda hi, lo: (hi - lo) * probe.drift(hi, lo), sigma_min, sigma_max, n)
    return Partition(kind, sorted(sequence[: K + 1], reverse=True), sequence)


def phase_weights(part: Partition, kind: str, probe: Probe | None = None) -> torch.Tensor:
    """alpha_k proportional to Delta t_k (``"dt"``) or to V_k (``"variance"``), summing to 1."""
    t = part.log_bounds()
    if kind == "dt":
        raw = t[:-1] - t[1:]
    elif kind == "variance":
        if probe is None:
            raise ValueError("alpha proportional to the score variance needs the teacher's probe")
        raw = torch.tensor([probe.mean_variance(float(hi), float(lo)) for hi, lo in zip(t[:-1], t[1:])])
    else:
        raise ValueError(f"phase weights must be one of {list(PHASE_WEIGHTS)}, got {kind!r}")
    return (raw / raw.sum()).float()


def draw_phases(K: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Stratified phase indices: phase (offset + i) mod K for sample i, the offset random, so every
    phase gets floor or ceil of batch / K samples (all of them when batch >= K)."""
    offset = int(torch.randint(K, (1,), generator=generator))
    return (torch.arange(batch) + offset) % K


def draw_sigmas(part: Partition, phases: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """sigma = exp(t), t uniform inside each sample's phase."""
    t = part.log_bounds()
    u = torch.rand(phases.shape[0], generator=generator, dtype=torch.float64)
    return (t[phases] + u * (t[phases + 1] - t[phases])).exp().float()


def sample_weights(alpha: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """alpha_k / n_k for each sample of phase k (n_k of them in the batch): summed against per-sample
    losses this estimates sum_k alpha_k E_{I_k}[loss] with every present phase's mean."""
    counts = torch.bincount(phases, minlength=alpha.shape[0]).clamp(min=1)
    return alpha[phases] / counts[phases]

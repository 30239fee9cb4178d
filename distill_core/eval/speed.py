"""Cost of sampling: network function evaluations (NFE) per image, as samplers report them."""

from __future__ import annotations

import torch

from distill_core.denoisers.base import Cond, Denoiser


class CountingDenoiser:
    """A denoiser that forwards to ``denoiser`` and counts its evaluations per image.

    One call counts as one evaluation of every image in its batch, whatever the batch size, and a
    CFG teacher's call (conditional and unconditional halves in one forward) counts once, as
    samplers count NFE. Images sampled in several batches one after another are told apart by the
    noise level: a sampling run visits non-increasing sigmas, so a call whose sigma is above the
    previous call's starts a new run (new images). Then

        nfe = (sum over calls of the batch size) / (number of images started),

    which is the number of calls when the images are sampled in one batch."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser
        self.sigma_min, self.sigma_max = denoiser.sigma_min, denoiser.sigma_max
        self.calls, self.evaluations, self.images = 0, 0, 0
        self._last_sigma = float("inf")
        self._last_batch = 0

    @property
    def nfe(self) -> int:
        """Network evaluations per image (0 before the first call)."""
        return round(self.evaluations / self.images) if self.images else 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond = None) -> torch.Tensor:
        s = float(torch.as_tensor(sigma).max())
        if s > self._last_sigma or x.shape[0] != self._last_batch:
            self.images += x.shape[0]
        self._last_sigma, self._last_batch = s, x.shape[0]
        self.calls += 1
        self.evaluations += x.shape[0]
        return self.denoiser(x, sigma, cond)

"""The CFG-aware teacher: the one place where classifier-free guidance is computed.

Ho & Salimans (2022), in the x0 parameterisation:  x0 = x0_u + w (x0_c - x0_u),
with x0_c = D(x, sigma, c) and x0_u = D(x, sigma, c_u) (unconditional or negative condition)
evaluated in one batched forward. w = 1 is the conditional model alone and skips the
unconditional pass. An optional guidance interval (Kynkaanniemi et al. 2024) applies w only for
sigma in [lo, hi]; outside it the teacher is the conditional model (one forward).
"""

from __future__ import annotations

import torch

from distill_core.denoisers.base import OWN_UNCOND, Cond, Denoiser, cat_conds, conditional, expand_sigma, move_cond


def guide(x0_c: torch.Tensor, x0_u: torch.Tensor, w: float) -> torch.Tensor:
    """x0 = x0_u + w (x0_c - x0_u): the guided prediction (also of means, since it is linear)."""
    return x0_u + w * (x0_c - x0_u)


class CFGTeacher:
    """A denoiser that wraps another with guidance scale ``w``; methods call only this."""

    def __init__(
        self,
        denoiser: Denoiser,
        w: float = 1.0,
        uncond: Cond = None,
        interval: tuple[float, float] | None = None,
    ):
        self.denoiser, self.w, self.uncond, self.interval = denoiser, float(w), uncond, interval
        self.sigma_min, self.sigma_max = denoiser.sigma_min, denoiser.sigma_max

    def guided(self, sigma: torch.Tensor | float) -> bool:
        """Whether guidance applies at this noise level (a scalar sigma, or the first of a batch)."""
        if self.w == 1.0:
            return False
        if self.interval is None:
            return True
        s = float(torch.as_tensor(sigma).flatten()[0])
        return self.interval[0] <= s <= self.interval[1]

    def evaluations(self, sigma: torch.Tensor | float | None = None) -> int:
        """Network evaluations of one call at ``sigma``: two where guidance applies (conditional and
        unconditional, batched), else one; ``None``: at a noise level inside the guidance interval."""
        if self.w == 1.0:
            return 1
        return 2 if sigma is None or self.guided(sigma) else 1

    def uncond_like(self, cond: Cond, batch: int, device: torch.device | None = None) -> Cond:
        """The unconditional condition for a batch: the stored one, broadcast to ``batch`` rows, on
        ``device`` (the batch's: the stored one may stay on the CPU while the network runs on CUDA); where
        ``cond`` carries each row's own (``OWN_UNCOND``: a negative per prompt), those. A model input it lacks is
        each row's own from ``cond``: the image an image-to-video row starts from conditions both sides of the
        guidance, as the negative of ComfyUI's WanImageToVideo carries the same image."""

        def fit(u: Cond) -> Cond:
            if isinstance(u, dict):  # nested: SDXL's added_cond_kwargs
                return {k: fit(v) for k, v in u.items()}
            if not isinstance(u, torch.Tensor):
                return u
            u = u if device is None else u.to(device)
            return u.expand(batch, *u.shape[1:]) if u.shape[0] == 1 else u

        own = isinstance(cond, dict) and OWN_UNCOND in cond
        uncond = (cond[OWN_UNCOND] if device is None else move_cond(cond[OWN_UNCOND], device)) if own \
            else fit(self.uncond)
        if isinstance(uncond, dict) and isinstance(cond, dict):
            uncond = {**{k: v for k, v in conditional(cond).items() if k not in uncond}, **uncond}
        return uncond

    def both_sides(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_c, x0_u): the conditional and unconditional predictions at ``sigma`` [B], in one batched forward."""
        uncond = self.uncond_like(cond, x.shape[0], x.device)
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cat_conds(conditional(cond), uncond))
        return both.chunk(2)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond = None) -> torch.Tensor:
        sigma = expand_sigma(sigma, x)
        if not self.guided(sigma):
            return self.denoiser(x, sigma, cond)
        return guide(*self.both_sides(x, sigma, cond), self.w)

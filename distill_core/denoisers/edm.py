"""EDM preconditioning (Karras et al. 2022, Table 1) around a raw network F:

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),   c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2),           c_noise = ln(sigma) / 4
"""

from __future__ import annotations

import torch
from torch import nn

from distill_core.denoisers.base import Cond, cast_cond, expand_sigma, network_dtype, per_sample


class EDMDenoiser(nn.Module):
    """A denoiser over a network ``net(x, c_noise, cond, extra_emb=None)``; cond is class labels or None."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__()
        self.net = net
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max

    def like(self, net: nn.Module) -> EDMDenoiser:
        """The same preconditioning around another network."""
        return EDMDenoiser(net, self.sigma_data, self.sigma_min, self.sigma_max)

    def settings(self) -> dict:
        """What a card stores to rebuild this preconditioning."""
        return {"preconditioning": "edm", "sigma_data": self.sigma_data, "sigma_min": self.sigma_min,
                "sigma_max": self.sigma_max}

    def preconditioning(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in, c_noise) for sigma of shape [B]."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1.0 / (sigma**2 + sd2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond = None, **net_kwargs) -> torch.Tensor:
        sigma = expand_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        dtype = network_dtype(self.net, x.dtype)
        f = self.net((per_sample(c_in, x) * x).to(dtype), c_noise.to(dtype), cast_cond(cond, dtype), **net_kwargs)
        return per_sample(c_skip, x) * x + per_sample(c_out, x) * f.to(c_out.dtype)

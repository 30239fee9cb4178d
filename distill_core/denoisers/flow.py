"""Rectified-flow (flow-matching) models in the engine's convention.

A rectified flow (Liu et al. 2022; Lipman et al. 2022; SD3, Esser et al. 2024) trains on

    x_t = (1 - t) x0 + t n,   t in [0, 1],   and predicts the velocity v = n - x0.

Dividing by (1 - t) gives our variance-exploding sample:

    x = x_t / (1 - t) = x0 + t / (1 - t) n,   so   sigma = t / (1 - t),   t = sigma / (1 + sigma),
    x_t = x / (1 + sigma)   (c_in = 1 / (1 + sigma)).

The velocity gives the clean sample: x_t - t v = (1 - t) x0 + t n - t n + t x0 = x0, so

    D(x, sigma) = x_t - t v(x_t, t) = c_in x - t F(c_in x, t),

ComfyUI's ``COSMOS_RFLOW`` model sampling makes the same change of variables. t = 1 (pure noise) is
sigma = inf; the adapter stops at a finite ``sigma_max`` (t_max = sigma_max / (1 + sigma_max)), where
x / (1 + sigma_max) differs from pure noise by x0 / (1 + sigma_max) only. Solvers, guidance and every
method then run on a flow model exactly as on an EDM one.
"""

from __future__ import annotations

import torch
from torch import nn

from distill_core.denoisers.base import Cond, cast_cond, expand_sigma, network_dtype, per_sample

#: where solves of a flow model start when its time reaches 1 (sigma = inf): t = 80 / 81, where
#: x / (1 + sigma) differs from pure noise by x0 / 81
FLOW_SIGMA_MAX = 80.0


def sigma_to_t(sigma: torch.Tensor | float) -> torch.Tensor | float:
    """t = sigma / (1 + sigma)."""
    return sigma / (1 + sigma)


def t_to_sigma(t: torch.Tensor | float) -> torch.Tensor | float:
    """sigma = t / (1 - t)."""
    return t / (1 - t)


class FlowDenoiser(nn.Module):
    """A denoiser over a velocity network ``net(x_t, t * time_scale, cond, **kwargs)`` of a rectified flow.

    ``time_scale``: what the network takes as its time input per unit of t (1 for the built-in UNet and
    diffusers' Flux transformer; diffusers' flow UNets and SD3 transformer take t * 1000). ``shift``: the time
    shift s its makers sample it with (``schedules.shift_time``; SD3: 3, Flux: by resolution), which sets the
    students' flow grid; it changes no value of D."""

    prediction = "flow"

    def __init__(self, net: nn.Module, sigma_min: float = 0.002, sigma_max: float = 200.0, time_scale: float = 1.0,
                 shift: float = 1.0):
        super().__init__()
        if not 0 < sigma_min < sigma_max < float("inf"):
            raise ValueError(f"a flow model needs 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
        self.net = net
        self.sigma_min, self.sigma_max, self.time_scale, self.shift = sigma_min, sigma_max, time_scale, shift

    def like(self, net: nn.Module) -> FlowDenoiser:
        """The same parametrisation around another network."""
        return FlowDenoiser(net, self.sigma_min, self.sigma_max, self.time_scale, self.shift)

    def settings(self) -> dict:
        """What a card stores to rebuild this parametrisation (the shift where it is not 1)."""
        return {"preconditioning": "flow", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "time_scale": self.time_scale, **({"shift": self.shift} if self.shift != 1 else {})}

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond = None, **net_kwargs) -> torch.Tensor:
        """v(x_t, t) for t of shape [B]."""
        dtype = network_dtype(self.net, x_t.dtype)
        return self.net(x_t.to(dtype), (t * self.time_scale).to(dtype), cast_cond(cond, dtype), **net_kwargs)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond = None, **net_kwargs) -> torch.Tensor:
        sigma = expand_sigma(sigma, x)
        t = sigma_to_t(sigma)
        x_t = x / (1 + per_sample(sigma, x))
        v = self.velocity(x_t.to(x.dtype), t, cond, **net_kwargs)
        return x_t - per_sample(t, x) * v.to(x_t.dtype)


def flow_matching_loss(denoiser: FlowDenoiser, x0: torch.Tensor, labels, logit_mean: float = 0.0,
                       logit_std: float = 1.0, uniform_fraction: float = 0.1) -> torch.Tensor:
    """The conditional flow-matching loss with SD3's logit-normal time density (Esser et al. 2024, eq. 19),
    t = sigmoid(u), u ~ N(m, s^2), mixed with t ~ U(0, 1) for a ``uniform_fraction`` of the batch so that the
    ends of [0, 1] (which the logit-normal rarely draws) are trained too:  L = E || v(x_t, t) - (n - x0) ||^2."""
    t = torch.sigmoid(torch.randn(x0.shape[0]) * logit_std + logit_mean)
    t = torch.where(torch.rand(x0.shape[0]) < uniform_fraction, torch.rand(x0.shape[0]), t)
    n = torch.randn_like(x0)
    tv = per_sample(t, x0)
    v = denoiser.velocity((1 - tv) * x0 + tv * n, t, labels)
    return ((v - (n - x0)) ** 2).mean()

"""Adapter for diffusers UNets trained on a discrete DDPM schedule (Ho et al. 2020), e.g. Stable
Diffusion 1.x/2.x and the ``UNet2DModel`` pixel models.

DDPM trains on the variance-preserving sample ``x_vp = alpha_t x0 + sigma_vp,t n`` at integer steps
t = 0 .. T-1, with alpha_t^2 = abar_t (``alphas_cumprod``) and sigma_vp,t^2 = 1 - abar_t. Dividing by
alpha_t gives our variance-exploding sample ``x = x_vp / alpha_t = x0 + sigma_t n`` with

    sigma_t = sqrt((1 - abar_t) / abar_t),   alpha = 1 / sqrt(1 + sigma^2),   sigma_vp = sigma alpha,

so the network input is ``x_vp = c_in x`` with c_in = alpha (Karras et al. 2022, Table 1, "VP"), and
a sigma between grid points is fed as the fractional t interpolated linearly in log sigma over the
training grid (as diffusers' ``EulerDiscreteScheduler._sigma_to_t`` and k-diffusion). The output F
becomes x0 by the prediction type:

    "epsilon":       F = n,                              x0 = x - sigma F
    "v_prediction":  F = v = alpha n - sigma_vp x0       (Salimans & Ho 2022, "Progressive Distillation", eq. 3)
                     x0 = alpha x_vp - sigma_vp v = alpha^2 x - sigma alpha F
                     (alpha x_vp - sigma_vp v = (alpha^2 + sigma_vp^2) x0 + (alpha sigma_vp - sigma_vp alpha) n = x0)
    "sample":        x0 = F
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from distill_core.denoisers.base import Cond, cast_cond, expand_sigma, network_dtype, per_sample

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: SDXL's added conditions (the pooled text embedding, the image's size and crop): ``added_cond_kwargs``
ADDED_CONDITIONS = ("text_embeds", "time_ids")


class DiffusersDenoiser(nn.Module):
    """``D(x, sigma, cond) -> x0`` over a diffusers ``UNet2DModel`` or ``UNet2DConditionModel``.

    ``cond`` is a dict of extra keyword arguments of the UNet (``encoder_hidden_states``,
    ``added_cond_kwargs``, ``class_labels``, ...; SDXL's ``text_embeds`` and ``time_ids`` may come flat, beside
    the others), a tensor (the ``encoder_hidden_states`` of a UNet that takes them, else its ``class_labels``)
    or None. ``sigmas`` is the training grid, ascending in t.
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {prediction_type!r}: this DDPM adapter handles {', '.join(PREDICTION_TYPES)}"
                " (flow-matching models, prediction 'flow_prediction', need a flow adapter instead)"
            )
        abar = torch.as_tensor(alphas_cumprod).detach().cpu().double()
        if abar.ndim != 1 or len(abar) < 2 or not ((abar > 0) & (abar < 1)).all() or not (abar.diff() < 0).all():
            raise ValueError(
                "alphas_cumprod must be a decreasing 1-D schedule strictly inside (0, 1); a zero-terminal-SNR "
                "schedule ends at 0 (sigma = inf): clamp its last value, e.g. to 2**-24 as diffusers' Euler does"
            )
        self.unet = unet
        self.prediction_type = prediction_type
        # Plain attributes, not buffers: module dtype casts (.half()) must not coarsen the grid.
        self.sigmas = ((1 - abar) / abar).sqrt()
        self.log_sigmas = self.sigmas.log()
        self.sigma_min, self.sigma_max = float(self.sigmas[0]), float(self.sigmas[-1])
        self._takes_text = "encoder_hidden_states" in inspect.signature(unet.forward).parameters

    def settings(self) -> dict:
        """The parametrisation (the teacher's fingerprint covers it): prediction type and trained sigma range."""
        return {"preconditioning": "ddpm", "prediction_type": self.prediction_type, "sigma_min": self.sigma_min,
                "sigma_max": self.sigma_max, "train_steps": len(self.sigmas)}

    @classmethod
    def from_scheduler(cls, unet: nn.Module, scheduler: Any) -> DiffusersDenoiser:
        """Read ``alphas_cumprod`` and ``prediction_type`` from a diffusers DDPM-family scheduler
        (DDPM, DDIM, Euler, Heun, DPM-Solver, UniPC, ...)."""
        config = scheduler.config
        if not hasattr(scheduler, "alphas_cumprod") or config.get("use_flow_sigmas", False):
            raise TypeError(
                f"{type(scheduler).__name__} is not a discrete DDPM scheduler (no alphas_cumprod, or flow sigmas): "
                "this adapter is for DDPM-trained UNets; load the model's DDPM/Euler scheduler config instead"
            )
        if config.get("timestep_type", "discrete") != "discrete":
            raise ValueError(
                f"{type(scheduler).__name__} feeds continuous timesteps (timestep_type="
                f"{config.timestep_type!r}); this adapter feeds the DDPM step index: use timestep_type='discrete'"
            )
        return cls(unet, scheduler.alphas_cumprod, config.prediction_type)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The fractional training step of sigma: t = i + w for log sigma = (1 - w) log sigma_i + w log sigma_{i+1},
        clamped to [0, T-1] (diffusers' ``_sigma_to_t``); float64."""
        sigma = torch.as_tensor(sigma)
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.double().clamp_min(1e-10).log()
        low = (torch.searchsorted(log_sigmas, log_sigma.contiguous(), right=True) - 1).clamp(0, len(log_sigmas) - 2)
        w = ((log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])).clamp(0, 1)
        return low + w

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of ``sigma_to_t``: log sigma interpolated linearly between the grid steps around t; float64."""
        t = torch.as_tensor(t).double().clamp(0, len(self.sigmas) - 1)
        log_sigmas = self.log_sigmas.to(t.device)
        low = t.floor().long().clamp(max=len(log_sigmas) - 2)
        w = t - low
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()

    def unet_kwargs(self, cond: Cond) -> dict:
        """The UNet's keyword arguments for a condition (see the class docstring)."""
        if cond is None:
            return {}
        if isinstance(cond, dict):
            kwargs = dict(cond)
            added = {k: kwargs.pop(k) for k in ADDED_CONDITIONS if k in kwargs}
            if added:
                kwargs["added_cond_kwargs"] = {**kwargs.get("added_cond_kwargs", {}), **added}
            return kwargs
        if isinstance(cond, torch.Tensor):
            return {"encoder_hidden_states" if self._takes_text else "class_labels": cond}
        raise TypeError(f"cond must be a tensor, a dict of UNet keyword arguments or None, got {type(cond).__name__}")

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond = None) -> torch.Tensor:
        sigma = expand_sigma(sigma, x)
        s = per_sample(sigma, x)
        alpha = (1 + s**2).rsqrt()
        t = self.sigma_to_t(sigma).to(sigma.dtype)
        dtype = network_dtype(self.unet, x.dtype)
        out = self.unet((alpha * x).to(dtype), t, **self.unet_kwargs(cast_cond(cond, dtype)), return_dict=False)[0]
        out = out.to(s.dtype)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return alpha**2 * x - s * alpha * out
        return out

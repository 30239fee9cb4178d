"""Denoisers: one interface ``(x, sigma, cond) -> x0`` with adapters for each model family."""

from distill_core.denoisers.base import Cond, Denoiser, cat_conds, expand_sigma
from distill_core.denoisers.diffusers import DiffusersDenoiser
from distill_core.denoisers.edm import EDMDenoiser

__all__ = ["Cond", "Denoiser", "DiffusersDenoiser", "EDMDenoiser", "cat_conds", "expand_sigma"]

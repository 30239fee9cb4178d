"""The analytic first step (AFS) of SFD (Zhou et al. 2024, sec. 4), and its centre.

At sigma_0 = sigma_max the sample is nearly pure noise, and SFD replaces the first network call of
the student's Euler sampler by the direction of a denoiser that returns the data's mean 0:

    d_0 = (x_0 - mu) / sqrt(1 + sigma_0^2),   mu = 0 (SFD)

A teacher whose data is not centred at 0 does not return 0 at sigma_max: the built-in teacher's
D(x, 80) is close to the mean image of the class it is asked for (pixel mean -0.79: the digits'
background is -1). With mu = mu_c, the mean of the teacher's D(sigma_max z, sigma_max, c) over z,
the analytic state at the next point is 6x closer to the teacher's own (docs/sfd_recipes.md):
``class_means`` estimates one mu_c per class label and one for the null condition, once per
distillation, and the table travels in the student file, so the first step still costs no
evaluation. With classifier-free guidance at w the centre is

    mu = mu_null + w (mu_c - mu_null)

which is the mean of the guided D exactly, because guidance is linear in D. Centres need the
conditions to be labels of a finite set that the sampler sees (the built-in teacher); prompt
conditions keep SFD's mu = 0.
"""

from __future__ import annotations

import torch

from distill_core.denoisers.base import Cond
from distill_core.teacher import guide

#: noises per class that estimate mu_c
CLASS_MEAN_SAMPLES = 100
#: the first step's centre: SFD's zero, the teacher's class means, or class means where conditions are labels
AFS_CENTERS = ("auto", "zero", "class_mean")


def afs_direction(x: torch.Tensor, sigma: torch.Tensor | float, center: torch.Tensor | None = None) -> torch.Tensor:
    """The analytic first direction d = (x - mu) / sqrt(1 + sigma^2); ``center`` is mu (None: 0), one
    per sample or broadcast."""
    if center is not None:
        x = x - center.to(x.dtype)
    return x / (1 + torch.as_tensor(sigma, dtype=x.dtype, device=x.device) ** 2).sqrt()


def resolve_center(choice: str, classes: int) -> str:
    """The centre a run uses: ``auto`` is the class means where the teacher's conditions are class labels
    (``classes`` > 0), else SFD's zero."""
    if choice not in AFS_CENTERS:
        raise ValueError(f"afs_center must be one of {list(AFS_CENTERS)}, got {choice!r}")
    if choice == "auto":
        return "class_mean" if classes > 0 else "zero"
    if choice == "class_mean" and classes == 0:
        raise ValueError(
            "afs_center 'class_mean' needs a teacher whose conditions are class labels (the built-in "
            "teacher); this teacher's conditions are prompts: use afs_center 'zero' (SFD's) or 'auto'"
        )
    return choice


@torch.no_grad()
def class_means(
    denoiser, classes: int, uncond: torch.Tensor, shape: tuple[int, ...], sigma_max: float,
    samples: int = CLASS_MEAN_SAMPLES, seed: int = 0, device: torch.device | None = None,
) -> torch.Tensor:
    """The table [mu_0, ..., mu_{classes-1}, mu_null] (shape [classes + 1, *shape]), indexed by label (the
    null class is label ``classes``): mu_c is the mean of the unguided D(sigma_max z, sigma_max, c) over
    ``samples`` noises z, the same noises for every row, drawn from ``seed`` (the caller's random
    stream is untouched); the network runs on ``device``."""
    if uncond.numel() != 1 or int(uncond.flatten()[0]) != classes:
        raise ValueError(f"class means need the null condition to be the label {classes}, got {uncond.tolist()}")
    z = torch.randn((samples, *shape), generator=torch.Generator().manual_seed(seed)).to(device)
    rows = []
    for label in range(classes + 1):
        cond = torch.full((samples,), label, dtype=torch.long, device=device)
        rows.append(denoiser(z * sigma_max, torch.full((samples,), float(sigma_max), device=device), cond)
                    .float().mean(0))
    return torch.stack(rows).cpu()


def guided_centers(table: torch.Tensor | None, labels: Cond, w: float) -> torch.Tensor | None:
    """mu = mu_null + w (mu_c - mu_null) for every label of a batch (shape [B, *sample shape]); ``table``
    is ``class_means``'s, or None for SFD's centre 0 (then None)."""
    if table is None:
        return None
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            "this student's analytic first step is centred on its teacher's class means: sample it with "
            "class labels (an integer tensor), not with "
            f"{type(labels).__name__ if labels is None else labels.dtype}"
        )
    table = table.to(labels.device)
    if labels.min() < 0 or labels.max() >= len(table):
        raise ValueError(f"class labels must lie in 0..{len(table) - 1} (the last: unconditional) for this "
                         "student's class means")
    return guide(table[labels], table[-1], w)

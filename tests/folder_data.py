"""A small federation of RGB 32x32 ImageFolders with class names, made from Fashion-MNIST for the tests.

Every image is resized from 28x28 and tinted with a random colour, so the folders look like the photos of real
silos: colour, another size, names rather than ids. Silo 0 and silo 2 both hold 'trouser' (different images).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from alignfl_app.config import CLASS_NAMES, resolve_data_root
from alignfl_app.data.datasets import load_split
from alignfl_app.data.folders import TEST_FOLDER, save_image_folder

SILO_CLASSES = (("tshirt", "trouser"), ("sandal", "bag"), ("trouser", "boot"))


def tinted(x: torch.Tensor, rng: np.random.Generator, size: int = 32) -> torch.Tensor:
    """Grey 28x28 -> RGB size x size, each image multiplied by its own random colour."""
    colours = torch.from_numpy(rng.uniform(0.5, 1.0, (len(x), 3, 1, 1))).float()
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1) * colours


def write_split(
    folder: Path,
    x: torch.Tensor,
    y: torch.Tensor,
    names: tuple[str, ...],
    picks: dict[str, np.ndarray],
    rng: np.random.Generator,
    size: int = 32,
) -> None:
    ids = {name: CLASS_NAMES["fashion-mnist"].index(name) for name in names}
    images = torch.cat([tinted(x[torch.from_numpy(picks[n])], rng, size) for n in names])
    labels = torch.cat([torch.full((len(picks[n]),), i) for i, n in enumerate(names)])
    assert all(int((y[torch.from_numpy(picks[n])] == ids[n]).all()) for n in names)
    save_image_folder(folder, images, labels, names)


def tinted_federation(root: Path, per_class: int, test_per_class: int = 40, seed: int = 0, size: int = 32) -> dict:
    """Write ``root/silo-<k>`` (silo 1 without a test folder: it holds out test-fraction) and ``root/global-test``
    of RGB ``size`` x ``size`` images; returns the run-config keys that train on them."""
    rng = np.random.default_rng(seed)
    data_root = str(resolve_data_root())
    x, y, _ = load_split(data_root, "fashion-mnist", True)
    xt, yt, _ = load_split(data_root, "fashion-mnist", False)
    names = CLASS_NAMES["fashion-mnist"]
    pools = {n: rng.permutation(np.flatnonzero(y.numpy() == names.index(n))) for n in names}
    test_pools = {n: rng.permutation(np.flatnonzero(yt.numpy() == names.index(n))) for n in names}
    taken = {n: 0 for n in names}
    dirs = []
    for k, classes in enumerate(SILO_CLASSES):
        picks = {}
        for n in classes:
            picks[n] = pools[n][taken[n] : taken[n] + per_class]
            taken[n] += per_class
        folder = root / f"silo-{k}"
        write_split(folder, x, y, classes, picks, rng, size)
        if k != 1:
            write_split(
                folder / TEST_FOLDER, xt, yt, classes, {n: test_pools[n][:test_per_class] for n in classes}, rng, size
            )
        dirs.append(str(folder))
    union = tuple(sorted({n for g in SILO_CLASSES for n in g}))
    write_split(root / "global-test", xt, yt, union, {n: test_pools[n][-test_per_class:] for n in union}, rng, size)
    return {
        "dataset": "folder",
        "silo-classes": ";".join(",".join(g) for g in SILO_CLASSES),
        "silo-data-dirs": ";".join(dirs),
        "global-test-dir": str(root / "global-test"),
        "image-size": f"{size}x{size}",
        "channels": 3,
    }

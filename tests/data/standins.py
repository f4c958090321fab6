"""Small stand-ins of the registry datasets in their fetched layout, so the tests never download 90 MB: an ELPV
folder (labels.csv with mono and poly cells of every defect probability, PNG cells) and an Animal-MNIST folder (two
gzipped pickles of numpy arrays), each with the manifest ``alignfl fetch`` writes."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from alignfl_app.data.wheels import write_manifest

# (module type, defect probability) -> cells; the sure ones (0 and 1) are what alignfl uses
ELPV_CELLS = {
    ("mono", 0.0): 24,
    ("mono", 1.0): 12,
    ("poly", 0.0): 32,
    ("poly", 1.0): 16,
    ("mono", 1 / 3): 3,
    ("poly", 2 / 3): 3,
}


def elpv_standin(root: Path, size: int = 40) -> Path:
    """``<root>/elpv``: bright cells, defects with a dark crack; returns the folder."""
    folder = root / "elpv"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines, i = [], 0
    for (module, probability), count in ELPV_CELLS.items():
        for _ in range(count):
            i += 1
            cell = rng.integers(150, 230, (size, size), dtype=np.uint8)
            if probability > 0.5:
                row = rng.integers(5, size - 5)
                cell[row - 1 : row + 2, :] = 20  # the crack the classifier must see
            name = f"images/cell{i:04d}.png"
            Image.fromarray(cell).save(folder / name)
            lines.append(f"{name}  {probability!r}  {module}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    write_manifest(folder)
    return folder


def animal_standin(root: Path, per_class: int = 20) -> Path:
    """``<root>/animal-mnist``: 10 classes of 28x28 silhouettes (a class-specific block), pickled as the wheel
    pickles them."""
    folder = root / "animal-mnist" / "Animal_MNIST"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    images = np.zeros((10 * per_class, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(10), per_class)
    for n, c in enumerate(labels):
        top, left = 2 + 2 * (c % 5), 2 + 10 * (c // 5)
        images[n, top : top + 12, left : left + 12] = rng.integers(180, 255)
    for name, value in (("animal_data_version_3.gz", images), ("animal_label_version_3.gz", labels)):
        with gzip.open(folder / name, "wb") as f:
            pickle.dump(value, f)
    write_manifest(root / "animal-mnist")
    return root / "animal-mnist"

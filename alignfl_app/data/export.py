"""Write a built-in dataset's silos as ImageFolders, to run the folder flow end to end on real images.

    alignfl export --dataset mnist --out DIR [--silo-classes '0,1;2,3;4,5'] [--max-per-class 500]

``DIR/silo-<k>/<class name>/NNNNN.png`` holds silo k's training images (the built-in provider's partition at the
same seed; a class listed by several silos is split between them), ``DIR/silo-<k>/test/<class name>/`` its
held-out images and ``DIR/global-test/<class name>/`` the test split of every exported class; the command prints
the run config that trains on them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from alignfl_app.config import BUILT_IN_DATASETS, ConfigError, RunConfig, parse_run_config
from alignfl_app.data.catalog import CATALOG
from alignfl_app.data.datasets import DataMissingError, federation_silo_data, global_test_set
from alignfl_app.data.folders import TEST_FOLDER, save_image_folder
from alignfl_app.training import to_local_labels

GLOBAL_TEST_FOLDER = "global-test"


def export_built_in(cfg: RunConfig, out: Path) -> tuple[int, str]:
    """Write every silo of ``cfg`` (a built-in dataset) and its global test set under ``out``; returns the number
    of images and the run config (flat ``k=v`` text) that trains on the folders. The folders are written next to
    ``out`` and moved there when complete, so a failed export leaves no half-written dataset at ``out``."""
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty: choose a new folder (an export never mixes with other files)")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    written = write_folders(cfg, staging)
    if out.exists():
        out.rmdir()
    staging.rename(out)
    groups = ";".join(",".join(cfg.data.class_names[c] for c in g) for g in cfg.data.silo_classes)
    dirs = ";".join(str(out / f"silo-{k}") for k in range(cfg.data.num_silos))
    return written, (
        f"dataset='folder' silo-classes='{groups}' silo-data-dirs='{dirs}' global-test-dir='{out / GLOBAL_TEST_FOLDER}'"
    )


def write_folders(cfg: RunConfig, out: Path) -> int:
    """Every silo's folder (training images, ``test/``) and the global test folder under ``out``; images written."""
    names = cfg.data.class_names
    written = 0
    for k in range(cfg.data.num_silos):
        data = federation_silo_data(cfg, k)
        silo_names = [names[c] for c in data.classes]
        folder = out / f"silo-{k}"
        written += save_image_folder(folder, data.x_train, to_local_labels(data.y_train, data.classes), silo_names)
        written += save_image_folder(
            folder / TEST_FOLDER, data.x_test, to_local_labels(data.y_test, data.classes), silo_names
        )
    exported = sorted({c for g in cfg.data.silo_classes for c in g})
    test = global_test_set(cfg)
    assert test is not None  # a built-in dataset always has its test split
    x, y = test
    chosen = torch.isin(y, torch.tensor(exported))
    written += save_image_folder(
        out / GLOBAL_TEST_FOLDER, x[chosen], to_local_labels(y[chosen], tuple(exported)), [names[c] for c in exported]
    )
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignfl export", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=BUILT_IN_DATASETS)
    parser.add_argument("--out", required=True, help="a new (or empty) folder")
    parser.add_argument(
        "--silo-classes",
        default=RunConfig().flat()["silo-classes"],
        help="class ids per silo, as the run config's silo-classes (default: %(default)s)",
    )
    parser.add_argument("--max-per-class", type=int, default=6000, help="training images per class and silo")
    parser.add_argument(
        "--outliers-per-silo",
        type=int,
        default=0,
        help="images of the other dataset slipped into silo 0 with its labels (default: none)",
    )
    parser.add_argument(
        "--silo-layout",
        choices=("slices", "by-source"),
        default=None,
        help="how silos share a class: slices (default), or by-source (default for elpv: a plant each)",
    )
    parser.add_argument(
        "--image-size",
        default="",
        help="HEIGHTxWIDTH of the written images (default: the dataset's own, e.g. 28x28, elpv 300x300)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data-root", default="", help="where the built-in datasets live (default: the data root)")
    args = parser.parse_args(argv)
    try:
        info = CATALOG[args.dataset]
        layout = args.silo_layout or ("by-source" if info.sources else "slices")
        size = args.image_size or "x".join(map(str, info.native_size))
        cfg = parse_run_config(
            {
                "dataset": args.dataset,
                "silo-classes": args.silo_classes,
                "seed": args.seed,
                "max-per-class": args.max_per_class,
                "outliers-per-silo": args.outliers_per_silo,
                "data-root": args.data_root,
                "silo-layout": layout,
                "image-size": size,
            }
        )
        written, run_config = export_built_in(cfg, Path(args.out).expanduser().resolve())
    except (ConfigError, DataMissingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"[alignfl] wrote {written} images under {args.out}; train on them with\n"
        f'  alignfl run --run-config "{run_config}"'
    )
    return 0

"""ImageFolder datasets: a folder per class (its name is the class name), PNG or JPEG images of any size.

Every image is converted to the federation's declared shape (grey or RGB, resized to image-size, floats in
[0, 1]) with torchvision's transforms, so silos whose cameras differ still feed the same models. A folder that
cannot serve its silo (missing, empty, unreadable, holding a class it did not declare or lacking one it did)
raises ``DataFolderError``: one line naming the folder and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TEST_FOLDER = "test"  # a silo's own held-out images, with the same class sub-folders


class DataFolderError(ValueError):
    """A silo's (or the server's test) image folder cannot be used; the message names the folder and the fix."""


def image_transform(image_shape: tuple[int, int, int]) -> transforms.Compose:
    """What every image goes through: grey or RGB, resized to (height, width), floats in [0, 1]."""
    channels, height, width = image_shape
    mode = "L" if channels == 1 else "RGB"
    return transforms.Compose(
        [transforms.Lambda(lambda im: im.convert(mode)), transforms.Resize((height, width)), transforms.ToTensor()]
    )


def describe_transform(image_shape: tuple[int, int, int]) -> dict[str, object]:
    """``image_transform`` in words, saved beside a model so that it can be used without the run config."""
    channels, height, width = image_shape
    return {
        "image-size": f"{height}x{width}",
        "channels": channels,
        "mode": "L" if channels == 1 else "RGB",
        "resize": "bilinear (torchvision transforms.Resize)",
        "scale": "pixel / 255, in [0, 1]",
    }


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def class_folders(root: Path, skip_test: bool) -> dict[str, Path]:
    """The class sub-folders of ``root`` by name (hidden folders, and ``test`` when ``skip_test``, left out)."""
    if not root.is_dir():
        raise DataFolderError(
            f"data folder {root} does not exist or is not a folder: fix the silo's data-dir "
            "(node config) or silo-data-dirs / global-test-dir (run config)"
        )
    try:
        entries = sorted(root.iterdir())
    except OSError as exc:
        raise DataFolderError(f"data folder {root} cannot be read ({exc.strerror}): fix its permissions") from exc
    return {
        p.name: p
        for p in entries
        if p.is_dir() and not p.name.startswith(".") and not (skip_test and p.name == TEST_FOLDER)
    }


def load_image_folder(
    root: Path,
    classes: Sequence[str],
    image_shape: tuple[int, int, int],
    *,
    every_class: bool = True,
    skip_test: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, C, H, W] in [0, 1], the index in ``classes`` of each image's class), classes in the given order
    and files sorted by name. ``every_class``: each declared class must have a folder (else a subset may)."""
    return _load(str(Path(root)), tuple(classes), tuple(image_shape), every_class, skip_test)


@lru_cache(maxsize=16)
def _load(
    root_s: str, classes: tuple[str, ...], image_shape: tuple[int, int, int], every_class: bool, skip_test: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    root = Path(root_s)
    found = class_folders(root, skip_test)
    undeclared = sorted(set(found) - set(classes))
    if undeclared:
        raise DataFolderError(
            f"data folder {root} holds class folder '{undeclared[0]}' that is not declared "
            f"({list(classes)}): declare it in silo-classes / classes or move the folder away"
        )
    missing = [c for c in classes if c not in found]
    if every_class and missing:
        raise DataFolderError(
            f"data folder {root} has no folder for declared class '{missing[0]}': add "
            f"{root / missing[0]} with its images or remove the class from silo-classes / classes"
        )
    if not found:
        raise DataFolderError(f"data folder {root} holds no class folder: add one folder of images per class")
    transform = image_transform(image_shape)
    images, labels = [], []
    for label, name in enumerate(classes):
        if name not in found:
            continue
        files = image_files(found[name])
        if not files:
            raise DataFolderError(
                f"class folder {found[name]} holds no PNG or JPEG image: add images or remove the class"
            )
        for path in files:
            try:
                with Image.open(path) as image:
                    images.append(transform(image))
            except (OSError, UnidentifiedImageError, ValueError) as exc:
                raise DataFolderError(
                    f"image {path} cannot be read ({type(exc).__name__}): replace or remove the file"
                ) from exc
        labels += [label] * len(files)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def save_image_folder(root: Path, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> int:
    """Write ``images`` ([N, C, H, W] in [0, 1]) as PNGs under ``root/<class name>/NNNNN.png`` (in their order,
    so that reading the folder back gives the same tensors); returns how many were written."""
    for label, name in enumerate(classes):
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        chosen = images[labels == label]
        for i, image in enumerate(chosen):
            pixels = image.mul(255).round().clamp(0, 255).to(torch.uint8)
            array = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
            Image.fromarray(array, "L" if pixels.shape[0] == 1 else "RGB").save(folder / f"{i:05d}.png")
    return len(images)

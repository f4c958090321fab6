"""Files that ship with alignfl: the architecture and experiment TOML files of ``conf/``."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def conf_dir() -> Path:
    """The packaged ``alignfl_app/conf`` of an installed wheel, else the checkout's (or FAB's) top-level ``conf/``."""
    packaged = Path(str(files("alignfl_app"))) / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf"

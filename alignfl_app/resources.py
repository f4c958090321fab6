"""Where the shipped configuration files (``conf/architectures``, ``conf/experiments``) are."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def conf_dir() -> Path:
    """The installed wheel's copy, else the checkout's top-level ``conf/`` (the one ``flwr run`` puts in the FAB)."""
    packaged = _PACKAGE / "conf"
    return packaged if packaged.is_dir() else _PACKAGE.parent / "conf"

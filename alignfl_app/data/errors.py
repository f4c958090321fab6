"""Why a dataset cannot be used: one line naming the fix."""

from __future__ import annotations


class DataMissingError(FileNotFoundError):
    """The dataset is not under the data root, or fails its checksums; the message names the fetch command."""

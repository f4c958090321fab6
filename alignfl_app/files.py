"""Writing files safely: atomic writes (a reader, or a restarted process, sees the old file or the new one, never
half of one), real folders only (a symbolic link would have a write land wherever it points), and a failed write
(read-only folder, full disk) reported in one line naming the folder and the fix."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from alignfl_app.config import ConfigError

# what the machine refuses (not a bug of ours), each with its fix
_FIXES = {
    errno.EACCES: "is not writable: give this user write access to it, or choose another folder",
    errno.EPERM: "is not writable: give this user write access to it, or choose another folder",
    errno.EROFS: "is on a read-only file system: choose a writable folder",
    errno.ENOSPC: "is on a full disk: free space there, then run again (a run continues with resume=true)",
    errno.EDQUOT: "is over this user's disk quota: free space there, then run again (a run continues with resume=true)",
}


class StorageError(ConfigError):
    """A folder that cannot be written as the run needs (a symbolic link, read-only, a full disk); one line naming
    the folder and the fix. A ConfigError, so every entry point reports it as it reports a bad setting."""


@contextlib.contextmanager
def writing(folder: Path) -> Iterator[None]:
    """Turn the machine's refusal to write into ``folder`` (permissions, read-only, full disk, quota) into a
    StorageError; any other OSError is a bug and passes unchanged."""
    try:
        yield
    except OSError as exc:
        fix = _FIXES.get(exc.errno or 0)
        if fix is None:
            raise
        raise StorageError(f"cannot write in {folder}: it {fix} ({exc.strerror or exc})") from exc


def refuse_link(path: Path) -> None:
    """StorageError if ``path`` is a symbolic link: whatever is written there would land where it points."""
    path = Path(path)
    if path.is_symlink():
        raise StorageError(
            f"{path} is a symbolic link (to {os.readlink(path)}): alignfl writes only into real folders: "
            "replace the link with the folder it points to, or set results-dir to a real folder"
        )


def real_folder(path: Path) -> Path:
    """``path`` as a real folder, created (with its parents) if missing; a symbolic link, or a file in its place,
    is refused with one line naming it."""
    path = Path(path)
    refuse_link(path)
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
    refuse_link(path)  # created by someone else between the check and mkdir
    if not path.is_dir():
        raise StorageError(f"{path} is not a folder: move the file away, or set results-dir to another folder")
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path`` (a link there is
    replaced, never followed). A failed write leaves the old file as it was and no temporary file behind."""
    path = Path(path)
    with writing(path.parent):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())

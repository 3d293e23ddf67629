"""Files only this site's user may read: secrets and patient-level outputs (0600 files in 0700 folders)."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

FILE_MODE, DIR_MODE = 0o600, 0o700


def make_dirs(path: Path) -> Path:
    """Create ``path`` and any missing parents as 0700 folders (``Path.mkdir(parents=True)`` would give the parents
    the default mode); folders that exist are left as they are."""
    target = folder = Path(path)
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another process: left as it is
            folder.mkdir(mode=DIR_MODE)
            os.chmod(folder, DIR_MODE)  # in case the umask removed bits we want (it cannot add any)
    return target


def private_dir(path: Path) -> Path:
    """``path`` as a folder only this user can open: created 0700 (with any missing parents) or set to 0700."""
    path = Path(path)
    make_dirs(path)
    os.chmod(path, DIR_MODE)
    return path


def write_private(path: Path, data: bytes, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` as a new 0600 file (from its first byte on), then rename it into place: a reader
    sees the old file or the whole new one. Missing folders are made 0700; an existing folder is left as it is. An
    existing ``path`` is replaced only if ``overwrite`` (else FileExistsError, checked atomically); a symbolic link
    at ``path`` is replaced, never followed."""
    path = Path(path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    make_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # on disk before it replaces the old file (the site's state, its outputs)
        os.chmod(tmp, FILE_MODE)  # in case the umask removed bits we want (it cannot add any)
        if overwrite:
            os.replace(tmp, path)
        else:  # a hard link fails if the name exists: no window between the check and the write
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path} exists; refusing to overwrite it") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


@contextlib.contextmanager
def private_output(folder: Path):
    """Inside the block, files and folders this process creates are 0600 / 0700 (umask 077), and ``folder`` is a
    0700 folder: for writers that create their own files (pandas, numpy) of patient-level data."""
    old = os.umask(0o077)
    try:
        yield private_dir(folder)
    finally:
        os.umask(old)


def open_to_others(path: Path) -> bool:
    """Whether anyone but the owner may read, write or enter ``path``."""
    return bool(os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO))

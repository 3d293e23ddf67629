"""A site's own state folder: created 0700, this user's only; one lock for every read-check-write of its files
(memory of what it answered, privacy spent), written atomically 0600."""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from .accountant import SiteAccountant
from .policy import ConsortiumMemory
from .private_files import write_private

MEMORY_FILE = "answered.json"
LOCK_FILE = ".lock"


class SiteMemory(BaseModel):
    """What the site answered, per consortium."""

    model_config = ConfigDict(extra="forbid")

    consortia: dict[str, ConsortiumMemory] = Field(default_factory=dict)


class StateFolderError(PermissionError):
    """The state folder is not this user's alone; the message names it and what is wrong."""


def private_folder(folder: Path) -> Path:
    """``folder``, created 0700 if absent; refused unless a directory owned by this user that others cannot use."""
    folder = Path(folder)
    if not os.path.lexists(folder):
        folder.mkdir(mode=0o700, parents=True)
        os.chmod(folder, 0o700)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode):
        raise StateFolderError(f"{folder}: the site's state folder is not a directory")
    if st.st_uid != os.getuid():
        raise StateFolderError(f"{folder}: the site's state folder belongs to user id {st.st_uid}, not this site "
                               f"(user id {os.getuid()})")
    if st.st_mode & 0o077:
        raise StateFolderError(f"{folder}: the site's state folder is open to others (mode "
                               f"{stat.S_IMODE(st.st_mode):o}); chmod 700 it")
    return folder


class SiteState:
    """``with SiteState(folder) as state:`` the folder locked, its memory and accountant loaded; ``save()`` writes
    both. Concurrent messages of one site wait for each other here."""

    def __init__(self, folder: Path):
        self.folder = private_folder(Path(folder))
        self._fd: int | None = None

    def __enter__(self) -> "SiteState":
        self._fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        path = self.folder / MEMORY_FILE
        self.memory = SiteMemory.model_validate_json(path.read_text(encoding="utf-8")) if path.exists() \
            else SiteMemory()
        self.accountant = SiteAccountant(self.folder)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def consortium(self, name: str) -> ConsortiumMemory:
        return self.memory.consortia.setdefault(name, ConsortiumMemory())

    def save(self) -> None:
        write_private(self.folder / MEMORY_FILE, self.memory.model_dump_json(indent=1).encode())
        write_private(self.accountant.path, self.accountant.dump().encode())

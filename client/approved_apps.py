"""The app bundles (Flower FABs) a site has approved: the only code its SuperNode lets near its data.

A hospital reviews a release of the app (its source tree), computes the sha256 of the bundle ``flwr run`` builds from
it (``magnet-fl deploy approve-app --bundle SITE_DIR APP_DIR``; Flower builds bundles byte for byte
reproducibly) and lists it in ``SITE_DIR/approved-apps.toml``. The SuperNode reads the list at every new run and
refuses any other bundle before storing it (``flower_compat.supernode.refuse_unapproved_apps``)."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import tomli_w
import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .private_files import write_private

FILE = "approved-apps.toml"
HEADER = "# app bundles (Flower FABs) this site runs; any other is refused before it is stored\n"
HEX64 = re.compile(r"[0-9a-f]{64}")


def sha256_text(value: str, what: str = "sha256") -> str:
    """A sha256 as 64 lower-case hex digits; a clear error otherwise."""
    text = value.strip().lower()
    if not HEX64.fullmatch(text):
        raise ValueError(f"{what} {value!r} is not a sha256 (64 hex digits)")
    return text


class ApprovedApp(BaseModel):
    """One approved bundle: its sha256 and, for the people reading the file, what it is and when it was approved."""

    model_config = ConfigDict(extra="forbid")

    sha256: str
    note: str = Field("", description="what was reviewed (release, source path, reviewer)")
    approved: str = Field("", description="UTC time it was added (ISO 8601)")

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        return sha256_text(value)


class ApprovedApps(BaseModel):
    """``approved-apps.toml``: ``[[app]]`` tables, one per approved bundle."""

    model_config = ConfigDict(extra="forbid")

    app: list[ApprovedApp] = Field(default_factory=list)

    def hashes(self) -> set[str]:
        return {a.sha256 for a in self.app}


def load(path: Path) -> ApprovedApps:
    """The site's list; an absent file is an empty list, an unreadable or malformed one a clear error."""
    path = Path(path)
    if not path.exists():
        return ApprovedApps()
    try:
        return ApprovedApps.model_validate(tomllib.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, ValidationError) as exc:
        raise ValueError(f"{path}: not a list of approved app bundles ({str(exc).splitlines()[0]})") from None


def approve(path: Path, sha256: str, note: str = "") -> ApprovedApps:
    """Add ``sha256`` to the list in ``path`` (created 0600 if absent); an already approved hash is kept once."""
    path = Path(path)
    apps = load(path)
    digest = sha256_text(sha256)
    if digest not in apps.hashes():
        stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        apps.app.append(ApprovedApp(sha256=digest, note=note, approved=stamp))
        write_private(path, (HEADER + tomli_w.dumps(apps.model_dump())).encode())
    return apps


def checker(path: Path, extra: set[str] = frozenset()):
    """``check(sha256) -> None | reason`` for the SuperNode: accepts a hash listed in ``path`` (read at every call,
    so an approval or a withdrawal applies from the next run on) or in ``extra`` (given on the command line). A list
    that cannot be read refuses everything (with its error as the reason)."""
    def check(sha256: str) -> str | None:
        try:
            approved = load(path).hashes() | set(extra)
        except ValueError as exc:
            return f"app bundle refused by this site: {exc}"
        if sha256 in approved:
            return None
        return (f"app bundle sha256 {sha256} is not approved by this site (its list: {path}); the site runs only "
                f"bundles it reviewed (`magnet-fl deploy approve-app`)")
    return check

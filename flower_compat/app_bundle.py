"""The app bundle (FAB) Flower 1.41's ``flwr run APP_DIR`` builds and sends, computed from the same source tree."""

from __future__ import annotations

import hashlib
from pathlib import Path

# (importing this module runs flower_compat/__init__.py first: the Flower version is checked before these imports)
from flwr.cli.build import build_fab_from_disk


def app_bundle(app_dir: Path) -> bytes:
    """The bytes of the bundle ``flwr run APP_DIR`` would send (Flower's own builder: files filtered by the app's
    .gitignore and include rules, sorted, with a fixed date, so the same tree always gives the same bytes)."""
    return build_fab_from_disk(Path(app_dir))


def app_bundle_sha256(app_dir: Path) -> str:
    """sha256 (hex) of :func:`app_bundle`: what a SuperNode receives as the run's FAB hash."""
    return hashlib.sha256(app_bundle(app_dir)).hexdigest()

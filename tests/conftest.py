"""Shared fixtures: where the real TCGA data live, and a failure (not a skip) in CI when they are absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# One torch thread per test process unless the caller says otherwise: the suite runs two workers on two cores
# (pytest-xdist), and this model trains no faster on two threads. Tests of the thread policy clear it themselves.
os.environ.setdefault("MAGNET_FL_THREADS", "1")
# Every Ray a test starts is its own local instance: never one another test (or worker) started with `ray start`
# (tests that want a running cluster pass its address explicitly).
os.environ.setdefault("RAY_ADDRESS", "local")

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    return Path(os.environ.get("MAGNET_FL_DATA", REPO.parent / "shared" / "data")).expanduser()


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Root of the real data; in CI (CI=true) its absence is a failure, elsewhere a skip with the reason."""
    root = _data_root()
    if not (root / "tcga-ov-magnet").is_dir():
        msg = f"real TCGA data not found at {root} (set MAGNET_FL_DATA)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def ov_path(data_root: Path) -> Path:
    return data_root / "tcga-ov-magnet"

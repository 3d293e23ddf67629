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


# The slowest test files, slowest first (their seconds on two cores in CI, measured with --durations). With
# `-n 2 --dist loadfile`, pytest-xdist hands out whole files in collection order, so these start first and the
# longest file is never the last one left on a worker while the other worker idles. (xdist's own default reorders
# files by their number of tests, which put the one-test deployment file last: switched off in pytest_configure.)
SLOW_FILES = ("test_deployment.py", "test_ray_cluster.py", "test_sparse_training.py", "test_parallel.py",
              "test_deployment_attacks.py", "test_robust.py", "test_prepare_federated.py", "test_training_numbers.py",
              "test_federated.py", "test_engine_threads.py", "test_study.py", "test_nested_tune.py")


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the file order set below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: the rest keep their order

"""Loading a simulated consortium (cohort -> sites) once per process, shared by clients and server."""

from __future__ import annotations

import functools

from magnet_core.data import Cohort, load_for_seed
from magnet_core.synthetic import make_generated_cohort

from .scenarios import build_consortium, load_scenario


@functools.lru_cache(maxsize=8)
def load_consortium(data_path: str, scenario: str, seed: int) -> tuple[Cohort, tuple[Cohort, ...]]:
    """(pooled cohort, sites) for a data path ("" = generated cohort), scenario name/file and seed."""
    cohort = make_generated_cohort(seed=seed) if not data_path else load_for_seed(data_path, seed, log=_quiet)
    sites = build_consortium(cohort, load_scenario(scenario), seed, log=_quiet)
    return cohort, tuple(sites)


def _quiet(*_args, **_kwargs) -> None:
    """Loading notes are printed once by the driver, not by every client process."""

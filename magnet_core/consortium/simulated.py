"""Loading a simulated consortium (cohort -> sites) once per process, shared by clients and server."""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

from magnet_core.cohort.data import Cohort, load_for_seed
from magnet_core.cohort.generated import GENERATED_VARIANTS, generated_cohort
from magnet_core.consortium.scenarios import build_consortium, load_scenario
from magnet_core.protocol.enrolment import Enrolment, SiteFacts

GENERATED_PREFIX = "generated:"


def parse_generated(data_path: str) -> tuple[str, int | None] | None:
    """(variant, patients or None for the variant's own) of a generated-cohort data path, None for a real one.

    "" and "generated:N" are the default variant (300 or N patients); "generated:NAME" and "generated:NAME:N" a
    named one (magnet_core.cohort.generated.GENERATED_VARIANTS). A bad path raises ValueError naming it."""
    if not data_path:
        return "default", None
    if not data_path.startswith(GENERATED_PREFIX):
        return None
    parts = data_path[len(GENERATED_PREFIX):].split(":")
    if len(parts) == 1 and parts[0].isdigit():
        parts = ["default", parts[0]]
    variant, size = parts[0], parts[1] if len(parts) == 2 else None
    if len(parts) > 2 or variant not in GENERATED_VARIANTS or (size is not None and not size.isdigit()) \
            or (size is not None and int(size) < 10):
        raise ValueError(f"data path {data_path!r}: expected 'generated:N', 'generated:NAME' or "
                         f"'generated:NAME:N' with NAME one of {sorted(GENERATED_VARIANTS)} and N >= 10 patients")
    return variant, None if size is None else int(size)


@functools.lru_cache(maxsize=8)
def load_consortium(data_path: str, scenario: str, seed: int, modalities: str = ""
                    ) -> tuple[Cohort, tuple[Cohort, ...]]:
    """(pooled cohort, sites) for a data path (a generated cohort, see :func:`parse_generated`, or a cohort
    folder), scenario name/file, seed and an optional comma-separated subset of modalities."""
    wanted = [m for m in modalities.split(",") if m] or None
    generated = parse_generated(data_path)
    if generated is not None:
        cohort = generated_cohort(*generated, seed=seed)
        if wanted:
            cohort = select_modalities(cohort, wanted)
    else:
        cohort = load_for_seed(data_path, seed, modalities=wanted, log=_quiet)
    sites = build_consortium(cohort, load_scenario(scenario), seed, log=_quiet)
    return cohort, tuple(sites)


def site_name(partition_id: int) -> str:
    """The name of simulated site ``partition_id``."""
    return f"site{partition_id}"


def enrolled_site(site: Cohort, any_seed: bool = False) -> SiteFacts:
    """What a site enrols with: its training (train + val) and test patients, and training patients per modality
    (the upper bounds the coordinator checks its replies by). ``any_seed``: bounds that hold whichever seed
    splits the site (a deployed site's manifest entry): a modality's bound is then every patient holding it,
    capped by the training size (split sizes depend only on the number of patients)."""
    train = site.split_indices("train", "val")
    rows = np.arange(site.mask.shape[0]) if any_seed else train
    return SiteFacts(train=int(train.size), test=int(site.split_indices("test").size),
                     modalities={m: int(min(site.mask[rows, j].sum(), train.size))
                                 for j, m in enumerate(site.modalities)})


def enrolment_of(sites: Sequence[Cohort]) -> Enrolment:
    """What each simulated site enrols with."""
    return Enrolment(sites={site_name(pid): enrolled_site(site) for pid, site in enumerate(sites)})


def select_modalities(cohort: Cohort, wanted: list[str]) -> Cohort:
    """The cohort restricted to ``wanted`` modalities; patients left with none are dropped."""
    cols = [cohort.modalities.index(m) for m in wanted]
    reduced = dataclasses.replace(cohort, modalities=list(wanted), features={m: cohort.features[m] for m in wanted},
                                  X={m: cohort.X[m] for m in wanted}, mask=cohort.mask[:, cols],
                                  paired=cohort.mask[:, cols].all(axis=1))
    return reduced.subset(np.flatnonzero(reduced.mask.any(axis=1)))


def _quiet(*_args, **_kwargs) -> None:
    """Loading notes are printed once by the driver, not by every client process."""

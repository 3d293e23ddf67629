"""Loading a simulated consortium (cohort -> sites) once per process, shared by clients and server."""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

from magnet_core.cohort.data import Cohort, holdout_split, load_for_seed
from magnet_core.cohort.generated import GENERATED_VARIANTS, generated_cohort
from magnet_core.consortium.scenarios import build_consortium, load_scenario
from magnet_core.protocol.enrolment import Enrolment, SiteFacts

GENERATED_PREFIX = "generated:"
# "validation:<data path>": the validation-only view of that data (see :func:`validation_view`)
VALIDATION_PREFIX = "validation:"
# the share of a site's non-test patients the validation view scores (0.1 / (0.7 + 0.1), MAGNET's train:val ratio)
VALIDATION_FRACTION = 0.125


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
    folder), scenario name/file, seed and an optional comma-separated subset of modalities.

    ``validation:<data path>``: the validation-only view of that data (:func:`validation_view`): the sites hold no
    test patient at all, and what they call "test" is their validation patients."""
    if data_path.startswith(VALIDATION_PREFIX):
        cohort = validation_view(load_cohort(data_path[len(VALIDATION_PREFIX):], seed, modalities), seed)
    else:
        cohort = load_cohort(data_path, seed, modalities)
    sites = build_consortium(cohort, load_scenario(scenario), seed, log=_quiet)
    return cohort, tuple(sites)


def load_cohort(data_path: str, seed: int, modalities: str = "") -> Cohort:
    """The pooled cohort (with its split for ``seed``) of a generated-cohort data path or a cohort folder."""
    if data_path.startswith(VALIDATION_PREFIX):
        raise ValueError(f"data path {data_path!r}: 'validation:' may be given once, before the data path")
    wanted = [m for m in modalities.split(",") if m] or None
    generated = parse_generated(data_path)
    if generated is not None:
        cohort = generated_cohort(*generated, seed=seed)
        return select_modalities(cohort, wanted) if wanted else cohort
    return load_for_seed(data_path, seed, modalities=wanted, log=_quiet)


def validation_view(cohort: Cohort, seed: int, fraction: float = VALIDATION_FRACTION) -> Cohort:
    """The validation-only view of a split cohort, for choosing settings (``magnet-fl tune``): the test patients
    are dropped FIRST, so nothing that follows (this split, the sites' partition and missingness, training,
    scoring) can read them; the remaining (train + val) patients get this view's own split, ``fraction`` of them
    stratified by class within paired and within unpaired patients (seeded by ``seed``) as validation patients.
    The validation patients carry the split name "test" so that every evaluation path (the sites' released counts,
    the coordinator's pooled metrics) scores exactly them; the others are "train"."""
    kept = cohort.subset(cohort.split_indices("train", "val"))
    view = holdout_split(kept, seed, fraction, held_out="test")
    view.name = f"{cohort.name} (validation view)"
    return view


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

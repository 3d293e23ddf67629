"""Consortium scenarios (pydantic, TOML): how patients are split into sites and each site's missingness."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Callable, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from magnet_core.data import Cohort, DataError

BUILTIN_DIR = Path(__file__).parent / "scenarios"

# Per site and modality: a fraction in [0, 1) of that site's patients lose the modality, or "absent" (the site
# has no such assay at all), or "keep" (the data's real availability, the default).
MissingRule = Union[float, Literal["absent", "keep"]]


class Scenario(BaseModel):
    """A simulated consortium."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    num_sites: int = Field(ge=1, le=1000)
    partition: Literal["iid", "label-skew", "size-skew"] = "iid"
    alpha: float = Field(1.0, gt=0, description="Dirichlet concentration for label-skew (small = skewed)")
    sizes: list[float] | None = Field(None, description="relative site sizes for size-skew")
    missing: dict[str, MissingRule] = Field(default_factory=dict, description="rule for every site, per modality")
    sites: dict[int, dict[str, MissingRule]] = Field(default_factory=dict, description="per-site overrides")

    @field_validator("missing")
    @classmethod
    def _fractions(cls, v: dict[str, MissingRule]) -> dict[str, MissingRule]:
        for m, rule in v.items():
            if isinstance(rule, float) and not 0.0 <= rule < 1.0:
                raise ValueError(f"missing fraction for {m!r} must be in [0, 1), got {rule}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "Scenario":
        if self.partition == "size-skew":
            if self.sizes is None or len(self.sizes) != self.num_sites or min(self.sizes) <= 0:
                raise ValueError(f"size-skew needs `sizes` with {self.num_sites} positive values")
        for site, rules in self.sites.items():
            if not 0 <= site < self.num_sites:
                raise ValueError(f"[sites.{site}] is outside 0..{self.num_sites - 1}")
            self._fractions(rules)
        return self

    def rule(self, site: int, modality: str) -> MissingRule:
        return self.sites.get(site, {}).get(modality, self.missing.get(modality, "keep"))


def builtin_scenarios() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.toml"))}


def load_scenario(name_or_file: str | Path) -> Scenario:
    """A built-in scenario by name, or a TOML file; errors name the file and the field."""
    path = Path(name_or_file)
    if not path.suffix == ".toml" or not path.exists():
        builtins = builtin_scenarios()
        if str(name_or_file) not in builtins:
            raise DataError(f"unknown scenario {str(name_or_file)!r}: not a TOML file and not one of "
                            f"the built-in scenarios {sorted(builtins)}")
        path = builtins[str(name_or_file)]
    try:
        return Scenario.model_validate(tomllib.loads(path.read_text()))
    except tomllib.TOMLDecodeError as exc:
        raise DataError(f"{path}: not valid TOML ({exc})") from None
    except ValidationError as exc:
        raise DataError(f"{path}: invalid scenario:\n{exc}") from None


# ------------------------------------------------------------------------------------------- partitioning


def _assign(idx: np.ndarray, labels: np.ndarray, scenario: Scenario, props: np.ndarray | None,
            rng: np.random.Generator) -> list[np.ndarray]:
    """Split ``idx`` into sites: per class, by site proportions (stratified for iid/size-skew)."""
    k = scenario.num_sites
    parts: list[list[int]] = [[] for _ in range(k)]
    for c in np.unique(labels[idx]):
        members = rng.permutation(idx[labels[idx] == c])
        p = props[c] if props is not None and props.ndim == 2 else props
        if p is None:
            p = np.full(k, 1.0 / k)
        cuts = np.floor(np.cumsum(p)[:-1] * len(members) + 0.5).astype(int)
        for s, chunk in enumerate(np.split(members, cuts)):
            parts[s].extend(chunk.tolist())
    # every site gets at least one patient of this split when there are enough (move from the largest)
    for s in range(k):
        if not parts[s] and len(idx) >= k:
            donor = max(range(k), key=lambda t: len(parts[t]))
            parts[s].append(parts[donor].pop())
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def partition_indices(cohort: Cohort, scenario: Scenario, seed: int) -> list[np.ndarray]:
    """Patient indices of each site; train+val and test patients are split separately so each site has both."""
    rng = np.random.default_rng(seed)
    k = scenario.num_sites
    props: np.ndarray | None = None
    if scenario.partition == "label-skew":
        props = rng.dirichlet(np.full(k, scenario.alpha), size=cohort.num_classes)  # (C, k)
    elif scenario.partition == "size-skew":
        props = np.asarray(scenario.sizes, dtype=np.float64) / np.sum(scenario.sizes)
    sites: list[list[np.ndarray]] = [[] for _ in range(k)]
    for names in (("train", "val"), ("test",)):
        idx = cohort.split_indices(*names)
        for s, part in enumerate(_assign(idx, cohort.labels, scenario, props, rng)):
            sites[s].append(part)
    return [np.sort(np.concatenate(p)) for p in sites]


def apply_missingness(site: Cohort, scenario: Scenario, site_index: int, rng: np.random.Generator,
                      log: Callable[[str], None] = print) -> Cohort:
    """Apply the scenario's per-modality rules to one site; patients left with no modality are dropped (logged)."""
    unknown = (set(scenario.missing) | set(scenario.sites.get(site_index, {}))) - set(site.modalities)
    if unknown:
        raise DataError(f"scenario {scenario.name!r} names modality {sorted(unknown)} but the data has "
                        f"{site.modalities}")
    for j, m in enumerate(site.modalities):
        rule = scenario.rule(site_index, m)
        if rule == "keep" or rule == 0.0:
            continue
        holders = np.flatnonzero(site.mask[:, j])
        if rule == "absent":
            site = site.drop_modality_rows(m, holders)
            continue
        # drop m for a fraction of the site's patients, choosing among those who keep another modality
        others = site.mask.sum(axis=1) - site.mask[:, j] > 0
        eligible = holders[others[holders]]
        want = int(round(float(rule) * len(holders)))
        if want > len(eligible):
            log(f"site {site_index}: only {len(eligible)} of the {want} patients asked to lose {m} "
                f"hold another modality; dropping {m} for those {len(eligible)}")
            want = len(eligible)
        site = site.drop_modality_rows(m, rng.choice(eligible, size=want, replace=False))
    empty = ~site.mask.any(axis=1)
    if empty.any():
        log(f"site {site_index}: dropped {int(empty.sum())} patient(s) left with no modality")
        site = site.subset(np.flatnonzero(~empty))
    return site


def build_consortium(cohort: Cohort, scenario: Scenario, seed: int, log: Callable[[str], None] = print
                     ) -> list[Cohort]:
    """The sites of ``scenario`` from a split cohort: partition, then site-specific missingness."""
    if cohort.split is None:
        raise DataError(f"cohort {cohort.name!r} needs a train/test split before it is partitioned")
    rng = np.random.default_rng(seed + 7919)
    sites = []
    for s, idx in enumerate(partition_indices(cohort, scenario, seed)):
        site = cohort.subset(idx)
        site.name = f"site{s}"
        sites.append(apply_missingness(site, scenario, s, rng, log))
    return sites

"""Consortium scenarios (pydantic, TOML): how patients are split into sites and each site's missingness."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

import numpy as np
import tomllib
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from magnet_core.cohort.data import Cohort, DataError

BUILTIN_DIR = Path(__file__).parent / "builtin"

# Per site and modality, a rule:
# - a fraction in [0, 1): that share of the site's holders lose the modality, chosen completely at random (MCAR);
# - "absent": the site has no such assay at all; "keep": the data's real availability (the default);
# - a table with ``by = "label"`` or ``by = "value"``: missing not at random (see the two models below).


class MissingByLabel(BaseModel):
    """The chance of losing the modality depends on the patient's class: per class, that fraction of the site's
    holders of the class lose it (``rates = {"3" = 0.8}``; classes not listed use ``default``)."""

    model_config = ConfigDict(extra="forbid")

    by: Literal["label"]
    rates: dict[int, float] = Field(min_length=1, description="class -> fraction in [0, 1] losing the modality")
    default: float = Field(0.0, ge=0.0, le=1.0, description="fraction for classes not in `rates`")

    @field_validator("rates")
    @classmethod
    def _rates(cls, v: dict[int, float]) -> dict[int, float]:
        for c, r in v.items():
            if c < 0:
                raise ValueError(f"class {c} in `rates` must be >= 0")
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"rate for class {c} must be in [0, 1], got {r}")
        return v


class MissingByValue(BaseModel):
    """The chance of losing the modality depends on the patient's own values: exactly ``rate`` of the site's holders
    lose it, drawn without replacement with weight ``sigmoid(slope * (q - 0.5))``, where ``q`` in (0, 1) is the
    patient's quantile, within the site, of a score: the mean of modality ``of``'s values (default: the modality
    itself, i.e. missing not at random) or of one named feature. ``slope > 0``: high scores go missing more often;
    ``slope = 0`` is MCAR."""

    model_config = ConfigDict(extra="forbid")

    by: Literal["value"]
    rate: float = Field(ge=0.0, lt=1.0, description="fraction of the site's holders that lose the modality")
    slope: float = Field(6.0, ge=-50.0, le=50.0, description="logistic steepness in the score quantile")
    of: str | None = Field(None, description="modality whose values give the score (default: this modality)")
    feature: str | None = Field(None, description="score = this feature of `of` (default: the mean of all)")


NotAtRandom = Annotated[Union[MissingByLabel, MissingByValue], Field(discriminator="by")]
_NOT_AT_RANDOM: TypeAdapter = TypeAdapter(NotAtRandom)
RULE_HELP = 'a fraction in [0, 1), "absent", "keep", or a table with by = "label" or by = "value"'


def _parse_rule(v: Any) -> float | str | MissingByLabel | MissingByValue:
    """One clear message per bad rule (instead of one per member of the union)."""
    if isinstance(v, (MissingByLabel, MissingByValue)):
        return v
    if isinstance(v, bool):
        raise ValueError(f"expected {RULE_HELP}; got {v!r}")
    if isinstance(v, (int, float)):
        if not 0.0 <= float(v) < 1.0:
            raise ValueError(f"a missing fraction must be in [0, 1), got {v}")
        return float(v)
    if isinstance(v, str):
        if v not in ("absent", "keep"):
            raise ValueError(f"expected {RULE_HELP}; got {v!r}")
        return v
    if isinstance(v, dict):
        try:
            return _NOT_AT_RANDOM.validate_python(v)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'by'}: "
                                 f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
            raise ValueError(f"invalid rule {v!r}: {problems}") from None
    raise ValueError(f"expected {RULE_HELP}; got {v!r}")


def _dump_rule(v: float | str | BaseModel) -> Any:
    return v.model_dump(mode="json", exclude_none=True) if isinstance(v, BaseModel) else v


MissingRule = Annotated[Union[float, str, MissingByLabel, MissingByValue], PlainValidator(_parse_rule),
                        PlainSerializer(_dump_rule)]


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

    @model_validator(mode="after")
    def _check(self) -> "Scenario":
        if self.partition == "size-skew":
            if self.sizes is None or len(self.sizes) != self.num_sites or min(self.sizes) <= 0:
                raise ValueError(f"size-skew needs `sizes` with {self.num_sites} positive values")
        for site, rules in self.sites.items():
            if not 0 <= site < self.num_sites:
                raise ValueError(f"[sites.{site}] is outside 0..{self.num_sites - 1}")
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
    """Apply the scenario's per-modality rules to one site; patients left with no modality are dropped (logged),
    and ``paired`` is recomputed (complete patients only)."""
    rules = {**scenario.missing, **scenario.sites.get(site_index, {})}
    unknown = set(rules) - set(site.modalities)
    unknown |= {r.of for r in rules.values() if isinstance(r, MissingByValue) and r.of} - set(site.modalities)
    if unknown:
        raise DataError(f"scenario {scenario.name!r} names modality {sorted(unknown)} but the data has "
                        f"{site.modalities}")
    original = site  # scores of value rules are read from the site's data before any simulated loss
    for j, m in enumerate(site.modalities):
        rule = scenario.rule(site_index, m)
        if rule == "keep" or (isinstance(rule, float) and rule == 0.0):
            continue
        holders = np.flatnonzero(site.mask[:, j])
        if rule == "absent":
            site = site.drop_modality_rows(m, holders)
            continue
        # drop m for some of the site's patients, choosing among those who keep another modality
        others = site.mask.sum(axis=1) - site.mask[:, j] > 0
        eligible = holders[others[holders]]
        if isinstance(rule, MissingByLabel):
            chosen = _choose_by_label(site, scenario, site_index, m, rule, holders, eligible, rng, log)
        else:
            rate = rule.rate if isinstance(rule, MissingByValue) else float(rule)
            want = _capped(int(round(rate * len(holders))), eligible, site_index, m, log)
            weights = None
            if isinstance(rule, MissingByValue):
                weights = _value_weights(original, scenario, rule, m, eligible)
            chosen = rng.choice(eligible, size=want, replace=False, p=weights)
        site = site.drop_modality_rows(m, np.sort(chosen))
    empty = ~site.mask.any(axis=1)
    if empty.any():
        log(f"site {site_index}: dropped {int(empty.sum())} patient(s) left with no modality")
        site = site.subset(np.flatnonzero(~empty))
    return with_paired_recomputed(site)


def _capped(want: int, eligible: np.ndarray, site_index: int, m: str, log: Callable[[str], None]) -> int:
    if want > len(eligible):
        log(f"site {site_index}: only {len(eligible)} of the {want} patients asked to lose {m} "
            f"hold another modality; dropping {m} for those {len(eligible)}")
        return len(eligible)
    return want


def _choose_by_label(site: Cohort, scenario: Scenario, site_index: int, m: str, rule: MissingByLabel,
                     holders: np.ndarray, eligible: np.ndarray, rng: np.random.Generator,
                     log: Callable[[str], None]) -> np.ndarray:
    bad = sorted(c for c in rule.rates if c >= site.num_classes)
    if bad:
        raise DataError(f"scenario {scenario.name!r}: missing rule for {m!r} names class {bad} but the data has "
                        f"classes 0..{site.num_classes - 1}")
    chosen = []
    for c in range(site.num_classes):
        rate = rule.rates.get(c, rule.default)
        in_c = holders[site.labels[holders] == c]
        pool = eligible[site.labels[eligible] == c]
        want = _capped(int(round(rate * len(in_c))), pool, site_index, f"{m} (class {c})", log)
        chosen.append(rng.choice(pool, size=want, replace=False))
    return np.concatenate(chosen).astype(np.int64)


def _value_weights(site: Cohort, scenario: Scenario, rule: MissingByValue, m: str, eligible: np.ndarray
                   ) -> np.ndarray | None:
    """Sampling probabilities over ``eligible``: logistic in the within-site quantile of the patient's score."""
    if len(eligible) == 0:
        return None
    source = rule.of or m
    j = site.modalities.index(source)
    if rule.feature is not None:
        if rule.feature not in site.features[source]:
            raise DataError(f"scenario {scenario.name!r}: missing rule for {m!r} names feature {rule.feature!r} "
                            f"that modality {source!r} does not have")
        values = site.X[source][:, site.features[source].index(rule.feature)]
    else:
        values = site.X[source].mean(axis=1)
    if not site.mask[eligible, j].all():
        raise DataError(f"scenario {scenario.name!r}: the score of the missing rule for {m!r} reads {source!r}, "
                        f"which some of the site's patients do not have")
    score = values[eligible].astype(np.float64)
    q = (np.argsort(np.argsort(score, kind="stable"), kind="stable") + 0.5) / len(score)
    w = 1.0 / (1.0 + np.exp(-rule.slope * (q - 0.5)))
    return w / w.sum()


def with_paired_recomputed(site: Cohort) -> Cohort:
    """``paired`` after missingness: a patient is paired only while every modality is still present (a flag read
    from split files, e.g. MAGNET's OV "paired", is kept for patients who lose nothing)."""
    assert site.paired is not None
    return dataclasses.replace(site, paired=site.paired & site.mask.all(axis=1))


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

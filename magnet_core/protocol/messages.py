"""The round messages: the coordinator's round config, a site's training and evaluation replies (no flwr)."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from magnet_core.cohort.manifest import DEFAULT_MIN_COUNT, MIN_COUNT_FLOOR
from magnet_core.model.config import MAX_LABEL_TAU, MAX_PROTOTYPE_WEIGHT, PRESETS
from magnet_core.protocol.errors import ContractError
from magnet_core.protocol.keys import NAME_FIELD, VERSION_KEY
from magnet_core.protocol.version import check_version, stamped

if TYPE_CHECKING:
    from magnet_core.protocol.release import EvalRelease

GROUPS = ("all", "paired", "unpaired")  # test-patient groups an evaluation reply may report
MAX_HISTOGRAM_BINS = 1000  # the most score-histogram bins a site will ever send
MAX_PROXIMAL_MU = 10.0  # FedProx's mu: the paper tries 0.001..1; beyond 10 local training barely moves
ROUND_KEY = "server-round"  # the round config's round number (read by round_of for logs of any message)
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Flower's client-side clipping mod reads this key from the round config (flwr.supercore.differential_privacy)
FLOWER_CLIPPING_KEY = "clipping_norm"

Flat = dict[str, Any]  # what one Flower ConfigRecord / MetricRecord carries: str -> scalar or list of scalars


def _errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "message"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def _site_name(v: str) -> str:
    if not SITE_NAME.match(v):
        raise ValueError("site name must be 1-64 characters of A-Z a-z 0-9 . _ - (starting alphanumeric)")
    return v


def _strict_keys(record: Mapping[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(set(record) - allowed)
    if unknown:
        raise ContractError(f"{what}: unknown key(s) {unknown[:5]}")


def _validated(cls, data: dict, what: str):
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ContractError(f"{what}: {_errors(exc)}") from None


# ----------------------------------------------------------------------------------------------- round config


class RoundConfig(BaseModel):
    """What the coordinator asks of a site in one round (train or evaluate)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    server_round: StrictInt = Field(ge=1, description="1-based round number")
    seed: StrictInt = Field(ge=0, lt=2**31,
                            description="run seed; the site's RNG is seeded from it, the round and its name")
    preset: str = Field(description="hyperparameter preset (model width, learning rate, graph sparsity)")
    local_epochs: StrictInt = Field(ge=1, le=1000, description="local epochs per round")
    proximal_mu: float = Field(0.0, ge=0, le=MAX_PROXIMAL_MU, allow_inf_nan=False,
                               description="FedProx: the local loss gains (mu / 2) ||w - w_global||^2 (0 = off)")
    label_adjustment: Literal["none", "logit-adjust", "fedlc"] = Field(
        "none", description="label skew: per-class logit offsets from the site's own training-label counts inside "
                            "its local cross-entropy (magnet_core.model.loss.label_offsets)")
    label_tau: float = Field(0.0, ge=0, le=MAX_LABEL_TAU, allow_inf_nan=False,
                             description="strength tau of label-adjustment (0 = plain cross-entropy)")
    prototype_weight: float = Field(0.0, ge=0, le=MAX_PROTOTYPE_WEIGHT, allow_inf_nan=False,
                                    description="fedproto: the pull towards the consortium's class prototypes (0 = "
                                                "off); > 0: the model carries them, and the site returns its class "
                                                "means for classes with >= k training patients "
                                                "(magnet_core.model.prototypes)")
    local_update: Literal["epochs", "gradient"] = Field(
        "epochs", description="training: epochs = local_epochs of Adam from the global model; gradient = one "
                              "full-batch step of size 1 (fedsgd): the update is minus the site's gradient at the "
                              "global model, weight decay included, and the coordinator runs the optimiser")
    histogram_bins: StrictInt = Field(ge=2, le=MAX_HISTOGRAM_BINS, description="score-histogram bins (binary tasks)")
    test_graph: Literal["among-test", "attach-to-train", "isolated"] = Field(
        "among-test", description="evaluation: a graph among the test patients (paper), attached to training ones, "
        "or none (isolated: each test patient scored alone)")
    min_count: StrictInt = Field(DEFAULT_MIN_COUNT, ge=MIN_COUNT_FLOOR,
                                 description="k: no released statistic may describe fewer than k patients")
    # simulation only: where a simulated site finds its partition (a deployed site reads its node config instead)
    data_path: str = Field("", max_length=4096)
    scenario: str = Field("", max_length=4096)
    modalities: str = Field("", max_length=4096, description="comma-separated subset of modalities ('' = all)")
    clipping_norm: float | None = Field(None, gt=0, description="differential privacy: clip the update to this norm")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v.lower() not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; known: {sorted(PRESETS)}")
        return v.lower()

    @model_validator(mode="after")
    def _one_step(self) -> "RoundConfig":
        if self.local_update == "gradient" and (self.local_epochs != 1 or self.prototype_weight > 0):
            raise ValueError("local-update 'gradient' is one full-batch step: it needs local-epochs = 1 and no class "
                             "prototypes")
        return self

    def encode(self) -> Flat:
        """The config record, stamped with the protocol version."""
        out = {k.replace("_", "-"): v for k, v in self.model_dump(exclude={"clipping_norm"}).items()}
        if self.clipping_norm is not None:
            out[FLOWER_CLIPPING_KEY] = float(self.clipping_norm)
        return stamped(out)

    @classmethod
    def decode(cls, record: Mapping[str, Any]) -> "RoundConfig":
        """A received config record: its protocol version first (ProtocolVersionError), then its fields."""
        check_version(record, "round config")
        keys = {k.replace("_", "-") for k in cls.model_fields if k != "clipping_norm"} | {FLOWER_CLIPPING_KEY}
        record = {k: v for k, v in record.items() if k != VERSION_KEY}
        _strict_keys(record, keys, "round config")
        data = {(k if k == FLOWER_CLIPPING_KEY else k.replace("-", "_")): v for k, v in record.items()}
        return _validated(cls, data, "round config")


def site_record(name: str) -> Flat:
    """The site record of a site's reply: its name, stamped with the protocol version."""
    return stamped({NAME_FIELD: name})


def site_name_of(site: Mapping[str, Any]) -> str:
    """The name a site record gives; KeyError when it gives none."""
    return str(site[NAME_FIELD])


def round_of(record: Mapping[str, Any] | None) -> int:
    """The round number a config record names (0 when it names none), for logs of messages of any validity."""
    value = (record or {}).get(ROUND_KEY, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# ------------------------------------------------------------------------------------------------ train reply


class TrainReply(BaseModel):
    """A site's training reply besides its weights: who it says it is, and how many patients trained what."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str = Field(description="the site's name (a label; the coordinator decides by node id)")
    num_examples: StrictInt = Field(ge=1, description="training patients")
    modality_counts: dict[str, StrictInt] = Field(description="training patients holding each modality")
    loss: float | None = Field(None, description="mean training loss of the last local epoch")

    _name = field_validator("site")(classmethod(lambda cls, v: _site_name(v)))

    @field_validator("loss")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("loss must be finite")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "TrainReply":
        for m, c in self.modality_counts.items():
            if not 0 <= c <= self.num_examples:
                raise ValueError(f"count of modality {m!r} is {c}, outside 0..num-examples ({self.num_examples})")
        if self.modality_counts and max(self.modality_counts.values()) == 0:
            raise ValueError("no training patient holds any modality")
        return self

    def encode(self) -> tuple[Flat, Flat]:
        """(metrics record, site record)."""
        metrics: Flat = {"num-examples": self.num_examples}
        if self.loss is not None:
            metrics["loss"] = float(self.loss)
        metrics.update({f"count-{m}": int(c) for m, c in self.modality_counts.items()})
        return metrics, site_record(self.site)

    @classmethod
    def decode(cls, metrics: Mapping[str, Any], site: Mapping[str, Any], modalities: Sequence[str]) -> "TrainReply":
        """A received reply: the site record's protocol version first (ProtocolVersionError), then its fields."""
        check_version(site, "train reply")
        _strict_keys(site, {NAME_FIELD, VERSION_KEY}, "site record")
        _strict_keys(metrics, {"num-examples", "loss"} | {f"count-{m}" for m in modalities}, "train metrics")
        absent = [m for m in modalities if f"count-{m}" not in metrics]
        if absent:
            raise ContractError(f"train metrics: no count for modality(ies) {absent}")
        data = {"site": site.get(NAME_FIELD), "num_examples": metrics.get("num-examples"),
                "modality_counts": {m: metrics[f"count-{m}"] for m in modalities}, "loss": metrics.get("loss")}
        return _validated(cls, data, "train reply")


# ------------------------------------------------------------------------------------------- evaluation reply


class Histogram(BaseModel):
    """A released score histogram: bin ``edges`` (B + 1 values from 0 to 1, 0.5 among them: the decision
    threshold) and ``counts`` (2 x B: negatives, positives)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    edges: list[float]
    counts: list[list[StrictInt]]

    @model_validator(mode="after")
    def _shape(self) -> "Histogram":
        e = np.asarray(self.edges, dtype=np.float64)
        c = np.asarray(self.counts, dtype=np.int64)
        if c.ndim != 2 or c.shape[0] != 2 or c.shape[1] < 1:
            raise ValueError("histogram counts must be 2 rows (negatives, positives) of at least one bin")
        if e.shape != (c.shape[1] + 1,) or not np.all(np.isfinite(e)):
            raise ValueError(f"histogram edges must be {c.shape[1] + 1} finite values for {c.shape[1]} bins")
        if e[0] != 0.0 or e[-1] != 1.0 or np.any(np.diff(e) <= 0) or not np.any(np.isclose(e, 0.5)):
            raise ValueError("histogram edges must rise strictly from 0 to 1 with 0.5 among them")
        if (c < 0).any():
            raise ValueError("histogram has negative counts")
        return self


class EvalReply(BaseModel):
    """A site's evaluation as counts released under the minimum count k: confusion matrices per group and, for
    binary tasks, score histograms with merged bins. Groups the site withheld (fewer than k test patients, or
    one that would reveal such a group by difference) are listed in ``withheld`` and carry nothing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str
    num_examples: StrictInt = Field(ge=0, description="test patients behind the released 'all' group (0 if withheld)")
    confusion: dict[Literal["all", "paired", "unpaired"], list[list[StrictInt]]] = Field(default_factory=dict)
    histogram: dict[Literal["all", "paired", "unpaired"], Histogram] = Field(default_factory=dict)
    withheld: list[Literal["all", "paired", "unpaired"]] = Field(default_factory=list)

    _name = field_validator("site")(classmethod(lambda cls, v: _site_name(v)))

    @model_validator(mode="after")
    def _consistent(self) -> "EvalReply":
        overlap = set(self.withheld) & (set(self.confusion) | set(self.histogram))
        if overlap:
            raise ValueError(f"group(s) {sorted(overlap)} are both withheld and released")
        if set(self.histogram) - set(self.confusion):
            raise ValueError("a histogram without its confusion matrix")
        if "all" not in self.confusion and "all" not in self.withheld:
            raise ValueError("neither a confusion matrix for 'all' nor 'all' withheld")
        for g, cm in self.confusion.items():
            a = np.asarray(cm, dtype=np.int64)
            if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 2:
                raise ValueError(f"cm-{g} is not a square matrix of at least 2 classes")
            if (a < 0).any():
                raise ValueError(f"cm-{g} has negative counts")
            hist = self.histogram.get(g)
            if hist is not None:
                h = np.asarray(hist.counts, dtype=np.int64)
                if a.shape[0] != 2:
                    raise ValueError(f"hist-{g} in a {a.shape[0]}-class task")
                if not np.array_equal(h.sum(axis=1), a.sum(axis=1)):
                    raise ValueError(f"hist-{g} class totals {h.sum(axis=1).tolist()} differ from cm-{g}'s "
                                     f"{a.sum(axis=1).tolist()}")
        sizes = {np.asarray(cm).shape for cm in self.confusion.values()}
        if len(sizes) > 1:
            raise ValueError(f"confusion matrices of different sizes {sorted(sizes)}")
        if "all" in self.confusion:
            total = int(np.asarray(self.confusion["all"]).sum())
            if total != self.num_examples:
                raise ValueError(f"cm-all holds {total} patients but num-examples is {self.num_examples}")
            if "paired" in self.confusion and "unpaired" in self.confusion:
                parts = np.asarray(self.confusion["paired"]) + np.asarray(self.confusion["unpaired"])
                if not np.array_equal(parts, np.asarray(self.confusion["all"])):
                    raise ValueError("cm-paired + cm-unpaired differ from cm-all")
        elif self.num_examples != 0:
            raise ValueError("num-examples must be 0 when 'all' is withheld")
        return self

    def encode(self) -> tuple[Flat, Flat]:
        metrics: Flat = {"num-examples": self.num_examples}
        for g, cm in self.confusion.items():
            metrics[f"cm-{g}"] = [int(v) for row in cm for v in row]
        for g, h in self.histogram.items():
            metrics[f"hist-{g}"] = [int(v) for row in h.counts for v in row]
            metrics[f"edges-{g}"] = [float(v) for v in h.edges]
        for g in self.withheld:
            metrics[f"withheld-{g}"] = 1
        return metrics, site_record(self.site)

    @classmethod
    def decode(cls, metrics: Mapping[str, Any], site: Mapping[str, Any], num_classes: int, max_bins: int
               ) -> "EvalReply":
        """A received reply: the site record's protocol version first (ProtocolVersionError), then its fields."""
        check_version(site, "evaluation reply")
        _strict_keys(site, {NAME_FIELD, VERSION_KEY}, "site record")
        allowed = {"num-examples"} | {f"{p}-{g}" for p in ("cm", "hist", "edges", "withheld") for g in GROUPS}
        _strict_keys(metrics, allowed, "evaluation metrics")
        confusion, histogram, withheld = {}, {}, []
        for g in GROUPS:
            if f"cm-{g}" in metrics:
                confusion[g] = _matrix(metrics[f"cm-{g}"], num_classes, num_classes, f"cm-{g}")
            if (f"hist-{g}" in metrics) != (f"edges-{g}" in metrics):
                raise ContractError(f"evaluation metrics: hist-{g} and edges-{g} come together")
            if f"hist-{g}" in metrics:
                if num_classes != 2:
                    raise ContractError(f"evaluation metrics: hist-{g} in a {num_classes}-class task")
                edges = metrics[f"edges-{g}"]
                if not isinstance(edges, list) or not 3 <= len(edges) <= max_bins + 1:
                    raise ContractError(f"evaluation metrics: edges-{g} must list 3 to {max_bins + 1} bin edges")
                histogram[g] = {"edges": edges, "counts": _matrix(metrics[f"hist-{g}"], 2, len(edges) - 1,
                                                                  f"hist-{g}")}
            if f"withheld-{g}" in metrics:
                if metrics[f"withheld-{g}"] != 1:
                    raise ContractError(f"evaluation metrics: withheld-{g} must be 1")
                withheld.append(g)
        data = {"site": site.get(NAME_FIELD), "num_examples": metrics.get("num-examples"), "confusion": confusion,
                "histogram": histogram, "withheld": withheld}
        return _validated(cls, data, "evaluation reply")

    def release(self, k: int) -> "EvalRelease":
        """As magnet_core.federation.privacy's release (for its k checks and pooling)."""
        from magnet_core.protocol.release import EvalRelease, ReleasedHistogram

        return EvalRelease(self.site, k, {g: np.asarray(cm, dtype=np.int64) for g, cm in self.confusion.items()},
                           {g: ReleasedHistogram(np.asarray(h.edges, dtype=np.float64),
                                                 np.asarray(h.counts, dtype=np.int64))
                            for g, h in self.histogram.items()},
                           {g: "withheld by the site" for g in self.withheld})

    @classmethod
    def from_release(cls, release: "EvalRelease") -> "EvalReply":
        conf = {g: np.asarray(cm).astype(int).tolist() for g, cm in release.confusion.items()}
        hist = {g: {"edges": [float(e) for e in h.edges], "counts": np.asarray(h.counts).astype(int).tolist()}
                for g, h in release.histogram.items()}
        num = int(np.asarray(release.confusion["all"]).sum()) if "all" in release.confusion else 0
        return cls(site=release.site, num_examples=num, confusion=conf, histogram=hist,
                   withheld=[g for g in GROUPS if g in release.withheld])


def _matrix(value: Any, rows: int, cols: int, key: str) -> list[list[int]]:
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise ContractError(f"evaluation metrics: {key} must be a list of integers")
    if len(value) != rows * cols:
        raise ContractError(f"evaluation metrics: {key} has {len(value)} values, expected {rows} x {cols}")
    return [value[r * cols:(r + 1) * cols] for r in range(rows)]

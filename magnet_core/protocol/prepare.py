"""The federated preparation's messages: what the coordinator asks of a site, and what a site answers.

  query.prepare_stats   PrepareRequest -> StatsReply (site + features records; in the clear mode also the
                        k-released statistics, STATS_KEY arrays named by ``stats_key``) or PrepareRefusal
  query.prepare_secagg  PrepareRequest + the StatsLayout (LAYOUT_KEY) + SecAggStart -> KeyAdvert (secure sum)
  query.prepare_apply   PrepareRequest with the manifest -> PrepareApplied or PrepareRefusal

Every config and site record carries the protocol version; ``decode`` refuses another (ProtocolVersionError).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from magnet_core.cohort.manifest import ConsortiumManifest
from magnet_core.cohort.preprocess import PrepareConfig, SiteSpec
from magnet_core.protocol.errors import ContractError
from magnet_core.protocol.keys import NAME_FIELD, VERSION_KEY
from magnet_core.protocol.version import check_version, stamped

Flat = dict[str, Any]
ERROR_FIELD = "error"  # a refusal's reason (site record)


def stats_key(modality: str, field: str) -> str:
    """The STATS_KEY array of one statistic (``field`` of magnet_core.cohort.preprocess.STAT_FIELDS)."""
    return f"{modality}/{field}"


def _json(record: Mapping[str, Any], key: str, what: str, default: str | None = None) -> Any:
    text = record.get(key, default)
    if not isinstance(text, str):
        raise ContractError(f"{what}: {key!r} must be a JSON string")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ContractError(f"{what}: {key!r} is not valid JSON ({exc})") from None


def _checked(cls, data: dict, what: str):
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}" for e in exc.errors())
        raise ContractError(f"{what}: {problems}") from None


class PrepareRequest(BaseModel):
    """The coordinator's config record of every preparation message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prepare: PrepareConfig = Field(default_factory=PrepareConfig, description="the consortium's thresholds")
    num_classes: int = Field(0, ge=0, description="classes the consortium declared (0: the sites say)")
    sites: list[SiteSpec] = Field(default_factory=list, description="simulation: one site per partition id")
    secagg: bool = Field(False, description="statistics go through a secure sum")
    observed_ranges: bool = Field(False, description="sites also send observed minima / maxima")
    manifest: ConsortiumManifest | None = Field(None, description="query.prepare_apply: the consortium's manifest")

    def encode(self) -> Flat:
        out: Flat = {"prepare-config": self.prepare.model_dump_json(), "num-classes": self.num_classes,
                     "sites": json.dumps([s.model_dump() for s in self.sites]), "secagg": self.secagg,
                     "observed-ranges": self.observed_ranges}
        if self.manifest is not None:
            out["manifest"] = self.manifest.model_dump_json()
        return stamped(out)

    @classmethod
    def decode(cls, record: Mapping[str, Any]) -> "PrepareRequest":
        what = "preparation request"
        check_version(record, what)
        known = {"prepare-config", "num-classes", "sites", "secagg", "observed-ranges", "manifest", VERSION_KEY}
        unknown = sorted(set(record) - known)
        if unknown:
            raise ContractError(f"{what}: unknown key(s) {unknown[:5]}")
        data = {"prepare": _json(record, "prepare-config", what, "{}"), "num_classes": record.get("num-classes", 0),
                "sites": _json(record, "sites", what, "[]"), "secagg": record.get("secagg", False),
                "observed_ranges": record.get("observed-ranges", False)}
        if "manifest" in record:
            data["manifest"] = _json(record, "manifest", what)
        return _checked(cls, data, what)


class StatsReply(BaseModel):
    """query.prepare_stats: a site's name, classes, k-protected self-description, what it withheld, and its
    feature names per modality (the statistics themselves travel as arrays, or masked)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str = Field(min_length=1)
    num_classes: int = Field(ge=0)
    summary: dict[str, Any] = Field(description="k-released summary (magnet_core.federation.privacy.release_summary)")
    withheld: dict[str, Any] = Field(description="per modality: withheld classes, number of withheld cells")
    features: dict[str, list[str]] = Field(default_factory=dict)

    def encode(self) -> tuple[Flat, Flat]:
        """(site record, features record)."""
        site = stamped({NAME_FIELD: self.site, "num-classes": self.num_classes, "summary": json.dumps(self.summary),
                        "withheld": json.dumps(self.withheld)})
        return site, {m: list(f) for m, f in self.features.items()}

    @classmethod
    def decode(cls, site: Mapping[str, Any], features: Mapping[str, Any]) -> "StatsReply":
        what = "statistics reply"
        check_version(site, what)
        data = {"site": site.get(NAME_FIELD), "num_classes": site.get("num-classes"),
                "summary": _json(site, "summary", what), "withheld": _json(site, "withheld", what),
                "features": {m: list(v) if isinstance(v, list) else v for m, v in features.items()}}
        return _checked(cls, data, what)


class PrepareApplied(BaseModel):
    """query.prepare_apply: where the site wrote its prepared cohort and what it did (counts only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str = Field(min_length=1)
    out_dir: str
    report: dict[str, Any]

    def encode(self) -> Flat:
        return stamped({NAME_FIELD: self.site, "out-dir": self.out_dir, "report": json.dumps(self.report)})

    @classmethod
    def decode(cls, site: Mapping[str, Any]) -> "PrepareApplied":
        what = "apply reply"
        check_version(site, what)
        return _checked(cls, {"site": site.get(NAME_FIELD), "out_dir": site.get("out-dir"),
                              "report": _json(site, "report", what)}, what)


class PrepareRefusal(BaseModel):
    """A site's refusal of a preparation message: its own data problem (or a request it refuses), as text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str
    error: str

    def encode(self) -> Flat:
        return stamped({NAME_FIELD: self.site, ERROR_FIELD: self.error})

    @staticmethod
    def is_refusal(site: Mapping[str, Any]) -> bool:
        return ERROR_FIELD in site

    @classmethod
    def decode(cls, site: Mapping[str, Any]) -> "PrepareRefusal":
        """Read without a version check: a refusal is reported whichever protocol the site speaks."""
        return cls(site=str(site.get(NAME_FIELD, "")), error=str(site.get(ERROR_FIELD, "")))

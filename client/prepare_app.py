"""ClientApp of federated preprocessing: a site sends per-feature statistics, then applies the consortium's plan."""

# What leaves a site (magnet_core/federation/privacy.py, k = the prepare config's min_count):
#   query.prepare_stats    its feature names, a k-protected self-description (counts below k withheld) and which
#                          classes / (class, feature) cells it withheld; in the clear mode also its k-released
#                          counts, sums and sums of squares per class (never minima or maxima).
#   query.prepare_secagg   (secagg=true) stage 0 of a secure sum: the same k-released statistics encoded in the
#                          consortium's StatsLayout stay here, masked; the reply carries public keys only. Then
#                          query.secagg_share / secagg_mask / secagg_unmask: the handlers of client/secure.py.
#   query.prepare_apply    counts of what it prepared.

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from magnet_core.cohort.data import DataError
from magnet_core.cohort.manifest import ConsortiumManifest
from magnet_core.cohort.preprocess import (
    STAT_FIELDS,
    PrepareConfig,
    RawSite,
    SiteSpec,
    apply_manifest,
    site_statistics,
    write_prepared_site,
)

from .private_files import private_output
from .secure import guarded, secagg_mask, secagg_share, secagg_unmask, secure_reply, start_secure_sum

app = ClientApp()
# the secure sum's stages 1-3, the very handlers training uses (any vector stored by start_secure_sum)
app.query("secagg_share")(secagg_share)
app.query("secagg_mask")(secagg_mask)
app.query("secagg_unmask")(secagg_unmask)
REQUIRE_SECAGG = "prepare-require-secagg"  # node config: this site answers only a secure preparation
RELEASED_FIELDS = [f for f in STAT_FIELDS if f not in ("minimum", "maximum")]  # never released: single patients

# A site's raw data are read once for both messages when the same process handles them (always in deployment).
_SITES: dict[tuple[str, str], RawSite] = {}

ONE_SECURE_SUM = "prepare-secure-sum"  # context.state: this site has contributed to a secure sum in this run

def site_spec(config: ConfigRecord, context: Context) -> SiteSpec:
    """This node's site: its own folders in deployment (node_config ``raw-dir`` and ``prepared-dir``, optional
    ``site-name``), or the partition's entry of the simulated ``sites`` list."""
    node = context.node_config
    if "raw-dir" in node:
        if "prepared-dir" not in node:
            raise DataError("node_config has raw-dir but no prepared-dir (where this site writes its prepared data)")
        raw = str(node["raw-dir"])
        return SiteSpec(name=str(node.get("site-name", os.path.basename(raw.rstrip("/")) or "site")),
                        raw_dir=raw, out_dir=str(node["prepared-dir"]))
    sites = json.loads(str(config.get("sites", "[]")))
    pid = int(node.get("partition-id", -1))
    if not 0 <= pid < len(sites):
        raise DataError(f"simulated node with partition-id {pid} has no site (the run lists {len(sites)} sites)")
    return SiteSpec.model_validate(sites[pid])


def _site(config: ConfigRecord, spec: SiteSpec, keep: bool = True) -> tuple[PrepareConfig, RawSite]:
    """This site's settings and raw data; ``keep=False`` drops the cached raw data (after the last message)."""
    cfg = PrepareConfig.model_validate_json(str(config["prepare-config"]))
    key = (spec.model_dump_json(), cfg.model_dump_json())
    site = _SITES[key] if key in _SITES else spec.load(cfg, log=lambda *_: None)
    if keep:
        _SITES[key] = site
    else:
        _SITES.pop(key, None)
    return cfg, site


def _refusal(msg: Message, name: str, exc: Exception) -> Message:
    """A site's own data problem, reported to the server as text (no traceback, no data)."""
    return Message(content=RecordDict({"site": ConfigRecord({"name": name, "error": str(exc)})}), reply_to=msg)


def released_statistics(site: RawSite, cfg: PrepareConfig, num_classes: int | None, observed_ranges: bool = False
                        ) -> tuple[dict, dict]:
    """This site's statistics as the k-rule lets them out, and what it withheld (class indices and numbers of
    cells only: no count of fewer than k patients). ``observed_ranges`` (one party holds every site's data, see
    server.prepare_app.PrepareRun) keeps the per-feature minima / maxima of modalities without a declared range."""
    import dataclasses

    from magnet_core.federation.privacy import release_site_stats

    raw = site_statistics(site, num_classes)
    released, report = release_site_stats(raw, cfg.min_count)
    if observed_ranges:
        released = {m: dataclasses.replace(s, minimum=raw[m].minimum, maximum=raw[m].maximum)
                    if m not in cfg.value_ranges else s for m, s in released.items()}
    return released, {m: {"withheld_classes": r["withheld_classes"], "withheld_cells": r["withheld_cells"]}
                      for m, r in report.items()}


@app.query("prepare_stats")
def stats(msg: Message, context: Context) -> Message:
    """Per class and feature, over this site's training patients, released only where >= k patients back it:
    counts, sums and sums of squares (in the clear, or only feature names when they go through a secure sum)."""
    from magnet_core.federation.privacy import release_summary

    config = msg.content["config"]
    name = f"node {context.node_id}"
    try:
        spec = site_spec(config, context)
        name = spec.name
        if bool(context.node_config.get(REQUIRE_SECAGG, False)) and not bool(config.get("secagg", False)):
            raise DataError(f"this site sends its statistics only through secure aggregation ({REQUIRE_SECAGG} in "
                            "its node config); run the preparation with secagg=true")
        if "raw-dir" in context.node_config and bool(config.get("observed-ranges", False)):
            raise DataError("observed ranges would send per-feature minima and maxima, single patients' values: "
                            "declare value_ranges for every modality instead")
        cfg, site = _site(config, spec)
        released, withheld = released_statistics(site, cfg, int(config.get("num-classes", 0)) or None,
                                                 bool(config.get("observed-ranges", False)))
    except DataError as exc:
        return _refusal(msg, name, exc)
    content = RecordDict({
        "features": ConfigRecord({m: list(st.features) for m, st in released.items()}),
        "site": ConfigRecord({"name": site.name, "num-classes": site.num_classes,
                              "summary": json.dumps(release_summary(site.summary(), cfg.min_count)),
                              "withheld": json.dumps(withheld)}),
    })
    if not bool(config.get("secagg", False)):
        content["stats"] = ArrayRecord({f"{m}/{f}": Array(a) for m, st in released.items()
                                        for f, a in st.to_arrays().items()
                                        if f in RELEASED_FIELDS or np.isfinite(a).any()})
    return Message(content=content, reply_to=msg)


@app.query("prepare_secagg")
def secure_stats(msg: Message, context: Context) -> Message:
    """Stage 0 of the secure sum of this site's k-released statistics in the consortium's StatsLayout: the vector
    is kept here (masked in query.secagg_mask); the reply holds public keys only."""

    def body(rec) -> Message:
        from magnet_core.federation.secagg import SecAggError, SecAggSetup, StatsLayout

        if ONE_SECURE_SUM in context.state.config_records:
            raise SecAggError("this site already contributed its statistics to a secure sum in this run: a second "
                              "sum over other sites would reveal this site's statistics by difference")
        config = msg.content["config"]
        spec = site_spec(config, context)
        cfg, site = _site(config, spec)
        layout = StatsLayout.from_record(msg.content["layout"])
        released, _ = released_statistics(site, cfg, layout.num_classes)
        advert = start_secure_sum(context, SecAggSetup.from_record(rec), int(rec["site-id"]), layout.encode(released))
        context.state[ONE_SECURE_SUM] = ConfigRecord({"done": True})
        return secure_reply(msg, advert, site=site.name)

    return guarded(msg, context, body)


@app.query("prepare_apply")
def apply(msg: Message, context: Context) -> Message:
    """Impute, scale and select locally with the consortium's manifest; write the prepared cohort; report counts."""
    config = msg.content["config"]
    name = f"node {context.node_id}"
    try:
        spec = site_spec(config, context)
        name = spec.name
        cfg, site = _site(config, spec, keep=False)
        manifest = ConsortiumManifest.model_validate_json(str(config["manifest"]))
        frames, report = apply_manifest(site, manifest, cfg.clip)
        with private_output(Path(spec.out_dir)):  # patient-level: 0600 files in a 0700 folder
            write_prepared_site(spec.out_dir, site, frames)
    except DataError as exc:
        return _refusal(msg, name, exc)
    return Message(content=RecordDict({"site": ConfigRecord({"name": name, "out-dir": spec.out_dir,
                                                             "report": json.dumps(report)})}), reply_to=msg)

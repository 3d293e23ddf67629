"""ClientApp of federated preprocessing: a site sends per-feature statistics, then applies the consortium's plan."""

# What leaves a site (magnet_core/federation/privacy.py, k = the prepare config's min_count):
#   query.prepare_stats    its feature names, a k-protected self-description (counts below k withheld) and which
#                          classes / (class, feature) cells it withheld; in the clear mode also its k-released
#                          counts, sums and sums of squares per class (never minima or maxima).
#   query.prepare_secagg   (secagg=true) stage 0 of a secure sum: the same k-released statistics encoded in the
#                          consortium's StatsLayout stay here, masked; the reply carries public keys only. Then
#                          query.secagg_share / secagg_mask / secagg_consistency (authenticated) / secagg_unmask:
#                          the handlers of client/secure.py.
#   query.prepare_apply    counts of what it prepared.

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from magnet_core.cohort.data import DataError
from magnet_core.cohort.preprocess import (
    STAT_FIELDS,
    PrepareConfig,
    RawSite,
    SiteSpec,
    apply_manifest,
    site_statistics,
    write_prepared_site,
)
from magnet_core.protocol.errors import ContractError
from magnet_core.protocol.keys import (
    CONFIG_KEY,
    DEPLOYED_KEYS,
    FEATURES_KEY,
    LAYOUT_KEY,
    NODE_PARTITION_ID,
    NODE_PREPARE_REQUIRE_SECAGG,
    NODE_PREPARED_DIR,
    NODE_RAW_DIR,
    NODE_SITE_NAME,
    PREPARE_APPLY,
    PREPARE_SECAGG,
    PREPARE_STATS,
    QUERY,
    SITE_KEY,
    STATE_DONE,
    STATE_PREPARE_SUMMED,
    STATS_KEY,
    message_type,
)
from magnet_core.protocol.prepare import PrepareApplied, PrepareRefusal, PrepareRequest, StatsReply, stats_key
from magnet_core.protocol.secagg import SecAggError, SecAggStart

from .private_files import private_output
from .secure import STAGE_HANDLERS, abandoned_on_refusal, secagg_record, secure_reply, site_auth, start_secure_sum
from .site_path import Handler, client_app

REQUIRE_SECAGG = NODE_PREPARE_REQUIRE_SECAGG  # node config: this site answers only a secure preparation
RELEASED_FIELDS = [f for f in STAT_FIELDS if f not in ("minimum", "maximum")]  # never released: single patients

# A site's raw data are read once for both messages when the same process handles them (always in deployment).
_SITES: dict[tuple[str, str], RawSite] = {}


def site_spec(request: PrepareRequest, context: Context) -> SiteSpec:
    """This node's site: its own folders in deployment (node_config ``raw-dir`` and ``prepared-dir``, optional
    ``site-name``), or the partition's entry of the simulated ``sites`` list."""
    node = context.node_config
    if NODE_RAW_DIR in node:
        if NODE_PREPARED_DIR not in node:
            raise DataError("node_config has raw-dir but no prepared-dir (where this site writes its prepared data)")
        raw = str(node[NODE_RAW_DIR])
        return SiteSpec(name=str(node.get(NODE_SITE_NAME, os.path.basename(raw.rstrip("/")) or "site")),
                        raw_dir=raw, out_dir=str(node[NODE_PREPARED_DIR]))
    if DEPLOYED_KEYS & set(node):  # a real site never reads or writes the folders a request names
        raise DataError("this site serves no raw data folder for the preparation (its site worker's --raw-dir)")
    pid = int(node.get(NODE_PARTITION_ID, -1))
    if not 0 <= pid < len(request.sites):
        raise DataError(f"simulated node with partition-id {pid} has no site (the run lists {len(request.sites)} "
                        "sites)")
    return request.sites[pid]


def _site(request: PrepareRequest, spec: SiteSpec, keep: bool = True) -> tuple[PrepareConfig, RawSite]:
    """This site's settings and raw data; ``keep=False`` drops the cached raw data (after the last message)."""
    cfg = request.prepare
    key = (spec.model_dump_json(), cfg.model_dump_json())
    site = _SITES[key] if key in _SITES else spec.load(cfg, log=lambda *_: None)
    if keep:
        _SITES[key] = site
    else:
        _SITES.pop(key, None)
    return cfg, site


def _refusal(msg: Message, name: str, exc: Exception) -> Message:
    """A site's own data problem (or a request it refuses), reported to the server as text (no traceback, no data)."""
    return Message(content=RecordDict({SITE_KEY: ConfigRecord(PrepareRefusal(site=name, error=str(exc)).encode())}),
                   reply_to=msg)


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


def stats(msg: Message, context: Context) -> Message:
    """Per class and feature, over this site's training patients, released only where >= k patients back it:
    counts, sums and sums of squares (in the clear, or only feature names when they go through a secure sum)."""
    from magnet_core.federation.privacy import release_summary

    name = f"node {context.node_id}"
    try:
        request = PrepareRequest.decode(msg.content[CONFIG_KEY])
        spec = site_spec(request, context)
        name = spec.name
        if bool(context.node_config.get(REQUIRE_SECAGG, False)) and not request.secagg:
            raise DataError(f"this site sends its statistics only through secure aggregation ({REQUIRE_SECAGG} in "
                            "its node config); run the preparation with secagg=true")
        if NODE_RAW_DIR in context.node_config and request.observed_ranges:
            raise DataError("observed ranges would send per-feature minima and maxima, single patients' values: "
                            "declare value_ranges for every modality instead")
        cfg, site = _site(request, spec)
        released, withheld = released_statistics(site, cfg, request.num_classes or None, request.observed_ranges)
    except (DataError, ContractError) as exc:
        return _refusal(msg, name, exc)
    reply = StatsReply(site=site.name, num_classes=site.num_classes,
                       summary=release_summary(site.summary(), cfg.min_count), withheld=withheld,
                       features={m: list(st.features) for m, st in released.items()})
    site_rec, features = reply.encode()
    content = RecordDict({FEATURES_KEY: ConfigRecord(features), SITE_KEY: ConfigRecord(site_rec)})
    if not request.secagg:
        content[STATS_KEY] = ArrayRecord({stats_key(m, f): Array(a) for m, st in released.items()
                                          for f, a in st.to_arrays().items()
                                          if f in RELEASED_FIELDS or np.isfinite(a).any()})
    return Message(content=content, reply_to=msg)


def secure_stats(msg: Message, context: Context) -> Message:
    """Stage 0 of the secure sum of this site's k-released statistics in the consortium's StatsLayout: the vector
    is kept here (masked in query.secagg_mask); the reply holds public keys only. With a roster and identity key
    (the site worker's own) the sum is authenticated as the training rounds' are: the keys signed, every other
    site's checked against the site's roster, the transcript (the request and layout every site received) signed."""
    from magnet_core.federation.secagg import StatsLayout  # torch: only once a secure preparation is asked for
    from magnet_core.federation.secagg_auth import context_digest

    with abandoned_on_refusal(context):
        if STATE_PREPARE_SUMMED in context.state.config_records:
            raise SecAggError("this site already contributed its statistics to a secure sum in this run: a second "
                              "sum over other sites would reveal this site's statistics by difference")
        request = PrepareRequest.decode(msg.content[CONFIG_KEY])
        spec = site_spec(request, context)
        cfg, site = _site(request, spec)
        layout = StatsLayout.from_record(msg.content[LAYOUT_KEY])
        released, _ = released_statistics(site, cfg, layout.num_classes)
        start = SecAggStart.from_record(secagg_record(msg))
        auth = site_auth(context.node_config, site.name)
        digest = b""
        if auth is not None:  # what the coordinator sent: the same request and layout to every site of the sum
            digest = context_digest({}, {CONFIG_KEY: dict(msg.content[CONFIG_KEY]),
                                         LAYOUT_KEY: dict(msg.content[LAYOUT_KEY])})
        advert = start_secure_sum(context, start.setup, start.site_id, layout.encode(released), auth, digest)
        context.state[STATE_PREPARE_SUMMED] = ConfigRecord({STATE_DONE: True})
        return secure_reply(msg, advert, site=site.name)


def apply(msg: Message, context: Context) -> Message:
    """Impute, scale and select locally with the consortium's manifest; write the prepared cohort; report counts."""
    name = f"node {context.node_id}"
    try:
        request = PrepareRequest.decode(msg.content[CONFIG_KEY])
        spec = site_spec(request, context)
        name = spec.name
        cfg, site = _site(request, spec, keep=False)
        if request.manifest is None:
            raise ContractError("preparation request: query.prepare_apply without the consortium's manifest")
        frames, report = apply_manifest(site, request.manifest, cfg.clip)
        with private_output(Path(spec.out_dir)):  # patient-level: 0600 files in a 0700 folder
            write_prepared_site(spec.out_dir, site, frames)
    except (DataError, ContractError) as exc:
        return _refusal(msg, name, exc)
    applied = PrepareApplied(site=name, out_dir=spec.out_dir, report=report)
    return Message(content=RecordDict({SITE_KEY: ConfigRecord(applied.encode())}), reply_to=msg)


HANDLERS: dict[str, Handler] = {message_type(QUERY, PREPARE_STATS): stats,
                                message_type(QUERY, PREPARE_SECAGG): secure_stats,
                                message_type(QUERY, PREPARE_APPLY): apply,
                                **STAGE_HANDLERS}  # the secure sum's stages 1-3: the very handlers training uses
# Every message through the site's one path (client/site_path.py: policy, audit, error replies): in deployment with a
# site worker (node config worker-socket) this ClientApp only forwards it and the worker answers from its own
# --raw-dir, under its own policy (client/worker.py); otherwise (simulation) it is answered in this process.
app = client_app(HANDLERS)

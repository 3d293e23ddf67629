"""Secure evaluation on Flower's Message API (run config secure-evaluation = true): the sites' evaluation counts
summed by secure aggregation, the minimum count k applied by the coordinator to the consortium's sums.

Stage 0 is evaluate.secagg (global weights + layout + round config + SecAggStart with frac_bits 1 -> site name +
public keys; the site evaluates and encodes its counts, client/secure.py), then the secure sum's stages 1-3
(server/secure.py). The coordinator checks what a sum lets it: each node's name, the summed counts are whole and
consistent (EvalLayout.decode), the summed test patients within the summed enrolment. The round's report then holds
the pooled metrics of the groups with >= k patients in the sum, the sites in the sum, and NO per-site metric (the
sites release none in this round: magnet_core/federation/secure_eval.py).
"""

from __future__ import annotations

import secrets
import time
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from magnet_core.federation.privacy import DEFAULT_MAX_BINS
from magnet_core.federation.secagg import SecAggServer
from magnet_core.federation.secagg_auth import Roster
from magnet_core.federation.secure_eval import EVAL_FRAC_BITS, EvalLayout, pool_sum
from magnet_core.protocol.keys import (
    ARRAYS_KEY,
    CONFIG_KEY,
    EVALUATE,
    LAYOUT_KEY,
    SECAGG_ACTION,
    SECAGG_KEY,
    message_type,
)
from magnet_core.protocol.secagg import SecAggError, SecAggSetup, SecAggStart

from .config import RunConfigError
from .secure import Stage, advert_check, decode_advert, effective_max_dropouts, record_size, secure_sum_stages


def _roster(strategy) -> Roster | None:
    get = getattr(strategy, "roster", None)
    if callable(get):
        return get()
    if not strategy.cfg.secagg_roster:
        return None
    try:
        return Roster.from_file(strategy.cfg.secagg_roster)
    except (OSError, ValueError) as exc:
        raise RunConfigError(f"secagg-roster: {exc}") from None


def secure_evaluate_round(strategy, grid: Grid, params: dict[str, np.ndarray], server_round: int,
                          config: ConfigRecord) -> MetricRecord | None:
    """One secure evaluation round of ``params`` for ``strategy`` (a MagnetFedAvg): the pooled global metrics (also
    in ``strategy.report``), or None (too few sites, or no group with >= k patients in the sum)."""
    cfg, rnd, rep = strategy.cfg, server_round, strategy.report
    t0 = time.perf_counter()
    arrays = strategy.wire(params)
    messages = strategy.configure_evaluate(rnd, arrays, config, grid)
    planned = sorted({int(m.metadata.dst_node_id) for m in messages})
    layout = EvalLayout.for_task(strategy.num_classes, min(cfg.histogram_bins, DEFAULT_MAX_BINS))
    summary: dict[str, Any] = {"status": "failed", "planned": len(planned), "k": strategy.min_count,
                               "vector_length": layout.length, "per_site_metrics": "none (secure evaluation)"}
    rep.screening["secure_evaluation"] = summary
    rep.site_metrics, rep.pooled_sites, rep.pooled_patients, rep.global_metrics = {}, [], 0, {}
    try:
        n = len(planned)
        if n < max(2, cfg.min_sites):
            raise SecAggError(f"{n} site(s) available, a secure evaluation needs at least {max(2, cfg.min_sites)}")
        max_drop = effective_max_dropouts(n, cfg.secagg_max_dropouts)
        setup = SecAggSetup.for_sites(f"{cfg.fingerprint()[:16]}/evaluate-{rnd}/{secrets.token_hex(8)}",
                                      list(range(1, n + 1)), layout.length, max_drop, EVAL_FRAC_BITS)
        summary.update(threshold=setup.threshold, max_dropouts=setup.max_dropouts)
        node_of_sid = dict(zip(setup.site_ids, planned))
        result = _secure_eval(strategy, grid, arrays, rnd, config, setup, layout, node_of_sid, summary)
    except SecAggError as exc:
        summary["error"] = str(exc)
        log(WARNING, "round %d: secure evaluation failed, no metric: %s", rnd, exc)
        return None
    finally:
        summary["seconds"] = time.perf_counter() - t0
    summary["status"] = "pooled"
    rep.global_metrics = result["metrics"]
    rep.pooled_sites = result["sites"] if "all" in result["patients"] else []
    rep.pooled_patients = result["patients"].get("all", 0)
    # a group withheld from the SUM is withheld for every site in it (what the plain rule's "withheld" reports)
    rep.withheld = {s: sorted(result["withheld"]) for s in result["sites"] if result["withheld"]}
    summary.update(sites=result["sites"], withheld_from_sum=result["withheld"], patients=result["patients"])
    log(INFO, "round %d: secure evaluation over %d site(s): %d test patients in the sum, groups withheld from the sum:"
        " %s", rnd, len(result["sites"]), rep.pooled_patients, sorted(result["withheld"]) or "none")
    if "all" not in result["patients"]:
        return None
    return MetricRecord({k: float(v) for k, v in rep.global_metrics.items() if v is not None})


def _secure_eval(strategy, grid: Grid, arrays, rnd: int, config: ConfigRecord, setup: SecAggSetup,
                 layout: EvalLayout, node_of_sid: dict[int, int], summary: dict) -> dict:
    cfg = strategy.cfg
    roster = _roster(strategy)
    server = SecAggServer(setup, roster)
    stage = Stage(strategy.ledger(rnd), str(rnd), node_of_sid, cfg.round_timeout, cfg.straggler_grace)
    wait_for = max(setup.threshold, min(cfg.min_sites, len(node_of_sid)))
    model_bytes = sum(len(a.data) for a in arrays.values())
    layout_rec = ConfigRecord(strategy.layout.to_record())
    payloads = {}
    for sid in setup.site_ids:
        r = ConfigRecord(SecAggStart(setup, sid).to_record())
        payloads[sid] = (RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config, SECAGG_KEY: r, LAYOUT_KEY: layout_rec}),
                         model_bytes + record_size(r) + record_size(layout_rec))
    names: dict[int, str] = {}

    enrolled = advert_check(strategy, server, roster, node_of_sid, names)

    adverts = [a for _, a in stage.exchange(grid, message_type(EVALUATE, SECAGG_ACTION), payloads, wait_for,
                                            decode_advert, "reply", enrolled).values()]
    total, request, answered = secure_sum_stages(grid, stage, server, adverts, config)
    summary["dropped_before_masking"] = [names.get(s, f"node{node_of_sid[s]}") for s in request.dropped]
    summary["dropped_after_masking"] = [names[s] for s in request.survivors if s not in answered]
    sites = [names[s] for s in server.included]
    for s in server.included:
        strategy.report.nodes[names[s]] = node_of_sid[s]
    summed = layout.decode(total)  # SecAggError unless whole, non-negative, consistent counts
    enrolled_test = sum(strategy.facts(s).test for s in sites)
    if summed.num > enrolled_test:
        raise SecAggError(f"summed test patients {summed.num} exceed the {enrolled_test} the sites {sites} enrolled "
                          "with")
    return pool_sum(total, layout, strategy.min_count, sites, min(cfg.histogram_bins, DEFAULT_MAX_BINS))

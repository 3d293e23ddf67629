"""ServerApp of federated preprocessing: combine sites' statistics, decide the plan, write the manifest."""

# The coordinator receives only k-released statistics (magnet_core/federation/privacy.py; classes and (class,
# feature) cells backed by fewer than k training patients are withheld by the site, which says so), never minima or
# maxima (messages: magnet_core/protocol/prepare.py):
# scaling uses the consortium's declared value ranges (PrepareConfig.value_ranges, via protected_ranges). With
# secagg=true the statistics travel only masked (the secure sum of server/secure.py, pairwise + self masks,
# dropout-tolerant) and the coordinator learns the consortium sums, not one site's.

from __future__ import annotations

import json
import secrets
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import tomllib
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from pydantic import BaseModel, ConfigDict, Field

from magnet_core.cohort.data import DataError
from magnet_core.cohort.preprocess import (
    STAT_FIELDS,
    FeatureStats,
    ModalityPrep,
    PrepareConfig,
    SiteSpec,
    build_manifest,
    class_names,
    combine_sites,
    derive_all,
)
from magnet_core.federation.privacy import federated_ranges
from magnet_core.protocol.errors import ContractError
from magnet_core.protocol.keys import (
    CONFIG_KEY,
    FEATURES_KEY,
    LAYOUT_KEY,
    PREPARE_APPLY,
    PREPARE_SECAGG,
    PREPARE_STATS,
    QUERY,
    SECAGG_KEY,
    SITE_KEY,
    STATS_KEY,
    message_type,
)
from magnet_core.protocol.messages import site_name_of
from magnet_core.protocol.prepare import (
    PrepareApplied,
    PrepareRefusal,
    PrepareRequest,
    StatsReply,
    stats_key,
)

app = ServerApp()
RUN_KEY = "prepare-run"  # run-config key holding a whole PrepareRun as JSON (how simulation drivers pass it)


class PrepareRun(BaseModel):
    """One federated preparation: the thresholds, where the sites are (simulation) and where results go."""

    model_config = ConfigDict(extra="forbid")

    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    sites: list[SiteSpec] = Field(default_factory=list, description="simulation: one site per partition id")
    out_dir: str = "runs/prepare"
    min_sites: int = Field(0, ge=0, description="sites to wait for (0 = one per listed site)")
    timeout: float = Field(600.0, gt=0, description="seconds to wait for the sites' replies in each step")
    wait_timeout: float = Field(300.0, gt=0, description="seconds to wait for the sites to connect")
    secagg: bool = Field(False, description="sum the sites' statistics with secure aggregation (masked vectors)")
    secagg_max_dropouts: int = Field(1, ge=0, description="sites that may drop after masking without losing the sum")
    secagg_frac_bits: int = Field(24, ge=8, le=52, description="fixed-point fractional bits of the statistics' "
                                  "secure sum (range +-2^(63 - bits) / sites for every sum of squares)")
    observed_ranges: bool = Field(False, description="modalities without a declared value range are scaled with "
                                  "the sites' observed per-feature minima / maxima, which the sites then send: "
                                  "single patients' values, so only for a preparation where one party holds every "
                                  "site's data (magnet-fl prepare without --federated); refused with secagg")
    straggler_grace: float = Field(30.0, ge=0, description="secure sum: once enough sites replied, wait this "
                                   "long for the rest")
    secagg_roster: str = Field("", description="secure sum: the consortium roster (registered_sites.csv); the sum "
                               "is then authenticated (signed adverts checked, a dealer of bad shares named)")

    def expected_sites(self) -> int:
        return self.min_sites or len(self.sites) or 1

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "PrepareRun":
        """Flower run config (kebab-case; ``prepare-config`` = a TOML file of thresholds; ``prepare-run`` = a
        whole PrepareRun as JSON, which then takes precedence)."""
        if isinstance(run_config.get(RUN_KEY), str):
            return cls.model_validate_json(run_config[RUN_KEY])
        raw = {k.replace("-", "_"): v for k, v in run_config.items()}
        if isinstance(raw.get("prepare_config"), str):
            raw["prepare"] = tomllib.loads(Path(raw.pop("prepare_config")).read_text())
        raw = {k: v for k, v in raw.items() if k in cls.model_fields}
        return cls.model_validate(raw)


def wait_for_sites(grid: Grid, expected: int, timeout: float) -> list[int]:
    """Node ids once ``expected`` sites are connected (they register asynchronously)."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise DataError(f"only {len(nodes)} of {expected} sites connected within {timeout:.0f} s")
        time.sleep(0.2)
    return nodes


def _decoded_reply(reply: Message, action: str):
    """A preparation reply's typed content (StatsReply for prepare_stats, PrepareApplied for prepare_apply)."""
    site = reply.content[SITE_KEY]
    if action == PREPARE_STATS:
        return StatsReply.decode(site, reply.content[FEATURES_KEY])
    return PrepareApplied.decode(site)


def ask(grid: Grid, nodes: list[int], action: str, request: PrepareRequest, timeout: float
        ) -> tuple[list[tuple[Message, Any]], dict]:
    """Send one query to every node; returns the (reply, its typed content) pairs sorted by site name and the
    sites that failed (name -> reason: a data problem the site reported, a reply breaking the contract or of
    another protocol version, a crash, or no reply)."""
    config = request.encode()
    msgs = [Message(RecordDict({CONFIG_KEY: ConfigRecord(config)}), dst_node_id=n,
                    message_type=message_type(QUERY, action)) for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    ok, failed = [], {}
    for r in replies:
        if r.has_error():
            failed[f"node {r.metadata.src_node_id}"] = f"crashed: {r.error.reason}"
            continue
        try:
            site = r.content[SITE_KEY]
            if PrepareRefusal.is_refusal(site):
                refusal = PrepareRefusal.decode(site)
                failed[refusal.site] = refusal.error
                continue
            ok.append((r, _decoded_reply(r, action)))
        except ContractError as exc:
            failed[f"node {r.metadata.src_node_id}"] = f"reply rejected: {exc}"
        except Exception as exc:  # noqa: BLE001 - a reply of the wrong shape must not end the run
            failed[f"node {r.metadata.src_node_id}"] = f"malformed reply ({type(exc).__name__}: {exc})"
    answered = {r.metadata.src_node_id for r in replies}
    for n in nodes:
        if n not in answered:
            failed[f"node {n}"] = f"no reply within {timeout:.0f} s"
    return sorted(ok, key=lambda pair: pair[1].site), failed


def stats_from_reply(reply: Message, stats: StatsReply) -> dict[str, FeatureStats]:
    """A site's released per-modality statistics (minima / maxima only with observed_ranges, else "never
    observed"), checked."""
    arrays = reply.content[STATS_KEY]
    out = {}
    for m, features in stats.features.items():
        got = {f: arrays[stats_key(m, f)].numpy() for f in STAT_FIELDS if stats_key(m, f) in arrays}
        d = len(features)
        got.setdefault("minimum", np.full(d, np.inf))
        got.setdefault("maximum", np.full(d, -np.inf))
        out[m] = FeatureStats.from_arrays(list(features), got, f"statistics of site {stats.site!r}, {m}")
    return out


def decide_combined(combined: dict[str, FeatureStats], num_classes: int, cfg: PrepareConfig,
                    observed_ranges: bool = False):
    """Consortium statistics -> decisions and manifest, scaling with the declared value ranges (pure)."""
    preps = derive_all(federated_ranges(combined, cfg.value_ranges, observed_ranges), cfg)
    manifest = build_manifest(preps, class_names(num_classes, cfg), cfg.missing_feature, cfg.name,
                              max_absent_features=cfg.max_absent_features, min_count=cfg.min_count)
    return manifest, preps, combined


def decide(per_site: list[dict[str, FeatureStats]], num_classes: int, cfg: PrepareConfig,
           observed_ranges: bool = False):
    """Released per-site statistics -> the consortium's decisions and manifest (pure; in-process checks too)."""
    return decide_combined(combine_sites(per_site), num_classes, cfg, observed_ranges)


def secure_statistics(grid: Grid, replies: list[tuple[Message, StatsReply]], num_classes: int, run: PrepareRun,
                      request: PrepareRequest) -> tuple[dict[str, FeatureStats], dict]:
    """The consortium's summed statistics through one secure sum (server/secure.py: the training rounds' stages)
    over the sites that announced their features (``replies``, sorted by name); also what happened."""
    from magnet_core.federation.secagg import SecAggServer, StatsLayout
    from magnet_core.protocol.secagg import KeyAdvert, SecAggError, SecAggSetup, SecAggStart

    from .secure import Ledger, Stage, effective_max_dropouts, payload_bytes, secure_sum_stages

    names = [s.site for _, s in replies]
    node_of_name = {n: int(r.metadata.src_node_id) for n, (r, _) in zip(names, replies)}
    layout = StatsLayout.from_feature_lists([dict(s.features) for _, s in replies], num_classes)
    n = len(names)
    t0 = time.perf_counter()
    try:
        if n < 2:
            raise SecAggError(f"secure aggregation needs at least 2 sites, {n} announced statistics")
        drop = effective_max_dropouts(n, run.secagg_max_dropouts)
        setup = SecAggSetup.for_sites(f"prepare/{secrets.token_hex(8)}", list(range(1, n + 1)), layout.length, drop,
                                      run.secagg_frac_bits)
        node_of_sid = {sid: node_of_name[name] for sid, name in zip(setup.site_ids, names)}
        name_of_sid = dict(zip(setup.site_ids, names))
        ledger = Ledger()
        ledger.names = {node_of_name[nm]: nm for nm in names}
        stage = Stage(ledger, "prepare", node_of_sid, run.timeout, run.straggler_grace)
        roster = None
        if run.secagg_roster:
            from magnet_core.federation.secagg_auth import Roster

            try:
                roster = Roster.from_file(Path(run.secagg_roster))
            except (OSError, ValueError) as exc:
                raise DataError(f"secagg_roster: {exc}") from None
        server = SecAggServer(setup, roster)
        config, lay = ConfigRecord(request.encode()), ConfigRecord(layout.to_record())
        payloads = {}
        for sid in setup.site_ids:
            content = RecordDict({CONFIG_KEY: config, LAYOUT_KEY: lay,
                                  SECAGG_KEY: ConfigRecord(SecAggStart(setup, sid).to_record())})
            payloads[sid] = (content, payload_bytes(content))
        adverts = []
        for sid, msg in stage.run(grid, message_type(QUERY, PREPARE_SECAGG), payloads, setup.threshold).items():
            try:
                advert = KeyAdvert.from_record(msg.content[SECAGG_KEY])
                name = site_name_of(msg.content[SITE_KEY])
            except Exception as exc:  # noqa: BLE001 - a reply of the wrong shape must not end the run
                stage.reject(sid, f"malformed reply ({type(exc).__name__}: {exc})")
                continue
            if advert.site_id != sid or name != name_of_sid[sid]:
                stage.reject(sid, f"answers as {name!r} / secagg site {advert.site_id}, was asked as "
                                  f"{name_of_sid[sid]!r} / {sid}")
                continue
            problem = server.check_advert(advert) if roster is not None else None
            if not problem and roster is not None and advert.site_name != name:
                problem = f"its secure-aggregation keys are signed as {advert.site_name!r}, the site is {name!r}"
            if problem:
                stage.reject(sid, problem)
                continue
            adverts.append(advert)
        total, unmask, answered = secure_sum_stages(grid, stage, server, adverts, config)
    except SecAggError as exc:
        raise DataError(f"the secure sum of the sites' statistics failed: {exc}") from None
    report = {"sites": [name_of_sid[s] for s in server.included],
              "dropped_before_masking": [name_of_sid[s] for s in unmask.dropped],
              "dropped_after_masking": [name_of_sid[s] for s in unmask.survivors if s not in answered],
              "authenticated": roster is not None,
              "left_out": {name_of_sid[s]: why for s, why in server.excluded.items()},
              "threshold": setup.threshold, "vector_length": layout.length, "frac_bits": setup.frac_bits,
              "failed": ledger.failed, "rejected": ledger.rejected, "seconds": time.perf_counter() - t0,
              "bytes_per_site": {name_of_sid[s]: {"up": stage.up[s], "down": stage.down[s]} for s in setup.site_ids}}
    log(INFO, "secure sum of statistics over %d site(s) (threshold %d)", len(report["sites"]), setup.threshold)
    survivors = [pair for sid, pair in zip(setup.site_ids, replies) if sid in server.included]
    return checked_sum(layout, total, announced_training_patients(survivors, run.prepare.min_count)), report


def announced_training_patients(replies: list[tuple[Message, StatsReply]], k: int) -> dict[str, int]:
    """Per modality, the most training patients the sites said they hold (their k-released summaries; a count
    withheld as below k counts as k - 1)."""
    bound: dict[str, int] = {}
    for r, stats in replies:
        try:
            mods = stats.summary["modalities"]
            for m, d in mods.items():
                n = d.get("training_patients")
                bound[m] = bound.get(m, 0) + (k - 1 if n is None else int(n))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"node {r.metadata.src_node_id}: unreadable site summary ({type(exc).__name__}: {exc})"
                            ) from None
    return bound


def checked_sum(layout, total: np.ndarray, bound: dict[str, int]) -> dict[str, FeatureStats]:
    """The decoded secure sum, refused unless it could come from the sites that announced their patients: counts
    non-negative and consistent, at most what the sites announced, sums of squares consistent with the sums
    (Cauchy-Schwarz: n * sum x^2 >= (sum x)^2)."""
    try:
        raw = np.asarray(total, dtype=np.float64)
        decoded = layout.decode(raw)
    except (IndexError, ValueError) as exc:
        raise DataError(f"the secure sum of the sites' statistics does not fit the layout ({exc})") from None
    out = {}
    for m, st in decoded.items():
        source = f"the secure sum of the sites' {m} statistics"
        st = FeatureStats.from_arrays(st.features, st.to_arrays(), source=source)
        if st.n > bound.get(m, 0):
            raise DataError(f"{source} counts {st.n} training patients, the sites announced at most "
                            f"{bound.get(m, 0)}: a site sent an impossible vector")
        tol = 1e-6 * (1.0 + np.abs(st.total) ** 2)
        if ((st.count * st.total_sq + tol) < st.total ** 2).any():
            raise DataError(f"{source} has sums of squares smaller than its sums allow: a site sent an "
                            "impossible vector")
        out[m] = st
    return out


def write_decisions(out: Path, preps: dict[str, ModalityPrep]) -> None:
    """Per-feature audit tables (aggregates only): missing fraction, mean, range, variance, F, each decision."""
    (out / "decisions").mkdir(parents=True, exist_ok=True)
    for m, p in preps.items():
        if p.table is not None:
            p.table.to_csv(out / "decisions" / f"{m}.csv", float_format="%.10g")


def prepare_main(grid: Grid, context: Context, run: PrepareRun | None = None) -> dict:
    """Statistics from every site -> combined -> decisions -> manifest -> every site applies them locally.
    ``run`` defaults to the one in the Flower run config."""
    run = run or PrepareRun.from_run_config(context.run_config)
    cfg, out = run.prepare, Path(run.out_dir)
    t0 = time.perf_counter()
    nodes = wait_for_sites(grid, run.expected_sites(), run.wait_timeout)
    request = PrepareRequest(prepare=cfg, num_classes=len(cfg.class_names or []), sites=run.sites,
                             secagg=run.secagg, observed_ranges=run.observed_ranges)
    if run.secagg and run.observed_ranges:
        raise DataError("secagg with observed_ranges: minima and maxima cannot go through a secure sum; declare "
                        "value_ranges for every modality instead")
    replies, failed = ask(grid, nodes, PREPARE_STATS, request, run.timeout)
    if failed:
        raise DataError("sites could not compute their statistics:\n- " +
                        "\n- ".join(f"{k}: {v}" for k, v in failed.items()))
    names = [s.site for _, s in replies]
    if len(set(names)) != len(names):
        raise DataError(f"two sites use the same name: {names}")
    num_classes = len(cfg.class_names or []) or max(s.num_classes for _, s in replies)
    withheld = {s.site: s.withheld for _, s in replies}
    secure = None
    if run.secagg:
        combined, secure = secure_statistics(grid, replies, num_classes, run, request)
        manifest, preps, _ = decide_combined(combined, num_classes, cfg)
    else:
        manifest, preps, _ = decide([stats_from_reply(r, s) for r, s in replies], num_classes, cfg,
                                    run.observed_ranges)
    t_stats = time.perf_counter() - t0
    manifest.save(out / "manifest.toml")
    write_decisions(out, preps)
    (out / "decisions" / "withheld.json").write_text(json.dumps(
        {"min_count": cfg.min_count, "sites": withheld}, indent=1))
    for name, w in withheld.items():
        for m, r in w.items():
            if r["withheld_classes"] or r["withheld_cells"]:
                log(INFO, "site %s, %s: withheld classes %s and %d (class, feature) cell(s) with fewer than k=%d "
                    "training patients", name, m, r["withheld_classes"], r["withheld_cells"], cfg.min_count)
    for m, p in preps.items():
        log(INFO, "%s: kept %d of %d features (dropped %d for missing values, %d for low variance, %d by F)", m,
            len(p.features), p.report["features_in"], p.dropped_missing, p.dropped_variance, p.dropped_f)
    applied, refused = ask(grid, nodes, PREPARE_APPLY, request.model_copy(update={"manifest": manifest}),
                           run.timeout)
    for name, reason in refused.items():
        log(WARNING, "site %s did not prepare its data: %s", name, reason)
    summary = {
        "status": "ok" if not refused else "incomplete",
        "manifest": str(out / "manifest.toml"),
        "missing_feature": cfg.missing_feature,
        "modalities": {m: p.report for m, p in preps.items()},
        "min_count": cfg.min_count,
        "secure_aggregation": secure,
        "sites": [{**s.summary, "withheld": s.withheld, "prepared": None} for _, s in replies],
        "refused": refused,
        "seconds": {"statistics_and_decisions": t_stats, "total": time.perf_counter() - t0},
        "config": cfg.model_dump(),
    }
    reports = {a.site: a for _, a in applied}
    for site in summary["sites"]:
        if site["site"] in reports:
            site["prepared"] = {"out_dir": reports[site["site"]].out_dir, **reports[site["site"]].report}
    (out / "prepare_report.json").write_text(json.dumps(summary, indent=1))
    return summary


def prepare_and_record(grid: Grid, context: Context, run: PrepareRun | None = None) -> dict:
    """:func:`prepare_main`, recording why in ``prepare_report.json`` when it fails (then failing the run)."""
    run = run or PrepareRun.from_run_config(context.run_config)
    try:
        return prepare_main(grid, context, run)
    except DataError as exc:
        out = Path(run.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "prepare_report.json").write_text(json.dumps({"status": "failed", "error": str(exc)}, indent=1))
        raise


@app.main()
def main(grid: Grid, context: Context) -> None:
    prepare_and_record(grid, context)

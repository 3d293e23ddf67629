"""Secure aggregation as a strategy: MagnetFedAvg whose training round is a secure sum of the sites' clipped updates.

Same hooks as the plain strategy (``train_round``, ``evaluate_round``; evaluation is the plain one): the loop cannot
tell them apart. The training round is stage 0 (train.secagg: global weights + SecAggSetup -> site name + public
keys; the site trains, clips, encodes) followed by the secure sum's stages 1-3 (server/secure.py). The coordinator
checks only what a sum lets it: each node's name (bound by server/names.py), the summed counts against the summed
enrolment, a finite mean.
"""

# With differential privacy (dp-clip-norm > 0) the noise is distributed (magnet_core/federation/dp.py): every site
# clips its update to dp-clip-norm over the blocks it holds, with uniform weights (1 per block held), and adds its own
# noise piece N(0, (z C)^2 / t) before fixed-point encoding and masking, so any t pieces sum to variance (z C)^2. The
# coordinator adds no noise and never sees a noise-free sum; it decodes block sum / sites holding the block and
# accounts the round with the multiplier the s pieces in the sum achieved, z sqrt(s / t). Under DP the loss slots
# stay 0 (a summed loss and patient count would be released without noise): the round reports no training loss.

from __future__ import annotations

import secrets
import time
from logging import INFO, WARNING
from typing import Any, Mapping

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from magnet_core.federation.dp import (
    DPConfig,
    distributed_noise_fits,
    dp_decode,
    effective_noise_multiplier,
    noise_piece_std,
)
from magnet_core.federation.secagg import SecAggServer, UpdateLayout
from magnet_core.federation.secagg_auth import Roster
from magnet_core.federation.secagg_bounds import clip_bound_problems
from magnet_core.federation.secagg_graph import choose_degree
from magnet_core.protocol.enrolment import SiteFacts
from magnet_core.protocol.keys import (
    ARRAYS_KEY,
    CONFIG_KEY,
    LAYOUT_KEY,
    SECAGG_ACTION,
    SECAGG_KEY,
    TRAIN,
    message_type,
)
from magnet_core.protocol.secagg import SecAggError, SecAggSetup, SecAggStart, SecureTrainTerms

from .config import FederatedConfig, RunConfigError
from .secure import Stage, advert_check, decode_advert, effective_max_dropouts, record_size, secure_sum_stages
from .strategy import MagnetFedAvg

LOSS_SLOTS = 2  # the sites append loss * training patients and training patients (client/secure.py)



def graph_degree(cfg: FederatedConfig, n: int) -> int:
    """Neighbours per site of this round's secure sum; 0 = the complete graph (secagg-graph, secagg-graph-degree)."""
    if cfg.secagg_graph != "neighbourhood":
        return 0
    k = cfg.secagg_graph_degree or choose_degree(n, 0.1)
    if k > n - 1 or k == 0:
        log(WARNING, "secagg-graph='neighbourhood' over %d sites: degree %s is not below %d, the complete graph is "
            "used", n, k or "choose_degree(n, 0.1)", n - 1)
        return 0
    return k

class SecureMagnetFedAvg(MagnetFedAvg):
    """MagnetFedAvg whose training round is a secure sum: the coordinator sees masked vectors only. With
    ``secagg-roster`` the sum is authenticated (magnet_core/federation/secagg_auth.py): every advert must be signed
    by the roster's key of the name the node is bound to, and a dealer of bad shares is named and left out."""

    _roster: Roster | None = None

    def roster(self) -> Roster | None:
        """The coordinator's copy of the consortium roster (run config secagg-roster), read once; None without."""
        if not self.cfg.secagg_roster:
            return None
        if self._roster is None:
            try:
                self._roster = Roster.from_file(self.cfg.secagg_roster)
            except (OSError, ValueError) as exc:
                raise RunConfigError(f"secagg-roster: {exc}") from None
        return self._roster

    def train_round(self, grid: Grid, params: dict[str, np.ndarray], server_round: int, config: ConfigRecord
                    ) -> dict[str, np.ndarray] | None:
        """Train one round with secure aggregation; the new global parameters, or None (round failed: model kept).
        The round's outcome is in ``self.report`` (accepted, failed, rejected, screening["secure_aggregation"])."""
        cfg, rnd = self.cfg, server_round
        t0 = time.perf_counter()
        dp = self.dp.model_copy(update={"noise": "distributed"}) if self.dp is not None else None
        arrays = self.wire(params)  # one flat float32 array; the layout travels in each message
        planned = sorted({int(m.metadata.dst_node_id) for m in self.configure_train(rnd, arrays, config, grid)})
        layout = UpdateLayout.from_params(params)
        summary: dict[str, Any] = {"status": "failed", "sites": [], "dropped_before_masking": [],
                                   "dropped_after_masking": [], "planned": len(planned)}
        self.report.screening = {"secure_aggregation": summary}
        try:
            n = len(planned)
            if n < max(2, cfg.min_sites):
                raise SecAggError(f"{n} site(s) available, secure aggregation needs at least {max(2, cfg.min_sites)}")
            max_drop = effective_max_dropouts(n, cfg.secagg_max_dropouts)
            if max_drop < cfg.secagg_max_dropouts:
                log(WARNING, "round %d: secure aggregation over %d sites tolerates %d dropout(s), not %d (the "
                    "threshold must stay a majority)", rnd, n, max_drop, cfg.secagg_max_dropouts)
            rid = f"{cfg.fingerprint()[:16]}/round-{rnd}/{secrets.token_hex(8)}"
            degree = graph_degree(cfg, n)
            if degree:
                setup = SecAggSetup.for_neighbourhoods(rid, list(range(1, n + 1)), layout.length + LOSS_SLOTS,
                                                       degree)
            else:
                setup = SecAggSetup.for_sites(rid, list(range(1, n + 1)), layout.length + LOSS_SLOTS, max_drop)
            summary.update(graph_degree=degree or n - 1)
            summary.update(threshold=setup.threshold, max_dropouts=setup.max_dropouts,
                           vector_length=setup.vector_length,
                           clip_norm=cfg.secagg_clip_norm if dp is None else dp.clip_norm)
            if dp is not None:
                piece = noise_piece_std(dp, setup.threshold)
                problem = distributed_noise_fits(dp.clip_norm, piece, n, setup.frac_bits)
                if problem:
                    raise RunConfigError(f"secagg=true with dp-clip-norm > 0: {problem}")
                summary.update(dp_noise="distributed", dp_noise_piece_std=piece)
            node_of_sid = dict(zip(setup.site_ids, planned))
            new = self._secure_round(grid, params, arrays, rnd, config, setup, layout, node_of_sid, summary, dp)
        except SecAggError as exc:
            summary["error"] = str(exc)
            self.report.accepted = []
            log(WARNING, "round %d: secure aggregation failed, the global model is unchanged: %s", rnd, exc)
            return None
        finally:
            summary["seconds"] = time.perf_counter() - t0
        summary["status"] = "aggregated"
        return new

    def _secure_round(self, grid: Grid, params: dict[str, np.ndarray], arrays, rnd: int, config: ConfigRecord,
                      setup: SecAggSetup, layout: UpdateLayout, node_of_sid: dict[int, int], summary: dict,
                      dp: DPConfig | None = None) -> dict[str, np.ndarray]:
        cfg = self.cfg
        roster = self.roster()
        server = SecAggServer(setup, roster)
        stage = Stage(self.ledger(rnd), str(rnd), node_of_sid, cfg.round_timeout, cfg.straggler_grace)
        t = setup.threshold
        wait_for = max(t, min(cfg.min_sites, len(node_of_sid)))
        modality_aware = cfg.aggregation == "modality-aware"

        # stage 0: train + keys
        model_bytes = sum(len(a.data) for a in arrays.values())
        layout_rec = ConfigRecord(self.layout.to_record())
        payloads = {}
        terms = train_terms(dp, cfg, modality_aware)
        for sid in setup.site_ids:
            r = ConfigRecord(SecAggStart(setup, sid, terms).to_record())
            payloads[sid] = (RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config, SECAGG_KEY: r,
                                         LAYOUT_KEY: layout_rec}),
                             model_bytes + record_size(r) + record_size(layout_rec))
        names: dict[int, str] = {}

        enrolled = advert_check(self, server, roster, node_of_sid, names)

        adverts = [advert for _, advert in stage.exchange(grid, message_type(TRAIN, SECAGG_ACTION), payloads,
                                                          wait_for, decode_advert, "reply", enrolled).values()]
        total, request, answered = secure_sum_stages(grid, stage, server, adverts, config)
        summary["dropped_before_masking"] = [names.get(s, f"node{node_of_sid[s]}") for s in request.dropped]
        summary["dropped_after_masking"] = [names[s] for s in request.survivors if s not in answered]

        # decode and check the counts against what the sites in the sum enrolled with (authenticated: a dealer
        # of bad shares was left out, server.included)
        included = server.included
        summary["left_out"] = {names[s]: why for s, why in server.excluded.items()}
        summary["blamed"] = {names[s]: why for s, why in server.blamed.items()}
        sites = [names[s] for s in included]
        facts = [self.facts(s) for s in sites]
        update, tail = total[:layout.length], total[layout.length:]
        _, wsum = layout.split(update)
        if dp is not None:  # the noisy sum is now known to the coordinator: account for it whatever follows
            self._account(dp, rnd, len(included), setup.threshold)
            problems = site_count_problems(layout, wsum, sites, facts, modality_aware)
        else:
            problems = count_problems(layout, wsum, sites, facts, modality_aware)
        if not problems:  # the sites' clipping, checked on the decoded sum (magnet_core/federation/secagg_bounds.py)
            noise_std = summary.get("dp_noise_piece_std", 0.0) * len(sites) ** 0.5
            problems = clip_bound_problems(layout, update, params, summary["clip_norm"], len(sites),
                                           "updates" if dp is not None else "params", noise_std)
        if problems:
            for s in sites:
                self.report.rejected[s] = "secure sum rejected: " + "; ".join(problems)
            raise SecAggError("; ".join(problems))
        new = dp_decode(layout, update, params) if dp is not None else layout.decode_mean(update, params)
        bad = [k for k, v in new.items() if not np.all(np.isfinite(v))]
        if bad:
            raise SecAggError(f"the decoded mean is not finite in {bad[:3]}")
        # server optimizer (FedAdam / FedYogi): a step along the decoded aggregate; blocks no surviving site held stay
        new = self.server_step(rnd, params, new, {k for k in params if wsum.get(layout.block(k), 0.0) > 0.5})
        self.report.accepted = sites
        for sid in included:
            self.report.nodes[names[sid]] = node_of_sid[sid]
        self.report.train_loss = float(tail[0] / tail[1]) if tail[1] > 0.5 else None
        summary.update(sites=sites, excluded=[names.get(s, self.names.label(node_of_sid[s]))
                                              for s in setup.site_ids if s not in included],
                       authenticated=roster is not None,
                       model_bytes=model_bytes,
                       weights={"shared": wsum[None], **{m: wsum[m] for m in layout.modalities}},
                       bytes_per_site={names.get(s, f"node{node_of_sid[s]}"): {"up": stage.up[s],
                                                                                "down_besides_model": stage.down[s]
                                                                                - model_bytes}
                                       for s in setup.site_ids})
        log(INFO, "round %d: secure aggregation over %d site(s) (threshold %d; dropped before masking %s, after %s)",
            rnd, len(sites), t, summary["dropped_before_masking"] or "none",
            summary["dropped_after_masking"] or "none")
        return new

    def _account(self, dp: DPConfig, rnd: int, pieces: int, threshold: int) -> None:
        """Record the round in the run's accountant (the same one and the same history fields as central DP)."""
        z_eff = effective_noise_multiplier(dp, pieces, threshold)
        spent = self.accountant.add_round(z_eff)
        self.report.dp = {"clip_norm": dp.clip_norm, "noise_multiplier": dp.noise_multiplier, "noise": dp.noise,
                          "sites_averaged": pieces, "noise_pieces": pieces, "threshold": threshold,
                          "effective_noise_multiplier": z_eff, **spent}
        log(INFO, "round %d: DP (distributed): %d noise piece(s) sized for %d, effective multiplier %.3g; spent "
            "epsilon %.3g at delta %g", rnd, pieces, threshold, z_eff, spent["epsilon"], dp.delta)


def train_terms(dp: DPConfig | None, cfg: FederatedConfig, modality_aware: bool) -> SecureTrainTerms:
    """What a site needs besides the setup: the clip norm, the weighting and, for its noise piece, the multiplier z
    (the site sizes its piece z C / sqrt(t) from the setup's threshold itself) and the simulation seed (-1: the
    site draws from its OS)."""
    if dp is None:
        return SecureTrainTerms(cfg.secagg_clip_norm, modality_aware)
    return SecureTrainTerms(dp.clip_norm, modality_aware, True, dp.noise_multiplier, cfg.dp_noise_seed)


def site_count_problems(layout: UpdateLayout, wsum: Mapping[str | None, float], sites: list[str],
                        facts: list[SiteFacts], modality_aware: bool) -> list[str]:
    """Under DP the weight slots count sites: the shared slot must be the number of sites in the sum, each encoder's
    a whole number no larger than the sites in the sum that enrolled with that modality (modality-aware)."""
    problems = []
    for blk, w in wsum.items():
        bound = len(sites) if blk is None or not modality_aware else sum(
            1 for f in facts if f.modalities.get(blk, f.train) > 0)
        label = "sites holding the shared layers" if blk is None else f"sites holding {blk}"
        if abs(w - round(w)) > 1e-3 or w < -1e-3:
            problems.append(f"summed {label} {w:.4f} is not a whole number")
        elif round(w) > bound or (blk is None and round(w) != len(sites)):
            problems.append(f"summed {label} {round(w)} does not fit the {len(sites)} sites {sites} in the sum")
    return problems


def count_problems(layout: UpdateLayout, wsum: Mapping[str | None, float], sites: list[str],
                   facts: list[SiteFacts], modality_aware: bool) -> list[str]:
    """The summed counts must be whole numbers, at least one training patient per site, and within the summed
    enrolment of the sites in the sum (the coordinator cannot check one site's counts)."""
    train_total = sum(f.train for f in facts)
    bounds: dict[str | None, int] = {None: train_total}
    for m in layout.modalities:
        bounds[m] = sum(f.modalities.get(m, f.train) for f in facts) if modality_aware else train_total
    problems = []
    for blk, w in wsum.items():
        label = "training patients" if blk is None else f"count of {blk}"
        if abs(w - round(w)) > 1e-3 or w < -1e-3:
            problems.append(f"summed {label} {w:.4f} is not a whole number")
        elif round(w) > bounds[blk]:
            problems.append(f"summed {label} {round(w)} exceeds the {bounds[blk]} the sites {sites} enrolled with")
    if not problems and round(wsum[None]) < len(sites):
        problems.append(f"summed training patients {round(wsum[None])} < {len(sites)} sites")
    return problems

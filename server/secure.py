"""Secure sums on Flower's Message API (training rounds, preparation statistics): the coordinator sees masks only."""

# secure_sum_stages (stages 1-3 below) serves any secure sum: server/prepare_app.py runs it on the sites'
# preprocessing statistics after its own stage 0 (query.prepare_secagg).

# Stages (the site side is client/secure.py, the messages magnet_core/protocol/secagg.py, the crypto
# magnet_core/federation/secagg.py):
#   0  train.secagg         global weights + SecAggSetup (planned secagg ids 1..n for the sampled nodes, threshold
#                           t = n - max dropouts) -> site name + public keys. The site trains, clips, encodes.
#   1  query.secagg_share   key book of U1 -> encrypted Shamir shares (ShareBundle)
#   2  query.secagg_mask    each site's inbox -> its masked vector, added at once to the running sum (U3)
#   3  query.secagg_unmask  survivors / dropped -> shares; the server removes the masks and decodes the sum.
# A site failing (error reply, no reply, rejected name) before stage 2's reply is left out of the sum; a site of U3
# failing afterwards is still in it. Fewer than t sites at any stage: the round fails, the model is unchanged.
#
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
from flwr.app import ConfigRecord, Message, RecordDict
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
from magnet_core.federation.secagg_bounds import clip_bound_problems  # [authsecagg]
from magnet_core.protocol.keys import (
    ARRAYS_KEY,
    CONFIG_KEY,
    LAYOUT_KEY,
    MASKED_KEY,
    QUERY,
    SECAGG_ACTION,
    SECAGG_KEY,
    SECAGG_MASK,
    SECAGG_SHARE,
    SECAGG_UNMASK,
    SITE_KEY,
    TRAIN,
    message_type,
)
from magnet_core.protocol.messages import site_name_of
from magnet_core.protocol.secagg import (
    KeyAdvert,
    MaskedInput,
    SecAggError,
    SecAggSetup,
    SecAggStart,
    SecureTrainTerms,
    ShareBundle,
    UnmaskRequest,
    UnmaskShares,
)

from .config import FederatedConfig, RunConfigError
from .loop import collect
from .strategy import MagnetFedAvg

LOSS_SLOTS = 2  # the sites append loss * training patients and training patients (client/secure.py)


class Ledger:
    """Where a secure sum's exchanges record who failed, was rejected or did not answer (training: the round's
    report through MagnetFedAvg; preparation: plain dicts). Keyed by node id, labelled by site name if known."""

    def __init__(self) -> None:
        self.destinations: dict[str, int] = {}  # message id -> addressed node (filled by server.loop.collect)
        self.failed: dict[str, str] = {}
        self.rejected: dict[str, str] = {}
        self.names: dict[int, str] = {}

    def node_of(self, msg: Message) -> int:
        return self.destinations.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)

    def label(self, node: int) -> str:
        return self.names.get(node, f"node {node}")

    def error(self, node: int, msg: Message) -> None:
        self.failed[self.label(node)] = f"node {node}: {msg.error.reason}"
        log(WARNING, "secure sum: node %d (%s) failed: %s", node, self.label(node), msg.error.reason)

    def reject(self, node: int, reason: str) -> None:
        self.rejected[self.label(node)] = f"node {node}: {reason}"
        log(WARNING, "secure sum: REJECTED reply from node %d (%s): %s", node, self.label(node), reason)

    def no_reply(self, node: int, action: str) -> None:
        self.failed[self.label(node)] = f"node {node}: no reply to {action} in time"
        log(WARNING, "secure sum: node %d (%s) did not answer %s", node, self.label(node), action)


class _TrainLedger(Ledger):
    """A training round's ledger: everything goes to the strategy's round report (history)."""

    def __init__(self, magnet: MagnetFedAvg, rnd: int):
        super().__init__()
        self.magnet, self.rnd = magnet, rnd
        self.destinations = magnet.destinations

    def node_of(self, msg: Message) -> int:
        return self.magnet.node_of(msg)

    def label(self, node: int) -> str:
        return self.magnet.registry.label(node)

    def error(self, node: int, msg: Message) -> None:
        self.magnet._failed(self.rnd, node, msg)

    def reject(self, node: int, reason: str) -> None:
        self.magnet._reject(self.rnd, node, reason, "secure-aggregation reply")

    def no_reply(self, node: int, action: str) -> None:
        label = self.label(node)
        self.magnet.report.failed[label] = f"node {node}: no reply to {action} in time"
        self.magnet.report.nodes[label] = node
        log(WARNING, "round %d: node %d (%s) did not answer %s", self.rnd, node, label, action)


class Stage:
    """Bookkeeping of one exchange: which planned sites answered well, and bytes per site both ways."""

    def __init__(self, ledger: Ledger, group: str, node_of_sid: Mapping[int, int], timeout: float, grace: float):
        self.ledger, self.group, self.node_of_sid = ledger, group, dict(node_of_sid)
        self.timeout, self.grace = timeout, grace
        self.sid_of_node = {n: s for s, n in node_of_sid.items()}
        self.up: dict[int, int] = dict.fromkeys(node_of_sid, 0)
        self.down: dict[int, int] = dict.fromkeys(node_of_sid, 0)

    def run(self, grid: Grid, action: str, payloads: Mapping[int, tuple[RecordDict, int]], min_replies: int
            ) -> dict[int, Message]:
        """Send each secagg id its message, collect; returns sid -> good reply (errors and strays recorded)."""
        msgs = []
        for sid, (content, down_bytes) in payloads.items():
            self.down[sid] += down_bytes
            msgs.append(Message(content=content, message_type=action, dst_node_id=self.node_of_sid[sid],
                                group_id=self.group))
        replies = collect(grid, msgs, self.timeout, min_replies, self.grace, self.ledger.destinations)
        good: dict[int, Message] = {}
        answered: set[int] = set()
        for msg in sorted(replies, key=self.ledger.node_of):
            node = self.ledger.node_of(msg)
            sid = self.sid_of_node.get(node)
            if sid is None or sid not in payloads:
                continue  # not asked at this stage: ignore
            if sid in answered:
                good.pop(sid, None)
                self.ledger.reject(node, f"{action}: more than one reply")
                continue
            answered.add(sid)
            if msg.has_error():
                self.ledger.error(node, msg)
                continue
            good[sid] = msg
            self.up[sid] += payload_bytes(msg.content)
        for sid in sorted(set(payloads) - answered):
            self.ledger.no_reply(self.node_of_sid[sid], action)
        return good

    def reject(self, sid: int, reason: str) -> None:
        self.ledger.reject(self.node_of_sid[sid], reason)


def payload_bytes(content: RecordDict) -> int:
    """Bytes a message carries in its records (array data, bytes/str lengths, 8 per number)."""
    total = 0
    for rec in content.array_records.values():
        total += sum(len(a.data) for a in rec.values())
    for rec in list(content.config_records.values()) + list(content.metric_records.values()):
        for v in rec.values():
            items = v if isinstance(v, list) else [v]
            total += sum(len(x) if isinstance(x, (bytes, str)) else 8 for x in items)
    return total


def _size(rec: ConfigRecord) -> int:
    return payload_bytes(RecordDict({SECAGG_KEY: rec}))


def effective_max_dropouts(n: int, wanted: int) -> int:
    """The largest dropout allowance <= ``wanted`` whose threshold n - d stays a majority and >= 2."""
    d = max(0, min(wanted, n - 2))
    while d > 0 and not n - d > n // 2:
        d -= 1
    return d


def secure_sum_stages(grid: Grid, stage: Stage, server: SecAggServer, adverts: list[KeyAdvert],
                      config: ConfigRecord) -> tuple[np.ndarray, UnmaskRequest, set[int]]:
    """Stages 1-3 of one secure sum of any vector the sites hold (training updates, preprocessing statistics):
    key book -> shares -> masked vectors (summed as they arrive) -> unmask. ``adverts``: the keys of the sites
    whose stage-0 reply was accepted. Returns the float64 sum over the survivors, the unmask request (survivors,
    dropped before masking) and the survivors that answered the unmask request. SecAggError when too few remain.
    ``config`` travels with every message (the sites' handlers log it)."""
    t = server.setup.threshold
    book = server.collect_keys(adverts)

    # stage 1: shares
    rec = ConfigRecord(book.to_record())
    payloads = {sid: (RecordDict({CONFIG_KEY: config, SECAGG_KEY: rec}), _size(rec)) for sid in book.keys}
    bundles = []
    for sid, msg in stage.run(grid, message_type(QUERY, SECAGG_SHARE), payloads, t).items():
        try:
            bundle = ShareBundle.from_record(msg.content[SECAGG_KEY])
        except Exception as exc:  # noqa: BLE001
            stage.reject(sid, f"malformed share bundle ({type(exc).__name__}: {exc})")
            continue
        if bundle.site_id != sid or set(bundle.ciphertexts) != set(book.keys) - {sid}:
            stage.reject(sid, "share bundle from the wrong site or for the wrong recipients")
            continue
        bundles.append(bundle)
    inboxes = server.route_shares(bundles)

    # stage 2: masked vectors, summed as they arrive
    payloads = {}
    for sid, inbox in inboxes.items():
        r = ConfigRecord(inbox.to_record())
        payloads[sid] = (RecordDict({CONFIG_KEY: config, SECAGG_KEY: r}), _size(r))
    for sid, msg in stage.run(grid, message_type(QUERY, SECAGG_MASK), payloads, t).items():
        try:
            masked = MaskedInput.from_record(msg.content[SECAGG_KEY], msg.content[MASKED_KEY][MASKED_KEY].numpy())
        except Exception as exc:  # noqa: BLE001
            stage.reject(sid, f"malformed masked input ({type(exc).__name__}: {exc})")
            continue
        if masked.site_id != sid:
            stage.reject(sid, f"masked input claims secagg site {masked.site_id}, was told {sid}")
            continue
        try:
            server.add_masked(MaskedInput(sid, masked.masked))
        except SecAggError as exc:  # one bad vector is that site's problem, not the round's
            stage.reject(sid, str(exc))
        del masked
    request = server.unmask_request()

    # stage 3: unmask
    r = ConfigRecord(request.to_record())
    payloads = {sid: (RecordDict({CONFIG_KEY: config, SECAGG_KEY: r}), _size(r)) for sid in request.survivors}
    shares = []
    for sid, msg in stage.run(grid, message_type(QUERY, SECAGG_UNMASK), payloads, t).items():
        try:
            got = UnmaskShares.from_record(msg.content[SECAGG_KEY])
        except Exception as exc:  # noqa: BLE001
            stage.reject(sid, f"malformed unmask shares ({type(exc).__name__}: {exc})")
            continue
        if got.site_id != sid or set(got.self_shares) != set(request.survivors) \
                or set(got.key_shares) != set(request.dropped):
            stage.reject(sid, "unmask shares from the wrong site or not answering the request")
            continue
        shares.append(got)
    answered = {s.site_id for s in shares}
    total = server.finish(shares)
    return total, request, answered



def secure_train_round(grid: Grid, magnet: MagnetFedAvg, params: dict[str, np.ndarray], rnd: int,
                       config: ConfigRecord, cfg: FederatedConfig) -> dict[str, np.ndarray] | None:
    """Train one round with secure aggregation; the new global parameters, or None (round failed: model kept).
    The round's outcome is in ``magnet.report`` (accepted, failed, rejected, screening["secure_aggregation"])."""
    t0 = time.perf_counter()
    dp = magnet.dp.model_copy(update={"noise": "distributed"}) if magnet.dp is not None else None
    arrays = magnet.wire(params)  # one flat float32 array; the layout travels in each message
    planned = sorted({int(m.metadata.dst_node_id) for m in magnet.configure_train(rnd, arrays, config, grid)})
    layout = UpdateLayout.from_params(params)
    summary: dict[str, Any] = {"status": "failed", "sites": [], "dropped_before_masking": [],
                               "dropped_after_masking": [], "planned": len(planned)}
    magnet.report.screening = {"secure_aggregation": summary}
    try:
        n = len(planned)
        if n < max(2, cfg.min_sites):
            raise SecAggError(f"{n} site(s) available, secure aggregation needs at least {max(2, cfg.min_sites)}")
        max_drop = effective_max_dropouts(n, cfg.secagg_max_dropouts)
        if max_drop < cfg.secagg_max_dropouts:
            log(WARNING, "round %d: secure aggregation over %d sites tolerates %d dropout(s), not %d (the "
                "threshold must stay a majority)", rnd, n, max_drop, cfg.secagg_max_dropouts)
        setup = SecAggSetup.for_sites(f"{cfg.fingerprint()[:16]}/round-{rnd}/{secrets.token_hex(8)}",
                                      list(range(1, n + 1)), layout.length + LOSS_SLOTS, max_drop)
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
        new = _protocol(grid, magnet, params, arrays, rnd, config, cfg, setup, layout, node_of_sid, summary, dp)
    except SecAggError as exc:
        summary["error"] = str(exc)
        magnet.report.accepted = []
        log(WARNING, "round %d: secure aggregation failed, the global model is unchanged: %s", rnd, exc)
        return None
    finally:
        summary["seconds"] = time.perf_counter() - t0
    summary["status"] = "aggregated"
    return new


def _protocol(grid: Grid, magnet: MagnetFedAvg, params: dict[str, np.ndarray], arrays, rnd: int,
              config: ConfigRecord, cfg: FederatedConfig, setup: SecAggSetup, layout: UpdateLayout,
              node_of_sid: dict[int, int], summary: dict, dp: DPConfig | None = None) -> dict[str, np.ndarray]:
    server = SecAggServer(setup)
    stage = Stage(_TrainLedger(magnet, rnd), str(rnd), node_of_sid, cfg.round_timeout, cfg.straggler_grace)
    t = setup.threshold
    wait_for = max(t, min(cfg.min_sites, len(node_of_sid)))
    modality_aware = cfg.aggregation == "modality-aware"

    # stage 0: train + keys
    model_bytes = sum(len(a.data) for a in arrays.values())
    layout_rec = ConfigRecord(magnet.layout.to_record())
    payloads = {}
    terms = _train_terms(dp, cfg, modality_aware)
    for sid in setup.site_ids:
        r = ConfigRecord(SecAggStart(setup, sid, terms).to_record())
        payloads[sid] = (RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config, SECAGG_KEY: r, LAYOUT_KEY: layout_rec}),
                         model_bytes + _size(r) + _size(layout_rec))
    replies = stage.run(grid, message_type(TRAIN, SECAGG_ACTION), payloads, wait_for)
    names: dict[int, str] = {}
    adverts = []
    for sid, msg in replies.items():
        node = node_of_sid[sid]
        try:
            name = site_name_of(msg.content[SITE_KEY])
            advert = KeyAdvert.from_record(msg.content[SECAGG_KEY])
        except Exception as exc:  # noqa: BLE001 - a reply of the wrong shape must not end the run
            stage.reject(sid, f"malformed reply ({type(exc).__name__}: {exc})")
            continue
        problem = magnet._claim(node, name) or ("" if magnet._facts(name) is not None
                                                 else f"site {name!r} is not enrolled")
        if not problem and advert.site_id != sid:
            problem = f"answers as secagg site {advert.site_id}, was told {sid}"
        if problem:
            stage.reject(sid, problem)
            continue
        names[sid] = name
        adverts.append(advert)
    total, request, answered = secure_sum_stages(grid, stage, server, adverts, config)
    summary["dropped_before_masking"] = [names.get(s, f"node{node_of_sid[s]}") for s in request.dropped]
    summary["dropped_after_masking"] = [names[s] for s in request.survivors if s not in answered]

    # decode and check the counts against what the surviving sites enrolled with
    sites = [names[s] for s in request.survivors]
    update, tail = total[:layout.length], total[layout.length:]
    _, wsum = layout.split(update)
    if dp is not None:  # the noisy sum is now known to the coordinator: account for it whatever follows
        _account(magnet, dp, rnd, len(request.survivors), setup.threshold)
        _check_site_counts(magnet, layout, wsum, sites, modality_aware)
        new = dp_decode(layout, update, params)
    else:
        _check_counts(magnet, layout, wsum, sites, modality_aware)
        new = layout.decode_mean(update, params)
    # [authsecagg] the sites' clipping, checked on the decoded sum (magnet_core/federation/secagg_bounds.py)
    noise_std = summary.get("dp_noise_piece_std", 0.0) * len(sites) ** 0.5
    clip_problems = clip_bound_problems(layout, update, params, summary["clip_norm"], len(sites),
                                        "updates" if dp is not None else "params", noise_std)
    if clip_problems:
        for s in sites:
            magnet.report.rejected[s] = "secure sum rejected: " + "; ".join(clip_problems)
        raise SecAggError("; ".join(clip_problems))
    # [/authsecagg]
    bad = [k for k, v in new.items() if not np.all(np.isfinite(v))]
    if bad:
        raise SecAggError(f"the decoded mean is not finite in {bad[:3]}")
    # server optimizer (FedAdam / FedYogi): a step along the decoded aggregate; blocks no surviving site held stay
    new = magnet.server_step(rnd, params, new, {k for k in params if wsum.get(layout.block(k), 0.0) > 0.5})
    magnet.report.accepted = sites
    for sid in request.survivors:
        magnet.report.nodes[names[sid]] = node_of_sid[sid]
    magnet.report.train_loss = float(tail[0] / tail[1]) if tail[1] > 0.5 else None
    summary.update(sites=sites, excluded=[names.get(s, magnet.registry.label(node_of_sid[s]))
                                          for s in setup.site_ids if s not in request.survivors],
                   model_bytes=model_bytes, weights={"shared": wsum[None], **{m: wsum[m] for m in layout.modalities}},
                   bytes_per_site={names.get(s, f"node{node_of_sid[s]}"): {"up": stage.up[s],
                                                                            "down_besides_model": stage.down[s]
                                                                            - model_bytes}
                                   for s in setup.site_ids})
    log(INFO, "round %d: secure aggregation over %d site(s) (threshold %d; dropped before masking %s, after %s)",
        rnd, len(sites), t, summary["dropped_before_masking"] or "none", summary["dropped_after_masking"] or "none")
    return new


def _train_terms(dp: DPConfig | None, cfg: FederatedConfig, modality_aware: bool) -> SecureTrainTerms:
    """What a site needs besides the setup: the clip norm, the weighting and, for its noise piece, the multiplier z
    (the site sizes its piece z C / sqrt(t) from the setup's threshold itself) and the simulation seed (-1: the
    site draws from its OS)."""
    if dp is None:
        return SecureTrainTerms(cfg.secagg_clip_norm, modality_aware)
    return SecureTrainTerms(dp.clip_norm, modality_aware, True, dp.noise_multiplier, cfg.dp_noise_seed)


def _account(magnet: MagnetFedAvg, dp: DPConfig, rnd: int, pieces: int, threshold: int) -> None:
    """Record the round in the run's accountant (the same one and the same history fields as central DP)."""
    z_eff = effective_noise_multiplier(dp, pieces, threshold)
    spent = magnet.accountant.add_round(z_eff)
    magnet.report.dp = {"clip_norm": dp.clip_norm, "noise_multiplier": dp.noise_multiplier, "noise": dp.noise,
                        "sites_averaged": pieces, "noise_pieces": pieces, "threshold": threshold,
                        "effective_noise_multiplier": z_eff, **spent}
    log(INFO, "round %d: DP (distributed): %d noise piece(s) sized for %d, effective multiplier %.3g; spent "
        "epsilon %.3g at delta %g", rnd, pieces, threshold, z_eff, spent["epsilon"], dp.delta)


def _check_site_counts(magnet: MagnetFedAvg, layout: UpdateLayout, wsum: Mapping[str | None, float],
                       sites: list[str], modality_aware: bool) -> None:
    """Under DP the weight slots count sites: the shared slot must be the number of sites in the sum, each encoder's
    a whole number no larger than the sites in the sum that enrolled with that modality (modality-aware)."""
    facts = [magnet._facts(s) for s in sites]
    problems = []
    for blk, w in wsum.items():
        bound = len(sites) if blk is None or not modality_aware else sum(
            1 for f in facts if f.modalities.get(blk, f.train) > 0)
        label = "sites holding the shared layers" if blk is None else f"sites holding {blk}"
        if abs(w - round(w)) > 1e-3 or w < -1e-3:
            problems.append(f"summed {label} {w:.4f} is not a whole number")
        elif round(w) > bound or (blk is None and round(w) != len(sites)):
            problems.append(f"summed {label} {round(w)} does not fit the {len(sites)} sites {sites} in the sum")
    if problems:
        for s in sites:
            magnet.report.rejected[s] = "secure sum rejected: " + "; ".join(problems)
        raise SecAggError("; ".join(problems))


def _check_counts(magnet: MagnetFedAvg, layout: UpdateLayout, wsum: Mapping[str | None, float], sites: list[str],
                  modality_aware: bool) -> None:
    """The summed counts must be whole numbers, at least one training patient per site, and within the summed
    enrolment of the sites in the sum (the coordinator cannot check one site's counts)."""
    facts = [magnet._facts(s) for s in sites]
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
    if problems:
        for s in sites:
            magnet.report.rejected[s] = "secure sum rejected: " + "; ".join(problems)
        raise SecAggError("; ".join(problems))

"""MagnetFedAvg: Flower's FedAvg checking every reply by node id; modality-aware, optionally with FedAdam/FedYogi.

The round loop (server/loop.py) drives every strategy through the same hooks: ``train_round`` (send, collect, check,
aggregate; the new global model or None) and ``evaluate_round`` (send, collect, check, pool). The secure-aggregation
strategy (server/secure_strategy.py) overrides ``train_round`` only."""

from __future__ import annotations

import dataclasses
from logging import INFO, WARNING
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from magnet_core.federation.aggregate import (
    TORCH_ADAM_BETAS,
    TORCH_ADAM_EPS,
    ServerOptState,
    SiteUpdate,
    StepsOnDemand,
    aggregate_updates,
    applied_rule,
    flat_delta,
    near_median,
    prototype_outliers,
    robust_refusal,
    server_opt_step,
    step_lr,
    trained_arrays,
    validate_update,
)
from magnet_core.federation.eval_screen import screen_evaluations
from magnet_core.federation.privacy import check_eval_release, pool_releases
from magnet_core.federation.screening import (
    ScreenMemory,
    ScreenRules,
    model_norm,
    screen_gradients,
    screen_updates,
    shrink,
)
from magnet_core.protocol.enrolment import Enrolment, SiteFacts, check_eval_against, check_train_against
from magnet_core.protocol.keys import ARRAYS_KEY, LAYOUT_KEY, METRICS_KEY, MODEL_KEY, SITE_KEY
from magnet_core.protocol.messages import EvalReply, TrainReply
from magnet_core.protocol.wire import Layout, flat_of, pack, unpack

from .collect import collect
from .config import FederatedConfig, preset_of
from .ledger import Ledger, RoundReport
from .names import SiteNames
from .replies import checked_replies


def to_record(params: dict[str, np.ndarray], layout: Layout) -> ArrayRecord:
    """The model as Flower moves it: one flat float32 array (one object per message, not one per array)."""
    return ArrayRecord({MODEL_KEY: Array(pack(params, layout))})


def to_numpy(record: ArrayRecord, layout: Layout) -> dict[str, np.ndarray]:
    """A model record split with the receiver's OWN ``layout`` (never names or shapes from the sender); Flower
    deserialises with allow_pickle=False. ContractError for any other keys, dtype or length."""
    return unpack(flat_of(record), layout)


@dataclasses.dataclass
class TrainUpdate:
    """A decoded training reply and the model it carries (split with the coordinator's own layout)."""

    reply: TrainReply
    params: dict[str, np.ndarray]

    @property
    def site(self) -> str:
        return self.reply.site


class MagnetFedAvg(FedAvg):
    """FedAvg whose aggregation is modality-aware (or plain), whose every reply is checked, optionally robust."""

    def __init__(self, cfg: FederatedConfig, modalities: list[str], num_classes: int,
                 enrolment: Enrolment | None = None, memory: ScreenMemory | None = None,
                 min_count: int | None = None, accountant=None, server_opt: ServerOptState | None = None,
                 names: SiteNames | None = None):
        super().__init__(
            fraction_train=cfg.fraction_train,
            fraction_evaluate=1.0,
            min_train_nodes=cfg.min_sites,
            min_evaluate_nodes=cfg.min_sites,
            min_available_nodes=cfg.min_sites,
        )
        self.cfg = cfg
        self.modalities = modalities
        self.num_classes = num_classes
        self.min_count = cfg.min_count if min_count is None else min_count
        self.enrolment = enrolment
        self.memory = memory or ScreenMemory()
        self.rules = ScreenRules(max_to_global=cfg.update_max_ratio, min_to_global=cfg.update_min_ratio,
                                 peer_ratio=cfg.norm_ratio, clip_factor=cfg.clip_factor,
                                 trust=cfg.trust_weighting, gradient_clip_factor=cfg.gradient_clip_factor)
        # node id -> site name, bound from the enrolment (server/names.py); without one, at first contact
        self.names = names if names is not None else SiteNames.at_first_contact()
        self.dp = None
        if cfg.dp_clip_norm > 0:
            from magnet_core.federation.dp import DPConfig, PrivacyAccountant

            self.dp = DPConfig(clip_norm=cfg.dp_clip_norm, noise_multiplier=cfg.dp_noise_multiplier,
                               delta=cfg.dp_delta)
            self.accountant = accountant or PrivacyAccountant(cfg.dp_delta)
        self.current: dict[str, np.ndarray] = {}
        self.layout: Layout | None = None  # the order and shapes of the flat model this run sends (``wire``)
        self.report = RoundReport()
        # server-side adaptive optimizer (FedAdam / FedYogi) stepping after this class's own aggregation; a resumed
        # run passes the state its checkpoint held (``server_opt_state()`` is what a checkpoint stores)
        self.server_opt: ServerOptState | None = None
        if cfg.server_optimizer != "none":
            self.server_opt = server_opt if server_opt is not None else ServerOptState()
        # message id -> addressed node, filled by `server.collect.collect` (error replies may come from the SuperLink)
        self.destinations: dict[str, int] = {}

    def wire(self, params: dict[str, np.ndarray]) -> ArrayRecord:
        """``params`` as the flat model record (its layout, the params' order, is kept for ``unwire``)."""
        self.layout = Layout.from_params(params)
        return to_record(params, self.layout)

    def unwire(self, record: ArrayRecord) -> dict[str, np.ndarray]:
        """A flat model record this server built (``wire``), as named arrays."""
        if self.layout is None:
            raise RuntimeError("unwire before wire: the strategy knows no model layout yet")
        return to_numpy(record, self.layout)

    def _with_layout(self, messages: Iterable[Message]) -> list[Message]:
        """Every message also names the flat model's layout (names, shapes); the site checks it against its own
        model before using the weights."""
        out = list(messages)
        for msg in out:
            msg.content[LAYOUT_KEY] = ConfigRecord(self.layout.to_record())
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        self.current = self.unwire(arrays)
        self.report = RoundReport()
        self.destinations.clear()
        self.names.refresh(grid)
        return self._with_layout(self._enrolled(server_round, super().configure_train(server_round, arrays, config,
                                                                                       grid)))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        if self.layout is None:
            raise RuntimeError("configure_evaluate before wire: the strategy knows no model layout yet")
        return self._with_layout(self._enrolled(server_round, super().configure_evaluate(server_round, arrays,
                                                                                          config, grid)))

    def _enrolled(self, server_round: int, messages: Iterable[Message]) -> list[Message]:
        """The messages addressed to enrolled nodes; every other node is refused by node id and sent nothing."""
        out = []
        for msg in messages:
            refusal = self.names.refusal(msg.metadata.dst_node_id)
            if refusal is None:
                out.append(msg)
            else:
                self.ledger(server_round).reject(msg.metadata.dst_node_id, refusal, "node")
        return out

    # ------------------------------------------------------------------------------------------- the rounds

    def train_round(self, grid: Grid, params: dict[str, np.ndarray], server_round: int, config: ConfigRecord
                    ) -> dict[str, np.ndarray] | None:
        """One training round: the new global parameters, or None (nothing usable: the model is unchanged). What
        happened is in ``self.report``."""
        c = self.cfg
        messages = self.configure_train(server_round, self.wire(params), config, grid)
        replies = collect(grid, messages, c.round_timeout, c.min_sites, c.straggler_grace, self.destinations)
        new, _ = self.aggregate_train(server_round, replies)
        return None if new is None else self.unwire(new)

    def evaluate_round(self, grid: Grid, params: dict[str, np.ndarray], server_round: int, config: ConfigRecord
                       ) -> MetricRecord | None:
        """One evaluation round of ``params``: the pooled global metrics (also in ``self.report``), or None."""
        c = self.cfg
        if c.secure_evaluation:  # counts only inside a secure sum, k on the sums (server/secure_eval.py)
            from .secure_eval import secure_evaluate_round

            return secure_evaluate_round(self, grid, params, server_round, config)
        messages = self.configure_evaluate(server_round, self.wire(params), config, grid)
        replies = collect(grid, messages, c.round_timeout, c.min_sites, c.straggler_grace, self.destinations)
        return self.aggregate_evaluate(server_round, replies)

    # ---------------------------------------------------------------------------------------------- helpers

    def ledger(self, server_round: int) -> Ledger:
        """Where this round's failures and rejections go: the round's report, labelled by the run's site names."""
        return Ledger(self.report, self.names.label, f"round {server_round}", self.destinations)

    def facts(self, name: str) -> SiteFacts | None:
        """What site ``name`` enrolled with (None: not enrolled)."""
        if self.enrolment is None:
            return SiteFacts(train=2**62, test=2**62)  # no enrolment known: only the contract's own checks
        return self.enrolment.sites.get(name)

    # --------------------------------------------------------------------------------------------- training

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply (contract, enrolment, arrays, step size and direction), drop bad ones (logged with
        node id and reason), aggregate the rest."""
        own = Layout.from_params(self.current)  # the order sent; names, shapes, dtypes are the server's own
        ledger = self.ledger(server_round)

        def decode(msg: Message) -> TrainUpdate:
            content = msg.content
            return TrainUpdate(TrainReply.decode(content[METRICS_KEY], content[SITE_KEY], self.modalities),
                               to_numpy(content[ARRAYS_KEY], own))

        candidates = checked_replies(replies, ledger, self.names, decode, [
            lambda u: check_train_against(u.reply, self.facts(u.site)),
            lambda u: validate_update(self.current, u.params)], "update", "more than one reply in a round")
        for node, reason in prototype_outliers(self.current, {n: u.params for n, u in candidates.items()}).items():
            ledger.reject(node, reason, "update")
            del candidates[node]
        deltas = StepsOnDemand(self.current, {node: u.params for node, u in candidates.items()})
        dp_clip = self.dp.clip_norm if self.dp is not None else None
        gradients = self.cfg.screen == "gradient"
        decisions = (screen_gradients(self.current, deltas, self.rules, dp_clip=dp_clip) if gradients
                     else screen_updates(self.current, deltas, self.memory, self.rules, dp_clip=dp_clip))
        self.report.screening = {
            "global_norm": model_norm(self.current),
            "step_norms": {self.names.label(n): d.norm for n, d in decisions.items()},
            "screen": self.cfg.screen,
            "direction_reference": self.memory.direction is not None and self.dp is None and not gradients,
            "clip": {"bound": next((d.bound for d in decisions.values() if d.accepted), None),
                     "scale": {self.names.label(n): d.scale for n, d in decisions.items() if d.accepted},
                     "rule": "dp-clip-norm" if self.dp is not None
                     else f"{self.rules.gradient_clip_factor:g} x lower median norm of this round" if gradients
                     else f"{self.rules.clip_factor:g} x lower median norm"},
            "trust": {self.names.label(n): d.trust for n, d in decisions.items() if d.accepted},
        }
        for node, d in decisions.items():
            if not d.accepted:
                ledger.reject(node, d.reason, "update")
        updates, losses, weights, accepted_norms = [], [], [], []
        for node, update in candidates.items():
            d, reply = decisions[node], update.reply
            if not d.accepted:
                continue
            params = shrink(self.current, update.params, d.scale)  # bounded influence: clipped before weighting
            updates.append(SiteUpdate(reply.site, params, reply.num_examples, dict(reply.modality_counts), d.trust))
            self.report.accepted.append(reply.site)
            self.report.nodes[reply.site] = node
            accepted_norms.append(d.norm * d.scale)
            if reply.loss is not None:
                losses.append(reply.loss)
                weights.append(reply.num_examples)
        if not updates:
            log(WARNING, "round %d: no usable update; the global model is unchanged", server_round)
            return None, None
        if self.dp is not None:
            new = self._dp_aggregate(server_round, updates)
        else:
            refusal = robust_refusal(self.cfg.robust, self.cfg.trim, len(updates))
            applied, robust, left_out = applied_rule(self.cfg.robust, len(updates)), self.cfg.robust, []
            if applied == "near-median":  # the n - f accepted steps nearest the median, then their weighted mean
                kept = near_median(self.current, updates)
                left_out = [u.site for u in updates if all(u is not k for k in kept)]
                updates, robust = kept, "mean"
            if refusal is None:
                try:
                    new = aggregate_updates(self.current, updates,
                                            modality_aware=self.cfg.aggregation == "modality-aware",
                                            robust=robust, trim=self.cfg.trim)
                except ValueError as exc:  # a block held by too few sites for the trimmed mean
                    refusal = str(exc)
            # "applied": the rule of the blocks every accepted site holds (auto: the median from 3 sites, the weighted
            # mean below; an encoder held by fewer sites may take the mean);
            # "left_out": accepted sites the near-median rule did not average this round
            self.report.screening["aggregator"] = {"rule": self.cfg.robust, "applied": applied,
                                                   "left_out": left_out, "trim": self.cfg.trim,
                                                   "sites": len(updates) + len(left_out), "refused": refusal}
            if refusal is not None:
                log(WARNING, "round %d: %s aggregation refused: %s; the global model is unchanged", server_round,
                    self.cfg.robust, refusal)
                return None, None
        # the screen's direction reference is the aggregate step (what honest sites' steps agree with), not the
        # server optimizer's rescaled one
        self.memory.remember(accepted_norms, flat_delta(self.current, new), self.rules.history_rounds)
        new = self.server_step(server_round, self.current, new, trained_arrays(self.current, updates))
        self.report.train_loss = float(np.average(losses, weights=weights)) if losses else None
        metrics = MetricRecord({"sites-accepted": len(updates), "sites-rejected": len(self.report.rejected)})
        if self.report.train_loss is not None:
            metrics["train-loss"] = self.report.train_loss
        return to_record(new, own), metrics

    def server_step(self, server_round: int, current: dict[str, np.ndarray], aggregated: dict[str, np.ndarray],
                    trained: set[str]) -> dict[str, np.ndarray]:
        """The new global model from this round's aggregate: the aggregate itself, or (server-optimizer adam /
        yogi) a step along aggregate - current; arrays not in ``trained`` (no contributing site holds their
        modality) do not move and their moments wait. Post-processing of the aggregate: a DP guarantee holds."""
        if self.server_opt is None:
            return aggregated
        c = self.cfg
        rule, lr, (beta1, beta2), tau = c.server_optimizer, c.server_lr, (c.server_beta1, c.server_beta2), c.server_tau
        if rule == "preset-adam":  # the preset's own Adam and schedule (fedsgd): as centralized training steps
            t = preset_of(c).train
            rule, lr, (beta1, beta2), tau = ("torch-adam", step_lr(t.lr, t.lr_step, t.lr_gamma, server_round),
                                             TORCH_ADAM_BETAS, TORCH_ADAM_EPS)
        new, self.server_opt = server_opt_step(current, aggregated, self.server_opt, rule, lr, beta1, beta2, tau,
                                               trained)
        info = {"rule": c.server_optimizer, "lr": lr,
                "pseudo_gradient_norm": float(np.linalg.norm(flat_delta(current, aggregated))),
                "step_norm": float(np.linalg.norm(flat_delta(current, new))),
                "arrays_held": sorted(k for k in current if k not in trained)}
        self.report.screening["server_optimizer"] = info
        log(INFO, "round %d: server %s step: pseudo-gradient norm %.3g, step norm %.3g%s", server_round,
            c.server_optimizer, info["pseudo_gradient_norm"], info["step_norm"],
            f", {len(info['arrays_held'])} untrained array(s) held" if info["arrays_held"] else "")
        return new

    def server_opt_state(self) -> dict | None:
        """The server optimizer's state for a checkpoint (tensors only), or None without one."""
        return None if self.server_opt is None else self.server_opt.to_tensors()

    def _dp_aggregate(self, server_round: int, updates: list[SiteUpdate]) -> dict[str, np.ndarray]:
        """Site-level DP: every accepted update clipped to C (the sites clip; clipping again here is a no-op for
        honest sites and binds a dishonest one), averaged with uniform weights per block (an encoder over the
        sites holding its modality, shared layers over all), Gaussian noise of std z * C on each block's sum, so
        one site moves a block's mean by at most C / (sites averaged) against noise z * C / (sites averaged)."""
        from magnet_core.federation.dp import dp_aggregate, dp_site_vector, effective_noise_multiplier, noise_rng
        from magnet_core.federation.secagg import UpdateLayout

        layout = UpdateLayout.from_params(self.current)
        modality_aware = self.cfg.aggregation == "modality-aware"
        vectors = [dp_site_vector(layout, u.params, self.current,
                                  u.modality_counts if modality_aware else dict.fromkeys(layout.modalities, 1),
                                  self.dp)[0] for u in updates]
        seed = self.cfg.dp_noise_seed
        rng = noise_rng(None if seed < 0 else seed * 100_003 + server_round)
        new = dp_aggregate(layout, self.current, vectors, self.dp, rng)
        spent = self.accountant.add_round(effective_noise_multiplier(self.dp, len(updates)))
        self.report.dp = {"clip_norm": self.dp.clip_norm, "noise_multiplier": self.dp.noise_multiplier,
                          "sites_averaged": len(updates), **spent}
        log(INFO, "round %d: DP: %d clipped update(s) averaged, noise std %.3g x C; spent epsilon %.3g at "
            "delta %g", server_round, len(updates), self.dp.noise_multiplier, spent["epsilon"], self.dp.delta)
        return new

    # ------------------------------------------------------------------------------------------- evaluation

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Check each evaluation reply (contract, enrolment, minimum count k), then pool the good ones: confusion
        matrices summed (metrics exactly those of the pooled predictions of the sites that released a group),
        AUROC as an interval from the sites' merged score bins."""
        def decode(msg: Message) -> EvalReply:
            content = msg.content
            return EvalReply.decode(content[METRICS_KEY], content[SITE_KEY], self.num_classes, self.cfg.histogram_bins)

        checked = checked_replies(replies, self.ledger(server_round), self.names, decode, [
            lambda r: check_eval_against(r, self.facts(r.site)),
            lambda r: check_eval_release(r.release(self.min_count), self.cfg.histogram_bins)],
            "evaluation", "more than one evaluation reply")
        for node, reply in checked.items():
            self.report.nodes[reply.site] = node
            if reply.withheld:
                self.report.withheld[reply.site] = list(reply.withheld)
        good = list(checked.values())
        pooled = [r for r in good if "all" in r.confusion]
        excluded = self._screen_evaluations(server_round, pooled)
        good = [r for r in good if r.site not in excluded]
        pooled = [r for r in pooled if r.site not in excluded]
        self.report.pooled_sites = [r.site for r in pooled]
        self.report.pooled_patients = sum(r.num_examples for r in pooled)
        if not pooled:
            return None
        result = pool_releases([r.release(self.min_count) for r in good])
        self.report.global_metrics = result["metrics"]
        self.report.site_metrics = {r.site: {"num": r.num_examples,
                                             **pool_releases([r.release(self.min_count)])["metrics"]}
                                    for r in pooled}
        log(INFO, "round %d: global metrics pooled over %d site(s), %d patients", server_round, len(pooled),
            self.report.pooled_patients)
        return MetricRecord({k: float(v) for k, v in self.report.global_metrics.items() if v is not None})

    def _screen_evaluations(self, server_round: int, pooled: list[EvalReply]) -> set[str]:
        """Flag replies out of line with the others (``eval_screen``) in the round's screening record; returns the
        sites to leave out of the pooled metric (the flagged ones if ``eval-exclude-flagged``)."""
        checks = screen_evaluations({r.site: np.asarray(r.confusion["all"]) for r in pooled}, self.cfg.eval_flag_alpha)
        flagged = sorted(s for s, c in checks.items() if c.flagged)
        excluded = set(flagged) if self.cfg.eval_exclude_flagged else set()
        self.report.screening["evaluation"] = {"alpha": self.cfg.eval_flag_alpha, "flagged": flagged,
                                               "excluded": sorted(excluded),
                                               "checks": {s: c.to_dict() for s, c in checks.items()}}
        for site in flagged:
            c = checks[site]
            shift = "moves by %+.3f with" % c.shift if c.shift is not None else "with"
            log(WARNING, "round %d: evaluation of node %s (%s) out of line: %d of %d correct where the others' "
                "recall makes %.1f expected (p = %.2g); pooled MCC %s it%s", server_round,
                self.report.nodes.get(site), site, c.correct, c.num, c.expected, c.p_value, shift,
                ", excluded from the pooled metric" if site in excluded else "")
        return excluded

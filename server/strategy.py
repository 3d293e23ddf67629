"""MagnetFedAvg: Flower's FedAvg with update validation, modality-aware aggregation and exact pooled metrics."""

from __future__ import annotations

import dataclasses
from logging import INFO, WARNING
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from magnet_core.aggregate import (
    EvalCounts, SiteUpdate, aggregate_updates, metrics_from_counts, norm_outliers, pooled_metrics, update_norm,
    validate_update,
)

from .config import FederatedConfig


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def to_record(params: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in params.items()})


def _site_name(msg: Message, destinations: dict[str, int] | None = None) -> str:
    """The site's name from its reply; ``node<id>`` of the addressed node for error replies (a site's failure, or
    the SuperLink's reply for a node that went away, whose sender is the SuperLink), which carry no content."""
    if not msg.has_error() and msg.has_content():
        try:
            return str(msg.content["site"]["name"])
        except (KeyError, TypeError, ValueError):
            pass
    return f"node{_node_id(msg, destinations)}"


def _node_id(msg: Message, destinations: dict[str, int] | None = None) -> int:
    return (destinations or {}).get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)


@dataclasses.dataclass
class RoundReport:
    """What happened in one round, for the history (no patient-level data)."""

    accepted: list[str] = dataclasses.field(default_factory=list)
    rejected: dict[str, str] = dataclasses.field(default_factory=dict)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    train_loss: float | None = None
    global_metrics: dict = dataclasses.field(default_factory=dict)
    site_metrics: dict = dataclasses.field(default_factory=dict)


class MagnetFedAvg(FedAvg):
    """FedAvg whose aggregation is modality-aware (or plain), validated and optionally robust."""

    def __init__(self, cfg: FederatedConfig, modalities: list[str]):
        super().__init__(
            fraction_train=cfg.fraction_train,
            fraction_evaluate=1.0,
            min_train_nodes=cfg.min_sites,
            min_evaluate_nodes=cfg.min_sites,
            min_available_nodes=cfg.min_sites,
        )
        self.cfg = cfg
        self.modalities = modalities
        self.current: dict[str, np.ndarray] = {}
        self.report = RoundReport()
        # message id -> addressed node, filled by `server.loop.collect` (error replies may come from the SuperLink)
        self.destinations: dict[str, int] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        self.current = to_numpy(arrays)
        self.report = RoundReport()
        self.destinations.clear()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, drop bad ones (logged with node id), aggregate the rest."""
        candidates: list[tuple[SiteUpdate, int, float]] = []
        for msg in sorted(replies, key=self._site):
            node, site = _node_id(msg, self.destinations), self._site(msg)
            if msg.has_error():
                self.report.failed[site] = str(msg.error.reason)
                log(WARNING, "round %d: node %d (%s) failed: %s", server_round, node, site, msg.error.reason)
                continue
            try:
                params = to_numpy(msg.content["arrays"])
                metrics = msg.content["metrics"]
                counts = {m: int(metrics.get(f"count-{m}", 0)) for m in self.modalities}
                num = int(metrics["num-examples"])
                loss = float(metrics.get("loss", float("nan")))
            except (KeyError, TypeError, ValueError) as exc:
                self._reject(server_round, node, site, f"malformed reply ({exc})")
                continue
            problems = validate_update(self.current, params)
            if problems:
                self._reject(server_round, node, site, "; ".join(problems))
                continue
            candidates.append((SiteUpdate(site, params, num, counts), node, loss))
        norms = {u.site: update_norm(self.current, u.params) for u, _, _ in candidates}
        outliers = norm_outliers(norms, self.cfg.norm_ratio)
        updates, losses, weights = [], [], []
        for update, node, loss in candidates:
            if update.site in outliers:
                self._reject(server_round, node, update.site, outliers[update.site])
                continue
            updates.append(update)
            self.report.accepted.append(update.site)
            if np.isfinite(loss):
                losses.append(loss)
                weights.append(update.num_train)
        if not updates:
            log(WARNING, "round %d: no usable update; the global model is unchanged", server_round)
            return None, None
        new = aggregate_updates(self.current, updates, modality_aware=self.cfg.aggregation == "modality-aware",
                                robust=self.cfg.robust, trim=self.cfg.trim)
        self.report.train_loss = float(np.average(losses, weights=weights)) if losses else None
        metrics = MetricRecord({"sites-accepted": len(updates), "sites-rejected": len(self.report.rejected)})
        if self.report.train_loss is not None:
            metrics["train-loss"] = self.report.train_loss
        return to_record(new), metrics

    def _site(self, msg: Message) -> str:
        return _site_name(msg, self.destinations)

    def _reject(self, server_round: int, node: int, site: str, reason: str) -> None:
        self.report.rejected[site] = reason
        log(WARNING, "round %d: REJECTED update from node %d (%s): %s", server_round, node, site, reason)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Sum confusion matrices / histograms over sites: metrics exactly as if test patients were pooled."""
        sites = []
        for msg in sorted(replies, key=self._site):
            site = self._site(msg)
            if msg.has_error():
                self.report.failed.setdefault(site, str(msg.error.reason))
                continue
            try:
                sites.append(parse_eval_counts(site, msg.content["metrics"]))
            except (KeyError, TypeError, ValueError) as exc:
                log(WARNING, "round %d: ignoring malformed evaluation from %s (%s)", server_round, site, exc)
        if not sites:
            return None
        self.report.global_metrics = pooled_metrics(sites)
        self.report.site_metrics = {s.site: {"num": s.num, **metrics_from_counts(s.confusion, s.histogram)}
                                    for s in sites}
        return MetricRecord({k: float(v) for k, v in self.report.global_metrics.items() if v is not None})


def parse_eval_counts(site: str, metrics: MetricRecord) -> EvalCounts:
    """EvalCounts from an evaluate reply (square confusion matrices, 2-row histograms)."""
    confusion, histogram = {}, {}
    for key, value in metrics.items():
        if key.startswith("cm-"):
            flat = np.asarray(value, dtype=np.int64)
            c = int(round(np.sqrt(flat.size)))
            if c * c != flat.size:
                raise ValueError(f"{key} is not a square matrix")
            confusion[key[3:]] = flat.reshape(c, c)
        elif key.startswith("hist-"):
            flat = np.asarray(value, dtype=np.int64)
            histogram[key[5:]] = flat.reshape(2, -1)
    if "all" not in confusion:
        raise ValueError("no cm-all in evaluation reply")
    return EvalCounts(site, confusion, histogram)

"""What happened to each node in an exchange (failed, rejected, no reply), and the round's report built on it."""

from __future__ import annotations

import dataclasses
from logging import WARNING
from typing import Callable

from flwr.app import Message
from flwr.common.logger import log


@dataclasses.dataclass
class Outcome:
    """Who failed or was rejected, by site label (each reason names the node id), and label -> node id."""

    rejected: dict[str, str] = dataclasses.field(default_factory=dict)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    nodes: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RoundReport(Outcome):
    """What happened in one round, for the history (no patient-level data). Keys are site labels."""

    accepted: list[str] = dataclasses.field(default_factory=list)
    train_loss: float | None = None
    global_metrics: dict = dataclasses.field(default_factory=dict)
    pooled_sites: list[str] = dataclasses.field(default_factory=list)
    pooled_patients: int = 0
    withheld: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    site_metrics: dict = dataclasses.field(default_factory=dict)
    screening: dict = dataclasses.field(default_factory=dict)
    dp: dict | None = None


class Ledger:
    """Records one exchange's failures and rejections by node id into an ``Outcome`` (a round's report, or its
    own), labelled by ``label`` (the run's site names) or, without one, ``names`` then ``node N``."""

    def __init__(self, outcome: Outcome | None = None, label: Callable[[int], str] | None = None,
                 where: str = "secure sum", destinations: dict[str, int] | None = None):
        self.outcome = outcome if outcome is not None else Outcome()
        self.names: dict[int, str] = {}
        self._label = label
        self.where = where
        # message id -> addressed node, filled by ``server.collect.collect`` (error replies may come from the
        # SuperLink, whose node id is not the addressed one)
        self.destinations: dict[str, int] = destinations if destinations is not None else {}

    @property
    def failed(self) -> dict[str, str]:
        return self.outcome.failed

    @property
    def rejected(self) -> dict[str, str]:
        return self.outcome.rejected

    def node_of(self, msg: Message) -> int:
        """The node a reply answers for: the one the coordinator addressed (its own record), else the sender."""
        return self.destinations.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)

    def label(self, node: int) -> str:
        return self._label(node) if self._label is not None else self.names.get(node, f"node {node}")

    def _record(self, into: dict[str, str], node: int, reason: str) -> str:
        label = self.label(node)
        into[label] = f"node {node}: {reason}"
        self.outcome.nodes[label] = node
        return label

    def error(self, node: int, msg: Message) -> None:
        """An error reply (the site's, or the SuperLink's for a node that went away)."""
        label = self._record(self.failed, node, msg.error.reason)
        log(WARNING, "%s: node %d (%s) failed: %s", self.where, node, label, msg.error.reason)

    def reject(self, node: int, reason: str, what: str = "reply") -> None:
        label = self._record(self.rejected, node, reason)
        log(WARNING, "%s: REJECTED %s from node %d (%s): %s", self.where, what, node, label, reason)

    def no_reply(self, node: int, action: str) -> None:
        label = self._record(self.failed, node, f"no reply to {action} in time")
        log(WARNING, "%s: node %d (%s) did not answer %s", self.where, node, label, action)

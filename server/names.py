"""Which site a node speaks for: bound by the coordinator from the enrolment, never taken from a reply.

Three bindings, chosen by the ServerApp (server/app.py) from the run:
- ``keys`` (deployment): each enrolled site's node public key (manifest ``[sites.NAME] public_key``, or the PKI's
  registered_sites.csv given as ``site-keys``); the grid's node list gives each node's public key (Flower node
  authentication: the SuperLink admits a node only with the key registered for it), so a node's name is the site
  whose key it holds.
- ``partitions`` (simulation, no PKI): the i-th node the engine registered is partition i (Flower's simulation
  engine, ``vce_api._register_nodes``, and ``simulations.engine.InProcessGrid`` both register partition i as the
  i-th node), whose site name the simulated consortium fixes.
- ``first-contact`` (only with ``allow-unenrolled=true``): a name belongs to the first node that uses it for the rest
  of the run (unless that node has left), as before names were bound; the run record says so every round.
A node without a name under ``keys`` or ``partitions`` is not enrolled: it is sent nothing and refused by node id.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence

from flwr.serverapp import Grid

from magnet_core.cohort.manifest import public_key_der

from .config import RunConfigError

Binding = Literal["keys", "partitions", "first-contact"]
DESCRIPTION: dict[str, str] = {
    "keys": "bound to each enrolled site's node public key",
    "partitions": "bound to the simulation's partition ids",
    "first-contact": "taken from the first reply of each node (allow-unenrolled=true): NOT bound to keys",
}


class SiteNames:
    """Node id -> site name for this run. Every decision about a reply is keyed by node id; the name a reply
    carries must be the one its node is bound to."""

    def __init__(self, binding: Binding, keys: Mapping[bytes, str] | None = None,
                 partitions: Sequence[str] = ()):
        self.binding: Binding = binding
        self.site_of_key = dict(keys or {})  # DER public key -> site name
        self.partitions = list(partitions)
        self.by_node: dict[int, str] = {}
        self.unenrolled: dict[int, str] = {}  # live node -> why it has no name (keys / partitions)
        self.live_nodes: set[int] | None = None

    @classmethod
    def from_keys(cls, keys: Mapping[str, str | bytes]) -> "SiteNames":
        """``keys``: site name -> its node's public key (OpenSSH line or PEM). ValueError names a bad or shared key."""
        owner: dict[bytes, str] = {}
        for name, text in keys.items():
            try:
                der = public_key_der(text)
            except ValueError as exc:
                raise ValueError(f"site {name!r}: {exc}") from None
            if der in owner:
                raise ValueError(f"sites {owner[der]!r} and {name!r} enrol the same public key")
            owner[der] = name
        return cls("keys", keys=owner)

    @classmethod
    def from_partitions(cls, names: Sequence[str]) -> "SiteNames":
        """``names[i]``: the site name of simulated partition i."""
        return cls("partitions", partitions=names)

    @classmethod
    def at_first_contact(cls) -> "SiteNames":
        return cls("first-contact")

    @property
    def description(self) -> str:
        return DESCRIPTION[self.binding]

    # ------------------------------------------------------------------------------------------------ binding

    def refresh(self, grid: Grid) -> list[int]:
        """Bind the grid's live nodes now (a site that rejoined under a new node id keeps its name: it holds the same
        key or partition); returns the live node ids."""
        if self.binding == "first-contact":
            self.live_nodes = {int(n) for n in grid.get_node_ids()}
            return sorted(self.live_nodes)
        nodes = list(grid.get_nodes())
        self.by_node, self.unenrolled = {}, {}
        if self.binding == "keys":
            for info in nodes:
                self._bind_key(int(info.node_id), bytes(info.public_key))
        else:
            for pid, info in enumerate(registration_order(nodes)):
                node = int(info.node_id)
                if pid < len(self.partitions):
                    self.by_node[node] = self.partitions[pid]
                else:
                    self.unenrolled[node] = f"partition {pid}, the simulation enrols {len(self.partitions)} site(s)"
        self.live_nodes = {int(info.node_id) for info in nodes}
        return sorted(self.live_nodes)

    def _bind_key(self, node: int, key: bytes) -> None:
        try:
            name = self.site_of_key.get(public_key_der(key))
        except ValueError:
            self.unenrolled[node] = "its public key is not a key the manifest could enrol"
            return
        if name is None:
            self.unenrolled[node] = "its public key matches no enrolled site"
        else:
            self.by_node[node] = name

    def refusal(self, node: int) -> str | None:
        """Why ``node`` may take no part (it is not enrolled), or None."""
        if self.binding == "first-contact" or node in self.by_node:
            return None
        why = self.unenrolled.get(node, "unknown to the grid when the round began")
        return f"node {node} is not enrolled ({why}); sent nothing"

    def check(self, node: int, claimed: str) -> str | None:
        """None if ``node`` may speak as ``claimed``, else the reason it may not."""
        if self.binding == "first-contact":
            return self._claim_first(node, claimed)
        own = self.by_node.get(node)
        if own is None:
            return f"node {node} is not enrolled ({self.unenrolled.get(node, 'unknown to the grid')})"
        if own == claimed:
            return None
        owners = [n for n, name in self.by_node.items() if name == claimed]
        whose = f"; {claimed!r} belongs to node {owners[0]}" if owners else ""
        return f"node {node} enrolled as {own!r} and now calls itself {claimed!r}{whose}"

    def _claim_first(self, node: int, name: str) -> str | None:
        if node in self.by_node:
            if self.by_node[node] != name:
                return f"node {node} enrolled as {self.by_node[node]!r} and now calls itself {name!r}"
            return None
        for other, other_name in list(self.by_node.items()):
            if other_name == name:
                if self.live_nodes is not None and other not in self.live_nodes:
                    del self.by_node[other]  # the site rejoined under a new node id
                    break
                return f"site name {name!r} already belongs to node {other}"
        self.by_node[node] = name
        return None

    def label(self, node: int) -> str:
        return self.by_node.get(node, f"node{node}")


def registration_order(nodes: Iterable) -> list:
    """Nodes (Flower ``NodeInfo``) in the order the engine registered them. RunConfigError if two share a timestamp
    (the order, and so the partition of each node, would be unknown)."""
    nodes = sorted(nodes, key=lambda n: (n.registered_at, n.node_id))
    stamps = [n.registered_at for n in nodes]
    if len(set(stamps)) < len(stamps):
        raise RunConfigError("two simulated nodes share a registration time: their partition ids are unknown")
    return nodes


def read_site_keys(path: str | Path) -> dict[str, str]:
    """Site name -> OpenSSH public key from a CSV with the columns ``site,public_key`` (the PKI's
    registered_sites.csv). RunConfigError naming the file and row for anything else."""
    path = Path(path)
    try:
        rows = list(csv.reader(io.StringIO(path.read_text())))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise RunConfigError(f"site-keys {path}: cannot read ({type(exc).__name__}: {exc})") from None
    if not rows or [c.strip() for c in rows[0]] != ["site", "public_key"]:
        raise RunConfigError(f"site-keys {path}: the first row must be 'site,public_key'")
    keys: dict[str, str] = {}
    for i, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2 or not row[0].strip() or row[0].strip() in keys:
            raise RunConfigError(f"site-keys {path} row {i}: expected a new site name and its public key")
        keys[row[0].strip()] = row[1].strip()
    return keys

"""The one reply check every exchange of the coordinator uses: one reply per node, errors recorded, each reply
decoded (a malformed one rejects its node, never the run), then its node's name and the reply's own checks."""

from __future__ import annotations

from typing import Callable, Collection, Hashable, Iterable, Mapping, Protocol, TypeVar

from flwr.app import Message

from magnet_core.protocol.errors import ContractError

from .ledger import Ledger
from .names import SiteNames

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Named(Protocol):
    site: str


N = TypeVar("N", bound=Named)


def one_per_node(replies: Iterable[Message], ledger: Ledger, duplicate: str,
                 expected: Collection[int] | None = None, what: str = "reply") -> dict[int, Message]:
    """node -> its one good reply, in node order. An error reply is the node's failure; a node answering more than
    once is rejected with ``duplicate`` (none of its replies counts); a node not in ``expected`` is ignored."""
    by_node: dict[int, list[Message]] = {}
    for msg in replies:
        node = ledger.node_of(msg)
        if expected is None or node in expected:
            by_node.setdefault(node, []).append(msg)
    good: dict[int, Message] = {}
    for node in sorted(by_node):
        msgs = by_node[node]
        if len(msgs) > 1:
            ledger.reject(node, duplicate, what)
        elif msgs[0].has_error():
            ledger.error(node, msgs[0])
        else:
            good[node] = msgs[0]
    return good


def decode_one(msg: Message, decode: Callable[[Message], T], what: str, contract_errors: bool = True
               ) -> tuple[T | None, str | None]:
    """(decoded, None), or (None, why not): a ContractError in its own words if ``contract_errors``, anything else
    as a malformed ``what``. Never raises: a reply of the wrong shape must not end the run."""
    try:
        return decode(msg), None
    except ContractError as exc:
        return None, str(exc) if contract_errors else f"malformed {what} (ContractError: {exc})"
    except Exception as exc:  # noqa: BLE001
        return None, f"malformed {what} ({type(exc).__name__}: {exc})"


def decode_each(messages: Mapping[K, Message], decode: Callable[[Message], T], reject: Callable[[K, str], None],
                what: str) -> dict[K, T]:
    """Every message decoded (``decode_one``); one that does not decode rejects its sender, the others go on."""
    out: dict[K, T] = {}
    for key, msg in messages.items():
        value, problem = decode_one(msg, decode, what)
        if problem is None:
            out[key] = value
        else:
            reject(key, problem)
    return out


def checked_replies(replies: Iterable[Message], ledger: Ledger, names: SiteNames, decode: Callable[[Message], N],
                    checks: Iterable[Callable[[N], list[str]]], what: str, duplicate: str) -> dict[int, N]:
    """node -> its decoded reply, for the replies that pass: one per node, decoded, spoken by the node under the name
    it is bound to, then each of ``checks`` in turn (the first that finds problems rejects the node with them)."""
    checks = list(checks)
    good = one_per_node(replies, ledger, duplicate, what=what)
    decoded = decode_each(good, decode, lambda node, reason: ledger.reject(node, reason, what), "reply")
    out: dict[int, N] = {}
    for node, reply in decoded.items():
        problems = [p for p in [names.check(node, reply.site)] if p]
        for check in checks:
            if problems:
                break
            problems = check(reply)
        if problems:
            ledger.reject(node, "; ".join(problems), what)
        else:
            out[node] = reply
    return out

"""A site's one message path: find the handler of a message's type, check the message against the contract and the
site's policy, answer, map every failure to one error reply, audit and log it.

    site_message(msg, context, handlers)   what a ClientApp runs for every message: in deployment (node config
                                           ``worker-socket``) it only forwards the raw message to the site's own
                                           worker (client/worker_link.py); otherwise ``serve``
    serve(msg, context, handlers)          the site's own answer: the policy check, privacy accountant and audit
                                           log (client/guard.py ``screened``) around ``answer``, then the site's
                                           message log (client/site_log.py); the site worker runs exactly this
    answer(msg, context, handlers)         the handler of the message's type; any failure becomes an error reply

A handler is ``(msg, context) -> reply``: it decodes its message with the protocol's classes and raises on any
problem (ContractError, DataError, SecAggError, SiteRefusal, ...); the error codes are magnet_core.protocol.errors.
The handlers: client/rounds.py (train, evaluate), client/secure.py (the secure-aggregation stages),
client/prepare_app.py (the preparation queries).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from magnet_core.cohort.errors import DataError
from magnet_core.protocol.errors import (
    CONTRACT_ERROR_CODE,
    DATA_ERROR_CODE,
    POLICY_ERROR_CODE,
    SECAGG_ERROR_CODE,
    ContractError,
)
from magnet_core.protocol.keys import EVALUATE, NODE_WORKER_SOCKET, QUERY, TRAIN
from magnet_core.protocol.secagg import SecAggError

from .guard import screened
from .site_log import record
from .worker_link import forward_message

Handler = Callable[[Message, Context], Message]
Mod = Callable[[Message, Context, Handler], Message]


class SiteRefusal(Exception):
    """A request the site's own settings refuse (its node config's DP floor); the reason names the setting."""


def error_reply(msg: Message, code: int, reason: str) -> Message:
    """A clear error reply instead of a crash (the coordinator logs it with this node's id)."""
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _what(kind: str) -> str:
    if "secagg" in kind:
        return "secure-aggregation message"
    if "prepare" in kind:
        return "preparation request"
    return "round message"


def failure_reply(msg: Message, exc: Exception) -> Message:
    """The error reply for a handler's failure: one mapping from what went wrong to the code and reason."""
    what = _what(msg.metadata.message_type)
    if isinstance(exc, SecAggError):
        return error_reply(msg, SECAGG_ERROR_CODE, f"secure aggregation refused: {exc}")
    if isinstance(exc, SiteRefusal):
        return error_reply(msg, POLICY_ERROR_CODE, str(exc))
    if isinstance(exc, DataError):
        return error_reply(msg, DATA_ERROR_CODE, f"site data rejected: {exc}")
    if isinstance(exc, ContractError):
        return error_reply(msg, CONTRACT_ERROR_CODE, f"{what} rejected: {exc}")
    return error_reply(msg, CONTRACT_ERROR_CODE, f"{what} rejected: {type(exc).__name__}: {exc}")


HANDLED = (SecAggError, SiteRefusal, DataError, ContractError, KeyError, ValueError, TypeError)


def answer(msg: Message, context: Context, handlers: Mapping[str, Handler]) -> Message:
    """The reply of the handler of ``msg``'s type; an error reply for a type this site does not answer or for any
    failure the handler raises (an unexpected exception is the caller's: the ClientApp's Flower runtime, the
    worker's own catch-all)."""
    kind = msg.metadata.message_type
    handler = handlers.get(kind)
    if handler is None:
        return error_reply(msg, CONTRACT_ERROR_CODE, f"message type {kind[:64]!r} is not one this site answers")
    try:
        return handler(msg, context)
    except HANDLED as exc:
        return failure_reply(msg, exc)


def serve(msg: Message, context: Context, handlers: Mapping[str, Handler]) -> Message:
    """The site's own answer to ``msg``: behind its policy, accountant and audit log (node config ``site-policy``),
    then recorded in its message log (node config ``site-log-dir``)."""
    reply = screened(msg, context, lambda: answer(msg, context, handlers))
    record(msg, reply, context.node_config)
    return reply


def site_message(msg: Message, context: Context, handlers: Mapping[str, Handler]) -> Message:
    """What a ClientApp does with a message: forward it to the site's worker in deployment, else ``serve`` it."""
    if NODE_WORKER_SOCKET in context.node_config:
        return forward_message(msg, context)
    return serve(msg, context, handlers)


def client_app(handlers: Mapping[str, Handler], mods: Mapping[str, Sequence[Mod]] | None = None,
               forward: bool = True) -> ClientApp:
    """A ClientApp answering every message type of ``handlers`` through the site's one path (``site_message``, or
    ``serve`` without ``forward``); ``mods``: Flower mods per message type."""
    app = ClientApp()
    run = site_message if forward else serve
    register = {TRAIN: app.train, EVALUATE: app.evaluate, QUERY: app.query}
    for kind in handlers:
        category, _, action = kind.partition(".")
        if category not in register:
            raise ValueError(f"handler for {kind!r}: Flower has no {category!r} messages")

        def entry(msg: Message, context: Context) -> Message:
            return run(msg, context, handlers)

        register[category](action or "default", mods=list((mods or {}).get(kind, ())))(entry)
    return app

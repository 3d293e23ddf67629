"""Send a batch of messages and collect the replies, bounded in time (every exchange of the coordinator uses it)."""

from __future__ import annotations

import time
from logging import DEBUG, WARNING
from typing import Iterable

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid


def collect(grid: Grid, messages: Iterable[Message], timeout: float, min_replies: int,
            grace: float, destinations: dict[str, int] | None = None) -> list[Message]:
    """Send and wait for replies; stop at ``timeout``, or ``grace`` seconds after ``min_replies`` successful
    replies have arrived (so one dead site delays a round by at most ``grace`` once enough sites have answered;
    error replies, e.g. the SuperLink's for a node that went away, are returned but do not count).
    ``destinations``, if given, receives message id -> addressed node for every message sent."""
    messages = list(messages)
    log(DEBUG, "collect: sending %d message(s) at %.3f", len(messages), time.time())  # FLWR_LOG_LEVEL=DEBUG shows it
    pushed = list(grid.push_messages(messages))  # the grid sets each message's id
    if destinations is not None:
        destinations.update({m.metadata.message_id: m.metadata.dst_node_id for m in messages})
    ids = {mid for mid in pushed if mid}
    if len(ids) < len(messages):
        log(WARNING, "%d message(s) could not be sent", len(messages) - len(ids))
    replies: list[Message] = []
    start, enough_at = time.monotonic(), None
    log(DEBUG, "collect: sent %d message(s) at %.3f", len(ids), time.time())
    while ids:
        for msg in grid.pull_messages(list(ids)):
            replies.append(msg)
            ids.discard(msg.metadata.reply_to_message_id)
            log(DEBUG, "collect: reply from node %d at %.3f", msg.metadata.src_node_id, time.time())
        now = time.monotonic()
        if enough_at is None and sum(not m.has_error() for m in replies) >= min_replies:
            enough_at = now
        if not ids or now - start > timeout or (enough_at is not None and now - enough_at > grace):
            break
        time.sleep(0.05)
    if ids:
        log(WARNING, "%d site(s) did not reply in time; continuing with %d replies", len(ids), len(replies))
    return replies

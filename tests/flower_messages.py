"""Server and site messages built outside a Flower run, as a grid would push and a site would answer them."""

from __future__ import annotations


def instruction(node: int, kind: str, content: dict | None = None):
    """A server message to ``node`` as a grid would push it (its id set), outside any Flower run."""
    from flwr.app import Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    msg = Message(RecordDict(content or {}), node, kind)
    msg.metadata.__dict__["_message_id"] = f"instruction-{node}-{kind}"
    return msg


def reply(instruction, content: dict | None = None, error: str | None = None):
    from flwr.app import Error, Message, RecordDict

    if error is not None:
        reply = Message(Error(code=0, reason=error), reply_to=instruction)
    else:
        reply = Message(RecordDict(content or {}), reply_to=instruction)
    reply.metadata.__dict__["_src_node_id"] = instruction.metadata.dst_node_id
    return reply

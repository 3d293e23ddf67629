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


def model_records(params) -> dict:
    """The model part of a server message as the coordinator sends it: one flat array + its layout record."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from magnet_core.protocol.wire import LAYOUT_KEY, MODEL_KEY, Layout, pack

    params = {k: v.detach().numpy() if hasattr(v, "detach") else v for k, v in params.items()}
    layout = Layout.from_params(params)
    return {"arrays": ArrayRecord({MODEL_KEY: Array(pack(params, layout))}),
            LAYOUT_KEY: ConfigRecord(layout.to_record())}


def model_of(msg, instruction=None) -> dict:
    """The named arrays of a message's flat model, split with the layout of ``instruction`` (default: ``msg``)."""
    from magnet_core.protocol.wire import LAYOUT_KEY, Layout, flat_of, unpack

    layout = Layout.from_record((instruction or msg).content[LAYOUT_KEY])
    return unpack(flat_of(msg.content["arrays"]), layout)


def flat_model(params, instruction):
    """``params`` as a site's reply record: one flat array in ``instruction``'s layout order."""
    from flwr.app import Array, ArrayRecord

    from magnet_core.protocol.wire import LAYOUT_KEY, MODEL_KEY, Layout, pack

    return ArrayRecord({MODEL_KEY: Array(pack(params, Layout.from_record(instruction.content[LAYOUT_KEY])))})

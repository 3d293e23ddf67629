"""Flower messages and record dicts as bytes (Flower 1.41's protobuf serialisation, ``flwr.common.serde``).

The site worker link sends a whole Flower message to the site's own worker and the reply's content back; the site's
audit log hashes what left the site. Both need the bytes Flower itself would send, deterministic, without pickle.
(Importing this module runs ``flower_compat/__init__.py`` first, which refuses any Flower but 1.41.x.)
"""

from __future__ import annotations

from flwr.app import Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto, recorddict_from_proto, recorddict_to_proto
from flwr.proto.message_pb2 import Message as MessageProto
from flwr.proto.node_pb2 import NodeInfo
from google.protobuf.message import DecodeError

__all__ = ["DecodeError", "NodeInfo", "message_bytes", "message_of", "recorddict_bytes", "recorddict_of"]


def message_bytes(msg: Message) -> bytes:
    return message_to_proto(msg).SerializeToString(deterministic=True)


def message_of(data: bytes) -> Message:
    """DecodeError / ValueError / TypeError / KeyError when ``data`` is not a Flower message."""
    proto = MessageProto()
    proto.ParseFromString(data)
    return message_from_proto(proto)


def recorddict_bytes(content: RecordDict) -> bytes:
    return recorddict_to_proto(content).SerializeToString(deterministic=True)


def recorddict_of(data: bytes) -> RecordDict:
    """DecodeError / ValueError / TypeError when ``data`` is not a Flower record dict."""
    from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto

    proto = RecordDictProto()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)

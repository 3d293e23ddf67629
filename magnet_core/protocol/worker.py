"""The site worker link's frame headers, typed: what the ClientApp (the coordinator's bundle) asks the site's own
persistent worker, and what the worker answers (no flwr).

A frame is a JSON header (one of the classes below) and the raw bytes of its payloads, described by ``payloads``
(client/worker_link.py reads and writes frames). A request carries one whole Flower message (Flower's protobuf); the
worker decodes it, checks it against the contract and the site's own policy, answers and audits it, and sends back
the reply's content (Flower's protobuf) or the error code and reason of an error reply. Nothing is pickled.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from magnet_core.protocol.errors import ContractError
from magnet_core.protocol.keys import PROTOCOL_VERSION
from magnet_core.protocol.version import check_version

PING = "ping"  # request kinds: the worker's status
MESSAGE = "message"  # one Flower message for the site to answer
MESSAGE_PAYLOAD = "message"  # a request's payload: the whole Flower message (flwr.proto.Message)
CONTENT_PAYLOAD = "content"  # an answer's payload: the reply's content (flwr.proto.RecordDict)
PROTOBUF = "protobuf"  # the payloads' encoding
MAX_NAME = 512  # characters of a payload name
MAX_PAYLOADS = 16  # payloads in one frame

NodeValue = StrictStr | StrictBool | StrictInt | StrictFloat  # a Flower node-config value (bool before int)


class Payload(BaseModel):
    """One payload of a frame: its name, encoding and size (the bytes follow the header, in order)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrictStr = Field(min_length=1, max_length=MAX_NAME)
    encoding: Literal["protobuf"] = PROTOBUF
    nbytes: StrictInt = Field(ge=0)


class Frame(BaseModel):
    """Every header: the protocol version (checked before anything else is read) and its payloads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    protocol: Literal[PROTOCOL_VERSION] = PROTOCOL_VERSION  # type: ignore[valid-type]
    payloads: tuple[Payload, ...] = Field((), max_length=MAX_PAYLOADS)


class WorkerRequest(Frame):
    """ClientApp -> worker. ``node_config`` is the SuperNode's node config as the ClientApp saw it (the worker keeps
    its own data folder, manifest, site name and policy, and refuses a request that names others)."""

    kind: Literal["message", "ping"]
    node_id: StrictInt = 0
    node_config: dict[StrictStr, NodeValue] = Field(default_factory=dict)


class WorkerStatus(BaseModel):
    """What a ping answers: the worker's process, what it serves and how many messages it answered."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pid: StrictInt
    data: StrictStr
    manifest: StrictStr
    site: StrictStr
    policy: StrictStr | None  # the site policy this worker enforces (its own command line), or None
    fingerprint: StrictStr
    requests: StrictInt
    started: StrictStr


class WorkerAnswer(Frame):
    """Worker -> ClientApp: ``ok`` with the reply's content as payload (or ``status`` for a ping), or the ``code``
    and ``reason`` of the error reply the site sends."""

    ok: StrictBool
    code: StrictInt | None = None
    reason: StrictStr | None = None
    status: WorkerStatus | None = None


def _errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'header'}: {e['msg']}" for e in exc.errors()[:5])


def read_header(cls: type[Frame], header: Mapping[str, Any], what: str) -> Frame:
    """``header`` as ``cls`` after the version check; ContractError naming the field otherwise (a
    ProtocolVersionError, naming both versions, for another version)."""
    check_version(header, what)
    try:
        return cls.model_validate(dict(header))
    except ValidationError as exc:
        raise ContractError(f"{what}: {_errors(exc)}") from None

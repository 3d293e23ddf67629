"""The protocol version both sides check: every message of the coordinator and every reply of a site carries it."""

from __future__ import annotations

from typing import Any, Mapping

from magnet_core.protocol.errors import ContractError
from magnet_core.protocol.keys import PROTOCOL_VERSION, VERSION_KEY


class ProtocolVersionError(ContractError):
    """A message of another protocol version (or of none): refused before anything else in it is read."""


def stamped(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` with this side's protocol version."""
    return {**dict(record), VERSION_KEY: PROTOCOL_VERSION}


def check_version(record: Mapping[str, Any] | None, what: str) -> None:
    """ProtocolVersionError unless ``record`` carries exactly this side's PROTOCOL_VERSION; the error names both."""
    got = (record or {}).get(VERSION_KEY)
    if got == PROTOCOL_VERSION:
        return
    if got is None:
        raise ProtocolVersionError(f"{what} carries no protocol version ({VERSION_KEY!r}); this side speaks "
                                   f"{PROTOCOL_VERSION!r}: the other side runs an older magnet-fl, upgrade it")
    raise ProtocolVersionError(f"{what} speaks protocol {str(got)[:64]!r}, this side speaks {PROTOCOL_VERSION!r}: "
                               "both sides must run the same magnet-fl protocol version (upgrade the older one)")

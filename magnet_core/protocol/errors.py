"""The one error of the protocol: a message that breaks the contract."""

from __future__ import annotations


class ContractError(ValueError):
    """A message that breaks the contract: unknown key, wrong type, out of range, inconsistent or of another
    protocol version."""

"""The one error of the protocol (a message that breaks the contract) and the error codes of a site's error replies."""

from __future__ import annotations

# A site answers a message it cannot or will not answer with a Flower Error of one of these codes; the reason is text
# for the coordinator's log (it names the file, key or policy line, never a patient's value).
DATA_ERROR_CODE = 4001  # the site's data failed validation; the reason names the file and the problem
CONTRACT_ERROR_CODE = 4002  # the coordinator's message broke the contract (or could not be read); the reason names it
WORKER_ERROR_CODE = 4003  # the site worker is unreachable, timed out, or failed; the reason says which
SECAGG_ERROR_CODE = 4005  # the secure-aggregation exchange cannot go on at this site; the reason says why
POLICY_ERROR_CODE = 4006  # refused by the site's own policy; the reason names the policy file and line


class ContractError(ValueError):
    """A message that breaks the contract: unknown key, wrong type, out of range, inconsistent or of another
    protocol version."""

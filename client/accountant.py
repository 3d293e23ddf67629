"""A site's own privacy accountant: the epsilon it has spent per consortium, across runs, kept in its state folder.
The coordinator's accounting is not trusted; this one is what the site's policy budget is checked against."""

# Each accepted DP round is charged at acceptance (before the update leaves; a round that fails later stays charged:
# the conservative side) with its effective noise multiplier from this site's view: the round's multiplier z for
# noise pieces sized for a threshold of t sites, of which the policy's ``colluding_sites`` are assumed to give their
# piece to the coordinator: z * sqrt((t - c) / t) (magnet_core.federation.dp.effective_noise_multiplier with
# s = t pieces, the fewest a secure sum can be unmasked with). Epsilon comes from magnet_core.federation.dp's
# PrivacyAccountant (RDP or exact conversion) over every round charged to the consortium.

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ACCOUNTANT_FILE = "privacy_spent.json"


class ChargedRound(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    run: int
    round: int | None = None
    noise_multiplier: float = Field(ge=0, description="effective multiplier of the round from this site's view")
    time: float


class SiteAccounts(BaseModel):
    """Every DP round charged, per consortium."""

    model_config = ConfigDict(extra="forbid")

    consortia: dict[str, list[ChargedRound]] = Field(default_factory=dict)


def round_multiplier(noise_multiplier: float, threshold: int, colluding_sites: int) -> float:
    """The multiplier this site counts for one secure DP round (distributed noise sized for ``threshold``)."""
    from magnet_core.federation.dp import DPConfig, effective_noise_multiplier  # lazy: dp loads torch (secagg)

    cfg = DPConfig(clip_norm=1.0, noise_multiplier=noise_multiplier, noise="distributed",
                   colluding_sites=colluding_sites)
    return effective_noise_multiplier(cfg, noise_pieces=threshold, threshold=threshold)


def epsilon(multipliers: list[float], delta: float, accounting: Literal["rdp", "exact"] = "rdp") -> float:
    """Epsilon at ``delta`` of the composed rounds (0 without any)."""
    if not multipliers:
        return 0.0
    from magnet_core.federation.dp import PrivacyAccountant  # lazy: dp loads torch (secagg)

    spent = PrivacyAccountant(delta, list(multipliers)).spent()
    return float(spent["epsilon_rdp" if accounting == "rdp" else "epsilon"])


class SiteAccountant:
    """The accounts file of one state folder; the caller holds the folder's lock (client/site_state.py)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ACCOUNTANT_FILE
        self.accounts = (SiteAccounts.model_validate_json(self.path.read_text(encoding="utf-8"))
                         if self.path.exists() else SiteAccounts())

    def multipliers(self, consortium: str) -> list[float]:
        return [r.noise_multiplier for r in self.accounts.consortia.get(consortium, [])]

    def spent(self, consortium: str, delta: float, accounting: Literal["rdp", "exact"] = "rdp") -> float:
        return epsilon(self.multipliers(consortium), delta, accounting)

    def spent_with(self, consortium: str, multiplier: float, delta: float,
                   accounting: Literal["rdp", "exact"] = "rdp") -> float:
        """Epsilon after one more round of ``multiplier`` (not charged)."""
        return epsilon(self.multipliers(consortium) + [multiplier], delta, accounting)

    def charge(self, consortium: str, run: int, server_round: int | None, multiplier: float) -> None:
        self.accounts.consortia.setdefault(consortium, []).append(
            ChargedRound(run=run, round=server_round, noise_multiplier=multiplier, time=time.time()))

    def rounds(self, consortium: str) -> list[ChargedRound]:
        return list(self.accounts.consortia.get(consortium, []))

    def dump(self) -> str:
        return self.accounts.model_dump_json(indent=1)

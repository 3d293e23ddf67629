"""The coordinator's record of a run: one RoundRecord per round in history.json, and the settings' fingerprint."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field


class PooledOver(BaseModel):
    """Which evaluation replies a global metric was pooled from."""

    model_config = ConfigDict(extra="forbid")

    sites: list[str] = Field(default_factory=list)
    patients: int = 0


class RoundRecord(BaseModel):
    """One round of a federated run, as written to history.json (no patient-level data)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    round: int = Field(ge=1)
    seconds: float
    train_seconds: float
    accepted: list[str] = Field(default_factory=list, description="sites whose update was aggregated")
    rejected: dict[str, str] = Field(default_factory=dict, description="site -> reason (incl. node id)")
    failed: dict[str, str] = Field(default_factory=dict, description="site -> error reply / timeout")
    nodes: dict[str, int] = Field(default_factory=dict, description="site label -> node id")
    train_loss: float | None = None
    global_metrics: dict[str, float | None] = Field(default_factory=dict, alias="global")
    pooled_over: PooledOver = Field(default_factory=PooledOver)
    withheld: dict[str, list[str]] = Field(default_factory=dict, description="site -> groups it withheld (< k)")
    sites: dict[str, dict[str, float | int | None]] = Field(default_factory=dict)
    screening: dict[str, Any] = Field(default_factory=dict, description="the update checks applied this round")
    dp: dict[str, Any] | None = None
    server: dict[str, float | None] | None = None
    config_fingerprint: str = ""

    def dump(self) -> dict:
        return self.model_dump(by_alias=True, mode="json")


def fingerprint(settings: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a run's settings (what must match to resume)."""
    text = json.dumps(dict(settings), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()

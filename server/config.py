"""The federated run configuration: one pydantic model read once from Flower's run config."""

from __future__ import annotations

import json
import os
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field

ENV_OVERRIDE = "MAGNET_FL_RUN_CONFIG"  # JSON with run-config keys; used by `magnet-fl simulate`


class FederatedConfig(BaseModel):
    """Every knob of a federated run; Flower's kebab-case run-config keys map to these fields."""

    model_config = ConfigDict(extra="forbid")

    num_server_rounds: int = Field(20, ge=1)
    local_epochs: int = Field(10, ge=1)
    preset: str = "ov"
    aggregation: Literal["modality-aware", "fedavg"] = "modality-aware"
    robust: Literal["mean", "trimmed-mean", "median"] = "mean"
    trim: float = Field(0.2, ge=0, lt=0.5)
    seed: int = 10
    min_sites: int = Field(2, ge=1, description="minimum sites per round (train and evaluate)")
    fraction_train: float = Field(1.0, gt=0, le=1)
    round_timeout: float = Field(600.0, gt=0, description="seconds to wait for replies in one round")
    straggler_grace: float = Field(30.0, ge=0, description="once min-sites replied, wait this long for the rest")
    norm_ratio: float = Field(10.0, gt=1, description="reject updates whose norm exceeds this x others' median")
    histogram_bins: int = Field(1000, ge=10)
    # simulation: where sites come from (empty data-path = generated cohort)
    data_path: str = ""
    scenario: str = "iid-3"
    modalities: str = Field("", description="comma-separated subset of the data's modalities ('' = all)")
    # deployment: the consortium manifest (modalities, features, classes)
    manifest: str = ""
    server_eval: bool = True
    out_dir: str = "runs/flwr-run"
    resume: bool = False
    # differential privacy (client-side fixed clipping); 0 = off
    dp_clip_norm: float = Field(0.0, ge=0)
    dp_noise_multiplier: float = Field(0.0, ge=0)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "FederatedConfig":
        """Flower run config (kebab-case) overlaid with the JSON in $MAGNET_FL_RUN_CONFIG, if set."""
        merged = dict(run_config)
        if os.environ.get(ENV_OVERRIDE):
            merged.update(json.loads(os.environ[ENV_OVERRIDE]))
        return cls.model_validate({k.replace("-", "_"): v for k, v in merged.items()})

    def to_run_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in self.model_dump().items()}

"""Run configuration of the federated preprocessing app (one pydantic model, kebab-case run-config keys)."""

from __future__ import annotations

import json
import os
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field

from magnet_core.preprocess import PrepareConfig

ENV_OVERRIDE = "MAGNET_FL_PREPARE_CONFIG"


class PrepareRunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    site_dirs: str = Field("", description="simulation: comma-separated raw site folders, one per partition")
    out_dir: str = "runs/prepare"
    name: str = "consortium"
    classes: str = Field("", description="comma-separated class names (default: class0..classC-1)")
    seed: int = 10
    n_features: int = 1000
    max_missing_fraction: float = 0.1
    variance_threshold: str = Field("", description="per modality, e.g. 'mRNA=0.03,DNA=0.04'")
    missing_feature: Literal["error", "impute"] = "impute"
    orientation: Literal["auto", "samples-x-features", "features-x-samples"] = "auto"
    min_sites: int = Field(0, ge=0, description="deployment: sites to wait for (simulation: one per site folder)")

    def expected_sites(self) -> int:
        return self.min_sites or max(1, len([d for d in self.site_dirs.split(",") if d]))

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "PrepareRunConfig":
        merged = dict(run_config)
        if os.environ.get(ENV_OVERRIDE):
            merged.update(json.loads(os.environ[ENV_OVERRIDE]))
        return cls.model_validate({k.replace("-", "_"): v for k, v in merged.items()})

    def to_run_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in self.model_dump().items()}

    def prepare_config(self) -> PrepareConfig:
        thresholds = {k: float(v) for k, v in (p.split("=") for p in self.variance_threshold.split(",") if p)}
        return PrepareConfig(max_missing_fraction=self.max_missing_fraction, variance_threshold=thresholds,
                             n_features=self.n_features, missing_feature=self.missing_feature, seed=self.seed)

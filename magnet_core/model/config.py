"""Hyperparameter models and the reference code's per-dataset presets."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    """Architecture of one MAGNET model (encoders, attention, GNN decoder)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden: int = Field(256, gt=0, description="encoder, attention and GNN width")
    heads: int = Field(8, gt=0, description="attention heads; must divide hidden")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="dropout in encoders and decoder")
    gnn_layers: int = Field(2, ge=1)
    negative_slope: float = Field(0.2, ge=0.0, description="LeakyReLU slope in the encoders")
    prototypes: bool = Field(False, description="carry the consortium's class prototypes of the fused embedding "
                             "(buffers prototype_sum / prototype_mass, magnet_core.model.prototypes): the fedproto "
                             "method; they never change a prediction")

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "ModelConfig":
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        return self


class TrainConfig(BaseModel):
    """Optimiser, schedule and loss weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(2.12e-4, gt=0)
    weight_decay: float = Field(1e-3, ge=0)
    epochs: int = Field(200, ge=1)
    lr_step: int = Field(20, ge=1, description="StepLR step size (epochs)")
    lr_gamma: float = Field(0.8, gt=0, le=1)
    kl_weight: float = Field(0.1, ge=0)


class GraphConfig(BaseModel):
    """How the patient graph is sparsified."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sparsity: float = Field(0.8, ge=0.0, lt=1.0, description="drop similarities below this quantile")
    rule: Literal["dense", "topk", "auto"] = Field(
        "auto", description="dense: MAGNET's quantile rule on the full similarity matrix; topk: a sparse k-nearest-"
                            "neighbour graph (same shared-modality masking); auto: dense up to 1,000 patients")
    k: int = Field(10, ge=1, description="neighbours per patient of the topk rule")


class Preset(BaseModel):
    """A named bundle of the three configs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    model: ModelConfig
    train: TrainConfig
    graph: GraphConfig


# Values from the MAGNET reference configs (configs/MAGNET_{OV,BRCA,BLCA}.yaml).
PRESETS: dict[str, Preset] = {
    "ov": Preset(
        name="ov",
        model=ModelConfig(hidden=256, heads=8, dropout=0.2),
        train=TrainConfig(lr=2.12e-4, weight_decay=1e-3),
        graph=GraphConfig(sparsity=0.8),
    ),
    "brca": Preset(
        name="brca",
        model=ModelConfig(hidden=128, heads=2, dropout=0.1),
        train=TrainConfig(lr=3.2e-4, weight_decay=1e-3),
        graph=GraphConfig(sparsity=0.6),
    ),
    "blca": Preset(
        name="blca",
        model=ModelConfig(hidden=256, heads=8, dropout=0.2),
        train=TrainConfig(lr=1.7e-4, weight_decay=1e-3),
        graph=GraphConfig(sparsity=0.6),
    ),
}


# Label-skew loss adjustments (magnet_core.model.loss.label_offsets); here, without torch, for the message contract.
LABEL_ADJUSTMENTS = ("none", "logit-adjust", "fedlc")
MAX_LABEL_TAU = 10.0  # the papers use tau in 0.5..2 (Menon et al.) and 0.01..1 (FedLC); beyond 10 training stalls

MAX_PROTOTYPE_WEIGHT = 100.0  # the prototype pull's weight lambda (FedProto uses 1); beyond this it swamps the task

DEFAULT_PRESET = "ov"  # the paper's TCGA-OV settings; every command's default


def get_preset(name: str, prototypes: bool = False) -> Preset:
    """Return a preset by (case-insensitive) name, with a clear error for unknown names. ``prototypes``: its model
    carries the class-prototype buffers (a run with prototype weight > 0; the server and every site build the same
    model from the same round config, and the site checks the layout it is sent against its own)."""
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[key]
    if prototypes:
        preset = preset.model_copy(update={"model": preset.model.model_copy(update={"prototypes": True})})
    return preset

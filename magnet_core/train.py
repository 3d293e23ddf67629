"""Training and prediction on a set of patients with its own patient graph."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .config import GraphConfig, ModelConfig, TrainConfig
from .data import Cohort
from .graph import PatientGraph, build_patient_graph
from .loss import magnet_loss
from .model import MAGNET, build_model


@dataclasses.dataclass
class PatientSet:
    """Tensors of one group of patients (e.g. a site's training patients) and the graph among them."""

    xs: list[Tensor]
    mask: Tensor
    y: Tensor
    paired: Tensor
    graph: PatientGraph

    @property
    def n(self) -> int:
        return int(self.y.numel())

    @classmethod
    def from_cohort(cls, cohort: Cohort, sparsity: float) -> "PatientSet":
        """Tensors of ``cohort`` and its patient graph (built among these patients only)."""
        xs = [torch.from_numpy(np.ascontiguousarray(cohort.X[m])) for m in cohort.modalities]
        mask = torch.from_numpy(cohort.mask.copy())
        graph = build_patient_graph(xs, mask, None, sparsity)
        return cls(xs, mask, torch.from_numpy(cohort.labels.copy()), torch.from_numpy(cohort.paired.copy()), graph)

    def modality_counts(self, modalities: list[str]) -> dict[str, int]:
        """How many of these patients hold each modality (aggregation weights)."""
        return {m: int(self.mask[:, j].sum()) for j, m in enumerate(modalities)}


def split_sets(cohort: Cohort, sparsity: float) -> tuple[PatientSet, PatientSet]:
    """Train (train+val, as the paper) and test sets, each with its own graph: no edge crosses the boundary."""
    train = cohort.subset(cohort.split_indices("train", "val"))
    test = cohort.subset(cohort.split_indices("test"))
    return PatientSet.from_cohort(train, sparsity), PatientSet.from_cohort(test, sparsity)


def make_optimizer(model: MAGNET, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    """Adam + StepLR as in the reference."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)


def train_epochs(
    model: MAGNET,
    data: PatientSet,
    cfg: TrainConfig,
    epochs: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Full-batch training for ``epochs`` epochs; returns the last epoch's losses."""
    if optimizer is None:
        optimizer, scheduler = make_optimizer(model, cfg)
    g = data.graph
    model.train()
    stats: dict[str, float] = {}
    for epoch in range(epochs):
        optimizer.zero_grad(set_to_none=True)
        logits, fused = model(data.xs, data.mask, g.edge_index, g.edge_weight)
        loss, stats = magnet_loss(logits, data.y, g.edge_index, g.edge_weight, fused, cfg.kl_weight)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if on_epoch is not None:
            on_epoch(epoch, stats)
    return stats


@torch.no_grad()
def predict_proba(model: MAGNET, data: PatientSet) -> Tensor:
    """Class probabilities (n, C) in eval mode."""
    model.eval()
    g = data.graph
    logits, _ = model(data.xs, data.mask, g.edge_index, g.edge_weight)
    return torch.softmax(logits, dim=-1)


def in_dims_of(cohort: Cohort) -> dict[str, int]:
    return {m: int(cohort.X[m].shape[1]) for m in cohort.modalities}


def fit_and_predict(
    cohort: Cohort,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    graph_cfg: GraphConfig,
    seed: int,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[MAGNET, PatientSet, Tensor]:
    """Train on train+val, predict on test (the paper's protocol). Returns model, test set and test probabilities."""
    train, test = split_sets(cohort, graph_cfg.sparsity)
    model = build_model(in_dims_of(cohort), cohort.num_classes, model_cfg, seed)
    torch.manual_seed(seed)
    train_epochs(model, train, train_cfg, train_cfg.epochs, on_epoch=on_epoch)
    return model, test, predict_proba(model, test)

"""Server-side evaluation of a global model on a held-out test set (simulation only)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from magnet_core.cohort.data import Cohort
from magnet_core.model.config import Preset
from magnet_core.model.metrics import metrics_with_groups
from magnet_core.model.network import MAGNET
from magnet_core.model.train import PatientSet, predict_proba


def held_out_evaluator(cohort: Cohort, preset: Preset) -> Callable[[dict[str, np.ndarray]], dict]:
    """Evaluate params on the cohort's test patients (one graph among them), exact metrics."""
    test = PatientSet.from_cohort(cohort.subset(cohort.split_indices("test")), preset.graph.sparsity)
    model = MAGNET({m: int(cohort.X[m].shape[1]) for m in cohort.modalities}, cohort.num_classes, preset.model)

    def evaluate(params: dict[str, np.ndarray]) -> dict:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in params.items()})
        probs = predict_proba(model, test).numpy()
        return metrics_with_groups(test.y.numpy(), probs, test.paired.numpy(), cohort.num_classes)

    return evaluate

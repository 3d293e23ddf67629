"""The simulated consortium's vocabulary, defined once: method names, their labels and colours, default seeds.

``simulations/`` (simulate, study, privacy study) and the run report read these; nothing else spells a method.
A new method is one entry in ``METHODS`` (and, for a trained method, its run-config settings in
``simulations/simulate.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from magnet_core.cohort.manifest import DEFAULT_SEED

DEFAULT_SEEDS: tuple[int, ...] = tuple(DEFAULT_SEED + 10 * i for i in range(5))  # commands' and studies' default


@dataclasses.dataclass(frozen=True)
class Method:
    """One way of training the consortium's model: ``label`` is its name in tables and plots (short), ``detail`` the
    longer description the run report shows, ``kind`` whether it is federated training or a reference."""

    name: str
    label: str
    detail: str
    color: str
    kind: Literal["federated", "reference"]


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("federated", "modality-aware FedAvg", "federated, modality-aware FedAvg", "tab:blue", "federated"),
    Method("fedavg_plain", "plain FedAvg", "federated, plain FedAvg", "tab:orange", "federated"),
    Method("fedprox", "FedProx", "federated, FedProx (modality-aware)", "tab:purple", "federated"),
    Method("fedadam", "FedAdam", "federated, FedAdam (modality-aware)", "tab:brown", "federated"),
    Method("fedyogi", "FedYogi", "federated, FedYogi (modality-aware)", "tab:pink", "federated"),
    Method("logit_adjusted", "logit-adjusted FedAvg",
           "federated, modality-aware FedAvg with logit-adjusted local loss (Menon et al. 2021; Balanced Softmax)",
           "tab:olive", "federated"),
    Method("fedlc", "FedLC", "federated, modality-aware FedAvg with FedLC logits calibration (Zhang et al. 2022)",
           "black", "federated"),
    Method("fedproto", "FedProto",
           "federated, modality-aware FedAvg with class prototypes shared under the minimum count (FedProto, Tan et "
           "al. 2022)", "tab:gray", "federated"),
    Method("fedsgd", "FedSGD",
           "federated, one full-batch gradient per site and round with the centralized optimiser at the coordinator "
           "(FedSGD, McMahan et al. 2017; server optimiser as Reddi et al. 2021)", "darkgoldenrod", "federated"),
    Method("personalized", "personalized", "personalized (modality-aware FedAvg, then site fine-tuning)", "tab:cyan",
           "federated"),
    Method("centralized", "centralized", "centralized (the training patients of all sites pooled)", "tab:green",
           "reference"),
    Method("local_only", "local-only", "local-only (each site alone)", "tab:red", "reference"),
)}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)  # the report's order: trained methods first, then the references
REFERENCE_METHODS: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.kind == "reference")
BASELINE_METHOD = "fedavg_plain"  # the strategy every other trained method is compared with in studies


def label(method: str) -> str:
    """A method's short label (its name when it is not one of ours)."""
    return METHODS[method].label if method in METHODS else method


def detail(method: str) -> str:
    """A method's long description for the run report."""
    return METHODS[method].detail if method in METHODS else method


def color(method: str, fallback: str) -> str:
    return METHODS[method].color if method in METHODS else fallback

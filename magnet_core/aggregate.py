"""Pure aggregation math: modality-aware FedAvg, robust variants, update validation, pooled evaluation."""

from __future__ import annotations

import dataclasses
from typing import Literal, Mapping, Sequence

import numpy as np

from .metrics import metrics_from_confusion, ranking_from_histogram
from .model import MAGNET

Params = dict[str, np.ndarray]
Robust = Literal["mean", "trimmed-mean", "median"]


@dataclasses.dataclass
class SiteUpdate:
    """What one site sends back after local training (no patient-level data)."""

    site: str
    params: Params
    num_train: int
    modality_counts: dict[str, int]


def _combine(stack: np.ndarray, weights: np.ndarray, robust: Robust, trim: float) -> np.ndarray:
    if robust == "median":
        return np.median(stack, axis=0)
    if robust == "trimmed-mean":
        k = int(np.floor(trim * stack.shape[0]))
        if k > 0 and stack.shape[0] - 2 * k >= 1:
            return np.sort(stack, axis=0)[k : stack.shape[0] - k].mean(axis=0)
        return stack.mean(axis=0)
    w = weights / weights.sum()
    return np.tensordot(w, stack, axes=1)


def aggregate_updates(
    global_params: Params,
    updates: Sequence[SiteUpdate],
    modality_aware: bool = True,
    robust: Robust = "mean",
    trim: float = 0.2,
) -> Params:
    """New global parameters.

    Modality-aware: the encoder of modality m is averaged over the sites that trained it, weighted by their
    number of training patients holding m; if no site holds m it stays as it was. Shared layers (attention, GNN,
    head) are averaged over all sites weighted by training patients. ``modality_aware=False`` is plain FedAvg
    (every parameter weighted by training patients). ``robust`` replaces the weighted mean with a coordinate-wise
    trimmed mean or median over the contributing sites.
    """
    if not updates:
        return {k: v.copy() for k, v in global_params.items()}
    out: Params = {}
    for name, current in global_params.items():
        modality = MAGNET.encoder_modality(name)
        if modality_aware and modality is not None:
            contrib = [(u, u.modality_counts.get(modality, 0)) for u in updates]
            contrib = [(u, c) for u, c in contrib if c > 0]
        else:
            contrib = [(u, u.num_train) for u in updates]
        if not contrib or sum(c for _, c in contrib) <= 0:
            out[name] = current.copy()
            continue
        stack = np.stack([u.params[name].astype(np.float64) for u, _ in contrib])
        weights = np.array([c for _, c in contrib], dtype=np.float64)
        out[name] = _combine(stack, weights, robust, trim).astype(current.dtype)
    return out


def validate_update(global_params: Params, params: Mapping[str, np.ndarray]) -> list[str]:
    """Problems that make an update unusable: wrong array names or shapes, non-finite values."""
    problems = []
    missing = sorted(set(global_params) - set(params))
    extra = sorted(set(params) - set(global_params))
    if missing:
        problems.append(f"missing arrays: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"unexpected arrays: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for name in sorted(set(global_params) & set(params)):
        a, g = params[name], global_params[name]
        if tuple(a.shape) != tuple(g.shape):
            problems.append(f"array {name!r} has shape {tuple(a.shape)}, expected {tuple(g.shape)}")
        elif not np.all(np.isfinite(a)):
            problems.append(f"array {name!r} has {int((~np.isfinite(a)).sum())} non-finite values")
    return problems


def update_norm(global_params: Params, params: Mapping[str, np.ndarray]) -> float:
    """L2 norm of (update - global) over all arrays."""
    return float(np.sqrt(sum(float(((params[k] - g) ** 2).sum()) for k, g in global_params.items())))


def norm_outliers(norms: Mapping[str, float], ratio: float = 10.0) -> dict[str, str]:
    """Sites whose update norm exceeds ``ratio`` times the median norm of the other sites.

    Comparing each site with the others' median keeps one huge update from hiding itself (also with 2 sites).
    """
    flagged = {}
    for site, norm in norms.items():
        others = [v for k, v in norms.items() if k != site]
        if not others:
            continue
        ref = float(np.median(others))
        if ref > 0 and norm > ratio * ref:
            flagged[site] = f"update norm {norm:.3g} is {norm / ref:.1f}x the median of the other sites ({ref:.3g})"
    return flagged


# --------------------------------------------------------------------------------------- pooled evaluation


@dataclasses.dataclass
class EvalCounts:
    """A site's evaluation as counts: confusion matrices (all/paired/unpaired) and, if binary, score histograms."""

    site: str
    confusion: dict[str, np.ndarray]  # group ("all", "paired", "unpaired") -> (C, C)
    histogram: dict[str, np.ndarray]  # group -> (2, bins); empty for multi-class

    @property
    def num(self) -> int:
        return int(self.confusion["all"].sum())


def metrics_from_counts(confusion: dict[str, np.ndarray], histogram: dict[str, np.ndarray]) -> dict[str, float | None]:
    """acc/f1/mcc (+ auroc/auprc if histograms) for all patients and ``paired_``/``unpaired_`` groups."""
    out: dict[str, float | None] = {}
    for group, cm in confusion.items():
        prefix = "" if group == "all" else f"{group}_"
        if cm.sum() == 0:
            vals: dict[str, float | None] = {"acc": None, "f1": None, "mcc": None}
        else:
            vals = dict(metrics_from_confusion(cm))
        hist = histogram.get(group)
        vals.update(ranking_from_histogram(hist) if hist is not None else {"auroc": None, "auprc": None})
        out.update({f"{prefix}{k}": v for k, v in vals.items()})
    return out


def pool_counts(sites: Sequence[EvalCounts]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Sum confusion matrices and histograms over sites (exactly the pooled predictions' counts)."""
    groups = sites[0].confusion.keys()
    confusion = {g: sum(s.confusion[g] for s in sites) for g in groups}
    histogram = {g: sum(s.histogram[g] for s in sites) for g in sites[0].histogram}
    return confusion, histogram


def pooled_metrics(sites: Sequence[EvalCounts]) -> dict[str, float | None]:
    """Global metrics as if all sites' test patients were pooled (never an average of per-site MCCs)."""
    if not sites:
        return {}
    return metrics_from_counts(*pool_counts(sites))

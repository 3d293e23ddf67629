"""Minimum-count release rules: what a site may send in the clear about its evaluation and its preprocessing."""

# The rules (k = the manifest's min_count, >= 3):
#
# Evaluation (confusion matrices and binary score histograms of the groups all / paired / unpaired):
#   * A group's statistics are released only when the group holds >= k test patients. Inside a released
#     confusion matrix, cells may hold 1 patient: this is the usual rule for tables of outcomes (the threshold
#     applies to the population a table describes, not to its cells). A cell tells "one of these >= k unnamed
#     patients of true class a was predicted b", which does not single a patient out among the group and which
#     the pooled, exact MCC needs. What the rule prevents is a table describing fewer than k patients.
#   * Complementary suppression: all = paired + unpaired, so releasing "all" and one subgroup reveals the other.
#     When a subgroup holds between 1 and k - 1 patients, both subgroups are withheld (only "all" may go out). An
#     empty subgroup reveals no patient and is simply absent (reason "no patients").
#   * Histograms: at most ``max_bins`` bins (fixed at the site, whatever the coordinator asks): the requested
#     grid is coarsened to the largest even number of equal bins <= max_bins that divides it. Then adjacent bins
#     are merged, left to right, until every released bin holds >= k patients (both labels together; the label
#     split within a bin is a cell of a table of >= k patients, as above); a short tail joins the last bin. This
#     is done separately below and above the decision threshold 0.5 (binary prediction = score > 0.5), because a
#     bin across 0.5 together with the confusion matrix would split into smaller groups. A side holding fewer than
#     k patients is released as one bin: it says exactly what the confusion matrix's column already says. So
#     every other score interval released describes >= k patients, and a single patient's score is known only to
#     lie in an interval shared with at least k - 1 others. Merged bins differ between sites, so pooled AUROC comes as
#     an
#     interval (``auroc_bounds``); on identical edges its midpoint is the usual tied-histogram AUROC. When both
#     subgroups are released, "all" sends no histogram of its own (its AUROC comes from the subgroups' bins):
#     two different merge grids over the same patients would let a difference isolate fewer than k of them.
#
# Preprocessing statistics (per class c and feature j: count, sum, sum of squares; per class: patients):
#   * a class's statistics only when the site holds >= k training patients of that class, otherwise the whole
#     class row is withheld (those patients then do not enter the consortium's statistics, and the release says
#     how many classes were withheld);
#   * a (class, feature) cell only when >= k of those patients have the feature observed; a withheld cell counts
#     its patients as missing the feature. Per-feature statistics thus always rest on >= k patients.
#   * minimum and maximum are never released (they are single patients' values). Scaling uses ranges fixed by the
#     consortium in advance (``protected_ranges``), which reveal nothing about any site; a feature whose pooled
#     variance (from the sums) is zero gets an empty range, so constant features are dropped as before. Cost: the
#     variance filter then compares variances on the declared scale instead of the observed min-max scale.

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from magnet_core.cohort.preprocess import FeatureStats
from magnet_core.model.metrics import EvalCounts, metrics_from_confusion
from magnet_core.protocol.release import EvalRelease, ReleasedHistogram

DEFAULT_MAX_BINS = 20
SUBGROUPS: dict[str, tuple[str, ...]] = {"all": ("paired", "unpaired")}


# ----------------------------------------------------------------------------------------------- evaluation


def coarsen_histogram(hist: np.ndarray, max_bins: int) -> np.ndarray:
    """(2, B) -> (2, B'), B' the largest even divisor of B that is <= max_bins (exact: bins are merged whole, and
    0.5 stays a bin edge)."""
    hist = np.asarray(hist)
    b = hist.shape[1]
    if b % 2:
        raise ValueError(f"a score histogram needs an even number of bins (0.5 must be a bin edge), got {b}")
    target = max(d for d in range(2, min(b, max(max_bins, 2)) + 1, 2) if b % d == 0)
    return hist.copy() if target == b else hist.reshape(2, target, b // target).sum(axis=2)


def _merge_side(per_bin: np.ndarray, lo: int, hi: int, k: int) -> list[int]:
    """Cut points inside [lo, hi) so that every merged bin holds >= k (the whole side if it holds fewer)."""
    cuts, run = [], 0
    for j in range(lo, hi):
        run += int(per_bin[j])
        if run >= k:
            cuts.append(j + 1)
            run = 0
    if not cuts:
        return [hi]
    cuts[-1] = hi  # a tail with < k patients (possibly 0) joins the last bin of the side
    return cuts


def merge_bins(hist: np.ndarray, k: int) -> ReleasedHistogram | None:
    """Merge adjacent bins, separately below and above 0.5, so that every released bin holds >= k patients (a
    side with fewer is one bin); None when the histogram holds fewer than k patients in all."""
    hist = np.asarray(hist, dtype=np.int64)
    b = hist.shape[1]
    if b % 2:
        raise ValueError(f"a score histogram needs an even number of bins, got {b}")
    per_bin = hist.sum(axis=0)
    if per_bin.sum() < k:
        return None
    cuts = [0, *_merge_side(per_bin, 0, b // 2, k), *_merge_side(per_bin, b // 2, b, k)]
    edges = np.array(cuts, dtype=np.float64) / b
    counts = np.stack([hist[:, lo:hi].sum(axis=1) for lo, hi in zip(cuts[:-1], cuts[1:])], axis=1)
    return ReleasedHistogram(edges, counts)


def release_eval(counts: EvalCounts, k: int, max_bins: int = DEFAULT_MAX_BINS) -> EvalRelease:
    """The part of a site's evaluation counts it may release under the minimum count ``k`` (see module notes)."""
    if k < 1 or max_bins < 1:
        raise ValueError(f"k={k} and max_bins={max_bins} must be positive")
    sizes = {g: int(np.asarray(cm).sum()) for g, cm in counts.confusion.items()}
    withheld: dict[str, str] = {}
    for g, n in sizes.items():
        if n == 0:
            withheld[g] = "no patients"
        elif n < k:
            withheld[g] = f"fewer than k={k} patients"
    for parent, children in SUBGROUPS.items():
        small = [c for c in children if 0 < sizes.get(c, 0) < k]
        for c in children:
            if small and c in sizes and c not in withheld:
                withheld[c] = (f"withheld with {small[0]!r} (fewer than k={k} patients), which {parent!r} minus "
                               f"{c!r} would reveal")
    released = [g for g in counts.confusion if g not in withheld]
    hists = {}
    for g in released:
        children = SUBGROUPS.get(g, ())
        if children and all(c in released for c in children):
            continue  # the parent's histogram comes from its children's (two merge grids would leak by difference)
        if g in counts.histogram:
            merged = merge_bins(coarsen_histogram(counts.histogram[g], max_bins), k)
            if merged is not None:
                hists[g] = merged
    return EvalRelease(counts.site, k, {g: np.asarray(counts.confusion[g]).copy() for g in released}, hists,
                       withheld)


def check_eval_release(release: EvalRelease, max_bins: int) -> list[str]:
    """Problems with a release (what the coordinator can check on what it received): a group below k, a histogram
    with too many bins or a bin below k."""
    problems = []
    for g, cm in release.confusion.items():
        if 0 < int(np.asarray(cm).sum()) < release.k:
            problems.append(f"group {g!r} holds {int(np.asarray(cm).sum())} < k={release.k} patients")
    for g, h in release.histogram.items():
        per_bin = np.asarray(h.counts).sum(axis=0)
        if h.counts.shape[1] > max_bins:
            problems.append(f"histogram {g!r} has {h.counts.shape[1]} > {max_bins} bins")
        whole_side = np.isclose(h.edges[:-1], 0.0) & np.isclose(h.edges[1:], 0.5) | \
            np.isclose(h.edges[:-1], 0.5) & np.isclose(h.edges[1:], 1.0)
        if ((per_bin < release.k) & ~whole_side).any():
            problems.append(f"histogram {g!r} has a bin with {int(per_bin[~whole_side].min())} < k={release.k} "
                            "patients")
        if not np.any(np.isclose(h.edges, 0.5)):
            problems.append(f"histogram {g!r} has a bin across the decision threshold 0.5")
    return problems


def auroc_bounds(histograms: Sequence[ReleasedHistogram]) -> dict[str, float | None]:
    """Pooled AUROC from histograms with possibly different edges: positive/negative pairs whose intervals do not
    overlap are ordered for sure; overlapping pairs count 0 (low), 1 (high) or 1/2 (mid, the usual tie rule)."""
    pos_lo, pos_hi, pos_n, neg_lo, neg_hi, neg_n = ([] for _ in range(6))
    for h in histograms:
        lo, hi = np.asarray(h.edges[:-1]), np.asarray(h.edges[1:])
        neg_lo.append(lo), neg_hi.append(hi), neg_n.append(np.asarray(h.counts[0], dtype=np.float64))
        pos_lo.append(lo), pos_hi.append(hi), pos_n.append(np.asarray(h.counts[1], dtype=np.float64))
    if not histograms:
        return {"auroc": None, "auroc_low": None, "auroc_high": None}
    pl, ph, pn = (np.concatenate(a) for a in (pos_lo, pos_hi, pos_n))
    nl, nh, nn = (np.concatenate(a) for a in (neg_lo, neg_hi, neg_n))
    total = pn.sum() * nn.sum()
    if total == 0:
        return {"auroc": None, "auroc_low": None, "auroc_high": None}
    pairs = np.outer(pn, nn)
    above = pl[:, None] >= nh[None, :]  # every positive of this bin scores above every negative of that one
    below = ph[:, None] <= nl[None, :]
    overlap = ~(above | below)
    certain, unsure = float(pairs[above].sum()), float(pairs[overlap].sum())
    return {"auroc": (certain + 0.5 * unsure) / total, "auroc_low": certain / total,
            "auroc_high": (certain + unsure) / total}


def _group_histograms(release: EvalRelease, group: str) -> list[ReleasedHistogram]:
    if group in release.histogram:
        return [release.histogram[group]]
    children = SUBGROUPS.get(group, ())
    if children and all(c in release.histogram for c in children):
        return [release.histogram[c] for c in children]
    return []


def pool_releases(releases: Sequence[EvalRelease]) -> dict:
    """Pooled metrics per group over the sites that released it, the AUROC interval, and who withheld what."""
    out: dict = {"metrics": {}, "withheld": {r.site: dict(r.withheld) for r in releases if r.withheld},
                 "sites_per_group": {}}
    groups = list(dict.fromkeys(g for r in releases for g in (*r.confusion, *r.withheld)))
    for g in groups:
        have = [r for r in releases if g in r.confusion]
        prefix = "" if g == "all" else f"{g}_"
        out["sites_per_group"][g] = [r.site for r in have]
        if not have:
            out["metrics"].update({f"{prefix}{m}": None for m in ("acc", "f1", "mcc", "auroc")})
            continue
        cm = sum(np.asarray(r.confusion[g], dtype=np.int64) for r in have)
        vals: dict = {m: (None if np.isnan(v) else v) for m, v in metrics_from_confusion(cm).items()}
        hists = [h for r in have for h in _group_histograms(r, g)]
        if hists:
            vals.update(auroc_bounds(hists))
        out["metrics"].update({f"{prefix}{m}": v for m, v in vals.items()})
    return out


# ----------------------------------------------------------------------------------------------- preprocessing


@dataclasses.dataclass
class StatsRelease:
    """A modality's statistics as released, and what was withheld (counts only)."""

    stats: FeatureStats
    withheld_classes: list[int]
    withheld_patients: int  # training patients of withheld classes
    withheld_cells: int  # (class, feature) cells with 1..k-1 observed patients


def release_feature_stats(stats: FeatureStats, k: int) -> StatsRelease:
    """Class rows with < k patients and (class, feature) cells with < k observed patients set to zero (counted as
    absent / missing); minimum and maximum replaced by "never observed" (+inf / -inf), i.e. not released."""
    n = np.asarray(stats.n_per_class, dtype=np.float64).copy()
    count, total, total_sq = (np.asarray(a, dtype=np.float64).copy() for a in (stats.count, stats.total,
                                                                              stats.total_sq))
    small_class = (n > 0) & (n < k)
    cell = (count > 0) & (count < k) & ~small_class[:, None]
    withheld_patients = int(n[small_class].sum())
    n[small_class] = 0
    drop = cell | small_class[:, None]
    count[drop], total[drop], total_sq[drop] = 0.0, 0.0, 0.0
    d = len(stats.features)
    released = FeatureStats(list(stats.features), n, count, total, total_sq, np.full(d, np.inf), np.full(d, -np.inf))
    return StatsRelease(released, np.flatnonzero(small_class).tolist(), withheld_patients, int(cell.sum()))


def release_site_stats(per_modality: Mapping[str, FeatureStats], k: int) -> tuple[dict[str, FeatureStats], dict]:
    """:func:`release_feature_stats` for every modality; the report holds counts only."""
    out, report = {}, {}
    for m, s in per_modality.items():
        r = release_feature_stats(s, k)
        out[m] = r.stats
        report[m] = {"withheld_classes": r.withheld_classes, "withheld_patients": r.withheld_patients,
                     "withheld_cells": r.withheld_cells}
    return out, report


def protected_ranges(stats: FeatureStats, low: float, high: float, rtol: float = 1e-9) -> FeatureStats:
    """Combined statistics with the consortium's declared range [low, high] as min / max of every feature that
    varies (judged from the sums alone) and an empty range at the mean for features with zero variance."""
    if not high > low:
        raise ValueError(f"declared range [{low}, {high}] is empty")
    observed = stats.count.sum(axis=0)
    tot, tot_sq = stats.total.sum(axis=0), stats.total_sq.sum(axis=0)
    mean = np.divide(tot, observed, out=np.zeros_like(tot), where=observed > 0)
    ss = tot_sq - np.divide(tot**2, np.maximum(observed, 1))
    varies = (observed > 1) & (ss > rtol * np.maximum(np.abs(tot_sq), 1.0))
    lo = np.where(varies, low, np.where(observed > 0, mean, np.inf))
    hi = np.where(varies, high, np.where(observed > 0, mean, -np.inf))
    return dataclasses.replace(stats, minimum=lo, maximum=hi)


def federated_ranges(combined: Mapping[str, FeatureStats], value_ranges: Mapping[str, Sequence[float]],
                     observed: bool = False) -> dict[str, FeatureStats]:
    """:func:`protected_ranges` for every modality with the consortium's declared range (``PrepareConfig.
    value_ranges``); a modality without one keeps the observed minima / maxima when ``observed`` (only for a
    preparation where one party holds every site's data) and is refused otherwise."""
    from magnet_core.cohort.data import DataError

    missing = [m for m in combined if m not in value_ranges and not observed]
    if missing:
        raise DataError(f"federated preparation needs a declared value range for modality {missing} (e.g. "
                        f"value_ranges = {{ {missing[0]} = [low, high] }} in the prepare config): per-feature "
                        "minima and maxima are single patients' values and are not released")
    return {m: protected_ranges(s, float(value_ranges[m][0]), float(value_ranges[m][1])) if m in value_ranges
            else s for m, s in combined.items()}


def release_summary(summary: Mapping, k: int) -> dict:
    """A site's self-description (``RawSite.summary``) with every patient count between 1 and k - 1 replaced by
    None (per class and per modality) and the withheld entries named, so that no count describes fewer than k."""
    out = dict(summary)
    small = lambda n: 0 < int(n) < k  # noqa: E731
    out["classes"] = [None if small(n) else int(n) for n in summary.get("classes", [])]
    below = [f"class {c}" for c, n in enumerate(summary.get("classes", [])) if small(n)]
    mods = {}
    for m, d in summary.get("modalities", {}).items():
        mods[m] = {key: (None if key != "features" and small(v) else v) for key, v in d.items()}
        below += [f"{m} {key}" for key, v in d.items() if key != "features" and small(v)]
    out["modalities"] = mods
    for key in ("patients", "training_patients", "test_patients"):
        if key in out and small(out[key]):
            out[key] = None
            below.append(key)
    out["below_k"] = below
    return out

"""Minimum counts: no released group, histogram bin or preprocessing statistic describes fewer than k patients."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from magnet_core.cohort.preprocess import PrepareConfig, compute_stats, derive_preparation
from magnet_core.federation.privacy import (
    EvalRelease,
    ReleasedHistogram,
    auroc_bounds,
    check_eval_release,
    coarsen_histogram,
    merge_bins,
    pool_releases,
    protected_ranges,
    release_eval,
    release_feature_stats,
)
from magnet_core.model.metrics import EvalCounts, confusion_counts, ranking_from_histogram, score_histogram

K = 5


def _site(name: str, n_paired: int, n_unpaired: int, seed: int, bins: int = 1000) -> tuple[EvalCounts, dict]:
    """A site's evaluation counts built the way SiteRuntime.evaluate_counts builds them, and the raw scores."""
    rng = np.random.default_rng(seed)
    n = n_paired + n_unpaired
    y = rng.integers(0, 2, n)
    score = np.clip(0.5 + 0.25 * (y - 0.5) + rng.normal(0, 0.2, n), 0, 1)
    paired = np.arange(n) < n_paired
    pred = (score >= 0.5).astype(int)
    groups = {"all": np.ones(n, bool), "paired": paired, "unpaired": ~paired}
    counts = EvalCounts(name, {g: confusion_counts(y[s], pred[s], 2) for g, s in groups.items()},
                        {g: score_histogram(y[s], score[s], bins) for g, s in groups.items()})
    return counts, {"y": y, "score": score, "paired": paired}


def _released_sizes(release):
    return {g: int(cm.sum()) for g, cm in release.confusion.items()}


def test_a_group_below_k_releases_nothing_and_neither_does_its_complement():
    counts, _ = _site("s", n_paired=20, n_unpaired=3, seed=0)
    rel = release_eval(counts, K, max_bins=20)
    assert set(rel.confusion) == {"all"} and set(rel.histogram) == {"all"}
    assert "fewer than k=5" in rel.withheld["unpaired"]
    assert "'all' minus 'paired' would reveal" in rel.withheld["paired"]
    assert check_eval_release(rel, 20) == []
    h = rel.histogram["all"]
    side = (h.edges[:-1] == 0.0) & (h.edges[1:] == 0.5) | (h.edges[:-1] == 0.5) & (h.edges[1:] == 1.0)
    assert h.counts.shape[1] <= 20 and (h.counts.sum(axis=0)[~side] >= K).all() and h.counts.sum() == 23
    assert 0.5 in h.edges.tolist()
    assert np.array_equal(h.counts.sum(axis=1), counts.histogram["all"].sum(axis=1))  # no patient dropped


def test_a_site_below_k_releases_no_statistic_at_all():
    counts, _ = _site("tiny", n_paired=3, n_unpaired=1, seed=1)
    rel = release_eval(counts, K)
    assert rel.confusion == {} and rel.histogram == {}
    assert set(rel.withheld) == {"all", "paired", "unpaired"}
    # an empty subgroup is simply absent; the other one equals "all" and goes out
    counts, _ = _site("complete", n_paired=12, n_unpaired=0, seed=2)
    rel = release_eval(counts, K)
    assert _released_sizes(rel) == {"all": 12, "paired": 12} and rel.withheld == {"unpaired": "no patients"}


def test_histograms_capped_at_the_site_and_merged_to_k():
    hist = np.random.default_rng(0).integers(0, 3, (2, 1000))
    coarse = coarsen_histogram(hist, 20)
    assert coarse.shape == (2, 20) and np.array_equal(coarse, hist.reshape(2, 20, 50).sum(axis=2))
    assert coarsen_histogram(hist, 30).shape == (2, 20)  # largest even divisor of 1000 that is <= 30 (not 25)
    with pytest.raises(ValueError, match="even number of bins"):
        coarsen_histogram(np.zeros((2, 25)), 20)
    one = np.zeros((2, 10), int)
    one[1, 4] = 1  # a single patient with score in [0.4, 0.5)
    assert merge_bins(one, K) is None
    few = np.zeros((2, 10), int)
    few[0, [0, 1, 2, 3, 4]] = 1
    few[1, [5, 6, 7, 8, 9]] = 1
    m = merge_bins(few, K)
    assert np.allclose(m.edges, [0, 0.5, 1.0]) and m.counts.tolist() == [[5, 0], [0, 5]]
    tail = np.zeros((2, 10), int)
    tail[0, [0, 1, 3]], tail[1, 4] = (3, 3, 1), 2  # 7 patients below 0.5 after the first 6: the tail joins them
    tail[1, 9] = 2  # 2 patients above 0.5: one bin, which says what the confusion matrix's column says
    m = merge_bins(tail, K)
    assert np.allclose(m.edges, [0, 0.5, 1.0]) and m.counts.tolist() == [[7, 0], [2, 2]]
    # no merged bin straddles the decision threshold, even when that would give fewer bins
    across = np.zeros((2, 10), int)
    across[0, 4], across[1, 5] = 3, 3
    m = merge_bins(across, K)
    assert np.allclose(m.edges, [0, 0.5, 1.0]) and m.counts.tolist() == [[3, 0], [0, 3]]


def test_pooled_auroc_interval_holds_the_exact_pooled_auroc():
    sites = [_site(f"s{i}", 30 + 7 * i, 12 + i, seed=10 + i) for i in range(3)]
    releases = [release_eval(c, K, max_bins=20) for c, _ in sites]
    for r in releases:
        assert set(r.confusion) == {"all", "paired", "unpaired"}
        assert set(r.histogram) == {"paired", "unpaired"}  # "all" has no histogram of its own
        assert check_eval_release(r, 20) == []
    import json

    releases = [EvalRelease.from_dict(json.loads(json.dumps(r.to_dict()))) for r in releases]  # over the wire
    pooled = pool_releases(releases)
    y = np.concatenate([raw["y"] for _, raw in sites])
    score = np.concatenate([raw["score"] for _, raw in sites])
    exact = roc_auc_score(y, score)
    m = pooled["metrics"]
    assert m["auroc_low"] <= exact <= m["auroc_high"]
    assert m["auroc_high"] - m["auroc_low"] < 0.35
    pooled_cm = sum(c.confusion["all"] for c, _ in sites)
    assert m["acc"] == pytest.approx(np.trace(pooled_cm) / pooled_cm.sum())
    # identical edges: the midpoint is the usual tied-histogram AUROC
    h = [ReleasedHistogram(np.linspace(0, 1, 21), coarsen_histogram(c.histogram["all"], 20)) for c, _ in sites]
    assert auroc_bounds(h)["auroc"] == pytest.approx(
        ranking_from_histogram(sum(x.counts for x in h))["auroc"], rel=1e-12)


def test_pooled_report_names_withheld_groups():
    a, _ = _site("a", 20, 3, 0)
    b, _ = _site("b", 15, 9, 1)
    pooled = pool_releases([release_eval(a, K), release_eval(b, K)])
    assert set(pooled["withheld"]) == {"a"} and set(pooled["withheld"]["a"]) == {"paired", "unpaired"}
    assert pooled["sites_per_group"] == {"all": ["a", "b"], "paired": ["b"], "unpaired": ["b"]}


def _stats():
    rng = np.random.default_rng(0)
    y = np.array([0] * 12 + [1] * 9 + [2] * 2)  # class 2 has 2 patients (< k)
    x = rng.normal(5, 2, (len(y), 4))
    x[:8, 1] = np.nan  # feature f1 observed in only 4 patients of class 0
    frame = pd.DataFrame(x, columns=["f0", "f1", "f2", "f3"])
    return compute_stats(frame, y, 3), x, y


def test_preprocessing_statistics_only_for_classes_and_features_backed_by_k():
    stats, x, y = _stats()
    r = release_feature_stats(stats, K)
    s = r.stats
    assert r.withheld_classes == [2] and r.withheld_patients == 2 and r.withheld_cells == 1
    assert s.n_per_class.tolist() == [12, 9, 0]
    assert (s.count[2] == 0).all() and (s.total[2] == 0).all() and (s.total_sq[2] == 0).all()
    assert s.count[0, 1] == 0 and s.total[0, 1] == 0  # 4 observed values of f1 in class 0 are not released
    assert s.count[1, 1] == 9 and s.total[1, 1] == pytest.approx(x[12:21, 1].sum())
    # every released (class, feature) cell rests on >= k patients; min and max are not released
    released = s.count[s.count > 0]
    assert (released >= K).all()
    assert np.isinf(s.minimum).all() and np.isinf(s.maximum).all()
    # no released array equals one patient's values
    for arr in (s.total, s.total_sq):
        for row in x:
            assert not np.any(np.isclose(arr, row[None, :]) & (s.count == 1))


def test_protected_ranges_keep_decisions_computable_and_drop_constant_features():
    stats, _, _ = _stats()
    stats.total[:, 3] = stats.count[:, 3] * 7.0  # f3 constant 7.0 in every patient
    stats.total_sq[:, 3] = stats.count[:, 3] * 49.0
    ranged = protected_ranges(stats, 0.0, 10.0)
    assert ranged.minimum.tolist()[:3] == [0.0, 0.0, 0.0] and ranged.maximum.tolist()[:3] == [10.0] * 3
    assert ranged.minimum[3] == ranged.maximum[3] == pytest.approx(7.0)
    prep = derive_preparation(ranged, PrepareConfig(n_features=2, max_missing_fraction=0.5), "x")
    assert "f3" not in prep.features and len(prep.features) == 2
    assert prep.scale_min.tolist() == [0.0, 0.0] and prep.scale_max.tolist() == [10.0, 10.0]
    with pytest.raises(ValueError, match="empty"):
        protected_ranges(stats, 1.0, 1.0)


def test_federated_ranges_need_a_declared_range_unless_one_party_holds_the_data():
    from magnet_core.cohort.data import DataError
    from magnet_core.federation.privacy import federated_ranges

    stats, _, _ = _stats()
    with pytest.raises(DataError, match=r"declared value range for modality \['x'\].*not released"):
        federated_ranges({"x": stats}, {})
    ranged = federated_ranges({"x": stats}, {"x": (0.0, 10.0)})["x"]
    assert ranged.minimum.max() <= 10.0 and set(ranged.maximum[np.isfinite(ranged.maximum)]) <= {10.0} | set(
        ranged.minimum)
    assert federated_ranges({"x": stats}, {}, observed=True)["x"] is stats  # observed minima / maxima kept
    with pytest.raises(ValueError, match="high > low"):
        PrepareConfig(value_ranges={"x": (1.0, 1.0)})
    with pytest.raises(ValueError):
        PrepareConfig(min_count=2)  # k is never below the floor of 3


def test_a_site_summary_releases_no_count_below_k():
    from magnet_core.federation.privacy import release_summary

    summary = {"site": "s", "patients": 40, "training_patients": 30, "test_patients": 4, "classes": [30, 1, 0, 9],
               "modalities": {"mRNA": {"patients": 40, "features": 100, "training_patients": 30},
                              "miRNA": {"patients": 2, "features": 50, "training_patients": 2}}, "notes": []}
    out = release_summary(summary, K)
    assert out["classes"] == [30, None, 0, 9] and out["test_patients"] is None
    assert out["modalities"]["miRNA"] == {"patients": None, "features": 50, "training_patients": None}
    assert out["modalities"]["mRNA"] == summary["modalities"]["mRNA"]
    assert set(out["below_k"]) == {"class 1", "miRNA patients", "miRNA training_patients", "test_patients"}
    released = [v for v in [out["patients"], out["training_patients"], *out["classes"]] if v]
    assert all(v >= K for v in released)

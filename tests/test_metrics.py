"""Metrics from confusion matrices and score histograms equal scikit-learn on pooled predictions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, matthews_corrcoef, roc_auc_score

from magnet_core.model.metrics import (
    RANKING_KEYS,
    auprc_bounds,
    classification_metrics,
    confusion_counts,
    empty_ranking,
    metrics_from_confusion,
    metrics_with_groups,
    ranking_from_histogram,
    score_histogram,
    summarize,
)


def _sklearn(y, p, classes):
    average = "binary" if classes == 2 else "macro"
    return {"acc": accuracy_score(y, p), "f1": f1_score(y, p, average=average, zero_division=0),
            "mcc": matthews_corrcoef(y, p)}


@pytest.mark.parametrize("classes", [2, 3, 4, 6])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_from_confusion_equal_sklearn_on_random_predictions(classes, seed):
    rng = np.random.default_rng(100 * classes + seed)
    n = int(rng.integers(20, 300))
    y = rng.integers(0, classes, n)
    p = np.where(rng.random(n) < 0.4, y, rng.integers(0, classes, n))  # better than chance, not perfect
    cm = confusion_counts(y, p, classes)
    assert cm.shape == (classes, classes) and cm.sum() == n and cm[1, 0] == np.sum((y == 1) & (p == 0))
    ours = metrics_from_confusion(cm)
    for k, v in _sklearn(y, p, classes).items():
        assert ours[k] == pytest.approx(v, abs=1e-12), k


@pytest.mark.filterwarnings("ignore:A single label was found")
@pytest.mark.parametrize("y, p, classes", [
    ([0, 1, 1, 0, 1], [0, 0, 0, 0, 0], 2),  # majority-class predictor: MCC 0, F1 of class 1 is 0
    ([0, 1, 1, 0, 1], [0, 1, 1, 0, 1], 2),  # perfect
    ([0, 1, 1, 0, 1], [1, 0, 0, 1, 0], 2),  # perfectly wrong: MCC -1
    ([0, 0, 2, 2, 0], [0, 2, 2, 2, 0], 4),  # classes 1 and 3 never seen: macro F1 over seen classes
    ([3, 3, 3, 3], [3, 3, 3, 3], 4),  # one class only
])
def test_metrics_from_confusion_edge_cases_equal_sklearn(y, p, classes):
    ours = metrics_from_confusion(confusion_counts(np.array(y), np.array(p), classes))
    for k, v in _sklearn(np.array(y), np.array(p), classes).items():
        assert ours[k] == pytest.approx(v, abs=1e-12), (k, ours)


@pytest.mark.parametrize("classes", [2, 5])
def test_summed_site_confusions_equal_pooled_metrics(classes):
    rng = np.random.default_rng(classes)
    sizes = (17, 60, 33, 5)
    ys = [rng.integers(0, classes, s) for s in sizes]
    ps = [np.where(rng.random(s) < 0.5, y, rng.integers(0, classes, s)) for s, y in zip(sizes, ys)]
    summed = sum(confusion_counts(y, p, classes) for y, p in zip(ys, ps))
    pooled = _sklearn(np.concatenate(ys), np.concatenate(ps), classes)
    ours = metrics_from_confusion(summed)
    for k, v in pooled.items():
        assert ours[k] == pytest.approx(v, abs=1e-12), k
    mean_of_sites = np.mean([matthews_corrcoef(y, p) for y, p in zip(ys, ps)])
    assert abs(mean_of_sites - ours["mcc"]) > 1e-3  # averaging per-site MCCs would be a different number


def test_empty_confusion_gives_nan():
    assert all(math.isnan(v) for v in metrics_from_confusion(np.zeros((2, 2))).values())


@pytest.mark.parametrize("seed, n, bins", [(0, 50, 1000), (1, 200, 1000), (2, 12, 64), (3, 300, 5000)])
def test_histogram_ranking_equals_sklearn_for_distinct_scores(seed, n, bins):
    rng = np.random.default_rng(seed)
    scores = (rng.choice(bins, size=n, replace=False) + rng.uniform(0.05, 0.95, n)) / bins  # one score per bin
    y = (rng.random(n) < scores).astype(int)
    y[:2] = [0, 1]
    hist = score_histogram(y, scores, bins=bins)
    assert hist.shape == (2, bins) and hist.sum() == n and hist.max() == 1
    r = ranking_from_histogram(hist)
    assert r["auroc"] == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert r["auprc"] == pytest.approx(average_precision_score(y, scores), abs=1e-12)
    for k in ("auroc", "auprc"):  # one patient per bin: nothing is uncertain
        assert r[f"{k}_low"] == pytest.approx(r[k], abs=1e-12) and r[f"{k}_high"] == pytest.approx(r[k], abs=1e-12)


def test_histogram_ranking_with_tied_scores_and_summed_sites():
    """Scores that are exactly equal inside a bin are ties for scikit-learn too; per-site histograms add up."""
    rng = np.random.default_rng(4)
    bins = 20
    scores = (rng.integers(0, bins, 400) + 0.5) / bins
    y = (rng.random(400) < scores).astype(int)
    r = ranking_from_histogram(sum(score_histogram(y[s], scores[s], bins) for s in np.array_split(np.arange(400), 3)))
    assert r["auroc"] == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert r["auprc"] == pytest.approx(average_precision_score(y, scores), abs=1e-12)
    assert ranking_from_histogram(score_histogram(np.zeros(5, int), scores[:5])) == empty_ranking()
    assert set(empty_ranking()) == set(RANKING_KEYS) and all(v is None for v in empty_ranking().values())
    edge = score_histogram(np.array([0, 1, 1]), np.array([0.0, 1.0, 0.9999]), bins=10)
    assert edge[0, 0] == 1 and edge[1, 9] == 2  # a score of exactly 1.0 falls in the last bin


@pytest.mark.parametrize("seed", range(2))
def test_histogram_bounds_contain_the_exact_pooled_ranking_of_clustered_scores(seed):
    """Scores clustered near 0.5 share bins (the binned AUROC is off); the bounds must hold the raw-score values."""
    rng = np.random.default_rng(seed)
    widths = []
    for draw in range(100):
        n = int(rng.integers(20, 120))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        scores = np.clip(0.5 + rng.normal(0.0, 0.01, n) + 0.004 * y, 0.0, 1.0)
        if draw % 4 == 0:
            scores = np.round(scores, 3)  # exact ties too, as saturated probabilities give
        sites = np.array_split(rng.permutation(n), 3)
        hist = sum(score_histogram(y[s], scores[s]) for s in sites)  # pooled from three sites
        r = ranking_from_histogram(hist)
        auroc, ap = roc_auc_score(y, scores), average_precision_score(y, scores)
        assert r["auroc_low"] - 1e-12 <= auroc <= r["auroc_high"] + 1e-12, (draw, r, auroc)
        low, high = auprc_bounds(hist)
        assert low - 1e-12 <= ap <= high + 1e-12, (draw, low, high, ap)
        assert r["auprc_low"] <= low + 1e-15 and r["auprc_high"] >= high - 1e-15
        assert r["auroc_low"] <= r["auroc"] <= r["auroc_high"] and r["auprc_low"] <= r["auprc"] <= r["auprc_high"]
        # the half-width is exactly the share of (positive, negative) pairs sharing a bin, halved
        shared = float((hist[0] * hist[1]).sum()) / (hist[0].sum() * hist[1].sum())
        assert r["auroc_high"] - r["auroc_low"] == pytest.approx(shared, abs=1e-12)
        widths.append(shared)
    assert max(widths) > 0.01  # the clustered draws really are uncertain (the old "exact" claim was wrong)


def test_histogram_bounds_are_tight_when_no_positive_and_negative_share_a_bin():
    rng = np.random.default_rng(7)
    bins = 50
    # positives only in even bins, negatives only in odd bins; several patients per bin, ties inside a bin
    y = rng.integers(0, 2, 300)
    scores = (2 * rng.integers(0, bins // 2, 300) + (1 - y) + rng.uniform(0.1, 0.9, 300)) / bins
    r = ranking_from_histogram(score_histogram(y, scores, bins))
    assert r["auroc_low"] == r["auroc_high"] == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert r["auroc"] == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    # average precision also depends on the order of positives sharing a bin (ties count differently)
    ap = average_precision_score(y, scores)
    assert r["auprc_low"] - 1e-12 <= ap <= r["auprc_high"] + 1e-12 and r["auprc_high"] > r["auprc_low"]


def test_logit_scale_histogram_keeps_confident_scores_apart():
    """A trained model's scores pile up near 0 and 1: equal probability bins lose their order, log-odds bins keep it,
    and the bounds of both contain the exact AUROC of the raw scores."""
    rng = np.random.default_rng(9)
    n = 200
    y = rng.integers(0, 2, n)
    z = rng.normal(0.0, 6.0, n) + 2.0 * y
    scores = (1 / (1 + np.exp(-z))).astype(np.float32).astype(np.float64)  # float32 probabilities, as sites have
    auroc = roc_auc_score(y, scores)
    widths = {}
    for scale in ("probability", "logit"):
        r = ranking_from_histogram(score_histogram(y, scores, scale=scale))
        assert r["auroc_low"] - 1e-12 <= auroc <= r["auroc_high"] + 1e-12, scale
        assert r["auprc_low"] - 1e-12 <= average_precision_score(y, scores) <= r["auprc_high"] + 1e-12, scale
        widths[scale] = r["auroc_high"] - r["auroc_low"]
    assert widths["probability"] > 0.01 and widths["logit"] < widths["probability"] / 5, widths
    edge = score_histogram(np.array([0, 1, 1, 0]), np.array([0.0, 1.0, 0.5, 1e-30]), bins=10, scale="logit")
    assert edge[0, 0] == 2 and edge[1, 9] == 1 and edge[1, 5] == 1  # 0 and 1 land in the end bins, 0.5 mid-way
    with pytest.raises(ValueError, match="scale"):
        score_histogram(y, scores, scale="rank")


def test_histogram_bounds_are_attained_by_some_ordering_inside_bins():
    """Every placement of the scores inside their bins (ties included) stays within the bounds and reaches both."""
    import itertools

    y = np.array([1, 1, 0, 1, 0])
    bin_of = np.array([0, 0, 0, 1, 1])
    hist = np.zeros((2, 2), np.int64)
    np.add.at(hist, (y, bin_of), 1)
    r = ranking_from_histogram(hist)
    aurocs, aps = [], []
    for inside in itertools.product((0.0, 0.25, 0.5), repeat=len(y)):  # 243 placements, with ties
        scores = bin_of + np.array(inside)
        pos, neg = scores[y == 1][:, None], scores[y == 0][None, :]
        aurocs.append(float(((pos > neg) + 0.5 * (pos == neg)).mean()))  # Mann-Whitney, ties count 1/2
        aps.append(average_precision_score(y, scores))
    assert min(aurocs) == pytest.approx(r["auroc_low"]) and max(aurocs) == pytest.approx(r["auroc_high"])
    assert min(aps) == pytest.approx(r["auprc_low"]) and max(aps) == pytest.approx(r["auprc_high"])


def test_classification_metrics_and_paired_unpaired_groups():
    rng = np.random.default_rng(5)
    n = 120
    y = rng.integers(0, 2, n)
    logits = rng.normal(size=n) + 1.2 * y
    probs = np.stack([1 - 1 / (1 + np.exp(-logits)), 1 / (1 + np.exp(-logits))], axis=1)
    paired = rng.random(n) < 0.6
    m = metrics_with_groups(y, probs, paired, 2)
    for prefix, sel in (("", np.ones(n, bool)), ("paired_", paired), ("unpaired_", ~paired)):
        pred = probs[sel].argmax(1)
        assert m[prefix + "acc"] == pytest.approx(accuracy_score(y[sel], pred))
        assert m[prefix + "f1"] == pytest.approx(f1_score(y[sel], pred))
        assert m[prefix + "mcc"] == pytest.approx(matthews_corrcoef(y[sel], pred))
        assert m[prefix + "auroc"] == pytest.approx(roc_auc_score(y[sel], probs[sel, 1]))
        assert m[prefix + "auprc"] == pytest.approx(average_precision_score(y[sel], probs[sel, 1]))
    one_class = classification_metrics(np.zeros(4, int), probs[:4], 2)
    assert one_class["auroc"] is None and one_class["auprc"] is None and one_class["acc"] is not None
    multi = classification_metrics(np.array([0, 1, 2, 2]), np.eye(3)[[0, 1, 2, 0]], 3)
    assert multi["acc"] == 0.75 and multi["auroc"] is None
    assert classification_metrics(np.array([], int), np.zeros((0, 2)), 2)["mcc"] is None


def test_summarize_mean_and_sample_std_over_seeds():
    # The reference's per-seed test MCCs on OV; it reports 0.240 +- 0.123, the population std (ddof 0). The project's
    # one convention is the sample std (ddof 1): sqrt(sum of squared deviations / 4) = 0.137 here.
    values = [0.331, 0.281, 0.395, 0.118, 0.077]
    per_seed = [{"mcc": v, "auroc": a} for v, a in zip(values, [0.7, None, 0.6, float("nan"), 0.8])]
    s = summarize(per_seed)
    mean = sum(values) / 5
    by_hand = math.sqrt(sum((v - mean) ** 2 for v in values) / 4)
    assert round(s["mcc"]["mean"], 3) == 0.240 and s["mcc"]["std"] == pytest.approx(by_hand)
    assert round(s["mcc"]["std"], 3) == 0.137 and round(float(np.std(values)), 3) == 0.123  # ddof 0 would fail
    assert s["mcc"]["per_seed"] == values
    assert s["auroc"]["mean"] == pytest.approx(0.7)
    assert s["auroc"]["std"] == pytest.approx(0.1)  # 0.7, 0.6, 0.8: sum of squares 0.02 / (3 - 1)
    assert s["auroc"]["per_seed"][1] is None
    assert summarize([{"auprc": None}])["auprc"] == {"mean": None, "std": None, "per_seed": [None]}
    assert summarize([{"mcc": 0.4}])["mcc"] == {"mean": 0.4, "std": None, "per_seed": [0.4]}  # no std from one value
    json.dumps(summarize([{"mcc": 0.1}, {"mcc": 0.3}]))

"""Classification metrics from summed confusion matrices (exact) and score histograms (exact bounds)."""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Literal, Mapping

import numpy as np

METRICS = ("acc", "f1", "mcc", "auroc", "auprc")
DEFAULT_BINS = 1000
LOGIT_RANGE = 20.0  # logit-scale histograms cover log-odds in [-20, 20] (float32 probabilities saturate near 16.6)


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def metrics_from_confusion(cm: np.ndarray) -> dict[str, float]:
    """Accuracy, F1 (binary: class 1; otherwise macro over classes seen) and MCC from a confusion matrix.

    Summing the matrices of several sites and calling this equals the metrics of the pooled predictions.
    """
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    if total == 0:
        return {"acc": float("nan"), "f1": float("nan"), "mcc": float("nan")}
    tp = np.diag(cm)
    true_k, pred_k = cm.sum(axis=1), cm.sum(axis=0)
    acc = tp.sum() / total
    f1_den = true_k + pred_k
    f1_k = np.divide(2 * tp, f1_den, out=np.zeros_like(tp), where=f1_den > 0)
    if cm.shape[0] == 2:
        f1 = f1_k[1]
    else:
        seen = f1_den > 0
        f1 = f1_k[seen].mean()
    cov_ytyp = tp.sum() * total - true_k @ pred_k
    cov_ypyp = total**2 - pred_k @ pred_k
    cov_ytyt = total**2 - true_k @ true_k
    den = math.sqrt(cov_ypyp * cov_ytyt)
    mcc = cov_ytyp / den if den > 0 else 0.0
    return {"acc": float(acc), "f1": float(f1), "mcc": float(mcc)}


def score_histogram(y_true: np.ndarray, score: np.ndarray, bins: int = DEFAULT_BINS,
                    scale: Literal["probability", "logit"] = "probability") -> np.ndarray:
    """(2, bins) counts of the positive-class score for negatives (row 0) and positives (row 1).

    ``scale="probability"``: equal bins on [0, 1]. ``scale="logit"``: equal bins on log(s / (1 - s)) clipped to
    +-LOGIT_RANGE, which separates the confident scores a trained model gives (near 0 and 1, where equal probability
    bins put many patients in one bin). Either way the bin is monotone in the score, so the bounds of
    :func:`ranking_from_histogram` hold; both give the same histogram shape."""
    s = np.asarray(score, dtype=np.float64)
    if scale == "logit":
        with np.errstate(divide="ignore"):
            logit = np.log(s) - np.log1p(-s)
        s = (np.clip(logit, -LOGIT_RANGE, LOGIT_RANGE) + LOGIT_RANGE) / (2 * LOGIT_RANGE)
    elif scale != "probability":
        raise ValueError(f"scale must be 'probability' or 'logit', got {scale!r}")
    idx = np.clip((s * bins).astype(np.int64), 0, bins - 1)
    hist = np.zeros((2, bins), dtype=np.int64)
    np.add.at(hist, (np.asarray(y_true, dtype=np.int64), idx), 1)
    return hist


RANKING_KEYS = ("auroc", "auprc", "auroc_low", "auroc_high", "auprc_low", "auprc_high")


def empty_ranking() -> dict[str, float | None]:
    """Every ranking key set to None (one class only, or no histogram: multi-class tasks)."""
    return {k: None for k in RANKING_KEYS}


def ranking_from_histogram(hist: np.ndarray) -> dict[str, float | None]:
    """AUROC and average precision from score histograms (scores in one bin count as ties), with exact bounds.

    Scores in different bins are ordered exactly (bins are monotone in the score); only the order inside a bin is
    unknown. ``auroc_low``/``auroc_high`` are the least and greatest AUROC over every ordering of the scores inside
    each bin (ties included): a (positive, negative) pair sharing a bin counts 0 or 1 instead of 1/2, so the width
    is (sum_b pos_b * neg_b) / (P * N), and 0 when no positive and negative share a bin. ``auprc_low``/
    ``auprc_high`` bound scikit-learn's average precision (mean over positives of the precision at their score,
    tied scores sharing one threshold) over the same orderings: see :func:`auprc_bounds`. The exact pooled values
    of the raw scores always lie within the bounds.
    """
    neg, pos = np.asarray(hist[0], dtype=np.float64)[::-1], np.asarray(hist[1], dtype=np.float64)[::-1]
    n_neg, n_pos = neg.sum(), pos.sum()
    if n_neg == 0 or n_pos == 0:
        return empty_ranking()
    tps, fps = np.cumsum(pos), np.cumsum(neg)
    tpr = np.concatenate([[0.0], tps / n_pos])
    fpr = np.concatenate([[0.0], fps / n_neg])
    auroc = float(np.trapezoid(tpr, fpr))
    nonempty = (pos + neg) > 0
    precision = tps[nonempty] / (tps[nonempty] + fps[nonempty])
    recall = tpr[1:][nonempty]
    auprc = float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))
    half_width = 0.5 * float(np.dot(pos, neg)) / (n_pos * n_neg)
    low_ap, high_ap = auprc_bounds(hist)
    return {"auroc": auroc, "auprc": auprc,
            "auroc_low": max(0.0, auroc - half_width), "auroc_high": min(1.0, auroc + half_width),
            "auprc_low": min(low_ap, auprc), "auprc_high": max(high_ap, auprc)}


def auprc_bounds(hist: np.ndarray) -> tuple[float, float]:
    """Least and greatest average precision over all orderings (ties included) of the scores inside each bin.

    Average precision is (1/P) * sum over positives of TP(>= s)/count(>= s) at the positive's score s; a positive
    in a bin with p positives and n negatives, below T positives and A patients of higher bins, has precision
    (T + q)/(A + q + k) with q >= its rank among the bin's positives and 0 <= k <= n negatives of the bin at or above
    it. As T <= A this is at most (T + p)/(A + p) (all p positives tied, above the bin's negatives) and at least
    (T + j)/(A + n + j) for the j-th positive (the bin's negatives first, then its positives one by one); bins do not
    interact. The bounds coincide only when every bin that holds a positive holds nothing else."""
    neg, pos = np.asarray(hist[0], dtype=np.float64)[::-1], np.asarray(hist[1], dtype=np.float64)[::-1]
    n_pos = pos.sum()
    if n_pos == 0 or neg.sum() == 0:
        return float("nan"), float("nan")
    above_pos = np.cumsum(pos) - pos  # T_b: positives in higher-score bins
    above_all = np.cumsum(pos + neg) - pos - neg  # A_b: patients in higher-score bins
    has = pos > 0
    high = float(np.sum(pos[has] * (above_pos[has] + pos[has]) / (above_all[has] + pos[has]))) / n_pos
    counts = pos[has].astype(np.int64)
    bin_of = np.repeat(np.arange(counts.size), counts)
    j = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + 1.0  # 1..p_b within a bin
    low = float(np.sum((above_pos[has][bin_of] + j) / (above_all[has][bin_of] + neg[has][bin_of] + j))) / n_pos
    return low, high


def _threshold_counts(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives (float64) at each distinct score, highest first (scikit-learn's
    ``confusion_matrix_at_thresholds`` without weights)."""
    order = np.argsort(score, kind="stable")[::-1]
    score, y = score[order], (np.asarray(y_true)[order] == 1).astype(np.float64)
    idx = np.r_[np.flatnonzero(np.diff(score)), y.size - 1]
    tps = np.cumsum(y, dtype=np.float64)[idx]
    return tps, 1 + idx.astype(np.float64) - tps


def binary_auroc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve, as ``sklearn.metrics.roc_auc_score`` computes it (same curve points, same
    trapezoids, same value), without importing scikit-learn (seconds per process). Needs both classes."""
    tps, fps = _threshold_counts(y_true, score)
    if fps.size > 2:  # drop collinear points as roc_curve(drop_intermediate=True) does
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        tps, fps = tps[keep], fps[keep]
    tpr, fpr = np.r_[0.0, tps] / tps[-1], np.r_[0.0, fps] / fps[-1]
    return float((np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0).sum())


def binary_average_precision(y_true: np.ndarray, score: np.ndarray) -> float:
    """Average precision (step-wise area under precision-recall), as ``sklearn.metrics.average_precision_score``
    computes it. Needs at least one positive."""
    tps, fps = _threshold_counts(y_true, score)
    ps = tps + fps
    precision = np.where(ps != 0, tps / np.where(ps != 0, ps, 1.0), 0.0)
    recall = tps / tps[-1]
    precision, recall = np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0]
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, num_classes: int) -> dict[str, float | None]:
    """acc, f1, mcc for any task; auroc/auprc (exact, scikit-learn's definitions) for binary tasks, else None."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs)
    if len(y_true) == 0:
        return {k: None for k in METRICS}
    out: dict[str, float | None] = dict(metrics_from_confusion(confusion_counts(y_true, probs.argmax(1), num_classes)))
    out["auroc"] = out["auprc"] = None
    if num_classes == 2 and len(np.unique(y_true)) == 2:
        out["auroc"] = binary_auroc(y_true, probs[:, 1])
        out["auprc"] = binary_average_precision(y_true, probs[:, 1])
    return out


def metrics_with_groups(y_true: np.ndarray, probs: np.ndarray, paired: np.ndarray, num_classes: int
                        ) -> dict[str, float | None]:
    """Metrics on all patients plus ``paired_*`` (complete) and ``unpaired_*`` (incomplete) subsets."""
    paired = np.asarray(paired, dtype=bool)
    out = classification_metrics(y_true, probs, num_classes)
    for prefix, sel in (("paired_", paired), ("unpaired_", ~paired)):
        for k, v in classification_metrics(y_true[sel], probs[sel], num_classes).items():
            out[prefix + k] = v
    return out


def summarize(per_seed: Iterable[Mapping[str, float | None]]) -> dict[str, dict]:
    """{metric: {"mean", "std", "per_seed"}} over seeds; None values (undefined metric) are left out of mean/std.
    ``std`` is the sample standard deviation (ddof = 1, the project's one convention); None below two values."""
    rows = list(per_seed)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = {}
    for k in keys:
        vals = [r.get(k) for r in rows]
        finite = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
        out[k] = {
            "mean": float(np.mean(finite)) if finite else None,
            "std": float(np.std(finite, ddof=1)) if len(finite) > 1 else None,
            "per_seed": vals,
        }
    return out


@dataclasses.dataclass
class EvalCounts:
    """A site's evaluation as counts: confusion matrices (all/paired/unpaired) and, if binary, score histograms."""

    site: str
    confusion: dict[str, np.ndarray]  # group ("all", "paired", "unpaired") -> (C, C)
    histogram: dict[str, np.ndarray]  # group -> (2, bins); empty for multi-class

    @property
    def num(self) -> int:
        return int(self.confusion["all"].sum())

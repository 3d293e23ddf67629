"""Classification metrics, computable exactly from summed confusion matrices and score histograms."""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np

METRICS = ("acc", "f1", "mcc", "auroc", "auprc")
DEFAULT_BINS = 1000


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


def score_histogram(y_true: np.ndarray, score: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """(2, bins) counts of the positive-class score for negatives (row 0) and positives (row 1)."""
    idx = np.clip((np.asarray(score, dtype=np.float64) * bins).astype(np.int64), 0, bins - 1)
    hist = np.zeros((2, bins), dtype=np.int64)
    np.add.at(hist, (np.asarray(y_true, dtype=np.int64), idx), 1)
    return hist


def ranking_from_histogram(hist: np.ndarray) -> dict[str, float | None]:
    """AUROC and average precision from score histograms (scores in one bin count as ties)."""
    neg, pos = np.asarray(hist[0], dtype=np.float64)[::-1], np.asarray(hist[1], dtype=np.float64)[::-1]
    n_neg, n_pos = neg.sum(), pos.sum()
    if n_neg == 0 or n_pos == 0:
        return {"auroc": None, "auprc": None}
    tps, fps = np.cumsum(pos), np.cumsum(neg)
    tpr = np.concatenate([[0.0], tps / n_pos])
    fpr = np.concatenate([[0.0], fps / n_neg])
    auroc = float(np.trapezoid(tpr, fpr))
    nonempty = (pos + neg) > 0
    precision = tps[nonempty] / (tps[nonempty] + fps[nonempty])
    recall = tpr[1:][nonempty]
    auprc = float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))
    return {"auroc": auroc, "auprc": auprc}


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, num_classes: int) -> dict[str, float | None]:
    """acc, f1, mcc for any task; auroc/auprc (exact, scikit-learn) for binary tasks, else None."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y_true = np.asarray(y_true)
    probs = np.asarray(probs)
    if len(y_true) == 0:
        return {k: None for k in METRICS}
    out: dict[str, float | None] = dict(metrics_from_confusion(confusion_counts(y_true, probs.argmax(1), num_classes)))
    out["auroc"] = out["auprc"] = None
    if num_classes == 2 and len(np.unique(y_true)) == 2:
        out["auroc"] = float(roc_auc_score(y_true, probs[:, 1]))
        out["auprc"] = float(average_precision_score(y_true, probs[:, 1]))
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
    """{metric: {"mean", "std", "per_seed"}} over seeds; None values (undefined metric) are left out of mean/std."""
    rows = list(per_seed)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = {}
    for k in keys:
        vals = [r.get(k) for r in rows]
        finite = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
        out[k] = {
            "mean": float(np.mean(finite)) if finite else None,
            "std": float(np.std(finite)) if finite else None,
            "per_seed": vals,
        }
    return out

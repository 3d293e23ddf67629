"""Evaluation replies out of line with the others: a site whose confusion matrix is better than the other sites'
model quality makes plausible, so that it would inflate the pooled (global) metric. Pure functions.

Every pooled site is compared with the others on the same global model: for each true class c the others' pooled
recall r_c (add-half smoothed, so a perfect matrix elsewhere never makes r_c = 1) is what the model achieves on
patients of class c, and the number of the site's class-c patients it got right would be Binomial(n_c, r_c) if its
patients were like the others'. The p-value is P(sum_c Binomial(n_c, r_c) >= the site's correct count), exact (the
binomials convolved). A site with p < alpha is flagged: it claims far more correct predictions than the model gets
elsewhere. Small sites limit what one round can show (measured, OV iid-3, 21 test patients a site, 3 seeds x 20
rounds honest: the smallest p of 180 site-rounds was 1.2e-4, one false flag at alpha 1e-3; a perfect matrix gave
p = 1.5e-6, 0.0034 and 0.00064 in rounds 1-3, i.e. it was missed in round 2 when the peers' recall was 77%).
Combining a site's rounds (Fisher) was tried and dropped: honest sites that stay better than a weak peer pile up
evidence (19 false flags of 180 site-rounds). One-sided on purpose: honest sites often score far *worse* than
their peers (measured on OV iid-3, seed 10: one site's accuracy 0.24-0.29 against 0.76 at the other two, round
after round, with small among-test graphs), so only the direction that inflates the global metric is flagged.
Alongside, every site's leave-one-out pooled MCC and the shift its reply causes are reported for the record.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
from scipy.stats import binom

from magnet_core.model.metrics import metrics_from_confusion

DEFAULT_ALPHA = 1e-3


@dataclasses.dataclass(frozen=True)
class EvalCheck:
    """One site's evaluation reply against the others' (all patients group)."""

    site: str
    num: int  # test patients in the site's reply
    correct: int  # of which predicted correctly (the diagonal)
    expected: float  # correct predictions the others' per-class recall makes expected
    p_value: float  # P(at least ``correct``) under the others' recall; 1.0 when there is nothing to compare with
    mcc_without: float | None  # pooled MCC over the other sites
    shift: float | None  # pooled MCC with the site minus without it
    flagged: bool

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def at_least(correct: int, n_per_class: np.ndarray, rates: np.ndarray) -> float:
    """P(sum_c Binomial(n_c, r_c) >= correct), exact."""
    pmf = np.array([1.0])
    for n, r in zip(n_per_class.astype(int), rates):
        if n > 0:
            pmf = np.convolve(pmf, binom.pmf(np.arange(n + 1), n, r))
    return float(min(1.0, pmf[correct:].sum())) if correct < len(pmf) else 0.0


def _mcc(cm: np.ndarray) -> float | None:
    if cm.sum() == 0:
        return None
    value = metrics_from_confusion(cm)["mcc"]
    return None if value is None or np.isnan(value) else float(value)


def screen_evaluations(confusions: Mapping[str, np.ndarray], alpha: float = DEFAULT_ALPHA) -> dict[str, EvalCheck]:
    """Site -> its check, from each pooled site's released confusion matrix for all patients (rows: true class).
    With fewer than two sites there is nothing to compare with and no site is flagged; ``alpha`` = 0 flags none."""
    cms = {s: np.asarray(cm, dtype=np.int64) for s, cm in confusions.items()}
    total = sum(cms.values()) if cms else None
    mcc_all = _mcc(total) if total is not None else None
    out: dict[str, EvalCheck] = {}
    for site, cm in cms.items():
        n_c, correct = cm.sum(axis=1), int(np.trace(cm))
        others = total - cm
        if len(cms) < 2 or others.sum() == 0:
            out[site] = EvalCheck(site, int(cm.sum()), correct, float(correct), 1.0, None, None, False)
            continue
        rates = (np.diag(others) + 0.5) / (others.sum(axis=1) + 1.0)
        p = at_least(correct, n_c, rates)
        without = _mcc(others)
        shift = None if without is None or mcc_all is None else mcc_all - without
        out[site] = EvalCheck(site, int(cm.sum()), correct, float((n_c * rates).sum()), p, without, shift,
                              bool(alpha > 0 and p < alpha))
    return out

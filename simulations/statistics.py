"""Study statistics: per-cell mean, sample std and 95% t interval; paired comparisons; headline wording."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
Verdict = Literal["helps", "hurts", "no difference detected"]


@dataclass(frozen=True)
class CellStats:
    """Summary of one cell's per-seed values: n, mean, sample std (ddof=1) and a t interval for the mean."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class PairedComparison:
    """``a - b`` over the units (seeds) where both exist: mean difference, its t interval and paired t-test."""

    n: int
    mean_diff: float
    std_diff: float
    ci_low: float
    ci_high: float
    p_value: float  # two-sided paired t-test (scipy.stats.ttest_rel); nan if undefined (n < 2 or no variation)
    units: tuple  # the keys that were paired, in order
    # Nadeau-Bengio corrected resampled t interval and p-value (corrected_resampled_t) with the mean test/train size
    # ratio over the paired units; nan where the sizes were not recorded
    nb_ci_low: float = math.nan
    nb_ci_high: float = math.nan
    nb_p_value: float = math.nan
    test_train_ratio: float = math.nan

    @property
    def verdict(self) -> Verdict:
        return verdict(self.ci_low, self.ci_high)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["units"] = list(self.units)
        d["verdict"] = self.verdict
        return d


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided t interval for the mean (sample std, n - 1 degrees of freedom); (nan, nan) below 2 values."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n < 2:
        return math.nan, math.nan
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def cell_stats(values: Sequence[float], confidence: float = CONFIDENCE) -> CellStats:
    """Mean, sample std (ddof=1) and t interval of the finite values (nan fields when there are none)."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return CellStats(0, math.nan, math.nan, math.nan, math.nan)
    lo, hi = t_interval(x, confidence)
    return CellStats(n, float(x.mean()), float(x.std(ddof=1)) if n > 1 else math.nan, lo, hi)


def paired_comparison(a: Mapping, b: Mapping, confidence: float = CONFIDENCE,
                      ratios: Mapping | None = None) -> PairedComparison:
    """``a - b`` paired by key (a seed, or (seed, split)); keys missing or non-finite on either side are left out.
    ``ratios``: per key, the test/train size ratio of that resplit; when every paired key has one, their mean gives
    the Nadeau-Bengio corrected interval (:func:`corrected_resampled_t`) next to the plain one."""
    keys = tuple(k for k in a if k in b and is_finite(a[k]) and is_finite(b[k]))
    try:
        keys = tuple(sorted(keys))
    except TypeError:  # mixed key types: keep a's order
        pass
    d = np.array([float(a[k]) - float(b[k]) for k in keys], dtype=np.float64)
    n = len(d)
    if n == 0:
        return PairedComparison(0, math.nan, math.nan, math.nan, math.nan, math.nan, keys)
    mean = float(d.mean())
    if n == 1:
        return PairedComparison(1, mean, math.nan, math.nan, math.nan, math.nan, keys)
    sd = float(d.std(ddof=1))
    if sd == 0.0:  # the same difference on every seed: no spread, so no t interval and no t-test (and no verdict)
        return PairedComparison(n, mean, 0.0, math.nan, math.nan, math.nan, keys)
    lo, hi = t_interval(d, confidence)
    p = float(stats.ttest_rel([float(a[k]) for k in keys], [float(b[k]) for k in keys]).pvalue)
    ratio = mean_ratio(ratios, keys)
    nb = corrected_resampled_t(d, 1.0, ratio, confidence)
    return PairedComparison(n, mean, sd, lo, hi, p, keys, nb.ci_low, nb.ci_high, nb.p_value, ratio)


def mean_ratio(ratios: Mapping | None, keys: Sequence) -> float:
    """The mean of ``ratios[k]`` over ``keys``; nan if any key has no finite ratio (or there are none)."""
    if not ratios or not keys or not all(k in ratios and is_finite(ratios[k]) for k in keys):
        return math.nan
    return float(np.mean([float(ratios[k]) for k in keys]))


@dataclass(frozen=True)
class CorrectedInterval:
    """Nadeau-Bengio corrected resampled t interval (and two-sided p-value) of a mean paired difference over ``J``
    train/test resplits (seeds), with test/train size ratio ``ratio`` (nan fields when undefined)."""

    ci_low: float
    ci_high: float
    p_value: float
    ratio: float


def corrected_resampled_t(differences: Sequence[float], n_train: float, n_test: float,
                          confidence: float = CONFIDENCE) -> CorrectedInterval:
    """Nadeau & Bengio (2003, Machine Learning 52: 239-281), corrected resampled t-test: the ``J`` differences come
    from ``J`` random train/test resplits of one data set, whose training sets overlap, so their sample variance
    ``s^2`` underestimates the variance of the mean. The corrected variance of the mean is
    ``(1/J + n_test/n_train) s^2`` instead of ``s^2 / J``; the interval is ``mean ± t_{J-1} sqrt(that)`` and the
    p-value is that of ``mean / sqrt(that)`` on ``J - 1`` degrees of freedom. With ``n_test/n_train -> 0`` it is
    the plain paired t interval. nan fields below two differences, with no spread, or without positive sizes."""
    d = np.asarray(differences, dtype=np.float64)
    j = len(d)
    ratio = float(n_test) / float(n_train) if is_finite(n_train) and is_finite(n_test) and n_train > 0 else math.nan
    if j < 2 or not np.isfinite(ratio) or ratio < 0:
        return CorrectedInterval(math.nan, math.nan, math.nan, ratio)
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        return CorrectedInterval(math.nan, math.nan, math.nan, ratio)
    mean = float(d.mean())
    se = math.sqrt((1.0 / j + ratio) * sd ** 2)
    half = float(stats.t.ppf(0.5 + confidence / 2, j - 1)) * se
    p = float(2 * stats.t.sf(abs(mean) / se, j - 1))
    return CorrectedInterval(mean - half, mean + half, p, ratio)


def verdict(ci_low: float, ci_high: float) -> Verdict:
    """"helps" if the interval of a - b lies above 0, "hurts" if below, otherwise no difference detected."""
    if np.isfinite(ci_low) and ci_low > 0:
        return "helps"
    if np.isfinite(ci_high) and ci_high < 0:
        return "hurts"
    return "no difference detected"


def _ascending(p_values: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(p as float64, an all-nan output of its shape, the indices of the finite p-values in ascending order)."""
    p = np.asarray(p_values, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(p))
    return p, np.full(p.shape, math.nan), finite[np.argsort(p[finite], kind="stable")]


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error), in the input order; nan stays nan and is not counted
    in the family. adjusted_(i) = max over j <= i of min(1, (m - j + 1) p_(j)) for the ascending p_(1..m)."""
    p, out, order = _ascending(p_values)
    m = order.size
    if m:
        out[order] = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    return out


def benjamini_hochberg(p_values: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (false discovery rate), in the input order; nan stays nan and is not
    counted. adjusted_(i) = min over j >= i of min(1, m p_(j) / j) for the ascending p_(1..m)."""
    p, out, order = _ascending(p_values)
    m = order.size
    if m:
        scaled = np.minimum(1.0, p[order] * m / np.arange(1, m + 1))
        out[order] = np.minimum.accumulate(scaled[::-1])[::-1]
    return out


def is_finite(v: object) -> bool:
    """A real, finite number (None, strings and nan are not)."""
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------------ wording


def fmt_stats(s: CellStats, digits: int = 3) -> str:
    """``0.707 ± 0.023 (95% CI 0.650 to 0.764, n = 5)``; sample std; CI omitted below 2 values."""
    if s.n == 0:
        return "n/a"
    if s.n == 1:
        return f"{s.mean:.{digits}f} (n = 1)"
    return (f"{s.mean:.{digits}f} ± {s.std:.{digits}f} "
            f"(95% CI {s.ci_low:.{digits}f} to {s.ci_high:.{digits}f}, n = {s.n})")


@dataclass(frozen=True)
class Adjusted:
    """Multiplicity-adjusted p-values of one comparison within a family of ``m`` comparisons (one report)."""

    holm: float
    bh: float
    m: int


def fmt_difference(c: PairedComparison, metric: str = "MCC", unit: str = "seeds", digits: int = 3,
                   adjusted: Adjusted | None = None) -> str:
    """The numbers of a paired difference, e.g.
    ``+0.061 MCC, 95% CI +0.020 to +0.102, paired t-test p = 0.015, n = 5 seeds``; with ``adjusted`` the Holm and
    Benjamini-Hochberg p-values over the report's comparisons follow the raw one."""
    if c.n == 0:
        return "no paired runs"
    if c.n == 1:
        return f"{c.mean_diff:+.{digits}f} {metric}, n = 1 {unit.rstrip('s')}: no interval"
    if c.std_diff == 0.0:
        return (f"{c.mean_diff:+.{digits}f} {metric} on every one of n = {c.n} {unit}: no spread, so no interval "
                "and no test")
    adj = ""
    if adjusted is not None and np.isfinite(adjusted.holm):
        adj = (f" (adjusted over {adjusted.m} comparisons: Holm {_fmt_p(adjusted.holm)}, "
               f"Benjamini-Hochberg {_fmt_p(adjusted.bh)})")
    nb = ""
    if is_finite(c.nb_ci_low) and is_finite(c.nb_ci_high):
        nb = (f"; resampling-corrected (Nadeau-Bengio) 95% CI {c.nb_ci_low:+.{digits}f} to "
              f"{c.nb_ci_high:+.{digits}f}")
    return (f"{c.mean_diff:+.{digits}f} {metric}, 95% CI {c.ci_low:+.{digits}f} to {c.ci_high:+.{digits}f}, "
            f"paired t-test {_fmt_p(c.p_value)}{adj}{nb}, n = {c.n} {unit}")


def comparison_sentence(a_label: str, b_label: str, c: PairedComparison, metric: str = "MCC",
                        unit: str = "seeds", words: tuple[str, str] = ("helps", "hurts"),
                        adjusted: Adjusted | None = None) -> str:
    """``A vs B: **helps** (+0.061 MCC, 95% CI ...)`` or ``A vs B: no difference detected (...)``.

    "helps"/"hurts" (or other ``words``, e.g. higher/lower) only when the paired interval excludes 0; a difference
    that is the same on every seed has no interval and gets no verdict."""
    if c.n >= 2 and c.std_diff == 0.0 and c.mean_diff == 0.0:
        return f"{a_label} vs {b_label}: no difference detected (identical {metric} on all {c.n} {unit})"
    if c.n < 2:
        return f"{a_label} vs {b_label}: no difference detected ({fmt_difference(c, metric, unit)})"
    v = c.verdict
    word = {"helps": f"**{words[0]}**", "hurts": f"**{words[1]}**"}.get(v, v)
    return f"{a_label} vs {b_label}: {word} ({fmt_difference(c, metric, unit, adjusted=adjusted)})"


def _fmt_p(p: float) -> str:
    if not np.isfinite(p):
        return "p n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def fmt_p_cell(p: float) -> str:
    """A p-value for a table cell: ``0.030``, ``< 0.001`` or blank."""
    if not is_finite(p):
        return ""
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


# ------------------------------------------------------------------------------------------------ frames


def summarize_groups(df: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """One row per group of ``keys``: ``<metric>_{mean,std,ci_low,ci_high,n}`` from the per-seed rows."""
    rows = []
    for key, g in df.groupby(list(keys), sort=False, dropna=False):
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        for m in metrics:
            values = pd.to_numeric(g[m], errors="coerce").tolist() if m in g else []
            s = cell_stats(values)
            row.update({f"{m}_mean": s.mean, f"{m}_std": s.std, f"{m}_ci_low": s.ci_low, f"{m}_ci_high": s.ci_high,
                        f"{m}_n": s.n})
        rows.append(row)
    return pd.DataFrame(rows)


def values_by_unit(df: pd.DataFrame, metric: str, unit: str | Sequence[str] = "seed") -> dict:
    """``{unit value: metric}`` for the rows of ``df`` (one row per unit; non-finite values are left out)."""
    cols = [unit] if isinstance(unit, str) else list(unit)
    out = {}
    for row in df[cols + [metric]].itertuples(index=False):
        key = row[0] if len(cols) == 1 else tuple(row[: len(cols)])
        value = pd.to_numeric(row[-1], errors="coerce")
        if is_finite(value):
            if key in out:
                raise ValueError(f"more than one row for {dict(zip(cols, key if len(cols) > 1 else (key,)))}")
            out[key] = float(value)
    return out

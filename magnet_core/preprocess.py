"""MAGNET's preprocessing from per-feature sufficient statistics, so sites can prepare data without pooling it.

Steps (published pipeline, thresholds configurable): drop features with more than 10% missing values, mean-impute,
min-max scale to [0, 1], drop low-variance features, keep the top features by ANOVA F on training patients.
Every statistic is a sum over training patients, so statistics of several sites add up to the pooled ones.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from .data import DataError, _check_unique_ids, _read_table, duplicate_header_names


class PrepareConfig(BaseModel):
    """Every threshold of the preprocessing, in one place."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_missing_fraction: float = Field(0.1, ge=0, le=1, description="drop features missing in more patients")
    variance_threshold: dict[str, float] = Field(
        default_factory=dict, description="per modality: drop features whose scaled variance is <= this")
    n_features: int = Field(1000, ge=1, description="keep this many features per modality by ANOVA F")
    missing_feature: Literal["error", "impute"] = "impute"
    seed: int = 10


# ----------------------------------------------------------------------------------------------- reading


def read_raw_matrix(path: str | Path, label_ids: Sequence[str],
                    orientation: Literal["auto", "samples-x-features", "features-x-samples"] = "auto"
                    ) -> pd.DataFrame:
    """A raw matrix as samples x features (missing cells allowed as NaN; text cells and infinities refused).

    ``auto`` orientation: whichever axis holds the labelled sample ids.
    """
    path = Path(path)
    df = _read_table(path)
    df.columns = [str(c).strip() for c in df.columns]
    ids = set(map(str, label_ids))
    rows_hit, cols_hit = len(ids & set(df.index)), len(ids & set(df.columns))
    if orientation == "auto":
        if rows_hit == 0 and cols_hit == 0:
            raise DataError(f"{path}: neither its row ids nor its column names match the labelled samples "
                            f"(first rows {list(df.index[:3])}, first columns {list(df.columns[:3])})")
        orientation = "samples-x-features" if rows_hit >= cols_hit else "features-x-samples"
    elif orientation == "samples-x-features" and rows_hit == 0 and cols_hit > 0:
        raise DataError(f"{path}: wrong orientation: sample ids are in the columns (features x samples); "
                        "use --orientation features-x-samples or auto")
    elif orientation == "features-x-samples" and cols_hit == 0 and rows_hit > 0:
        raise DataError(f"{path}: wrong orientation: sample ids are in the rows (samples x features)")
    if orientation == "features-x-samples":
        _check_unique_ids(df, path, what="feature name")
        dup = duplicate_header_names(path)
        if dup:
            raise DataError(f"{path}: duplicate sample ids: {', '.join(dup[:5])}")
        df = df.T
    else:
        dup = duplicate_header_names(path)
        if dup:
            raise DataError(f"{path}: duplicate feature names: {', '.join(dup[:5])}")
        _check_unique_ids(df, path)
    numeric = df.apply(pd.to_numeric, errors="coerce")
    bad = numeric.isna() & df.notna()
    if bad.any().any():
        r, c = np.argwhere(bad.to_numpy())[0]
        raise DataError(f"{path}: non-numeric value {df.iat[r, c]!r} at sample {df.index[r]!r}, "
                        f"feature {df.columns[c]!r} ({int(bad.values.sum())} such cells)")
    values = numeric.to_numpy(dtype=np.float64)
    inf = np.isinf(values)
    if inf.any():
        r, c = np.argwhere(inf)[0]
        raise DataError(f"{path}: infinite value at sample {df.index[r]!r}, feature {df.columns[c]!r}")
    return numeric.astype(np.float64)


# ----------------------------------------------------------------------------------------------- statistics


@dataclasses.dataclass
class FeatureStats:
    """Per-feature sums over a set of training patients (no patient-level values)."""

    features: list[str]
    n_per_class: np.ndarray  # (C,) training patients per class holding this modality
    count: np.ndarray  # (C, F) non-missing values per class
    total: np.ndarray  # (C, F) sums per class
    total_sq: np.ndarray  # (C, F) sums of squares per class
    minimum: np.ndarray  # (F,) +inf where never observed
    maximum: np.ndarray  # (F,) -inf where never observed

    @property
    def n(self) -> int:
        return int(self.n_per_class.sum())


def compute_stats(frame: pd.DataFrame, labels: np.ndarray, num_classes: int) -> FeatureStats:
    """Statistics of one site's training patients (rows of ``frame``, labels aligned)."""
    x = frame.to_numpy(dtype=np.float64)
    observed = ~np.isnan(x)
    filled = np.where(observed, x, 0.0)
    onehot = np.eye(num_classes)[np.asarray(labels, dtype=np.int64)]  # (n, C)
    with np.errstate(all="ignore"):
        minimum = np.where(observed.any(axis=0), np.nanmin(np.where(observed, x, np.inf), axis=0), np.inf)
        maximum = np.where(observed.any(axis=0), np.nanmax(np.where(observed, x, -np.inf), axis=0), -np.inf)
    return FeatureStats(
        features=[str(c) for c in frame.columns],
        n_per_class=onehot.sum(axis=0),
        count=onehot.T @ observed.astype(np.float64),
        total=onehot.T @ filled,
        total_sq=onehot.T @ (filled * filled),
        minimum=minimum,
        maximum=maximum,
    )


def combine_stats(parts: Sequence[FeatureStats]) -> FeatureStats:
    """Sum sites' statistics over the union of their features (first-seen order); a site without a feature
    counts its patients as missing that feature."""
    features = list(dict.fromkeys(f for p in parts for f in p.features))
    pos = {f: i for i, f in enumerate(features)}
    c = max(p.n_per_class.shape[0] for p in parts)  # sites may have seen fewer classes: pad with zeros
    parts = [_pad_classes(p, c) for p in parts]
    out = FeatureStats(features, np.zeros(c), np.zeros((c, len(features))), np.zeros((c, len(features))),
                       np.zeros((c, len(features))), np.full(len(features), np.inf), np.full(len(features), -np.inf))
    for p in parts:
        idx = np.array([pos[f] for f in p.features], dtype=np.int64)
        out.n_per_class += p.n_per_class
        out.count[:, idx] += p.count
        out.total[:, idx] += p.total
        out.total_sq[:, idx] += p.total_sq
        out.minimum[idx] = np.minimum(out.minimum[idx], p.minimum)
        out.maximum[idx] = np.maximum(out.maximum[idx], p.maximum)
    return out


def _pad_classes(p: FeatureStats, c: int) -> FeatureStats:
    extra = c - p.n_per_class.shape[0]
    if extra == 0:
        return p
    pad = lambda a: np.vstack([a, np.zeros((extra, a.shape[1]))])  # noqa: E731
    return dataclasses.replace(p, n_per_class=np.concatenate([p.n_per_class, np.zeros(extra)]),
                               count=pad(p.count), total=pad(p.total), total_sq=pad(p.total_sq))


def build_manifest(preps: dict[str, ModalityPrep], classes: list[str], missing_feature: str, name: str):
    """The consortium manifest (features in order + imputation + scaling) that site validation and training use."""
    from .manifest import ConsortiumManifest, ModalitySpec

    return ConsortiumManifest(
        name=name, classes=classes, missing_feature=missing_feature,
        modalities=[ModalitySpec(name=m, features=p.features, impute_means=p.impute_means.tolist(),
                                 scale_min=p.scale_min.tolist(), scale_max=p.scale_max.tolist())
                    for m, p in preps.items() if p.features])


def anova_f(n_k: np.ndarray, sum_k: np.ndarray, sumsq_k: np.ndarray) -> np.ndarray:
    """One-way ANOVA F per feature from per-class counts, sums and sums of squares (as sklearn's f_classif)."""
    n = n_k.sum()
    c = int((n_k > 0).sum())
    sum_all = sum_k.sum(axis=0)
    ss_all = sumsq_k.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (sum_k**2 / np.where(n_k > 0, n_k, 1)[:, None]).sum(axis=0) - sum_all**2 / n
        within = ss_all - sum_all**2 / n - between
        return (between / (c - 1)) / (within / (n - c))


@dataclasses.dataclass
class ModalityPrep:
    """The consortium's decisions for one modality, derived from combined statistics."""

    features: list[str]  # kept features, in selection order (original order of the kept ones)
    impute_means: np.ndarray
    scale_min: np.ndarray
    scale_max: np.ndarray
    f_scores: np.ndarray  # F of the kept features
    dropped_missing: int
    dropped_variance: int


def derive_preparation(stats: FeatureStats, cfg: PrepareConfig, modality: str) -> ModalityPrep:
    """Missing filter -> imputation means -> min-max range -> variance filter -> top-k ANOVA F."""
    n = stats.n
    if n == 0:
        raise DataError(f"{modality}: no training patient holds this modality")
    observed = stats.count.sum(axis=0)
    keep = (1.0 - observed / n) <= cfg.max_missing_fraction
    dropped_missing = int((~keep).sum())
    mean = np.divide(stats.total.sum(axis=0), observed, out=np.zeros_like(observed), where=observed > 0)
    # mean imputation: each missing value of class k adds `mean` to that class's sums
    missing_k = stats.n_per_class[:, None] - stats.count
    sum_k = stats.total + missing_k * mean
    sumsq_k = stats.total_sq + missing_k * mean**2
    lo, hi = stats.minimum, stats.maximum
    span = np.where(hi > lo, hi - lo, 1.0)
    var_scaled = (sumsq_k.sum(axis=0) / n - (sum_k.sum(axis=0) / n) ** 2) / span**2
    threshold = cfg.variance_threshold.get(modality)
    low_var = np.zeros_like(keep) if threshold is None else var_scaled <= threshold
    dropped_variance = int((keep & low_var).sum())
    keep &= ~low_var
    if int((stats.n_per_class > 0).sum()) < 2:
        raise DataError(f"{modality}: the training patients hold a single class, so the ANOVA F test is "
                        "undefined; add sites (statistics are pooled across the consortium) or use another split")
    f = anova_f(stats.n_per_class, sum_k, sumsq_k)
    scores = np.where(keep, np.nan_to_num(f, nan=np.finfo(np.float64).min, posinf=np.finfo(np.float64).max),
                      -np.inf)
    k = min(cfg.n_features, int(keep.sum()))
    chosen = np.sort(np.argsort(scores, kind="mergesort")[len(scores) - k :]) if k else np.array([], dtype=int)
    return ModalityPrep([stats.features[i] for i in chosen], mean[chosen], lo[chosen], hi[chosen], f[chosen],
                        dropped_missing, dropped_variance)


def apply_preparation(frame: pd.DataFrame, prep: ModalityPrep, missing_feature: str = "impute",
                      source: str = "") -> tuple[pd.DataFrame, list[str]]:
    """Impute, scale and select one site's matrix with the consortium's decisions; returns the prepared matrix
    (features in manifest order) and the consortium features this site lacks (filled or refused)."""
    lacking = [f for f in prep.features if f not in frame.columns]
    if lacking and missing_feature == "error":
        raise DataError(f"{source}: lacks {len(lacking)} consortium feature(s), e.g. {lacking[:5]}, and the "
                        "manifest says missing_feature = 'error'")
    x = frame.reindex(columns=prep.features).to_numpy(dtype=np.float64)
    x = np.where(np.isnan(x), prep.impute_means, x)
    span = np.where(prep.scale_max > prep.scale_min, prep.scale_max - prep.scale_min, 1.0)
    x = (x - prep.scale_min) / span
    return pd.DataFrame(x.astype(np.float32), index=frame.index, columns=prep.features), lacking

"""MAGNET's preprocessing from per-feature sufficient statistics, so sites can prepare data without pooling it."""

# Steps (published pipeline, thresholds configurable): drop features with more than 10% missing values, mean-impute,
# min-max scale to [0, 1], drop low-variance features, keep the top features by ANOVA F on training patients.
# Every statistic is a sum (or a min / max) over training patients, so statistics of several sites add up to the
# pooled ones, and every decision derived from them is the decision the pooled pipeline would make.
# Test patients never enter a statistic (the published pipeline imputed and scaled with the test patients).

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from magnet_core.cohort import tables
from magnet_core.cohort.data import SPLITS, Cohort, DataError, stratified_split
from magnet_core.cohort.limits import DEFAULT_INPUT_LIMITS, InputLimits
from magnet_core.cohort.manifest import DEFAULT_MAX_ABSENT_FEATURES, DEFAULT_MIN_COUNT, DEFAULT_SEED, MIN_COUNT_FLOOR
from magnet_core.cohort.tables import Orientation

RAW_SUFFIXES = (".csv", ".tsv", ".txt")
STAT_FIELDS = ("n_per_class", "count", "total", "total_sq", "minimum", "maximum")


class PrepareConfig(BaseModel):
    """Every threshold of the preprocessing, in one place (MAGNET's published values are the defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("consortium", description="consortium name written into the manifest")
    max_missing_fraction: float = Field(0.1, ge=0, le=1, description="drop features missing in more patients")
    variance_threshold: dict[str, float] = Field(
        default_factory=dict, description="per modality: keep features whose scaled variance is >= this "
        "(MAGNET: DNA 0.04, mRNA 0.03); constant features are always dropped")
    variance_ddof: Literal[0, 1] = Field(1, description="1: sample variance (pandas, as MAGNET); 0: population")
    n_features: int = Field(1000, ge=1, description="keep this many features per modality by ANOVA F")
    n_features_per_modality: dict[str, int] = Field(default_factory=dict, description="per-modality override")
    missing_feature: Literal["error", "impute"] = Field(
        "impute", description="a site lacking a kept feature: fill it with the consortium mean, or refuse")
    max_absent_features: float = Field(
        DEFAULT_MAX_ABSENT_FEATURES, ge=0, le=1,
        description="refuse a site lacking more than this share of a modality's kept features (manifest)")
    seed: int = Field(DEFAULT_SEED, description="seed of each site's stratified train/val/test split")
    split_ratios: tuple[float, float, float] = (0.7, 0.1, 0.2)
    use_split_file: bool = Field(True, description="use a site's split.csv instead of the seeded split")
    orientation: Orientation = "auto"
    label_column: str | None = Field(None, description="label column ('Class', else the first column)")
    class_names: list[str] | None = Field(None, description="class names; text labels are mapped to their index")
    clip: bool = Field(False, description="clip scaled values of non-training patients to [0, 1]")
    # federated preparation (magnet_core/federation/privacy.py): what a site may release
    min_count: int = Field(DEFAULT_MIN_COUNT, ge=MIN_COUNT_FLOOR,
                           description="k: a site releases statistics only of classes and (class, feature) cells "
                                       "with >= k training patients; written into the manifest")
    value_ranges: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="per modality: the raw value range [low, high] the consortium declares "
        "in advance; federated preparation scales with it (per-feature minima and maxima are single patients' "
        "values and are never released)")
    input_limits: InputLimits = Field(
        default_factory=InputLimits, description="size limits of every raw table file, checked before parsing; "
        "raise them for a genome-wide raw matrix")

    @model_validator(mode="after")
    def _check(self) -> "PrepareConfig":
        r = self.split_ratios
        if min(r) < 0 or r[0] <= 0 or r[2] <= 0 or abs(sum(r) - 1) > 1e-9:
            raise ValueError(f"split_ratios must be train/val/test fractions summing to 1 (train, test > 0), got {r}")
        if self.class_names is not None and (len(self.class_names) < 2 or
                                             len(set(self.class_names)) != len(self.class_names)):
            raise ValueError(f"class_names needs at least two distinct names, got {self.class_names}")
        empty = {m: r for m, r in self.value_ranges.items() if not r[1] > r[0]}
        if empty:
            raise ValueError(f"value_ranges must be [low, high] with high > low, got {empty}")
        bad = {m: v for m, v in self.variance_threshold.items() if v < 0}
        bad.update({m: v for m, v in self.n_features_per_modality.items() if v < 1})
        if bad:
            raise ValueError(f"negative variance threshold or non-positive feature count: {bad}")
        return self

    def features_for(self, modality: str) -> int:
        return self.n_features_per_modality.get(modality, self.n_features)


# ----------------------------------------------------------------------------------------------- reading


def read_raw_table(path: str | Path, limits: InputLimits = DEFAULT_INPUT_LIMITS) -> pd.DataFrame:
    """A table as written, through the one reader (:func:`magnet_core.cohort.tables.read_table`) within ``limits``:
    first column = row ids, first line = column names (duplicates kept so they can be reported), cells parsed as
    numbers where possible."""
    return tables.read_table(path, limits)


def read_raw_matrix(path: str | Path, label_ids: Iterable[str], orientation: Orientation = "auto",
                    label_source: str = "the labels file",
                    limits: InputLimits = DEFAULT_INPUT_LIMITS) -> pd.DataFrame:
    """A raw matrix as samples x features (float64, NaN = missing cell); text cells, infinities and values beyond
    float32 refused, named by file line and column.

    ``auto`` orientation: whichever axis holds the labelled sample ids. The orientation found is kept in
    ``frame.attrs["orientation"]``."""
    path = Path(path)
    table = tables.read_table(path, limits)
    other = {"samples-x-features": "features-x-samples", "features-x-samples": "samples-x-features"}
    hint = f"use orientation '{other.get(orientation, 'auto')}' or 'auto'"
    tables.orientation(table, path, label_ids, "auto", label_source)  # neither axis matches: refused here
    transposed = tables.orientation(table, path, label_ids, orientation, label_source, hint=hint)
    samples, features = (table.columns, table.index) if transposed else (table.index, table.columns)
    for axis, what in ((samples, "sample ids"), (features, "feature names")):
        dup = tables.duplicates(axis)
        if dup:
            count = int(pd.Index(axis).duplicated().sum())
            raise DataError(f"{path}: duplicate {what} ({count}): {', '.join(dup[:5])}")
    problems, values = tables.cell_problems(table, path, allow_missing=True, transposed=transposed)
    if problems:
        raise DataError(problems[0])
    x = values.to_numpy()
    if transposed:
        x = x.T
    frame = pd.DataFrame(x, index=pd.Index(list(map(str, samples)), dtype=object),
                         columns=pd.Index(list(map(str, features)), dtype=object))
    frame.attrs["orientation"] = "features-x-samples" if transposed else "samples-x-features"
    return frame


def read_site_labels(path: str | Path, column: str | None = None, class_names: Sequence[str] | None = None,
                     log=print, limits: InputLimits = DEFAULT_INPUT_LIMITS) -> pd.Series:
    """Labels as class indices 0..C-1; text labels are mapped through ``class_names``; empty labels dropped."""
    path = Path(path)
    table = read_raw_table(path, limits)
    col = column or ("Class" if "Class" in table.columns else table.columns[0])
    if col not in table.columns:
        raise DataError(f"{path}: no column {col!r} (columns: {list(table.columns)})")
    dup = table.index[table.index.duplicated()]
    if len(dup):
        raise DataError(f"{path}: duplicate sample ids ({len(dup)}): {', '.join(dup[:5])}")
    raw = table[col]
    if isinstance(raw, pd.DataFrame):
        raise DataError(f"{path}: column {col!r} is given more than once")
    empty = raw.isna().to_numpy() | (raw.astype(str).str.strip() == "").to_numpy()
    if empty.any():
        log(f"note: {path.name}: {int(empty.sum())} sample(s) without a label are not used")
        raw = raw[~empty]
    if class_names is not None:
        lookup = {name: i for i, name in enumerate(class_names)}
        lookup.update({str(i): i for i in range(len(class_names)) if str(i) not in lookup})
        text = raw.astype(str).str.strip().str.replace(r"\.0$", "", regex=True)
        unknown = ~text.isin(list(lookup)).to_numpy()
        if unknown.any():
            sid = text.index[unknown][0]
            raise DataError(f"{path}: label {raw.loc[sid]!r} of sample {sid!r} is not one of the classes "
                            f"{list(class_names)} ({int(unknown.sum())} such rows)")
        return text.map(lookup).astype(np.int64).rename("Class")
    numeric = pd.to_numeric(raw, errors="coerce")
    bad = (numeric.isna() | (numeric != np.round(numeric)) | (numeric < 0)).to_numpy()
    if bad.any():
        sid = raw.index[bad][0]
        raise DataError(f"{path}: label {raw.loc[sid]!r} of sample {sid!r} in column {col!r} is not a class index "
                        f"0..C-1 ({int(bad.sum())} such rows); give class names to map text labels")
    return numeric.astype(np.int64).rename("Class")


def read_split_file(path: str | Path, limits: InputLimits = DEFAULT_INPUT_LIMITS) -> pd.Series:
    """A split table: sample id, then train / val / test."""
    path = Path(path)
    table = read_raw_table(path, limits)
    col = "split" if "split" in table.columns else table.columns[0]
    dup = table.index[table.index.duplicated()]
    if len(dup):
        raise DataError(f"{path}: duplicate sample ids ({len(dup)}): {', '.join(dup[:5])}")
    values = table[col].astype(str).str.strip().str.lower()
    bad = ~values.isin(SPLITS).to_numpy()
    if bad.any():
        sid = values.index[bad][0]
        raise DataError(f"{path}: split {table[col].loc[sid]!r} of sample {sid!r} is not one of {list(SPLITS)} "
                        f"({int(bad.sum())} such rows)")
    return values.rename("split")


# ----------------------------------------------------------------------------------------------- one site


class SiteSpec(BaseModel):
    """Where one site's raw data are and where its prepared cohort goes (a folder, or explicit files)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    out_dir: str = Field(min_length=1, description="the prepared cohort directory to write")
    raw_dir: str | None = Field(None, description="labels.csv + one matrix per modality (+ optional split.csv)")
    labels: str | None = None
    modalities: dict[str, str] = Field(default_factory=dict, description="modality -> raw matrix file")
    split: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "SiteSpec":
        if (self.raw_dir is None) == (self.labels is None):
            raise ValueError(f"site {self.name!r}: give either raw_dir or labels + modalities")
        if self.labels is not None and not self.modalities:
            raise ValueError(f"site {self.name!r}: labels given without any modality matrix")
        return self

    def load(self, cfg: PrepareConfig, log=print) -> "RawSite":
        if self.raw_dir is not None:
            return load_raw_site_dir(self.raw_dir, cfg, name=self.name, log=log)
        return load_raw_site(self.labels, self.modalities, cfg, self.split, name=self.name, log=log)


@dataclasses.dataclass
class RawSite:
    """One site's labelled patients, raw matrices (samples x features, NaN = missing cell) and split."""

    name: str
    labels: pd.Series  # sample id -> class index; sorted; only patients with >= 1 modality
    frames: dict[str, pd.DataFrame]  # modality -> samples x features (labelled samples only, sorted)
    split: pd.Series  # sample id -> train / val / test, aligned with labels
    num_classes: int
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def train_ids(self) -> pd.Index:
        """Train + val patients: the only ones whose values enter any statistic."""
        return self.split.index[self.split.isin(["train", "val"]).to_numpy()]

    def stats(self, num_classes: int | None = None) -> dict[str, "FeatureStats"]:
        """Per-modality statistics over training patients only (test patients never contribute)."""
        return site_statistics(self, num_classes)

    def summary(self) -> dict:
        """Counts only (what a site may disclose about itself): patients, training patients, features."""
        train = set(self.train_ids)
        return {"site": self.name, "patients": int(len(self.labels)), "training_patients": len(train),
                "test_patients": int((self.split == "test").sum()),
                "classes": np.bincount(self.labels.to_numpy(), minlength=self.num_classes).tolist(),
                "modalities": {m: {"patients": int(len(f)), "features": int(f.shape[1]),
                                   "training_patients": int(f.index.isin(list(train)).sum())}
                               for m, f in self.frames.items()},
                "notes": list(self.notes)}


def split_patients(labels: pd.Series, has: pd.DataFrame, seed: int,
                   ratios: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> pd.Series:
    """MAGNET's stratified split, paired and unpaired patients separately: the split that
    ``stratified_split(load_cohort_dir(prepared_dir), seed)`` gives for the prepared directory."""
    n = len(labels)
    modalities = list(has.columns)
    stub = Cohort(sample_ids=labels.index.to_numpy(dtype=str), labels=labels.to_numpy(dtype=np.int64),
                  modalities=modalities, features={m: [] for m in modalities},
                  X={m: np.zeros((n, 0), np.float32) for m in modalities},
                  mask=has.reindex(labels.index).to_numpy(dtype=bool), num_classes=int(labels.max()) + 1)
    return pd.Series(stratified_split(stub, seed, ratios).split, index=labels.index, name="split")


def assemble_site(name: str, labels: pd.Series, frames: dict[str, pd.DataFrame], cfg: PrepareConfig,
                  split: pd.Series | None = None, split_source: str = "the split file", log=print) -> RawSite:
    """Keep labelled patients with at least one modality, check classes, and split them (file or seeded)."""
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        log(f"note: {name}: {text}")

    if not frames:
        raise DataError(f"site {name!r}: no modality matrix")
    if len(labels) == 0:
        raise DataError(f"site {name!r}: no labelled sample")
    num_classes = len(cfg.class_names) if cfg.class_names else int(labels.max()) + 1
    if int(labels.max()) >= num_classes:
        raise DataError(f"site {name!r}: label {int(labels.max())} is not one of the {num_classes} classes")
    kept: dict[str, pd.DataFrame] = {}
    for m, frame in frames.items():
        unlabelled = int((~frame.index.isin(labels.index)).sum())
        if unlabelled:
            note(f"{m}: {unlabelled} sample(s) have no label and are not used")
        frame = frame.loc[frame.index.isin(labels.index)]
        empty = frame.isna().all(axis=1).to_numpy()
        if empty.any():
            note(f"{m}: {int(empty.sum())} sample(s) have no value at all and count as lacking {m}")
            frame = frame.loc[~empty]
        kept[m] = frame.sort_index()
    has = pd.DataFrame({m: labels.index.isin(f.index) for m, f in kept.items()}, index=labels.index)
    none = ~has.any(axis=1).to_numpy()
    if none.any():
        note(f"{int(none.sum())} labelled sample(s) have none of the modalities {list(kept)} and are dropped")
    labels = labels[~none].sort_index()
    if len(labels) == 0:
        raise DataError(f"site {name!r}: no labelled patient has any modality")
    if split is not None:
        missing = labels.index.difference(split.index)
        if len(missing):
            raise DataError(f"{split_source}: no split for {len(missing)} patient(s) of site {name!r}, e.g. "
                            f"{', '.join(missing[:3])}")
        split = split.reindex(labels.index)
    else:
        split = split_patients(labels, has.loc[labels.index], cfg.seed, cfg.split_ratios)
    if not split.isin(["train", "val"]).any():
        raise DataError(f"site {name!r}: no training patient (all are in the test split)")
    return RawSite(name, labels, kept, split.rename("split"), num_classes, notes)


def _stem(filename: str) -> str | None:
    name = filename[:-3] if filename.endswith(".gz") else filename
    return next((name[: -len(s)] for s in RAW_SUFFIXES if name.endswith(s)), None)


def discover_site_files(folder: str | Path) -> tuple[Path, dict[str, Path], Path | None]:
    """``labels.<csv|tsv|txt>[.gz]``, an optional ``split.<...>``, and one ``<modality>.<...>`` per modality."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such directory")
    labels, split, modalities = None, None, {}
    for p in sorted(folder.iterdir()):
        stem = _stem(p.name) if p.is_file() and not p.name.startswith(".") else None
        if stem is None:
            continue
        if stem in ("labels", "split"):
            if (labels if stem == "labels" else split) is not None:
                raise DataError(f"{folder}: more than one {stem} file")
            labels, split = (p, split) if stem == "labels" else (labels, p)
        elif stem in modalities:
            raise DataError(f"{folder}: modality {stem!r} is given twice ({modalities[stem].name}, {p.name})")
        else:
            modalities[stem] = p
    if labels is None:
        raise DataError(f"{folder}: no labels.csv (a raw site folder holds labels.csv plus one matrix per modality)")
    if not modalities:
        raise DataError(f"{folder}: no modality matrix beside {labels.name}")
    return labels, modalities, split


def load_raw_site(labels_path: str | Path, modality_paths: dict[str, str | Path], cfg: PrepareConfig,
                  split_path: str | Path | None = None, name: str = "site", log=print) -> RawSite:
    """Read one site's labels and raw matrices (either orientation), then assemble and split it."""
    labels = read_site_labels(labels_path, cfg.label_column, cfg.class_names, log=log, limits=cfg.input_limits)
    frames = {}
    for m, p in modality_paths.items():
        frames[m] = read_raw_matrix(p, labels.index, cfg.orientation, str(labels_path), cfg.input_limits)
        if frames[m].attrs.get("orientation") == "features-x-samples" and cfg.orientation == "auto":
            log(f"note: {name}: {Path(p).name} is features x samples (read transposed)")
    split = read_split_file(split_path, cfg.input_limits) if split_path is not None else None
    return assemble_site(name, labels, frames, cfg, split, str(split_path), log=log)


def load_raw_site_dir(folder: str | Path, cfg: PrepareConfig, name: str | None = None, log=print) -> RawSite:
    """A raw site folder (see :func:`discover_site_files`); its split.csv is used when ``cfg.use_split_file``."""
    labels, modalities, split = discover_site_files(folder)
    return load_raw_site(labels, modalities, cfg, split if cfg.use_split_file else None,
                         name or Path(folder).name, log=log)


# ----------------------------------------------------------------------------------------------- statistics


@dataclasses.dataclass
class FeatureStats:
    """Per-feature sums over a set of training patients (no patient-level values).

    ``n_per_class[c]``: training patients of class c holding the modality; ``count/total/total_sq[c, j]``: over
    their non-missing values of feature j; ``minimum/maximum[j]``: +inf / -inf where never observed."""

    features: list[str]
    n_per_class: np.ndarray  # (C,)
    count: np.ndarray  # (C, F)
    total: np.ndarray  # (C, F)
    total_sq: np.ndarray  # (C, F)
    minimum: np.ndarray  # (F,)
    maximum: np.ndarray  # (F,)

    @property
    def n(self) -> int:
        return int(self.n_per_class.sum())

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {f: np.ascontiguousarray(getattr(self, f), dtype=np.float64) for f in STAT_FIELDS}

    @classmethod
    def from_arrays(cls, features: Sequence[str], arrays: dict[str, np.ndarray], source: str = "statistics"
                    ) -> "FeatureStats":
        """Rebuild statistics received from a site, refusing inconsistent ones."""
        missing = [f for f in STAT_FIELDS if f not in arrays]
        if missing:
            raise DataError(f"{source}: missing {missing}")
        features = [str(f) for f in features]
        if len(set(features)) != len(features):
            raise DataError(f"{source}: duplicate feature names")
        a = {f: np.asarray(arrays[f], dtype=np.float64) for f in STAT_FIELDS}
        c, d = a["n_per_class"].reshape(-1).shape[0], len(features)
        shapes = {"n_per_class": (c,), "count": (c, d), "total": (c, d), "total_sq": (c, d), "minimum": (d,),
                  "maximum": (d,)}
        for f, shape in shapes.items():
            if a[f].shape != shape:
                raise DataError(f"{source}: {f} has shape {a[f].shape}, expected {shape}")
        if (a["n_per_class"] < 0).any() or (a["count"] < 0).any() or (a["count"] > a["n_per_class"][:, None]).any():
            raise DataError(f"{source}: counts are negative or exceed the number of patients")
        if not (np.isfinite(a["total"]).all() and np.isfinite(a["total_sq"]).all()):
            raise DataError(f"{source}: non-finite sums")
        return cls(features, *(a[f] for f in STAT_FIELDS))


def compute_stats(frame: pd.DataFrame, labels: np.ndarray, num_classes: int) -> FeatureStats:
    """Statistics of training patients (rows of ``frame``, NaN = missing; ``labels`` aligned, 0..C-1)."""
    x = frame.to_numpy(dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if len(y) != len(x):
        raise ValueError(f"{len(x)} rows but {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"labels must be in 0..{num_classes - 1}, found {sorted(set(y.tolist()))}")
    observed = ~np.isnan(x)
    filled = np.where(observed, x, 0.0)
    count = np.zeros((num_classes, x.shape[1]))
    total = np.zeros((num_classes, x.shape[1]))
    total_sq = np.zeros((num_classes, x.shape[1]))
    for c in range(num_classes):
        rows = y == c
        count[c] = observed[rows].sum(axis=0)
        total[c] = filled[rows].sum(axis=0)
        total_sq[c] = np.square(filled[rows]).sum(axis=0)
    return FeatureStats(
        features=[str(c) for c in frame.columns],
        n_per_class=np.bincount(y, minlength=num_classes).astype(np.float64),
        count=count, total=total, total_sq=total_sq,
        minimum=np.where(observed, x, np.inf).min(axis=0, initial=np.inf),
        maximum=np.where(observed, x, -np.inf).max(axis=0, initial=-np.inf),
    )


def site_statistics(site: RawSite, num_classes: int | None = None) -> dict[str, FeatureStats]:
    """Statistics of every modality over the site's training patients (train + val, never test)."""
    train = site.train_ids
    out = {}
    for m, frame in site.frames.items():
        rows = frame.loc[frame.index.isin(train)]
        out[m] = compute_stats(rows, site.labels.loc[rows.index].to_numpy(), num_classes or site.num_classes)
    return out


def combine_stats(parts: Sequence[FeatureStats]) -> FeatureStats:
    """Sum sites' statistics over the union of their features (first-seen order); a site without a feature
    counts its patients as missing that feature. Associative; commutative up to feature order and rounding."""
    if not parts:
        raise ValueError("no statistics to combine")
    features = list(dict.fromkeys(f for p in parts for f in p.features))
    pos = {f: i for i, f in enumerate(features)}
    c = max(p.n_per_class.shape[0] for p in parts)  # sites may have seen fewer classes: pad with zeros
    d = len(features)
    out = FeatureStats(features, np.zeros(c), np.zeros((c, d)), np.zeros((c, d)), np.zeros((c, d)),
                       np.full(d, np.inf), np.full(d, -np.inf))
    for p in parts:
        idx = np.array([pos[f] for f in p.features], dtype=np.int64)
        k = p.n_per_class.shape[0]
        out.n_per_class[:k] += p.n_per_class
        out.count[:k, idx] += p.count
        out.total[:k, idx] += p.total
        out.total_sq[:k, idx] += p.total_sq
        out.minimum[idx] = np.minimum(out.minimum[idx], p.minimum)
        out.maximum[idx] = np.maximum(out.maximum[idx], p.maximum)
    return out


def combine_sites(per_site: Sequence[dict[str, FeatureStats]]) -> dict[str, FeatureStats]:
    """Combine per-modality statistics of several sites (a site without a modality adds nothing to it)."""
    modalities = list(dict.fromkeys(m for site in per_site for m in site))
    return {m: combine_stats([s[m] for s in per_site if m in s]) for m in modalities}


# ----------------------------------------------------------------------------------------------- decisions


def imputed_class_sums(stats: FeatureStats, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class sums and sums of squares after every missing value was set to ``means``."""
    missing_k = stats.n_per_class[:, None] - stats.count
    return stats.total + missing_k * means, stats.total_sq + missing_k * np.square(means)


def anova_f(n_k: np.ndarray, sum_k: np.ndarray, sumsq_k: np.ndarray) -> np.ndarray:
    """One-way ANOVA F per feature from per-class counts, sums and sums of squares, with the very formula of
    sklearn's ``f_classif`` (classes with no patient are left out, as f_classif only sees classes present)."""
    present = n_k > 0
    n_k, sum_k, sumsq_k = n_k[present], sum_k[present], sumsq_k[present]
    n = n_k.sum()
    c = int(present.sum())
    sum_all = sum_k.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        sq_over_n = sum_all**2 / n
        sstot = sumsq_k.sum(axis=0) - sq_over_n
        between = (sum_k**2 / n_k[:, None]).sum(axis=0) - sq_over_n
        within = sstot - between
        return (between / (c - 1)) / (within / (n - c))


def select_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the ``k`` best scores, NaN and ties handled exactly as sklearn's ``SelectKBest``."""
    mask = np.zeros(len(scores), dtype=bool)
    if k >= len(scores):
        mask[:] = True
        return mask
    clean = np.where(np.isnan(scores), np.finfo(np.float64).min, scores)
    mask[np.argsort(clean, kind="mergesort")[len(scores) - k:]] = True
    return mask


@dataclasses.dataclass
class ModalityPrep:
    """The consortium's decisions for one modality, derived from combined statistics."""

    features: list[str]  # kept features, in their original order (as SelectKBest keeps them)
    impute_means: np.ndarray
    scale_min: np.ndarray
    scale_max: np.ndarray
    f_scores: np.ndarray  # F of the kept features
    dropped_missing: int
    dropped_variance: int
    dropped_f: int = 0
    table: pd.DataFrame | None = None  # every feature: missing fraction, mean, range, variance, F, decisions
    report: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_spec(cls, spec) -> "ModalityPrep":
        """The decisions stored in a manifest's ModalitySpec."""
        if spec.impute_means is None or spec.scale_min is None or spec.scale_max is None:
            raise DataError(f"manifest modality {spec.name!r} has no imputation/scaling values; run "
                            "`magnet-fl prepare` to produce them")
        return cls(list(spec.features), np.asarray(spec.impute_means, dtype=np.float64),
                   np.asarray(spec.scale_min, dtype=np.float64), np.asarray(spec.scale_max, dtype=np.float64),
                   np.full(len(spec.features), np.nan), 0, 0)


def derive_preparation(stats: FeatureStats, cfg: PrepareConfig, modality: str) -> ModalityPrep:
    """Missing filter -> imputation means -> min-max range -> variance filter -> top-k ANOVA F, each decided
    from combined statistics exactly as MAGNET's steps decide on the pooled training patients."""
    n = stats.n
    if n == 0:
        raise DataError(f"{modality}: no training patient holds this modality, at any site")
    present = stats.n_per_class > 0
    if int(present.sum()) < 2:
        raise DataError(f"{modality}: the training patients hold a single class (class "
                        f"{int(np.flatnonzero(present)[0])}, {n} patients), so the ANOVA F test is undefined; a "
                        "one-class site can only be prepared together with other sites (statistics are pooled "
                        "across the consortium)")
    observed = stats.count.sum(axis=0)
    seen = observed > 0
    missing_fraction = 1.0 - observed / n
    keep_missing = (n - observed) <= cfg.max_missing_fraction * n + 1e-9
    mean = np.divide(stats.total.sum(axis=0), observed, out=np.zeros(len(observed)), where=seen)
    lo, hi = np.where(seen, stats.minimum, np.nan), np.where(seen, stats.maximum, np.nan)
    span = np.where(seen, hi - lo, 0.0)
    # imputing with the mean adds nothing to the sum of squared deviations; it only adds patients
    ss = np.maximum(stats.total_sq.sum(axis=0) - np.divide(stats.total.sum(axis=0) ** 2, np.maximum(observed, 1)), 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        variance = np.where(span > 0, ss / max(n - cfg.variance_ddof, 1) / span**2, 0.0)
    threshold = cfg.variance_threshold.get(modality, 0.0)
    keep_variance = keep_missing & (span > 0) & (variance >= threshold)
    sum_k, sumsq_k = imputed_class_sums(stats, mean)
    f = np.where(seen, anova_f(stats.n_per_class, sum_k, sumsq_k), np.nan)
    candidates = np.flatnonzero(keep_variance)
    k = cfg.features_for(modality)
    chosen = candidates[select_top_k(f[candidates], k)] if len(candidates) else candidates
    selected = np.zeros(len(observed), dtype=bool)
    selected[chosen] = True
    if not len(chosen):
        raise DataError(f"{modality}: no feature survives preprocessing ({len(observed)} features, "
                        f"{int(keep_missing.sum())} with <= {cfg.max_missing_fraction:.0%} missing values, "
                        f"{int(keep_variance.sum())} with scaled variance >= {threshold} and not constant)")
    table = pd.DataFrame({"missing_fraction": missing_fraction, "mean": np.where(seen, mean, np.nan), "min": lo,
                          "max": hi, "variance": np.where(seen, variance, np.nan), "f": f,
                          "kept_missing": keep_missing, "kept_variance": keep_variance, "selected": selected},
                         index=pd.Index(stats.features, name="feature"))
    dropped_missing = int((~keep_missing).sum())
    dropped_variance = int(keep_missing.sum() - keep_variance.sum())
    dropped_f = int(keep_variance.sum() - len(chosen))
    report = {"features_in": len(observed), "dropped_missing": dropped_missing, "dropped_variance": dropped_variance,
              "dropped_f": dropped_f, "features": int(len(chosen)), "training_patients": n,
              "training_patients_per_class": stats.n_per_class.astype(int).tolist(), "variance_threshold": threshold,
              "n_features": k}
    return ModalityPrep([stats.features[i] for i in chosen], mean[chosen], lo[chosen], hi[chosen], f[chosen],
                        dropped_missing, dropped_variance, dropped_f, table, report)


def derive_all(combined: dict[str, FeatureStats], cfg: PrepareConfig) -> dict[str, ModalityPrep]:
    return {m: derive_preparation(s, cfg, m) for m, s in combined.items()}


def class_names(num_classes: int, cfg: PrepareConfig) -> list[str]:
    return list(cfg.class_names) if cfg.class_names else [f"class{k}" for k in range(num_classes)]


def build_manifest(preps: dict[str, ModalityPrep], classes: list[str], missing_feature: str, name: str,
                   **fields):
    """The consortium manifest (features in order + imputation + scaling) that site validation and training use;
    ``fields``: further manifest fields (e.g. ``max_absent_features``)."""
    from magnet_core.cohort.manifest import ConsortiumManifest, ModalitySpec

    return ConsortiumManifest(
        name=name, classes=classes, missing_feature=missing_feature, **fields,
        modalities=[ModalitySpec(name=m, features=p.features, impute_means=p.impute_means.tolist(),
                                 scale_min=p.scale_min.tolist(), scale_max=p.scale_max.tolist())
                    for m, p in preps.items() if p.features])


# ----------------------------------------------------------------------------------------------- applying


def apply_preparation(frame: pd.DataFrame, prep: ModalityPrep, missing_feature: str = "impute",
                      source: str = "", clip: bool = False, max_absent: float | None = None
                      ) -> tuple[pd.DataFrame, list[str]]:
    """Impute, scale and select one site's matrix with the consortium's decisions; returns the prepared matrix
    (features in manifest order) and the consortium features this site lacks (filled or refused). A site lacking
    more than the share ``max_absent`` of the features is refused (None: no limit)."""
    lacking = [f for f in prep.features if f not in frame.columns]
    if lacking and max_absent is not None and len(lacking) > max_absent * len(prep.features) + 1e-9:
        raise DataError(f"{source}: lacks {len(lacking)} of {len(prep.features)} consortium features "
                        f"({len(lacking) / len(prep.features):.0%}), e.g. {lacking[:5]}; at most "
                        f"{max_absent:.0%} may be filled with consortium means (max_absent_features): renamed "
                        "columns or another consortium's file?")
    if lacking and missing_feature == "error":
        raise DataError(f"{source}: lacks {len(lacking)} consortium feature(s), e.g. {lacking[:5]}, and the "
                        "manifest says missing_feature = 'error' (set it to 'impute' to fill them with the "
                        "consortium means)")
    x = frame.reindex(columns=prep.features).to_numpy(dtype=np.float64)
    x = np.where(np.isnan(x), prep.impute_means, x)
    span = np.where(prep.scale_max > prep.scale_min, prep.scale_max - prep.scale_min, 1.0)
    x = (x - prep.scale_min) / span
    if clip:
        x = np.clip(x, 0.0, 1.0)
    return pd.DataFrame(x.astype(np.float32), index=frame.index, columns=prep.features), lacking


def apply_manifest(site: RawSite, manifest, clip: bool = False) -> tuple[dict[str, pd.DataFrame], dict]:
    """Every manifest modality the site holds, prepared locally, and a report of counts (no patient values)."""
    out, report = {}, {}
    train = site.train_ids
    for spec in manifest.modalities:
        if spec.name not in site.frames:
            report[spec.name] = {"absent": True}
            continue
        frame = site.frames[spec.name]
        prep = ModalityPrep.from_spec(spec)
        out[spec.name], lacking = apply_preparation(frame, prep, manifest.missing_feature,
                                                    f"site {site.name!r}, {spec.name}", clip,
                                                    manifest.max_absent_features)
        held = frame.reindex(columns=[f for f in spec.features if f in frame.columns])
        x = out[spec.name].to_numpy()
        outside = (x < -1e-6) | (x > 1 + 1e-6)
        report[spec.name] = {
            "patients": int(len(frame)), "features": len(spec.features), "lacking_features": lacking,
            "lacking_features_imputed": lacking, "imputed_cells": int(held.isna().to_numpy().sum()),
            "ignored_features": int(len(set(frame.columns) - set(spec.features))),
            "cells_outside_0_1": {"training": int(outside[frame.index.isin(train)].sum()),
                                  "test": int(outside[~frame.index.isin(train)].sum())}}
    if not out:
        raise DataError(f"site {site.name!r} holds none of the consortium's modalities "
                        f"{[s.name for s in manifest.modalities]}")
    extra = sorted(set(site.frames) - {s.name for s in manifest.modalities})
    if extra:
        report["ignored_modalities"] = extra
    return out, report


def write_prepared_site(folder: str | Path, site: RawSite, frames: dict[str, pd.DataFrame]) -> Path:
    """Cohort layout read by ``load_cohort_dir`` / site validation: labels.csv, split.csv, <modality>.csv.gz."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    held = set().union(*(set(f.index) for f in frames.values()))
    labels = site.labels[site.labels.index.isin(list(held))]
    labels.rename("Class").rename_axis("sampleID").to_csv(folder / "labels.csv")
    site.split.reindex(labels.index).rename("split").rename_axis("sampleID").to_csv(folder / "split.csv")
    for m, frame in frames.items():
        frame.sort_index().rename_axis("sampleID").to_csv(folder / f"{m}.csv.gz", float_format="%.9g")
    return folder


def prepare_pooled_decisions(sites: Sequence[RawSite], cfg: PrepareConfig):
    """The whole decision from sites' statistics in one process (what the federated server computes):
    ``(manifest, preps, combined statistics)``."""
    num_classes = len(cfg.class_names) if cfg.class_names else max(s.num_classes for s in sites)
    combined = combine_sites([site_statistics(s, num_classes) for s in sites])
    preps = derive_all(combined, cfg)
    manifest = build_manifest(preps, class_names(num_classes, cfg), cfg.missing_feature, cfg.name,
                              max_absent_features=cfg.max_absent_features)
    return manifest, preps, combined

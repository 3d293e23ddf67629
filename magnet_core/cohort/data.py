"""Cohorts: per-modality matrices, labels, availability mask and splits, with validated loaders."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from magnet_core.cohort import tables as reader
from magnet_core.cohort.limits import DEFAULT_INPUT_LIMITS, InputLimits
from magnet_core.cohort.tables import DataError

MODALITY_SUFFIXES = (".csv.gz", ".csv", ".tsv.gz", ".tsv")
LABEL_FILE_RE = re.compile(r"^label_(train|val|test)_(paired|unpaired)\.(csv|tsv)(\.gz)?$")
SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class Cohort:
    """Patients x modalities. ``X[m]`` has one row per patient (zeros where ``mask[:, m]`` is False)."""

    sample_ids: np.ndarray  # (n,) str
    labels: np.ndarray  # (n,) int64 in 0..num_classes-1
    modalities: list[str]
    features: dict[str, list[str]]
    X: dict[str, np.ndarray]  # modality -> (n, d_m) float32
    mask: np.ndarray  # (n, M) bool availability
    num_classes: int
    split: np.ndarray | None = None  # (n,) in {"train", "val", "test"}
    paired: np.ndarray | None = None  # (n,) bool; defaults to "has every modality"
    name: str = "cohort"
    generated: bool = False

    def __post_init__(self) -> None:
        n = len(self.sample_ids)
        if self.paired is None:
            self.paired = self.mask.all(axis=1)
        assert self.labels.shape == (n,) and self.mask.shape == (n, len(self.modalities))
        for m in self.modalities:
            assert self.X[m].shape[0] == n, m

    @property
    def n(self) -> int:
        return len(self.sample_ids)

    def subset(self, idx: Sequence[int] | np.ndarray) -> "Cohort":
        """The cohort restricted to the patients ``idx`` (in that order)."""
        idx = np.asarray(idx, dtype=np.int64)
        return dataclasses.replace(
            self,
            sample_ids=self.sample_ids[idx],
            labels=self.labels[idx],
            X={m: self.X[m][idx] for m in self.modalities},
            mask=self.mask[idx],
            split=None if self.split is None else self.split[idx],
            paired=self.paired[idx],
        )

    def split_indices(self, *names: str) -> np.ndarray:
        """Indices of patients whose split is one of ``names``."""
        if self.split is None:
            raise DataError(f"cohort {self.name!r} has no train/test split yet")
        return np.flatnonzero(np.isin(self.split, names))

    def drop_modality_rows(self, modality: str, idx: np.ndarray) -> "Cohort":
        """A copy in which patients ``idx`` no longer have ``modality`` (rows zeroed, mask cleared)."""
        j = self.modalities.index(modality)
        mask = self.mask.copy()
        mask[idx, j] = False
        X = dict(self.X)
        X[modality] = self.X[modality].copy()
        X[modality][idx] = 0.0
        return dataclasses.replace(self, mask=mask, X=X)

    def availability(self) -> dict[str, int]:
        """Patients per modality and per missingness pattern, for summaries."""
        out = {f"has_{m}": int(self.mask[:, j].sum()) for j, m in enumerate(self.modalities)}
        out["complete"] = int(self.mask.all(axis=1).sum())
        out["patients"] = self.n
        return out


# ----------------------------------------------------------------------------- reading files


def _modality_files(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or LABEL_FILE_RE.match(p.name):
            continue
        for suffix in MODALITY_SUFFIXES:
            if p.name.endswith(suffix):
                stem = p.name[: -len(suffix)]
                if stem in ("labels", "split"):
                    break
                if stem in files:
                    raise DataError(f"{folder}: modality {stem!r} is given twice ({files[stem].name}, {p.name})")
                files[stem] = p
                break
    return files


def _read_table(path: Path, limits: InputLimits = DEFAULT_INPUT_LIMITS) -> pd.DataFrame:
    """A table through the one reader (:func:`magnet_core.cohort.tables.read_table`), within ``limits``."""
    return reader.read_table(path, limits)


def duplicate_header_names(path: Path, limits: InputLimits = DEFAULT_INPUT_LIMITS) -> list[str]:
    """Column names given more than once in the file's header (pandas would silently rename them)."""
    return sorted(set(reader.duplicates(reader.read_header(path, limits)[1:])))


def _check_unique_ids(df: pd.DataFrame, path: Path, what: str = "sample id") -> None:
    dup = df.index[df.index.duplicated()]
    if len(dup):
        shown = ", ".join(map(str, dup[:5].tolist()))
        raise DataError(f"{path}: duplicate {what}s ({len(dup)}): {shown}")


def read_modality(path: str | Path, limits: InputLimits = DEFAULT_INPUT_LIMITS) -> pd.DataFrame:
    """Read a samples x features matrix (float32); reject a file beyond ``limits``, duplicate ids and names, and any
    cell that is not a finite number within float32 (the first one is named by line and column)."""
    path = Path(path)
    df = reader.read_table(path, limits)
    _check_unique_ids(df, path)
    dup_cols = reader.duplicates(df.columns)
    if dup_cols:
        raise DataError(f"{path}: duplicate feature names: {', '.join(dup_cols[:5])}")
    return reader.numeric_values(df, path).astype(np.float32)


def read_labels(path: str | Path, column: str | None = None,
                limits: InputLimits = DEFAULT_INPUT_LIMITS) -> pd.Series:
    """Read a label table (sample id, class) within ``limits``; labels must be integers."""
    path = Path(path)
    df = _read_table(path, limits)
    if df.shape[1] == 0:
        raise DataError(f"{path}: no label column")
    col = column or ("Class" if "Class" in df.columns else df.columns[0])
    if col not in df.columns:
        raise DataError(f"{path}: no column {col!r} (columns: {list(df.columns)})")
    _check_unique_ids(df, path)
    raw = df[col]
    numeric = pd.to_numeric(raw, errors="coerce")
    bad = numeric.isna() | (numeric.notna() & (numeric != np.round(numeric)))
    if bad.any():
        sid = raw.index[bad.to_numpy()][0]
        value = raw.loc[sid]
        shown = repr(value) if isinstance(value, str) else str(value)  # as written, not numpy's repr
        raise DataError(
            f"{path}: label {shown} of sample {sid!r} in column {col!r} is not an integer class"
            f" ({int(bad.sum())} such rows)"
        )
    return numeric.astype(np.int64).rename("Class")


def check_label_range(labels: pd.Series | np.ndarray, num_classes: int | None, source: str) -> int:
    """Labels must be 0..C-1 with every class present (or within 0..num_classes-1 when given)."""
    values = np.asarray(labels)
    if values.size == 0:
        raise DataError(f"{source}: no labelled samples")
    present = np.unique(values)
    if num_classes is None:
        num_classes = int(present.max()) + 1
        missing = sorted(set(range(num_classes)) - set(present.tolist()))
        if present.min() < 0 or missing:
            raise DataError(
                f"{source}: labels must be integers 0..C-1 with every class present; found {present.tolist()}"
                + (f" (missing {missing})" if missing else "")
            )
    elif present.min() < 0 or present.max() >= num_classes:
        raise DataError(f"{source}: labels must be in 0..{num_classes - 1}; found {present.tolist()}")
    return num_classes


# ----------------------------------------------------------------------------- assembling a cohort


def assemble_cohort(
    labels: pd.Series,
    tables: dict[str, pd.DataFrame],
    sources: dict[str, Path],
    *,
    label_source: str,
    num_classes: int | None = None,
    name: str = "cohort",
    split: pd.Series | None = None,
    paired: pd.Series | None = None,
    log=print,
) -> Cohort:
    """Align modality tables on the labelled samples; build the availability mask; drop empty patients."""
    num_classes = check_label_range(labels, num_classes, label_source)
    modalities = list(tables)
    if not modalities:
        raise DataError(f"{label_source}: no modality files found beside the labels")
    avail = {}
    for m, df in tables.items():
        overlap = df.index.intersection(labels.index)
        if len(overlap) == 0:
            reader.orientation(df, sources[m], labels.index, "samples-x-features", label_source)
            raise DataError(
                f"{sources[m]}: none of its {len(df)} sample ids matches a labelled sample in {label_source}"
                f" (first ids: {', '.join(df.index[:3])} vs {', '.join(labels.index[:3])})"
            )
        unlabelled = len(df.index.difference(labels.index))
        if unlabelled:
            log(f"note: {sources[m].name}: {unlabelled} sample(s) have no label and are not used")
        avail[m] = labels.index.isin(df.index)
    mask = np.stack([avail[m] for m in modalities], axis=1)
    keep = mask.any(axis=1)
    dropped = int((~keep).sum())
    if dropped:
        log(f"note: dropped {dropped} labelled sample(s) that have none of the modalities {modalities}")
    labels = labels[keep]
    mask = mask[keep]
    X = {}
    for j, m in enumerate(modalities):
        aligned = tables[m].reindex(labels.index)
        X[m] = np.nan_to_num(aligned.to_numpy(dtype=np.float32), nan=0.0)
        X[m][~mask[:, j]] = 0.0
    return Cohort(
        sample_ids=labels.index.to_numpy(dtype=str),
        labels=labels.to_numpy(dtype=np.int64),
        modalities=modalities,
        features={m: [str(c) for c in tables[m].columns] for m in modalities},
        X=X,
        mask=mask,
        num_classes=num_classes,
        split=None if split is None else split.reindex(labels.index).to_numpy(dtype=str),
        paired=None if paired is None else paired.reindex(labels.index).to_numpy(dtype=bool),
        name=name,
    )


def load_magnet_split(folder: str | Path, seed: int, *, modalities: Iterable[str] | None = None, log=print,
                      limits: InputLimits = DEFAULT_INPUT_LIMITS) -> Cohort:
    """MAGNET split layout: ``folder/<seed>/{<modality>.csv.gz, label_{train,val,test}_{paired,unpaired}.csv.gz}``.

    Train and val are both kept (split "train"/"val"); the paper trains on train+val and tests on test. Every file
    is read within ``limits``.
    """
    seed_dir = Path(folder) / str(seed)
    if not seed_dir.is_dir():
        found = sorted(p.name for p in Path(folder).iterdir() if p.is_dir()) if Path(folder).is_dir() else []
        raise DataError(f"{seed_dir}: no split folder for seed {seed} (found: {found or 'none'})")
    parts, split, paired = [], {}, {}
    for name in SPLITS:
        for kind in ("paired", "unpaired"):
            candidates = [p for p in seed_dir.iterdir() if LABEL_FILE_RE.match(p.name)
                          and p.name.startswith(f"label_{name}_{kind}.")]
            if not candidates:
                raise DataError(f"{seed_dir}: missing label file label_{name}_{kind}.csv.gz")
            lab = read_labels(candidates[0], limits=limits)
            parts.append((candidates[0], lab))
            for sid in lab.index:
                split[sid] = name
                paired[sid] = kind == "paired"
    labels = pd.concat([lab for _, lab in parts])
    dup = labels.index[labels.index.duplicated()]
    if len(dup):
        raise DataError(f"{seed_dir}: sample {dup[0]!r} appears in more than one label file")
    files = _modality_files(seed_dir)
    if modalities is not None:
        files = _select(files, modalities, seed_dir)
    tables = {m: read_modality(p, limits) for m, p in files.items()}
    return assemble_cohort(
        labels.sort_index(), tables, files, label_source=str(seed_dir / "label_*"),
        name=f"{Path(folder).name}/seed{seed}", split=pd.Series(split), paired=pd.Series(paired), log=log,
    )


def _select(files: dict[str, Path], modalities: Iterable[str], folder: Path) -> dict[str, Path]:
    wanted = list(modalities)
    missing = [m for m in wanted if m not in files]
    if missing:
        raise DataError(f"{folder}: no file for modality {missing} (found {sorted(files)})")
    return {m: files[m] for m in wanted}


def load_cohort_dir(folder: str | Path, *, modalities: Iterable[str] | None = None,
                    num_classes: int | None = None, log=print, limits: InputLimits = DEFAULT_INPUT_LIMITS) -> Cohort:
    """Cohort layout: one file per modality plus ``labels.csv`` (no split yet); every file read within ``limits``."""
    folder = Path(folder)
    label_path = next((folder / f"labels{s}" for s in MODALITY_SUFFIXES if (folder / f"labels{s}").exists()), None)
    if label_path is None:
        raise DataError(f"{folder}: no labels.csv (cohort layout needs labels.csv plus one file per modality)")
    labels = read_labels(label_path, limits=limits)
    files = _modality_files(folder)
    if modalities is not None:
        files = _select(files, modalities, folder)
    tables = {m: read_modality(p, limits) for m, p in files.items()}
    return assemble_cohort(labels.sort_index(), tables, files, label_source=str(label_path),
                           num_classes=num_classes, name=folder.name, log=log)


def stratified_split(cohort: Cohort, seed: int, ratios: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> Cohort:
    """MAGNET's split: stratified train/val/test within paired and within unpaired patients separately."""

    split = np.empty(cohort.n, dtype=object)
    for group in (cohort.paired, ~cohort.paired):
        idx = np.flatnonzero(group)
        if len(idx) == 0:
            continue
        y = cohort.labels[idx]
        if len(idx) < 5:  # too few to split three ways: keep them for training
            split[idx] = "train"
            continue
        tr, rest = _split(idx, y, ratios[1] + ratios[2], seed)
        va, te = _split(rest, cohort.labels[rest], ratios[2] / (ratios[1] + ratios[2]), seed)
        split[tr], split[va], split[te] = "train", "val", "test"
    return dataclasses.replace(cohort, split=split.astype(str))


def holdout_split(cohort: Cohort, seed: int, fraction: float, held_out: str = "val") -> Cohort:
    """Every patient "train" except ``fraction`` of them, split ``held_out``: stratified by class within paired and
    within unpaired patients separately (as :func:`stratified_split`); a group of fewer than 5 stays "train"."""
    split = np.full(cohort.n, "train", dtype=object)
    paired = cohort.paired if cohort.paired is not None else np.ones(cohort.n, dtype=bool)
    for group in (paired, ~paired):
        idx = np.flatnonzero(group)
        if len(idx) < 5:
            continue
        _, held = _split(idx, cohort.labels[idx], fraction, seed)
        split[held] = held_out
    return dataclasses.replace(cohort, split=split.astype(str))


def _split(idx: np.ndarray, y: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified when every class can be represented on both sides, otherwise a plain random split; a group
    too small for two non-empty sides goes wholly to the side its size rounds to."""
    from sklearn.model_selection import train_test_split

    n_test = int(np.ceil(test_size * len(idx)))
    if n_test >= len(idx):
        return idx[:0], idx
    if n_test == 0:
        return idx, idx[:0]
    try:
        return train_test_split(idx, test_size=test_size, stratify=y if _min_count(y) >= 2 else None,
                                random_state=seed)
    except ValueError:  # too few patients per class for a stratified split of this size
        return train_test_split(idx, test_size=test_size, random_state=seed)


def _min_count(y: np.ndarray) -> int:
    counts = np.bincount(y)
    return int(counts[counts > 0].min())


def minmax_scale_by_train(cohort: Cohort) -> Cohort:
    """Min-max scale each feature to [0, 1] with statistics of training patients only (train+val)."""
    train = cohort.split_indices("train", "val")
    X = {}
    for j, m in enumerate(cohort.modalities):
        rows = train[cohort.mask[train, j]]
        x = cohort.X[m]
        if len(rows) == 0:
            X[m] = x
            continue
        lo, hi = x[rows].min(axis=0), x[rows].max(axis=0)
        span = np.where(hi > lo, hi - lo, 1.0)
        scaled = ((x - lo) / span).astype(np.float32)
        scaled[~cohort.mask[:, j]] = 0.0
        X[m] = scaled
    return dataclasses.replace(cohort, X=X)


def detect_layout(path: str | Path) -> str:
    """``"split"`` for the MAGNET per-seed layout, ``"cohort"`` for labels.csv + modality files."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such directory")
    if not path.is_dir():
        raise DataError(f"{path}: expected a directory holding a cohort")
    if any((path / f"labels{s}").exists() for s in MODALITY_SUFFIXES):
        return "cohort"
    seed_dirs = [p for p in path.iterdir() if p.is_dir() and p.name.isdigit()]
    if seed_dirs and any(LABEL_FILE_RE.match(f.name) for f in seed_dirs[0].iterdir()):
        return "split"
    raise DataError(
        f"{path}: not a cohort: expected labels.csv + one file per modality, or per-seed folders "
        "with label_{train,val,test}_{paired,unpaired}.csv.gz"
    )


def available_seeds(path: str | Path) -> list[int]:
    """Seeds of a MAGNET split layout (its numeric sub-folders)."""
    return sorted(int(p.name) for p in Path(path).iterdir() if p.is_dir() and p.name.isdigit())


def load_for_seed(path: str | Path, seed: int, *, modalities: Iterable[str] | None = None, scale: bool | None = None,
                  log=print, limits: InputLimits = DEFAULT_INPUT_LIMITS) -> Cohort:
    """Load a cohort of either layout with its split for ``seed`` (MAGNET's own split files or a stratified split).

    Cohort-layout data are min-max scaled with training statistics unless ``scale=False``. Every file is read
    within ``limits``.
    """
    layout = detect_layout(path)
    if layout == "split":
        cohort = load_magnet_split(path, seed, modalities=modalities, log=log, limits=limits)
        return minmax_scale_by_train(cohort) if scale else cohort
    cohort = stratified_split(load_cohort_dir(path, modalities=modalities, log=log, limits=limits), seed)
    return cohort if scale is False else minmax_scale_by_train(cohort)

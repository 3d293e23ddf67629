"""Checks a site's data directory against the consortium manifest, and loads it as a Cohort in manifest order."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from magnet_core.cohort import tables
from magnet_core.cohort.data import MODALITY_SUFFIXES, SPLITS, Cohort, DataError, _modality_files, stratified_split
from magnet_core.cohort.manifest import ConsortiumManifest, ModalitySpec

FLOAT32_MAX = tables.FLOAT32_MAX


class SiteReport(BaseModel):
    """The outcome of validation: errors stop training, warnings are reported."""

    errors: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    summary: dict = Field(default_factory=dict,
                          description="patients, labelled, classes, modalities (patients with each), patterns, split")

    @property
    def ok(self) -> bool:
        return not self.errors


def _line(i: int) -> int:
    """File line of data row ``i`` (0-based): line 1 is the header."""
    return i + 2


def _where(path: Path, df: pd.DataFrame, r: int, c: int | None = None) -> str:
    """``file, line L (sample 'id')[, column C 'name']``; column 1 is the sample id."""
    text = f"{path}, line {_line(r)} (sample {df.index[r]!r})"
    if c is not None:
        text += f", column {c + 2} {df.columns[c]!r}"
    return text


def _few(items, k: int = 5) -> str:
    items = list(items)
    return ", ".join(repr(x) for x in items[:k]) + (f" and {len(items) - k} more" if len(items) > k else "")


def _find(folder: Path, stem: str) -> Path | None:
    return next((folder / f"{stem}{s}" for s in MODALITY_SUFFIXES if (folder / f"{stem}{s}").exists()), None)


def _check_ids(path: Path, df: pd.DataFrame, report: SiteReport) -> None:
    blank = [i for i, s in enumerate(df.index) if s in ("", "nan", "None")]
    if blank:
        report.errors.append(f"{path}, line {_line(blank[0])}: empty sample id ({len(blank)} such rows)")
    dup = df.index.duplicated(keep=False)
    if dup.any():
        first = df.index[dup][0]
        lines = [_line(i) for i in np.flatnonzero(df.index == first)]
        report.errors.append(f"{path}: duplicate sample ids ({int(df.index.duplicated().sum())} repeated rows): "
                             f"{first!r} on lines {', '.join(map(str, lines))}"
                             + (f"; also {_few(sorted(set(df.index[dup]) - {first}))}" if dup.sum() > len(lines)
                                else ""))


def _read_labels(path: Path, manifest: ConsortiumManifest, report: SiteReport) -> tuple[pd.Series | None, pd.Index]:
    """Integer labels in 0..C-1 by sample id; blank labels are reported and left out (unlabelled).
    Also returns the ids whose label is invalid (already reported as errors)."""
    none = (None, pd.Index([]))
    try:
        df = tables.read_table(path, manifest.input_limits)
    except DataError as exc:
        report.errors.append(str(exc))
        return none
    df.columns = [str(c).strip() for c in df.columns]
    if df.shape[1] == 0:
        report.errors.append(f"{path}: no label column (expected: sample id, {manifest.label_column})")
        return none
    if manifest.label_column in df.columns:
        col = manifest.label_column
    elif manifest.label_column == "Class":
        col = df.columns[0]
    else:
        report.errors.append(f"{path}: no column {manifest.label_column!r} (the manifest's label_column); "
                             f"columns: {list(df.columns)}")
        return none
    _check_ids(path, df, report)
    raw = df[col].astype(str).str.strip()
    blank = df[col].isna().to_numpy() | raw.isin(["", "nan", "NA"]).to_numpy()
    numeric = pd.to_numeric(raw.where(~blank), errors="coerce").to_numpy()
    not_int = ~blank & (np.isnan(numeric) | (numeric != np.round(numeric)))
    c = list(df.columns).index(col)
    if not_int.any():
        r = int(np.flatnonzero(not_int)[0])
        report.errors.append(f"{_where(path, df, r, c)}: label {raw.iloc[r]!r} is not an integer class index "
                             f"(0..{manifest.num_classes - 1} for {', '.join(manifest.classes)}); "
                             f"{int(not_int.sum())} such rows")
    unknown = ~blank & ~not_int & ((numeric < 0) | (numeric >= manifest.num_classes))
    if unknown.any():
        r = int(np.flatnonzero(unknown)[0])
        report.errors.append(f"{_where(path, df, r, c)}: label {int(numeric[r])} is not a class of the consortium "
                             f"(0..{manifest.num_classes - 1}: {', '.join(manifest.classes)}); "
                             f"{int(unknown.sum())} such rows")
    if blank.any():
        r = int(np.flatnonzero(blank)[0])
        report.warnings.append(f"{_where(path, df, r, c)}: no label; {int(blank.sum())} unlabelled sample(s) "
                               f"are not used")
    keep = ~blank & ~not_int & ~unknown
    labels = pd.Series(numeric[keep].astype(np.int64), index=df.index[keep], name="Class")
    return labels[~labels.index.duplicated()], df.index[not_int | unknown]


def _check_matrix(path: Path, spec: ModalitySpec, manifest: ConsortiumManifest, report: SiteReport,
                  label_ids: pd.Index | None = None, label_path: Path | None = None) -> pd.DataFrame | None:
    """One modality file: ids, orientation, header (missing / extra / order), every manifest feature's cells and,
    for prepared data, their range. A file beyond the manifest's input limits is refused before parsing."""
    try:
        df = tables.read_table(path, manifest.input_limits)
    except DataError as exc:
        report.errors.append(str(exc))
        return None
    _check_ids(path, df, report)
    if label_ids is not None and len(label_ids):
        try:
            tables.orientation(df, path, label_ids, "samples-x-features", str(label_path or "labels.csv"),
                               hint="write one row per sample (samples x features)")
        except DataError as exc:
            report.errors.append(str(exc))
            return None
    dup_cols = tables.duplicates(df.columns)
    if dup_cols:
        report.errors.append(f"{path}: duplicate feature names in the header: {_few(dup_cols)}")
    expected = spec.features
    wanted = set(expected)
    missing = [f for f in expected if f not in set(df.columns)]
    extra = [c for c in df.columns if c not in wanted]
    if missing:
        msg = (f"{path}: {len(missing)} manifest feature(s) missing for modality {spec.name!r}, "
               f"e.g. {_few(missing)}")
        share = len(missing) / len(expected)
        if manifest.missing_feature == "impute" and share > manifest.max_absent_features + 1e-12:
            report.errors.append(msg + f" ({share:.0%} of its {len(expected)} features; the manifest fills at most "
                                       f"{manifest.max_absent_features:.0%} (max_absent_features): renamed columns "
                                       "or another consortium's file?)")
        elif manifest.missing_feature == "impute" and spec.impute_means is not None:
            report.warnings.append(msg + " (filled with the consortium mean, as the manifest allows)")
        elif manifest.missing_feature == "impute":
            report.errors.append(msg + f" (the manifest allows imputation but gives no impute_means for {spec.name!r})")
        else:
            report.errors.append(msg)
    if extra:
        report.warnings.append(f"{path}: {len(extra)} column(s) not in the manifest are ignored, e.g. {_few(extra)}")
    present = [c for c in df.columns if c in wanted]
    order = [f for f in expected if f in set(present)]
    if present != order:
        first = next(i for i, (a, b) in enumerate(zip(present, order)) if a != b)
        column = list(df.columns).index(present[first]) + 2
        report.errors.append(f"{path}: features are not in the manifest's order: column {column} is "
                             f"{present[first]!r}, the manifest expects {order[first]!r} there "
                             f"(write the columns in the manifest's order)")
    cols = [i for i, c in enumerate(df.columns) if c in wanted]
    problems, numeric = tables.cell_problems(df, path, columns=cols)
    report.errors.extend(problems)
    if not problems:
        _check_range(path, spec, manifest, numeric, cols, report)
    return numeric[~numeric.index.duplicated()]


def _check_range(path: Path, spec: ModalitySpec, manifest: ConsortiumManifest, values: pd.DataFrame,
                 cols: list[int], report: SiteReport) -> None:
    """Prepared values are min-max scaled with the manifest's ranges: [0, 1] for training patients, a little
    beyond for others. Many cells far outside mean raw (unscaled) data."""
    if spec.scale_min is None or spec.scale_max is None or values.size == 0:
        return
    x = values.to_numpy()
    tol = manifest.scale_tolerance
    with np.errstate(invalid="ignore"):
        outside = (x < -tol) | (x > 1 + tol)
    n = int(outside.sum())
    if not n:
        return
    i, j = (int(v) for v in np.argwhere(outside)[0])
    share = n / max(int(np.isfinite(x).sum()), 1)
    msg = (f"{tables.locate(path, values, i, j, False, cols[j] - j)}: value {x[i, j]:g} lies outside the prepared "
           f"range [0, 1] by more than scale_tolerance {tol:g}, as do {n} of {x.size} cells ({share:.1%})")
    if share > manifest.max_out_of_range:
        report.errors.append(msg + f", more than max_out_of_range {manifest.max_out_of_range:.0%}: raw, unscaled "
                                   "values? prepare them with the consortium's manifest (magnet-fl prepare)")
    else:
        report.warnings.append(msg + f" (allowed up to max_out_of_range {manifest.max_out_of_range:.0%})")


def _read_split(path: Path, manifest: ConsortiumManifest, report: SiteReport) -> pd.Series | None:
    try:
        df = tables.read_table(path, manifest.input_limits)
    except DataError as exc:
        report.errors.append(str(exc))
        return None
    col = "split" if "split" in df.columns else df.columns[0]
    _check_ids(path, df, report)
    values = df[col].astype(str).str.strip().str.lower()
    bad = ~values.isin(SPLITS).to_numpy()
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        report.errors.append(f"{_where(path, df, r, list(df.columns).index(col))}: split {df[col].iloc[r]!r} is not "
                             f"one of {', '.join(SPLITS)} ({int(bad.sum())} such rows)")
        return None
    return values[~values.index.duplicated()]


def validate_site(folder: str | Path, manifest: ConsortiumManifest) -> tuple[SiteReport, dict]:
    """Every check of the site's data against the manifest.

    Returns the report and the readable tables: modality name -> numeric frame (manifest features present),
    ``"__labels__"`` -> labels of the patients that will be used (labelled, with at least one modality), and
    ``"__split__"`` -> the split.csv column when the site has one."""
    folder = Path(folder)
    report = SiteReport()
    tables: dict = {}
    if not folder.is_dir():
        report.errors.append(f"{folder}: no such directory")
        return report, tables
    label_path = _find(folder, "labels")
    labels, invalid = None, pd.Index([])
    if label_path is None:
        report.errors.append(f"{folder}: no labels.csv (sample id, {manifest.label_column})")
    else:
        labels, invalid = _read_labels(label_path, manifest, report)
    try:
        files = _modality_files(folder)
    except DataError as exc:
        report.errors.append(str(exc))
        files = {}
    known = {s.name for s in manifest.modalities}
    for m, path in files.items():
        if m not in known:
            report.warnings.append(f"{path}: modality {m!r} is not in the manifest ({', '.join(sorted(known))}) "
                                   f"and is ignored")
    for spec in manifest.modalities:
        if spec.name not in files:
            report.warnings.append(f"{folder}: no {spec.name} file: this site has no {spec.name} at all (allowed)")
            continue
        frame = _check_matrix(files[spec.name], spec, manifest, report,
                              None if labels is None else labels.index.append(invalid), label_path)
        if frame is not None:
            tables[spec.name] = frame
    split = None
    split_path = _find(folder, "split")
    if split_path is not None:
        split = _read_split(split_path, manifest, report)
    if labels is None:
        return report, tables

    held = {m: labels.index.isin(t.index) for m, t in tables.items()}
    mask = np.stack(list(held.values()), axis=1) if held else np.zeros((len(labels), 0), dtype=bool)
    used = mask.any(axis=1)
    if (~used).any():
        report.warnings.append(f"{int((~used).sum())} labelled patient(s) have no modality and will not be used, "
                               f"e.g. {_few(labels.index[~used])}")
    for m, t in tables.items():
        unlabelled = t.index.difference(labels.index).difference(invalid)  # invalid labels are errors already
        if len(unlabelled):
            report.warnings.append(f"{files[m]}: {len(unlabelled)} sample(s) have no label and are not used, "
                                   f"e.g. {_few(unlabelled)}")
    if not used.any():
        report.errors.append(f"{folder}: no patient has both a label and at least one modality: nothing to train on")
    patterns = Counter("+".join(m for m, h in held.items() if h[i]) or "none" for i in range(len(labels)))
    kept = labels[used]
    report.summary = {
        "patients": int(used.sum()),
        "labelled": int(len(labels)),
        "classes": {name: int((kept == k).sum()) for k, name in enumerate(manifest.classes)},
        "modalities": {s.name: int(held[s.name][used].sum()) if s.name in held else 0 for s in manifest.modalities},
        "patterns": dict(patterns.most_common()),
    }
    if split is not None:
        assigned = split.reindex(kept.index)
        if assigned.isna().any():
            report.warnings.append(f"{split_path}: {int(assigned.isna().sum())} patient(s) have no split row and are "
                                   f"used for training, e.g. {_few(kept.index[assigned.isna().to_numpy()])}")
        assigned = assigned.fillna("train")
        report.summary["split"] = {s: int((assigned == s).sum()) for s in SPLITS}
        if used.any() and not (assigned == "train").any():
            report.errors.append(f"{split_path}: no patient of this site is in the train split")
        tables["__split__"] = assigned
    tables["__labels__"] = kept
    return report, tables


def manifest_fill_values(spec: ModalitySpec) -> np.ndarray:
    """Values for features a prepared site lacks: the consortium mean, in the scaled units of prepared data."""
    if spec.impute_means is None:
        return np.zeros(len(spec.features))
    mean = np.asarray(spec.impute_means, dtype=np.float64)
    if spec.scale_min is None or spec.scale_max is None:
        return mean
    lo, hi = np.asarray(spec.scale_min), np.asarray(spec.scale_max)
    return (mean - lo) / np.where(hi > lo, hi - lo, 1.0)


def load_site_cohort(folder: str | Path, manifest: ConsortiumManifest, seed: int,
                     ratios: tuple[float, float, float] = (0.7, 0.1, 0.2), use_split_file: bool = True) -> Cohort:
    """Validate, then build the site's Cohort with the manifest's modalities and feature order.

    Absent features are filled from the manifest (when it allows it); the split comes from split.csv when the site
    has one and ``use_split_file``, else :func:`magnet_core.cohort.data.stratified_split` with ``seed`` and
    ``ratios``. Raises DataError listing every problem."""
    report, tables = validate_site(folder, manifest)
    if not report.ok:
        raise DataError(f"site data in {folder} failed validation:\n- " + "\n- ".join(report.errors))
    labels: pd.Series = tables["__labels__"]
    specs = manifest.modalities
    mask = np.stack([labels.index.isin(tables[s.name].index) if s.name in tables else np.zeros(len(labels), bool)
                     for s in specs], axis=1)
    X = {}
    for j, s in enumerate(specs):
        if s.name in tables:
            x = tables[s.name].reindex(index=labels.index, columns=s.features).to_numpy(dtype=np.float64)
            x = np.where(np.isnan(x), manifest_fill_values(s), x)  # only absent features remain NaN here
        else:
            x = np.zeros((len(labels), len(s.features)))
        x[~mask[:, j]] = 0.0
        X[s.name] = x.astype(np.float32)
    cohort = Cohort(sample_ids=labels.index.to_numpy(dtype=str), labels=labels.to_numpy(dtype=np.int64),
                    modalities=[s.name for s in specs], features={s.name: list(s.features) for s in specs}, X=X,
                    mask=mask, num_classes=manifest.num_classes, name=Path(folder).name)
    if "__split__" not in tables or not use_split_file:
        return stratified_split(cohort, seed, tuple(ratios))
    cohort.split = tables["__split__"].to_numpy(dtype=str)
    return cohort

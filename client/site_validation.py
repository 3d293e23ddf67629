"""Checks a site's data directory against the consortium manifest, and loads it as a Cohort in manifest order."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from magnet_core.data import (
    MODALITY_SUFFIXES, Cohort, DataError, _modality_files, _read_table, duplicate_header_names, read_labels,
    stratified_split,
)
from magnet_core.manifest import ConsortiumManifest


class SiteReport(BaseModel):
    """The outcome of validation: errors stop training, warnings are reported."""

    errors: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    summary: dict = Field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


def _check_matrix(path: Path, spec, manifest: ConsortiumManifest, report: SiteReport) -> pd.DataFrame | None:
    try:
        df = _read_table(path)
    except DataError as exc:
        report.errors.append(str(exc))
        return None
    df.columns = [str(c).strip() for c in df.columns]
    dup_ids = df.index[df.index.duplicated()]
    if len(dup_ids):
        report.errors.append(f"{path}: duplicate sample ids ({len(dup_ids)}): {', '.join(dup_ids[:5])}")
    dup_cols = duplicate_header_names(path)
    if dup_cols:
        report.errors.append(f"{path}: duplicate feature names: {', '.join(dup_cols[:5])}")
    expected = spec.features
    missing = [f for f in expected if f not in df.columns]
    extra = [c for c in df.columns if c not in set(expected)]
    if missing:
        msg = f"{path}: {len(missing)} manifest feature(s) missing, e.g. {missing[:5]}"
        if manifest.missing_feature == "impute" and spec.impute_means is not None:
            report.warnings.append(msg + " (filled with the consortium mean, as the manifest allows)")
        else:
            report.errors.append(msg)
    if extra:
        report.warnings.append(f"{path}: {len(extra)} feature(s) not in the manifest are ignored, e.g. {extra[:5]}")
    present = [c for c in df.columns if c in set(expected)]
    order = [f for f in expected if f in set(present)]
    if present != order:
        first = next(i for i, (a, b) in enumerate(zip(present, order)) if a != b)
        report.errors.append(f"{path}: features are not in the manifest's order: column {first + 2} is "
                             f"{present[first]!r}, the manifest expects {order[first]!r} there")
    numeric = df.apply(pd.to_numeric, errors="coerce")
    bad = numeric.isna() & df.notna()
    if bad.any().any():
        r, c = np.argwhere(bad.to_numpy())[0]
        report.errors.append(f"{path}: non-numeric value {df.iat[r, c]!r} at sample {df.index[r]!r}, column "
                             f"{df.columns[c]!r} ({int(bad.values.sum())} such cells)")
    values = numeric.to_numpy(dtype=np.float64)
    nonfinite = ~np.isfinite(values) & ~bad.to_numpy()
    if nonfinite.any():
        r, c = np.argwhere(nonfinite)[0]
        what = "missing (empty or NA)" if np.isnan(values[r, c]) else f"non-finite ({values[r, c]})"
        report.errors.append(f"{path}: {what} value at sample {df.index[r]!r}, column {df.columns[c]!r} "
                             f"({int(nonfinite.sum())} such cells; prepared site data must be complete)")
    return numeric


def validate_site(folder: str | Path, manifest: ConsortiumManifest) -> tuple[SiteReport, dict]:
    """Every check of the site's data against the manifest; returns the report and the readable tables."""
    folder = Path(folder)
    report = SiteReport()
    tables: dict = {}
    if not folder.is_dir():
        report.errors.append(f"{folder}: no such directory")
        return report, tables
    label_path = next((folder / f"labels{s}" for s in MODALITY_SUFFIXES if (folder / f"labels{s}").exists()), None)
    labels = None
    if label_path is None:
        report.errors.append(f"{folder}: no labels.csv")
    else:
        try:
            labels = read_labels(label_path, manifest.label_column if manifest.label_column != "Class" else None)
            unknown = labels[(labels < 0) | (labels >= manifest.num_classes)]
            if len(unknown):
                report.errors.append(f"{label_path}: label {int(unknown.iloc[0])} of sample {unknown.index[0]!r} is "
                                     f"not a class of the consortium (0..{manifest.num_classes - 1}: "
                                     f"{', '.join(manifest.classes)}); {len(unknown)} such rows")
        except DataError as exc:
            report.errors.append(str(exc))
    files = _modality_files(folder)
    for m in files:
        if m not in {s.name for s in manifest.modalities}:
            report.warnings.append(f"{files[m]}: modality {m!r} is not in the manifest and is ignored")
    for spec in manifest.modalities:
        if spec.name not in files:
            report.warnings.append(f"{folder}: no {spec.name} file: this site has no {spec.name} at all (allowed)")
            continue
        frame = _check_matrix(files[spec.name], spec, manifest, report)
        if frame is not None:
            tables[spec.name] = frame
    if labels is not None:
        held = {m: labels.index.isin(t.index) for m, t in tables.items()}
        mask = np.stack(list(held.values()), axis=1) if held else np.zeros((len(labels), 0), dtype=bool)
        empty = int((~mask.any(axis=1)).sum()) if mask.size else len(labels)
        if empty:
            report.warnings.append(f"{empty} labelled patient(s) have no modality and will not be used")
        for m, t in tables.items():
            unlabelled = len(t.index.difference(labels.index))
            if unlabelled:
                report.warnings.append(f"{files[m]}: {unlabelled} sample(s) have no label and are not used")
        patterns = Counter("+".join(m for m, h in held.items() if h[i]) or "none" for i in range(len(labels)))
        report.summary = {
            "patients": int(len(labels)),
            "classes": {manifest.classes[k] if 0 <= k < manifest.num_classes else str(k): int(v)
                        for k, v in labels.value_counts().sort_index().items()},
            "modalities": {m: int(h.sum()) for m, h in held.items()},
            "patterns": dict(patterns.most_common()),
        }
        tables["__labels__"] = labels
    return report, tables


def manifest_fill_values(spec) -> np.ndarray:
    """Values for features a prepared site lacks: the consortium mean, in the scaled units of prepared data."""
    if spec.impute_means is None:
        return np.zeros(len(spec.features))
    mean = np.asarray(spec.impute_means, dtype=np.float64)
    if spec.scale_min is None or spec.scale_max is None:
        return mean
    lo, hi = np.asarray(spec.scale_min), np.asarray(spec.scale_max)
    return (mean - lo) / np.where(hi > lo, hi - lo, 1.0)


def load_site_cohort(folder: str | Path, manifest: ConsortiumManifest, seed: int) -> Cohort:
    """Validate, then build the site's Cohort with the manifest's modalities and feature order."""
    report, tables = validate_site(folder, manifest)
    if not report.ok:
        raise DataError(f"site data in {folder} failed validation:\n- " + "\n- ".join(report.errors))
    labels: pd.Series = tables.pop("__labels__")
    specs = [s for s in manifest.modalities]
    mask = np.stack([labels.index.isin(tables[s.name].index) if s.name in tables else np.zeros(len(labels), bool)
                     for s in specs], axis=1)
    keep = mask.any(axis=1)
    labels, mask = labels[keep], mask[keep]
    X = {}
    for j, s in enumerate(specs):
        if s.name in tables:
            frame = tables[s.name].reindex(index=labels.index, columns=s.features)
            fill = manifest_fill_values(s)
            x = frame.to_numpy(dtype=np.float64)
            x = np.where(np.isnan(x), fill, x)
        else:
            x = np.zeros((len(labels), len(s.features)))
        x[~mask[:, j]] = 0.0
        X[s.name] = x.astype(np.float32)
    cohort = Cohort(sample_ids=labels.index.to_numpy(dtype=str), labels=labels.to_numpy(dtype=np.int64),
                    modalities=[s.name for s in specs], features={s.name: s.features for s in specs}, X=X,
                    mask=mask, num_classes=manifest.num_classes, name=Path(folder).name)
    split_path = next((Path(folder) / f"split{s}" for s in MODALITY_SUFFIXES if (Path(folder) / f"split{s}").exists()),
                      None)
    if split_path is None:
        return stratified_split(cohort, seed)
    split = pd.read_csv(split_path, index_col=0).iloc[:, 0].astype(str)
    split.index = split.index.map(str)
    cohort.split = split.reindex(labels.index).fillna("train").to_numpy(dtype=str)
    return cohort

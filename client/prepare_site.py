"""A site's side of federated preprocessing: read raw matrices, split, compute statistics, apply decisions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from magnet_core.data import MODALITY_SUFFIXES, DataError, _split, read_labels
from magnet_core.preprocess import FeatureStats, ModalityPrep, apply_preparation, compute_stats, read_raw_matrix


@dataclasses.dataclass
class RawSite:
    """One site's raw data: labels, split and per-modality samples x features frames (NaN = missing cell)."""

    name: str
    folder: Path
    labels: pd.Series
    split: pd.Series  # sample id -> train / val / test
    frames: dict[str, pd.DataFrame]

    @property
    def train_ids(self) -> pd.Index:
        return self.split.index[self.split.isin(["train", "val"])]

    def stats(self, num_classes: int) -> dict[str, FeatureStats]:
        """Per-modality statistics over training patients only (test patients never contribute)."""
        out = {}
        for m, frame in self.frames.items():
            rows = frame.index.intersection(self.train_ids)
            out[m] = compute_stats(frame.loc[rows], self.labels.loc[rows].to_numpy(), num_classes)
        return out

    def write_prepared(self, preps: dict[str, ModalityPrep], out: Path, missing_feature: str) -> dict:
        """Apply the consortium's decisions and write a cohort-layout directory; returns a report."""
        out.mkdir(parents=True, exist_ok=True)
        report = {"site": self.name, "patients": int(len(self.labels)), "modalities": {}}
        for m, prep in preps.items():
            if m not in self.frames:
                report["modalities"][m] = {"absent": True}
                continue
            source = str(self.folder / m)
            prepared, lacking = apply_preparation(self.frames[m], prep, missing_feature, source)
            prepared.rename_axis("sampleID").to_csv(out / f"{m}.csv.gz")
            report["modalities"][m] = {"patients": int(len(prepared)), "features": len(prep.features),
                                       "lacking_features_imputed": lacking}
        self.labels.rename("Class").rename_axis("sampleID").to_csv(out / "labels.csv")
        self.split.rename("split").rename_axis("sampleID").to_csv(out / "split.csv")
        return report


def load_raw_site(folder: str | Path, seed: int, orientation: str = "auto", name: str | None = None) -> RawSite:
    """Labels (labels.csv), the split (split.csv, or stratified 70/10/20 by ``seed``) and raw modality matrices."""
    folder = Path(folder)
    label_path = next((folder / f"labels{s}" for s in MODALITY_SUFFIXES if (folder / f"labels{s}").exists()), None)
    if label_path is None:
        raise DataError(f"{folder}: no labels.csv")
    labels = read_labels(label_path)
    frames = {}
    for path in sorted(folder.iterdir()):
        stem = next((path.name[: -len(s)] for s in MODALITY_SUFFIXES if path.name.endswith(s)), None)
        if stem is None or stem in ("labels", "split"):
            continue
        frame = read_raw_matrix(path, labels.index, orientation)  # type: ignore[arg-type]
        frames[stem] = frame.loc[frame.index.intersection(labels.index)]
    if not frames:
        raise DataError(f"{folder}: no modality matrices beside labels.csv")
    split_path = next((folder / f"split{s}" for s in MODALITY_SUFFIXES if (folder / f"split{s}").exists()), None)
    if split_path is not None:
        raw = pd.read_csv(split_path, index_col=0).iloc[:, 0].astype(str).str.strip()
        raw.index = raw.index.map(str)
        bad = sorted(set(raw.unique()) - {"train", "val", "test"})
        if bad:
            raise DataError(f"{split_path}: split values must be train/val/test, found {bad}")
        split = raw.reindex(labels.index).fillna("train")
    else:
        idx = np.arange(len(labels))
        tr, rest = _split(idx, labels.to_numpy(), 0.3, seed)
        va, te = _split(rest, labels.to_numpy()[rest], 2 / 3, seed)
        values = np.empty(len(labels), dtype=object)
        values[tr], values[va], values[te] = "train", "val", "test"
        split = pd.Series(values, index=labels.index)
    return RawSite(name or folder.name, folder, labels, split, frames)

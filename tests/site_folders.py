"""A deployed site's prepared data folder written from the generated cohort (labels.csv and one table per modality,
no split.csv) and the consortium manifest that describes it, for tests of what a deployed site does."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from magnet_core.cohort.generated import generated_cohort
from magnet_core.cohort.manifest import ConsortiumManifest, ModalitySpec


def generated_site(folder: Path, manifest_path: Path, n: int, seed: int = 0) -> Path:
    """Write ``n`` generated patients into ``folder`` and their manifest to ``manifest_path`` (returned)."""
    cohort = generated_cohort("default", n=n, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    ids = pd.Index(cohort.sample_ids, name="sampleID")
    pd.DataFrame({"Class": cohort.labels}, index=ids).to_csv(folder / "labels.csv")
    specs = []
    for j, m in enumerate(cohort.modalities):
        has = cohort.mask[:, j]
        pd.DataFrame(cohort.X[m][has], index=ids[has], columns=cohort.features[m]).to_csv(folder / f"{m}.csv")
        specs.append(ModalitySpec(name=m, features=list(cohort.features[m])))
    return ConsortiumManifest(name="gen", classes=["a", "b"], modalities=specs).save(manifest_path)

"""Enrolment: a site's patient counts go into the manifest, and the coordinator bounds its replies by them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import tomllib

from magnet_core.cohort.manifest import ConsortiumManifest, ModalitySpec
from magnet_core.protocol.enrolment import Enrolment, check_train_against
from magnet_core.protocol.messages import TrainReply
from simulations.cli import main


def test_validate_site_prints_an_enrolment_entry_the_server_bounds_replies_by(tmp_path, data_root, capsys):
    root = data_root / "tcga-brca-mixomics"
    labels = pd.read_csv(root / "labels.csv", index_col=0)
    part = sorted(np.random.default_rng(1).permutation(labels.index)[:150])
    site = tmp_path / "site"
    site.mkdir()
    labels.loc[part].to_csv(site / "labels.csv")
    mods = {m: pd.read_csv(root / f"{m}.csv.gz", index_col=0) for m in ("mRNA", "miRNA")}
    for m, df in mods.items():
        df.loc[df.index.intersection(part[: 120 if m == "mRNA" else 150])].to_csv(site / f"{m}.csv.gz")
    manifest = ConsortiumManifest(name="brca", classes=["Basal", "Her2", "LumA"],
                                  modalities=[ModalitySpec(name=m, features=list(df.columns))
                                              for m, df in mods.items()])
    path = manifest.save(tmp_path / "manifest.toml")
    assert main(["validate-site", str(site), "--manifest", str(path), "--enrol", "hospital-a"]) == 0
    out = capsys.readouterr().out
    entry = tomllib.loads(out[out.index("[sites.hospital-a]"):])
    facts = entry["sites"]["hospital-a"]
    assert facts["train"] + facts["test"] == 150  # bounds hold for any seed: patients holding m, capped by train
    assert facts["modalities"] == {"mRNA": min(120, facts["train"]), "miRNA": facts["train"]}

    enrolled = ConsortiumManifest.model_validate({**manifest.model_dump(), **entry})
    bounds = Enrolment(sites=enrolled.sites).sites["hospital-a"]
    honest = TrainReply(site="hospital-a", num_examples=facts["train"],
                        modality_counts={"mRNA": 100, "miRNA": facts["train"]})
    assert check_train_against(honest, bounds) == []
    inflated = TrainReply(site="hospital-a", num_examples=10 * facts["train"],
                          modality_counts={"mRNA": 100, "miRNA": 10 * facts["train"]})
    assert any("exceeds" in p for p in check_train_against(inflated, bounds))
    assert main(["validate-site", str(site), "--manifest", str(path), "--enrol", "bad name!"]) == 2

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


def test_enrolment_counts_the_training_patients_of_the_sites_own_split(tmp_path, capsys):
    """A site without split.csv trains on its policy's split (client/handlers.py own_split): --policy enrols the
    training size of that split, so the coordinator does not reject the site's honest replies as inflated."""
    from site_folders import generated_site

    from client.policy import template

    site = tmp_path / "site"
    path = generated_site(site, tmp_path / "manifest.toml", 80)
    policy = tmp_path / "policy.toml"
    policy.write_text(template("gen").replace("split_ratios = [0.7, 0.1, 0.2]", "split_ratios = [0.8, 0.1, 0.1]"))

    def trained(*extra) -> int:
        assert main(["validate-site", str(site), "--manifest", str(path), "--enrol", "h", *extra]) == 0
        out = capsys.readouterr().out
        return tomllib.loads(out[out.index("[sites.h]"):])["sites"]["h"]["train"]

    from client.handlers import forget_sites, site_for
    from magnet_core.protocol.messages import RoundConfig

    forget_sites()
    cfg = RoundConfig(server_round=1, seed=3, preset="ov", local_epochs=1, histogram_bins=10)
    node = {"data-dir": str(site), "manifest": str(path), "site-policy": str(policy)}
    assert trained("--policy", str(policy)) == site_for(cfg, node, 0).train.n > trained()
    forget_sites()

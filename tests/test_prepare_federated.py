"""Federated preparation through the ServerApp/ClientApp protocol: in-process, deployment-style and with Flower."""

from __future__ import annotations

import gzip
import json
import sys

import numpy as np
import pandas as pd
import pytest

from magnet_core.site_validation import load_site_cohort, validate_site
from magnet_core.data import DataError
from magnet_core.manifest import ConsortiumManifest
from magnet_core.preprocess import STAT_FIELDS, PrepareConfig, load_raw_site_dir, prepare_pooled_decisions
from simulations.engine import InProcessGrid
from simulations.prepare_federated import make_run, run_flower, run_inprocess, site_specs, write_simulated_sites

QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def mixomics_sites(data_root, tmp_path_factory):
    return write_simulated_sites(data_root / "tcga-brca-mixomics", tmp_path_factory.mktemp("mixomics"), 3,
                                 transpose=(2, "mRNA"))


@pytest.fixture(scope="module")
def rjive_lacking(data_root, tmp_path_factory):
    """rjive dealt to 3 sites; site1 lacks the first 5 mRNA features; 2% of cells blank."""
    return write_simulated_sites(data_root / "tcga-brca-rjive", tmp_path_factory.mktemp("rjive"), 3,
                                 lacking=(1, "mRNA", 5), missing_cells=0.02)


def _read(path):
    return gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()


def test_protocol_sends_only_statistics_and_matches_the_pooled_decisions(mixomics_sites, tmp_path, monkeypatch):
    replies = []
    push = InProcessGrid.push_messages

    def recording_push(self, messages):
        ids = push(self, messages)
        replies.extend(self._replies[i] for i in ids)
        return ids

    monkeypatch.setattr(InProcessGrid, "push_messages", recording_push)
    cfg = PrepareConfig(n_features=50)
    summary = run_inprocess(make_run(site_specs(mixomics_sites, tmp_path), tmp_path, cfg))
    assert summary["status"] == "ok" and not summary["refused"]
    # every array a site sent is a per-class or per-feature statistic: no patient-level row leaves a site
    stats_replies = [r for r in replies if "stats" in r.content]
    assert len(stats_replies) == 3
    for r in stats_replies:
        for key, arr in r.content["stats"].items():
            m, field = key.split("/")
            d = len(r.content["features"][m])
            assert field in STAT_FIELDS and arr.numpy().shape in {(3,), (3, d), (d,)}
    # the server's decision is the one made from all sites' statistics in one process
    sites = [load_raw_site_dir(d, cfg, **QUIET) for d in mixomics_sites]
    expected, _, _ = prepare_pooled_decisions(sites, cfg)
    manifest = ConsortiumManifest.load(tmp_path / "manifest.toml")
    assert manifest == expected
    for m in manifest.modalities:
        table = pd.read_csv(tmp_path / "decisions" / f"{m.name}.csv", index_col=0)
        assert table.index[table["selected"]].tolist() == m.features
    # each prepared folder passes site validation and loads in manifest order, with the split it was prepared on
    for site, info in zip(sites, summary["sites"]):
        folder = tmp_path / site.name
        report, _ = validate_site(folder, manifest)
        assert report.ok, report.errors
        cohort = load_site_cohort(folder, manifest, seed=10)
        assert cohort.features == {m.name: m.features for m in manifest.modalities}
        assert dict(zip(cohort.sample_ids, cohort.split)) == site.split.to_dict()
        assert info["training_patients"] == len(site.train_ids)
        assert info["prepared"]["mRNA"]["cells_outside_0_1"]["training"] == 0


def test_missing_feature_is_imputed_or_refused_as_the_manifest_says(rjive_lacking, tmp_path):
    lacking = list(pd.read_csv(rjive_lacking[0] / "mRNA.csv.gz", index_col=0, nrows=1).columns[:5])
    # default 10% rule: features absent at a whole site (a third of the patients) are dropped for everyone
    strict = run_inprocess(make_run(site_specs(rjive_lacking, tmp_path / "strict"), tmp_path / "strict",
                                    PrepareConfig(n_features=1000)))
    kept = ConsortiumManifest.load(tmp_path / "strict" / "manifest.toml").modality("mRNA").features
    assert not set(lacking) & set(kept) and strict["modalities"]["mRNA"]["dropped_missing"] == 5
    # a looser rule keeps them; the lacking site fills them with the consortium mean, and says so
    cfg = PrepareConfig(n_features=1000, max_missing_fraction=0.5, missing_feature="impute")
    loose = run_inprocess(make_run(site_specs(rjive_lacking, tmp_path / "loose"), tmp_path / "loose", cfg))
    site1 = next(s for s in loose["sites"] if s["site"] == "site1")
    assert site1["prepared"]["mRNA"]["lacking_features"] == lacking
    manifest = ConsortiumManifest.load(tmp_path / "loose" / "manifest.toml")
    spec = manifest.modality("mRNA")
    prepared = pd.read_csv(tmp_path / "loose" / "site1" / "mRNA.csv.gz", index_col=0)
    j = spec.features.index(lacking[0])
    scaled_mean = (spec.impute_means[j] - spec.scale_min[j]) / (spec.scale_max[j] - spec.scale_min[j])
    np.testing.assert_allclose(prepared[lacking[0]], scaled_mean, rtol=1e-6)
    assert manifest.missing_feature == "impute"
    # "error": that site refuses (reported, nothing written), the others are prepared, the run is incomplete
    cfg = cfg.model_copy(update={"missing_feature": "error"})
    refused = run_inprocess(make_run(site_specs(rjive_lacking, tmp_path / "refuse"), tmp_path / "refuse", cfg))
    assert refused["status"] == "incomplete" and list(refused["refused"]) == ["site1"]
    assert "lacks 5 consortium feature(s)" in refused["refused"]["site1"]
    assert not (tmp_path / "refuse" / "site1").exists() and (tmp_path / "refuse" / "site0" / "mRNA.csv.gz").exists()
    assert json.loads((tmp_path / "refuse" / "prepare_report.json").read_text())["status"] == "incomplete"


def test_one_class_site_is_fine_in_a_consortium_but_not_alone(mixomics_sites, tmp_path):
    labels = pd.read_csv(mixomics_sites[0] / "labels.csv", index_col=0)
    one = tmp_path / "one"
    one.mkdir()
    labels[labels["Class"] == 2].to_csv(one / "labels.csv")
    for p in mixomics_sites[0].iterdir():
        if p.name != "labels.csv":
            (one / p.name).write_bytes(p.read_bytes())
    cfg = PrepareConfig(n_features=20, class_names=["Basal", "Her2", "LumA"])
    with pytest.raises(DataError, match="single class .* ANOVA F test is undefined"):
        run_inprocess(make_run(site_specs([one], tmp_path / "alone"), tmp_path / "alone", cfg))
    assert json.loads((tmp_path / "alone" / "prepare_report.json").read_text())["status"] == "failed"
    dirs = [one, *mixomics_sites[1:]]
    summary = run_inprocess(make_run(site_specs(dirs, tmp_path / "together"), tmp_path / "together", cfg))
    assert summary["status"] == "ok"
    manifest = ConsortiumManifest.load(tmp_path / "together" / "manifest.toml")
    assert manifest.classes == ["Basal", "Her2", "LumA"]
    assert validate_site(tmp_path / "together" / "one", manifest)[0].ok


def test_a_site_with_bad_data_stops_the_run_naming_site_and_cell(mixomics_sites, tmp_path):
    bad = tmp_path / "badsite"
    bad.mkdir()
    for p in mixomics_sites[1].iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    frame = pd.read_csv(bad / "miRNA.csv.gz", index_col=0).astype(object)
    frame.iloc[3, 7] = "n/a?"
    frame.to_csv(bad / "miRNA.csv.gz")
    dirs = [mixomics_sites[0], bad]
    with pytest.raises(DataError, match=r"badsite: .*miRNA.csv.gz, line 5 \(sample '[^']+'\), column 9 '[^']+': non-numeric value 'n/a\?'"):
        run_inprocess(make_run(site_specs(dirs, tmp_path / "out"), tmp_path / "out", PrepareConfig(n_features=20)))


def test_deployment_style_sites_read_their_folders_from_node_config(mixomics_sites, tmp_path):
    cfg = PrepareConfig(n_features=30)
    nodes = {i: {"raw-dir": str(d), "prepared-dir": str(tmp_path / "nodes" / f"hospital{i}"),
                 "site-name": f"hospital{i}"} for i, d in enumerate(mixomics_sites)}
    summary = run_inprocess(make_run([], tmp_path / "coordinator", cfg, min_sites=3), node_configs=nodes)
    assert [s["site"] for s in summary["sites"]] == ["hospital0", "hospital1", "hospital2"]
    run_inprocess(make_run(site_specs(mixomics_sites, tmp_path / "sim"), tmp_path / "sim", cfg))
    assert (ConsortiumManifest.load(tmp_path / "coordinator" / "manifest.toml")
            == ConsortiumManifest.load(tmp_path / "sim" / "manifest.toml"))
    assert _read(tmp_path / "nodes" / "hospital2" / "protein.csv.gz") == _read(tmp_path / "sim" / "site2" /
                                                                               "protein.csv.gz")


def test_flower_simulation_with_three_supernodes_equals_in_process(data_root, tmp_path):
    dirs = write_simulated_sites(data_root / "tcga-brca-rjive", tmp_path / "raw", 3, transpose=(2, "mRNA"))
    cfg = PrepareConfig(n_features=100)
    inproc = run_inprocess(make_run(site_specs(dirs, tmp_path / "inproc"), tmp_path / "inproc", cfg))
    flower = run_flower(make_run(site_specs(dirs, tmp_path / "flower"), tmp_path / "flower", cfg))
    print(f"federated preparation through Flower (3 supernodes): {flower['wall_seconds']:.1f} s")
    assert flower["status"] == "ok"
    assert ConsortiumManifest.load(tmp_path / "flower" / "manifest.toml") == ConsortiumManifest.load(
        tmp_path / "inproc" / "manifest.toml")
    files = [p for p in (tmp_path / "inproc").rglob("*") if p.is_file() and p.name != "prepare_report.json"]
    assert len(files) == 1 + 3 + 3 * 5  # manifest + 3 decision tables + 3 sites x (labels, split, 3 modalities)
    for p in files:
        assert _read(p) == _read(tmp_path / "flower" / p.relative_to(tmp_path / "inproc")), p
    assert [s["prepared"]["mRNA"] for s in flower["sites"]] == [s["prepared"]["mRNA"] for s in inproc["sites"]]


def _cli(monkeypatch, *argv):
    from simulations.cli import main

    monkeypatch.setattr(sys, "argv", ["magnet-fl"])
    return main(["prepare", *argv])


def test_cli_one_site_from_explicit_files_with_config_and_overrides(data_root, tmp_path, monkeypatch, capsys):
    src = data_root / "tcga-brca-mixomics"
    (tmp_path / "prep.toml").write_text('n_features = 20\nvariance_threshold = { mRNA = 0.03 }\nname = "brca"\n')
    rc = _cli(monkeypatch, "--labels", str(src / "labels.csv"), "--modality", f"mRNA={src / 'mRNA.csv.gz'}",
              "--modality", f"protein={src / 'protein.csv.gz'}", "--split-file", str(src / "split.csv"),
              "--site-name", "hospitalA", "--config", str(tmp_path / "prep.toml"), "--n-features", "30",
              "--classes", "Basal,Her2,LumA", "--out", str(tmp_path / "out"))
    assert rc == 0
    manifest = ConsortiumManifest.load(tmp_path / "out" / "manifest.toml")
    assert manifest.name == "brca" and [len(m.features) for m in manifest.modalities] == [30, 30]
    assert manifest.classes == ["Basal", "Her2", "LumA"]
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert report["modalities"]["mRNA"]["dropped_variance"] > 0 and report["sites"][0]["training_patients"] == 150
    assert "hospitalA: 220 patients (150 training)" in capsys.readouterr().out
    assert _cli(monkeypatch, "--out", str(tmp_path / "none")) == 2
    assert "no site" in capsys.readouterr().err
    assert _cli(monkeypatch, "--labels", str(src / "labels.csv"), "--modality", f"mRNA={src / 'mRNA.csv.gz'}",
                "--orientation", "features-x-samples", "--out", str(tmp_path / "bad")) == 2
    assert "wrong orientation" in capsys.readouterr().err

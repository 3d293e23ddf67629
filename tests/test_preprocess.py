"""Federated preprocessing: sufficient statistics add up to pooled ones, F equals f_classif, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.feature_selection import SelectKBest, f_classif

from client.prepare_site import load_raw_site
from magnet_core.data import DataError, load_cohort_dir
from magnet_core.manifest import ConsortiumManifest
from magnet_core.preprocess import (
    PrepareConfig, anova_f, apply_preparation, combine_stats, compute_stats, derive_preparation, read_raw_matrix,
)
from server.prepare_config import PrepareRunConfig


def _split_into_sites(root, out, n_sites=3, seed=0, lacking=None, transpose=None):
    """Write ``n_sites`` raw site folders from a real cohort (optionally one site lacking features / transposed)."""
    labels = pd.read_csv(root / "labels.csv", index_col=0)
    mods = {p.name.split(".")[0]: pd.read_csv(p, index_col=0) for p in sorted(root.glob("*.csv.gz"))}
    ids = np.random.default_rng(seed).permutation(labels.index)
    dirs = []
    for s, part in enumerate(np.array_split(ids, n_sites)):
        d = out / f"site{s}"
        d.mkdir(parents=True)
        labels.loc[sorted(part)].to_csv(d / "labels.csv")
        for m, df in mods.items():
            sub = df.loc[df.index.intersection(part)]
            if lacking and lacking[0] == s and lacking[1] == m:
                sub = sub.drop(columns=sub.columns[:5])
            if transpose and transpose == (s, m):
                sub = sub.T
            sub.to_csv(d / f"{m}.csv.gz")
        dirs.append(d)
    return dirs


@pytest.mark.parametrize("dataset", ["tcga-brca-rjive", "tcga-brca-mixomics"])
def test_federated_statistics_equal_pooled_and_f_equals_f_classif(data_root, tmp_path, dataset):
    dirs = _split_into_sites(data_root / dataset, tmp_path, transpose=(2, "mRNA"))
    sites = [load_raw_site(d, seed=10) for d in dirs]
    num_classes = int(max(s.labels.max() for s in sites)) + 1
    cfg = PrepareConfig(n_features=100)
    for m in sites[0].frames:
        per_site = [s.stats(num_classes)[m] for s in sites if m in s.frames]
        combined = combine_stats(per_site)
        pooled_frame = pd.concat([s.frames[m].loc[s.frames[m].index.intersection(s.train_ids)] for s in sites])
        pooled_y = pd.concat([s.labels for s in sites]).loc[pooled_frame.index].to_numpy()
        pooled = compute_stats(pooled_frame[combined.features], pooled_y, num_classes)
        for field in ("n_per_class", "count", "total", "total_sq", "minimum", "maximum"):
            np.testing.assert_allclose(getattr(combined, field), getattr(pooled, field), rtol=1e-10, atol=1e-8)
        prep = derive_preparation(combined, cfg, m)
        # the pooled pipeline on the training patients: impute with the mean, min-max scale, f_classif, top-k
        x = pooled_frame[combined.features]
        x = x.fillna(x.mean())
        scaled = (x - x.min()) / (x.max() - x.min()).replace(0, 1)
        keep = pooled_frame[combined.features].isna().mean() <= cfg.max_missing_fraction
        f_sk, _ = f_classif(scaled.loc[:, keep.values], pooled_y)
        f_ours = anova_f(combined.n_per_class,
                         combined.total + (combined.n_per_class[:, None] - combined.count) * prep_means(combined),
                         combined.total_sq + (combined.n_per_class[:, None] - combined.count) * prep_means(combined) ** 2)
        span = np.where(combined.maximum > combined.minimum, combined.maximum - combined.minimum, 1)
        assert np.allclose(f_ours[keep.values], f_sk, rtol=1e-6, equal_nan=True)  # F is invariant to scaling
        assert np.all(span > 0)
        selector = SelectKBest(f_classif, k=min(100, int(keep.sum()))).fit(scaled.loc[:, keep.values], pooled_y)
        assert set(prep.features) == set(scaled.columns[keep.values][selector.get_support()])


def prep_means(stats):
    observed = stats.count.sum(axis=0)
    return np.divide(stats.total.sum(axis=0), observed, out=np.zeros_like(observed), where=observed > 0)


def test_test_patients_never_contribute(data_root, tmp_path):
    (d,) = _split_into_sites(data_root / "tcga-brca-mixomics", tmp_path, n_sites=1)
    site = load_raw_site(d, seed=10)
    before = site.stats(3)["mRNA"]
    test_ids = site.split.index[site.split == "test"]
    site.frames["mRNA"].loc[site.frames["mRNA"].index.intersection(test_ids)] = 1e9
    after = site.stats(3)["mRNA"]
    np.testing.assert_array_equal(before.total, after.total)
    np.testing.assert_array_equal(before.maximum, after.maximum)


def _run(dirs, out, federated=False, **kw):
    from simulations.prepare_cli import run_prepare

    kw.setdefault("n_features", 50)
    cfg = PrepareRunConfig(site_dirs=",".join(map(str, dirs)), out_dir=str(out), **kw)
    return run_prepare(cfg, len(dirs), federated=federated)


def test_missing_feature_handled_as_the_manifest_says(data_root, tmp_path):
    dirs = _split_into_sites(data_root / "tcga-brca-mixomics", tmp_path / "raw", lacking=(1, "mRNA"))
    # with the default 10% rule the 5 features missing at one site (a third of patients) are dropped
    summary = _run(dirs, tmp_path / "strict")
    manifest = ConsortiumManifest.load(tmp_path / "strict" / "manifest.toml")
    lacking = list(pd.read_csv(dirs[0] / "mRNA.csv.gz", index_col=0, nrows=1).columns[:5])
    assert not set(lacking) & set(manifest.modality("mRNA").features)
    # with a looser rule they are kept; site1 fills them with the consortium mean and it is reported
    summary = _run(dirs, tmp_path / "loose", max_missing_fraction=0.5, n_features=200)
    site1 = next(s for s in summary["sites"] if s["site"] == "site1")
    assert set(site1["modalities"]["mRNA"]["lacking_features_imputed"]) == set(lacking)
    with pytest.raises(DataError, match="lacks 5 consortium feature"):
        _run(dirs, tmp_path / "refuse", max_missing_fraction=0.5, n_features=200, missing_feature="error")


def test_prepared_sites_load_as_cohorts_in_manifest_order_and_flower_run_matches(data_root, tmp_path):
    dirs = _split_into_sites(data_root / "tcga-brca-mixomics", tmp_path / "raw")
    _run(dirs, tmp_path / "inproc")
    _run(dirs, tmp_path / "flower", federated=True)
    a = ConsortiumManifest.load(tmp_path / "inproc" / "manifest.toml")
    b = ConsortiumManifest.load(tmp_path / "flower" / "manifest.toml")
    assert a == b
    cohort = load_cohort_dir(tmp_path / "inproc" / "site0", log=lambda *x: None)
    for m in cohort.modalities:
        assert cohort.features[m] == a.modality(m).features
    report = json.loads((tmp_path / "flower" / "prepare_report.json").read_text())
    assert {s["site"] for s in report["sites"]} == {"site0", "site1", "site2"}


def test_bad_raw_inputs(tmp_path):
    labels = ["s1", "s2", "s3"]
    good = pd.DataFrame({"g1": [1.0, 2.0, np.nan], "g2": [3.0, 4.0, 5.0]}, index=labels)
    good.to_csv(tmp_path / "ok.csv")
    assert read_raw_matrix(tmp_path / "ok.csv", labels).shape == (3, 2)
    good.T.to_csv(tmp_path / "t.csv")
    assert read_raw_matrix(tmp_path / "t.csv", labels).shape == (3, 2)  # auto orientation
    with pytest.raises(DataError, match="wrong orientation"):
        read_raw_matrix(tmp_path / "t.csv", labels, "samples-x-features")
    with pytest.raises(DataError, match="neither its row ids nor its column names"):
        read_raw_matrix(tmp_path / "ok.csv", ["x", "y"])
    (tmp_path / "dup.csv").write_text("id,g1,g1\ns1,1,2\ns2,3,4\n")
    with pytest.raises(DataError, match="duplicate feature names: g1"):
        read_raw_matrix(tmp_path / "dup.csv", labels)
    (tmp_path / "txt.csv").write_text("id,g1,g2\ns1,1,2\ns2,high,4\n")
    with pytest.raises(DataError, match="non-numeric value 'high' at sample 's2', feature 'g1'"):
        read_raw_matrix(tmp_path / "txt.csv", labels)


def test_single_class_site_alone_is_refused_but_fine_in_a_consortium():
    frame = pd.DataFrame(np.random.default_rng(0).random((6, 4)), columns=list("abcd"))
    one_class = compute_stats(frame, np.zeros(6, dtype=int), 2)
    with pytest.raises(DataError, match="single class"):
        derive_preparation(one_class, PrepareConfig(n_features=2), "mRNA")
    other = compute_stats(frame * 2, np.ones(6, dtype=int), 2)
    prep = derive_preparation(combine_stats([one_class, other]), PrepareConfig(n_features=2), "mRNA")
    assert len(prep.features) == 2
    prepared, lacking = apply_preparation(frame, prep)
    assert lacking == [] and prepared.shape == (6, 2)

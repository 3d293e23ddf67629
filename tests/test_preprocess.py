"""Preprocessing from sufficient statistics: each step against pandas/sklearn, every bad input, real cohorts."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest
from sklearn.feature_selection import SelectKBest, f_classif

from magnet_core.cohort.data import DataError, load_cohort_dir, stratified_split
from magnet_core.cohort.manifest import ConsortiumManifest
from magnet_core.cohort.preprocess import (
    STAT_FIELDS,
    FeatureStats,
    ModalityPrep,
    PrepareConfig,
    anova_f,
    apply_manifest,
    apply_preparation,
    assemble_site,
    combine_sites,
    combine_stats,
    compute_stats,
    derive_preparation,
    imputed_class_sums,
    load_raw_site_dir,
    prepare_pooled_decisions,
    read_raw_matrix,
    read_site_labels,
    read_split_file,
    select_top_k,
    site_statistics,
    write_prepared_site,
)
from simulations.prepare_federated import compare_with_pooled, write_simulated_sites

QUIET = {"log": lambda *_: None}


def _frame(n=30, d=6, seed=0, missing=0.0, index=None):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, d) + rng.uniform(-5, 20, d)
    if missing:
        x[rng.random(x.shape) < missing] = np.nan
    return pd.DataFrame(x, index=index or [f"p{i:03d}" for i in range(n)], columns=[f"g{j}" for j in range(d)])


def _assert_stats_close(a: FeatureStats, b: FeatureStats):
    assert a.features == b.features
    for f in STAT_FIELDS:
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=1e-12, atol=1e-9, err_msg=f)


# ----------------------------------------------------------------------------------------------- reading


def test_either_orientation_reads_the_same_matrix(tmp_path):
    frame = _frame(5, 3, missing=0.2)
    frame.rename_axis("sampleID").to_csv(tmp_path / "rows.csv")
    frame.T.rename_axis("gene").to_csv(tmp_path / "cols.tsv.gz", sep="\t")  # as UCSC Xena ships matrices
    ids = list(frame.index)
    a = read_raw_matrix(tmp_path / "rows.csv", ids)
    b = read_raw_matrix(tmp_path / "cols.tsv.gz", ids)
    assert (a.attrs["orientation"], b.attrs["orientation"]) == ("samples-x-features", "features-x-samples")
    pd.testing.assert_frame_equal(a, b, check_like=False)
    np.testing.assert_array_equal(np.isnan(a.to_numpy()), frame.isna().to_numpy())  # NaN = missing cell, kept


def test_wrong_orientation_and_unmatched_ids_are_clear_errors(tmp_path):
    frame = _frame(4, 3)
    frame.to_csv(tmp_path / "rows.csv")
    frame.T.to_csv(tmp_path / "cols.csv")
    ids = list(frame.index)
    with pytest.raises(DataError, match=r"cols.csv: wrong orientation: .* the file is features x samples"):
        read_raw_matrix(tmp_path / "cols.csv", ids, "samples-x-features")
    with pytest.raises(DataError, match=r"rows.csv: wrong orientation: .* the file is samples x features"):
        read_raw_matrix(tmp_path / "rows.csv", ids, "features-x-samples")
    with pytest.raises(DataError, match="neither its row ids nor its column names match the labelled samples"):
        read_raw_matrix(tmp_path / "rows.csv", ["x1", "x2"])


@pytest.mark.parametrize("text, orientation, match", [
    ("id,g1,g1\np1,1,2\np2,3,4\n", "auto", "duplicate feature names \\(1\\): g1"),
    ("id,p1,p2\ng1,1,2\ng1,3,4\n", "auto", "duplicate feature names \\(1\\): g1"),  # features x samples
    ("id,g1,g2\np1,1,2\np1,3,4\n", "auto", "duplicate sample ids \\(1\\): p1"),
    ("id,p1,p1\ng1,1,2\ng2,3,4\n", "auto", "duplicate sample ids \\(1\\): p1"),
    ("id,g1,g2\np1,1,2\np2,high,4\n", "auto",
     "line 3 \\(sample 'p2'\\), column 2 'g1': non-numeric value 'high'; missing values must be empty or NA"),
    ("id,p1,p2\ng1,1,2\ng2,3,high\n", "auto",
     "line 3 \\(feature 'g2'\\), column 3 'p2': non-numeric value 'high'"),
    ("id,g1,g2\np1,1,inf\np2,3,4\n", "auto", "line 2 \\(sample 'p1'\\), column 3 'g2': non-finite \\(inf\\) value"),
    ("id,g1,g2\np1,1,1e300\np2,3,4\n", "auto", "column 3 'g2': too large for float32: value 1e\\+300"),
    ("id,g1,g2\np1,1,2\np2,3\n", "auto", "m.csv, line 3: 2 cells where the other rows have 3 \\(a truncated or ragged row"),  # noqa: E501 (one assertion string)
    ("id,g1,g2\np1,1,2,3,4\np2,3,4,5,6\n", "auto", "header has 3 cells but the rows have 5"),
    ("id,g1,g2\np1,1,2\np2,3,4,5,6\n", "auto", "cannot be read as a table"),
    ("id,g1,\np1,1,2\np2,3,4\n", "auto", "empty name in header cell 3"),
])
def test_bad_raw_matrices_are_named(tmp_path, text, orientation, match):
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(DataError, match=match) as err:
        read_raw_matrix(tmp_path / "m.csv", ["p1", "p2"], orientation)
    assert "m.csv" in str(err.value)


def test_missing_cells_are_allowed_as_empty_or_na(tmp_path):
    (tmp_path / "m.csv").write_text("id,g1,g2\np1,1,NA\np2,,4\np3,2,5\n")
    x = read_raw_matrix(tmp_path / "m.csv", ["p1", "p2", "p3"])
    assert x.isna().to_numpy().tolist() == [[False, True], [True, False], [False, False]]


def test_labels_text_classes_empty_labels_and_split_file(tmp_path):
    (tmp_path / "labels.csv").write_text("sampleID,PAM50\na,LumA\nb,Basal\nc,\nd,LumA\n")
    notes = []
    y = read_site_labels(tmp_path / "labels.csv", "PAM50", ["Basal", "LumA"], log=notes.append)
    assert y.to_dict() == {"a": 1, "b": 0, "d": 1} and "1 sample(s) without a label" in notes[0]
    with pytest.raises(DataError, match="label 'LumA' of sample 'a' is not one of the classes \\['Basal', 'Her2'\\]"):
        read_site_labels(tmp_path / "labels.csv", "PAM50", ["Basal", "Her2"], **QUIET)
    with pytest.raises(DataError, match="is not a class index 0..C-1 .*give class names"):
        read_site_labels(tmp_path / "labels.csv", "PAM50", **QUIET)
    (tmp_path / "split.csv").write_text("sampleID,split\na,train\nb,holdout\n")
    with pytest.raises(DataError, match="split 'holdout' of sample 'b' is not one of"):
        read_split_file(tmp_path / "split.csv")


def _site_dir(tmp_path, n=40, classes=2, seed=0, split=None):
    rng = np.random.default_rng(seed)
    ids = [f"p{i:03d}" for i in range(n)]
    y = pd.Series(np.arange(n) % classes, index=ids)
    y.rename("Class").rename_axis("sampleID").to_csv(tmp_path / "labels.csv")
    a = _frame(n, 5, seed, index=ids)
    a.iloc[: n // 8] = np.nan  # these patients lack modality a (all cells empty)
    a.to_csv(tmp_path / "a.csv")
    _frame(n, 4, seed + 1, index=ids).drop(index=ids[-3:]).T.to_csv(tmp_path / "b.tsv", sep="\t")
    if split is not None:
        pd.Series(split, index=ids, name="split").rename_axis("sampleID").to_csv(tmp_path / "split.csv")
    return tmp_path, ids, rng


def test_site_split_is_the_one_training_will_use_and_patients_without_data_are_dropped(tmp_path):
    folder, ids, _ = _site_dir(tmp_path)
    notes = []
    site = load_raw_site_dir(folder, PrepareConfig(seed=20), log=notes.append)
    assert len(site.frames["a"]) == 35 and len(site.frames["b"]) == 37 and len(site.labels) == 40
    assert any("5 sample(s) have no value at all and count as lacking a" in n for n in notes)
    assert any("b.tsv is features x samples" in n for n in notes)
    manifest, _, _ = prepare_pooled_decisions([site], PrepareConfig(seed=20))
    frames, _ = apply_manifest(site, manifest)
    out = write_prepared_site(tmp_path / "prepared", site, frames)
    cohort = stratified_split(load_cohort_dir(out, **QUIET), seed=20)  # what training does with the folder
    assert dict(zip(cohort.sample_ids, cohort.split)) == site.split.to_dict()


def test_split_file_must_cover_every_patient(tmp_path):
    folder, ids, _ = _site_dir(tmp_path, split=["train"] * 30 + ["test"] * 10)
    site = load_raw_site_dir(folder, PrepareConfig(), **QUIET)
    assert (site.split == "test").sum() == 10
    pd.Series(["train"] * 39, index=ids[:39], name="split").rename_axis("sampleID").to_csv(folder / "split.csv")
    with pytest.raises(DataError, match="split.csv: no split for 1 patient"):
        load_raw_site_dir(folder, PrepareConfig(), **QUIET)


# ----------------------------------------------------------------------------------------------- statistics


def test_statistics_are_the_sums_they_claim():
    x = _frame(50, 7, missing=0.15)
    y = np.arange(50) % 3
    st = compute_stats(x, y, 4)  # class 3 has no patient
    v = x.to_numpy()
    for c in range(4):
        rows = v[y == c]
        np.testing.assert_array_equal(st.count[c], (~np.isnan(rows)).sum(0))
        np.testing.assert_allclose(st.total[c], np.nansum(rows, 0), rtol=1e-13)
        np.testing.assert_allclose(st.total_sq[c], np.nansum(rows**2, 0), rtol=1e-13)
    np.testing.assert_array_equal(st.minimum, np.nanmin(v, 0))
    np.testing.assert_array_equal(st.maximum, np.nanmax(v, 0))
    assert st.n_per_class.tolist() == [17, 17, 16, 0]


def test_test_patients_never_contribute(tmp_path):
    folder, ids, _ = _site_dir(tmp_path, n=60)
    site = load_raw_site_dir(folder, PrepareConfig(), **QUIET)
    before = site_statistics(site)
    test = site.split.index[site.split == "test"]
    assert len(test) > 0
    for m in site.frames:  # an extreme test patient would move min/max and the means if it leaked
        site.frames[m].loc[site.frames[m].index.isin(test)] = 1e9
    after = site_statistics(site)
    for m in before:
        _assert_stats_close(before[m], after[m])
    rows = site.frames["a"].loc[site.frames["a"].index.isin(site.train_ids)]
    np.testing.assert_array_equal(after["a"].maximum, rows.max().to_numpy())


def test_combining_sites_equals_pooling_and_is_associative():
    rng = np.random.default_rng(3)
    pooled = _frame(90, 8, seed=4, missing=0.1)
    y = rng.integers(0, 3, 90)
    parts = [(pooled.iloc[:30], y[:30]), (pooled.iloc[30:55], y[30:55]), (pooled.iloc[55:], y[55:])]
    parts[1] = (parts[1][0].drop(columns=["g2", "g5"]), parts[1][1])  # a site lacking two features
    parts[2] = (parts[2][0][parts[2][1] != 2], parts[2][1][parts[2][1] != 2])  # a site without class 2
    stats = [compute_stats(f, c, 3 if i != 2 else 2) for i, (f, c) in enumerate(parts)]
    combined = combine_stats(stats)
    kept = pd.concat([parts[0][0], parts[1][0], parts[2][0]])[list(pooled.columns)]
    ref = compute_stats(kept, np.concatenate([p[1] for p in parts]), 3)
    _assert_stats_close(combined, ref)  # the lacking features count as missing cells of that site's patients
    _assert_stats_close(combine_stats([combine_stats(stats[:2]), stats[2]]),
                        combine_stats([stats[0], combine_stats(stats[1:])]))
    by_site = combine_sites([{"m": stats[0]}, {"m": stats[1], "other": stats[1]}])
    assert list(by_site) == ["m", "other"] and by_site["other"].n == stats[1].n


def test_inconsistent_statistics_from_a_site_are_refused():
    st = compute_stats(_frame(10, 3), np.arange(10) % 2, 2).to_arrays()
    assert FeatureStats.from_arrays(["g0", "g1", "g2"], st).n == 10
    with pytest.raises(DataError, match="count has shape"):
        FeatureStats.from_arrays(["g0", "g1"], st, "site A")
    bad = dict(st, count=st["count"] + 100)
    with pytest.raises(DataError, match="site A: counts are negative or exceed"):
        FeatureStats.from_arrays(["g0", "g1", "g2"], bad, "site A")


# ----------------------------------------------------------------------------------------------- decisions


def test_f_equals_sklearn_f_classif_on_pooled_imputed_training_patients():
    x = _frame(120, 12, seed=7, missing=0.05)
    y = np.random.default_rng(8).integers(0, 4, 120)
    x.iloc[:, 3] += y * 0.8  # one informative feature
    sites = [compute_stats(x.iloc[i::3], y[i::3], 4) for i in range(3)]
    st = combine_stats(sites)
    means = x.mean().to_numpy()
    f_ours = anova_f(st.n_per_class, *imputed_class_sums(st, means))
    f_sk, _ = f_classif(x.fillna(x.mean()).to_numpy(), y)
    np.testing.assert_allclose(f_ours, f_sk, rtol=1e-10)
    scaled = (x.fillna(x.mean()) - x.min()) / (x.max() - x.min())
    np.testing.assert_allclose(f_ours, f_classif(scaled.to_numpy(), y)[0], rtol=1e-9)  # invariant to scaling
    assert np.argmax(f_ours) == 3


def test_derived_decisions_equal_the_pooled_sklearn_pipeline():
    x = _frame(150, 40, seed=11)
    x.iloc[::20, :4] = np.nan  # 5% missing: imputed
    x.iloc[:30, 5] = np.nan  # 20% missing: dropped
    x.iloc[:15, 6] = np.nan  # exactly 10% missing: kept
    x["g7"] = 3.0  # constant: dropped
    x["g8"] = np.where(np.arange(150) % 50 == 0, 1.0, 0.0)  # scaled variance 0.02 - 0.0004: below 0.02
    y = np.arange(150) % 3
    cfg = PrepareConfig(n_features=10, variance_threshold={"m": 0.02})
    prep = derive_preparation(combine_stats([compute_stats(x.iloc[i::2], y[i::2], 3) for i in range(2)]), cfg, "m")
    t = prep.table
    assert not t.loc["g5", "kept_missing"] and t.loc["g6", "kept_missing"] and t.loc["g0", "kept_missing"]
    assert not t.loc["g7", "kept_variance"] and not t.loc["g8", "kept_variance"]
    keep = x.isna().mean() <= 0.1
    imputed = x.loc[:, keep].fillna(x.loc[:, keep].mean())
    scaled = (imputed - imputed.min()) / (imputed.max() - imputed.min())
    var = scaled.var(ddof=1)  # pandas, as MAGNET
    passing = (var >= 0.02) & (imputed.max() > imputed.min())
    assert (prep.dropped_missing, prep.dropped_variance) == (int((~keep).sum()), int((~passing).sum()))
    scaled = scaled.loc[:, passing]
    expected = scaled.columns[SelectKBest(f_classif, k=10).fit(scaled.to_numpy(), y).get_support()]
    assert prep.features == list(expected)
    np.testing.assert_allclose(prep.impute_means, x[prep.features].mean().to_numpy(), rtol=1e-12)
    np.testing.assert_array_equal(prep.scale_min, x[prep.features].min().to_numpy())
    np.testing.assert_array_equal(prep.scale_max, x[prep.features].max().to_numpy())
    np.testing.assert_allclose(t.loc[var.index[passing], "variance"], var[passing], rtol=1e-9)
    np.testing.assert_allclose(t.loc[scaled.columns, "f"], f_classif(scaled.to_numpy(), y)[0], rtol=1e-9)


def test_top_k_ties_and_nan_like_select_k_best():
    scores = np.array([3.0, np.nan, 5.0, 3.0, 3.0, 1.0])
    x = np.random.default_rng(0).random((6, 6))

    class Fixed(SelectKBest):
        def _get_support_mask(self):
            self.scores_ = scores
            return super()._get_support_mask()

    for k in (1, 2, 3, 4, 6):
        ref = Fixed(k=k).fit(x, np.arange(6) % 2).get_support()
        np.testing.assert_array_equal(select_top_k(scores, k), ref)


def test_one_class_site_alone_is_refused_but_fine_in_a_consortium():
    frame = _frame(12, 4)
    one_class = compute_stats(frame, np.zeros(12, dtype=int), 1)
    with pytest.raises(DataError, match="single class .* ANOVA F test is undefined.*together with other sites"):
        derive_preparation(one_class, PrepareConfig(n_features=2), "mRNA")
    other = compute_stats(_frame(12, 4, seed=5), np.array([1, 2] * 6), 3)
    prep = derive_preparation(combine_stats([one_class, other]), PrepareConfig(n_features=2), "mRNA")
    pooled = pd.concat([frame, _frame(12, 4, seed=5)])
    f_sk, _ = f_classif(pooled.to_numpy(), np.r_[np.zeros(12), [1, 2] * 6])
    np.testing.assert_allclose(prep.table["f"].to_numpy(), f_sk, rtol=1e-10)
    assert len(prep.features) == 2


def test_nothing_survives_is_an_error():
    x = _frame(20, 3)
    x.iloc[:5] = np.nan
    with pytest.raises(DataError, match="no feature survives preprocessing \\(3 features, 0 with <= 10% missing"):
        derive_preparation(compute_stats(x, np.arange(20) % 2, 2), PrepareConfig(), "m")


@pytest.mark.parametrize("kw", [{"split_ratios": (0.5, 0.5, 0.0)}, {"class_names": ["a"]},
                                {"variance_threshold": {"m": -1}}, {"max_missing_fraction": 2}])
def test_config_rejects_nonsense(kw):
    with pytest.raises(ValueError):
        PrepareConfig(**kw)


# ----------------------------------------------------------------------------------------------- applying


def test_apply_imputes_scales_orders_and_handles_lacking_features():
    prep = ModalityPrep(["g2", "g0", "g9"], np.array([1.0, 2.0, 3.0]), np.array([0.0, 1.0, 2.0]),
                        np.array([2.0, 5.0, 4.0]), np.zeros(3), 0, 0)
    frame = pd.DataFrame({"g0": [1.0, np.nan, 9.0], "g1": [7.0, 7.0, 7.0], "g2": [0.0, 2.0, np.nan]},
                         index=["a", "b", "c"])
    out, lacking = apply_preparation(frame, prep, "impute")
    assert lacking == ["g9"] and list(out.columns) == ["g2", "g0", "g9"]
    np.testing.assert_allclose(out.to_numpy(), [[0.0, 0.0, 0.5], [1.0, 0.25, 0.5], [0.5, 2.0, 0.5]])
    assert apply_preparation(frame, prep, "impute", clip=True)[0]["g0"].max() == 1.0
    with pytest.raises(DataError, match="site X: lacks 1 consortium feature\\(s\\), e.g. \\['g9'\\].*'error'"):
        apply_preparation(frame, prep, "error", "site X")


# ----------------------------------------------------------------------------------------------- real cohorts


@pytest.mark.parametrize("dataset, twist", [
    ("tcga-brca-rjive", {}),
    ("tcga-brca-rjive", {"missing_cells": 0.03, "lacking": (1, "mRNA", 5)}),
    ("tcga-brca-mixomics", {}),
])
def test_real_cohort_split_across_three_sites_federated_equals_pooled(data_root, tmp_path, dataset, twist):
    dirs = write_simulated_sites(data_root / dataset, tmp_path, 3, transpose=(2, "mRNA"), **twist)
    for k in (100, 1000):
        cfg = PrepareConfig(n_features=k)
        sites = [load_raw_site_dir(d, cfg, **QUIET) for d in dirs]
        result = compare_with_pooled(sites, cfg)
        for m, r in result.items():
            assert r["max_abs_diff"]["count"] == 0 and r["max_abs_diff"]["n_per_class"] == 0, m
            assert r["max_abs_diff"]["minimum"] == 0 and r["max_abs_diff"]["maximum"] == 0, m
            assert r["max_abs_diff"]["total"] < 1e-9 and r["max_abs_diff"]["total_sq"] < 1e-8, m
            assert r["max_rel_diff_f"] < 1e-8 and r["max_abs_diff_impute_means"] < 1e-12, m
            assert r["selection_equal"] and r["same_order"], m
            assert r["selected"] == min(k, r["features_in"] - (5 if twist and m == "mRNA" else 0)), m


def test_prepared_real_site_is_scaled_by_training_patients_only(data_root, tmp_path):
    dirs = write_simulated_sites(data_root / "tcga-brca-mixomics", tmp_path / "raw", 1)
    cfg = PrepareConfig(n_features=50)
    site = load_raw_site_dir(dirs[0], cfg, **QUIET)
    manifest, _, _ = prepare_pooled_decisions([site], cfg)
    frames, report = apply_manifest(site, manifest)
    write_prepared_site(tmp_path / "out", site, frames)
    train = site.train_ids
    x = frames["mRNA"]
    assert x.loc[x.index.isin(train)].min().min() == 0.0 and x.loc[x.index.isin(train)].max().max() == 1.0
    assert report["mRNA"]["cells_outside_0_1"]["training"] == 0
    assert report["mRNA"]["cells_outside_0_1"]["test"] > 0  # test patients are not squeezed into the range
    assert report["protein"]["patients"] == 150  # the release's protein assay exists only for its train split
    cohort = load_cohort_dir(tmp_path / "out", **QUIET)
    assert cohort.features["mRNA"] == manifest.modality("mRNA").features
    assert isinstance(ConsortiumManifest.model_validate_json(manifest.model_dump_json()), ConsortiumManifest)
    with gzip.open(tmp_path / "out" / "mRNA.csv.gz", "rt") as fh:
        assert fh.readline().startswith("sampleID,")


def test_assemble_refuses_labels_outside_the_classes():
    frames = {"a": _frame(6, 2)}
    labels = pd.Series([0, 1, 2, 0, 1, 2], index=frames["a"].index)
    with pytest.raises(DataError, match="label 2 is not one of the 2 classes"):
        assemble_site("s", labels, frames, PrepareConfig(class_names=["x", "y"]), **QUIET)

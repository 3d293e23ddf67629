"""magnet_core data and metrics: loaders on the real cohorts, every input error, exact metrics."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, matthews_corrcoef, roc_auc_score

from magnet_core.cohort.data import (
    DataError,
    load_cohort_dir,
    load_for_seed,
    load_magnet_split,
    stratified_split,
)
from magnet_core.model.metrics import (
    classification_metrics,
    confusion_counts,
    metrics_from_confusion,
    ranking_from_histogram,
    score_histogram,
    summarize,
)


def _write_site(tmp_path, labels=None, mrna=None, mirna=None):
    labels = labels if labels is not None else pd.DataFrame({"Class": [0, 1, 0, 1]}, index=["p1", "p2", "p3", "p4"])
    mrna = mrna if mrna is not None else pd.DataFrame(np.random.default_rng(0).random((3, 4)),
                                                      index=["p1", "p2", "p3"], columns=list("abcd"))
    mirna = mirna if mirna is not None else pd.DataFrame(np.random.default_rng(1).random((3, 2)),
                                                         index=["p2", "p3", "p4"], columns=["x", "y"])
    labels.rename_axis("sampleID").to_csv(tmp_path / "labels.csv")
    mrna.rename_axis("sampleID").to_csv(tmp_path / "mRNA.csv")
    mirna.rename_axis("sampleID").to_csv(tmp_path / "miRNA.csv")
    return tmp_path


def test_cohort_layout_builds_availability_mask(tmp_path):
    cohort = load_cohort_dir(_write_site(tmp_path))
    assert cohort.modalities == ["mRNA", "miRNA"]
    assert cohort.mask.tolist() == [[True, False], [True, True], [True, True], [False, True]]
    assert np.all(cohort.X["miRNA"][0] == 0)


def test_patients_with_no_modality_are_dropped_with_a_count(tmp_path):
    labels = pd.DataFrame({"Class": [0, 1, 0, 1, 1]}, index=["p1", "p2", "p3", "p4", "p5"])
    logs: list[str] = []
    cohort = load_cohort_dir(_write_site(tmp_path, labels=labels), log=logs.append)
    assert cohort.n == 4 and "p5" not in cohort.sample_ids
    assert any("dropped 1 labelled sample" in line for line in logs)


@pytest.mark.parametrize("value, match", [("abc", "line 3 \\(sample 'p2'\\), column 4 'c': non-numeric value 'abc'"),
                                          (np.inf, "non-finite \\(inf\\) value"), (np.nan, "missing \\(empty or NA\\) value")])  # noqa: E501 (one assertion string)
def test_bad_cells_are_named(tmp_path, value, match):
    mrna = pd.DataFrame(np.random.default_rng(0).random((3, 4)), index=["p1", "p2", "p3"], columns=list("abcd"))
    mrna = mrna.astype(object)
    mrna.loc["p2", "c"] = value
    _write_site(tmp_path, mrna=mrna)
    with pytest.raises(DataError, match=match) as err:
        load_cohort_dir(tmp_path)
    assert "mRNA.csv" in str(err.value)


def test_duplicate_sample_ids(tmp_path):
    mrna = pd.DataFrame(np.ones((3, 2)), index=["p1", "p1", "p3"], columns=["a", "b"])
    _write_site(tmp_path, mrna=mrna)
    with pytest.raises(DataError, match=r"mRNA.csv: duplicate sample ids \(1\): p1"):
        load_cohort_dir(tmp_path)


@pytest.mark.parametrize("labels, match", [
    ([0, 2, 0, 2], r"0..C-1 .*missing \[1\]"),
    ([0, 1.5, 0, 1], "not an integer class"),
    ([0, "tumour", 0, 1], "'tumour' of sample 'p2'"),
    ([-1, 0, 1, 0], "0..C-1"),
])
def test_bad_labels(tmp_path, labels, match):
    frame = pd.DataFrame({"Class": labels}, index=["p1", "p2", "p3", "p4"])
    _write_site(tmp_path, labels=frame)
    with pytest.raises(DataError, match=match) as err:
        load_cohort_dir(tmp_path)
    assert "labels.csv" in str(err.value)


def test_modality_without_overlap_and_missing_labels(tmp_path):
    mirna = pd.DataFrame(np.ones((2, 2)), index=["zz1", "zz2"], columns=["x", "y"])
    _write_site(tmp_path, mirna=mirna)
    with pytest.raises(DataError, match="miRNA.csv: none of its 2 sample ids matches a labelled sample"):
        load_cohort_dir(tmp_path)
    (tmp_path / "labels.csv").unlink()
    with pytest.raises(DataError, match="no labels.csv"):
        load_cohort_dir(tmp_path)


def test_cli_reports_bad_data_without_traceback(tmp_path):
    mrna = pd.DataFrame(np.ones((3, 2)), index=["p1", "p1", "p3"], columns=["a", "b"])
    _write_site(tmp_path, mrna=mrna)
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "centralized", "--data", str(tmp_path),
                           "--out", str(tmp_path / "out"), "--epochs", "1", "--seeds", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "duplicate sample ids" in proc.stderr and "mRNA.csv" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_magnet_split_layout_on_real_ov(ov_path):
    logs: list[str] = []
    cohort = load_magnet_split(ov_path, 10, log=logs.append)
    assert cohort.n == 305 and any("dropped 55" in line for line in logs)
    j = {m: cohort.modalities.index(m) for m in cohort.modalities}
    assert int(cohort.mask[:, j["mRNA"]].sum()) == 184 and int(cohort.mask[:, j["miRNA"]].sum()) == 302
    assert int(cohort.mask.all(axis=1).sum()) == 181
    test_ids = set(pd.read_csv(ov_path / "10" / "label_test_paired.csv.gz", index_col=0).index) | \
        set(pd.read_csv(ov_path / "10" / "label_test_unpaired.csv.gz", index_col=0).index)
    assert set(cohort.sample_ids[cohort.split == "test"]) <= test_ids


def test_cohort_layout_on_real_brca(data_root):
    rjive = load_for_seed(data_root / "tcga-brca-rjive", 10, log=lambda *a: None)
    assert rjive.n == 341 and rjive.mask.all() and rjive.num_classes == 5
    train = rjive.split_indices("train", "val")
    for m in rjive.modalities:  # min-max scaled with training statistics only
        assert rjive.X[m][train].min() >= 0 and rjive.X[m][train].max() <= 1 + 1e-6
    mix = load_cohort_dir(data_root / "tcga-brca-mixomics", log=lambda *a: None)
    assert int((~mix.mask[:, mix.modalities.index("protein")]).sum()) == 70


def test_stratified_split_is_deterministic_and_stratified_within_groups(data_root):
    mix = load_cohort_dir(data_root / "tcga-brca-mixomics", log=lambda *a: None)
    a, b, c = stratified_split(mix, 10), stratified_split(mix, 10), stratified_split(mix, 20)
    assert (a.split == b.split).all() and not (a.split == c.split).all()
    for group in (a.paired, ~a.paired):
        y, s = a.labels[group], a.split[group]
        test_frac = np.array([(s[y == k] == "test").mean() for k in np.unique(y)])
        assert np.all(np.abs(test_frac - 0.2) < 0.1)


# ----------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_confusion_metrics_equal_sklearn(classes):
    rng = np.random.default_rng(classes)
    y, p = rng.integers(0, classes, 200), rng.integers(0, classes, 200)
    m = metrics_from_confusion(confusion_counts(y, p, classes))
    assert m["acc"] == pytest.approx(accuracy_score(y, p))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y, p))
    avg = "binary" if classes == 2 else "macro"
    assert m["f1"] == pytest.approx(f1_score(y, p, average=avg))


def test_summed_site_confusions_equal_pooled_predictions():
    rng = np.random.default_rng(0)
    ys = [rng.integers(0, 3, n) for n in (30, 50, 11)]
    ps = [rng.integers(0, 3, n) for n in (30, 50, 11)]
    pooled = metrics_from_confusion(sum(confusion_counts(y, p, 3) for y, p in zip(ys, ps)))
    assert pooled["mcc"] == pytest.approx(matthews_corrcoef(np.concatenate(ys), np.concatenate(ps)))
    mean_of_sites = np.mean([matthews_corrcoef(y, p) for y, p in zip(ys, ps)])
    assert abs(mean_of_sites - pooled["mcc"]) > 1e-6  # averaging MCCs is a different (wrong) number


def test_histogram_ranking_equals_sklearn_for_distinct_bins():
    rng = np.random.default_rng(1)
    scores = (rng.permutation(500)[:120] + 0.5) / 500  # distinct bins of a 500-bin histogram
    y = (rng.random(120) < scores).astype(int)
    r = ranking_from_histogram(score_histogram(y, scores, bins=500))
    assert r["auroc"] == pytest.approx(roc_auc_score(y, scores))
    assert r["auprc"] == pytest.approx(average_precision_score(y, scores))


def test_classification_metrics_and_summary():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    m = classification_metrics(np.array([0, 1, 1, 1]), probs, 2)
    assert m["acc"] == 0.75 and m["auroc"] == 1.0
    s = summarize([{"mcc": 0.2, "auroc": None}, {"mcc": 0.4, "auroc": 0.6}])
    assert s["mcc"]["mean"] == pytest.approx(0.3) and s["mcc"]["std"] == pytest.approx(0.1 * 2 ** 0.5)  # ddof 1
    assert s["auroc"]["mean"] == 0.6 and s["auroc"]["per_seed"] == [None, 0.6]
    json.dumps(s)


def test_duplicate_feature_names_are_refused(tmp_path):
    _write_site(tmp_path)
    (tmp_path / "mRNA.csv").write_text("sampleID,a,a\np1,1,2\np2,3,4\n")
    with pytest.raises(DataError, match="mRNA.csv: duplicate feature names: a"):
        load_cohort_dir(tmp_path)

"""Cohort loading: every input error names the file and the problem; both real layouts load as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from magnet_core.cohort.data import (
    DataError,
    detect_layout,
    load_cohort_dir,
    load_for_seed,
    load_magnet_split,
    stratified_split,
)

REPO = Path(__file__).resolve().parents[1]
IDS = ["p1", "p2", "p3", "p4", "p5", "p6"]


def _silent(*_args) -> None:
    return None


def write_cohort(folder: Path, labels=None, mrna=None, mirna=None) -> Path:
    """A small valid cohort (labels.csv + mRNA.csv + miRNA.csv); any table can be replaced by a bad one.

    Default availability: p1 mRNA only, p2-p5 both, p6 miRNA only.
    """
    rng = np.random.default_rng(0)
    if labels is None:
        labels = pd.DataFrame({"Class": [0, 1, 0, 1, 0, 1]}, index=IDS)
    if mrna is None:
        mrna = pd.DataFrame(rng.random((5, 4)), index=IDS[:5], columns=["g1", "g2", "g3", "g4"])
    if mirna is None:
        mirna = pd.DataFrame(rng.random((5, 3)), index=IDS[1:], columns=["mir1", "mir2", "mir3"])
    folder.mkdir(parents=True, exist_ok=True)
    labels.rename_axis("sampleID").to_csv(folder / "labels.csv")
    mrna.rename_axis("sampleID").to_csv(folder / "mRNA.csv")
    mirna.rename_axis("sampleID").to_csv(folder / "miRNA.csv")
    return folder


def _mrna_with(cell_value) -> pd.DataFrame:
    frame = pd.DataFrame(np.random.default_rng(1).random((5, 4)), index=IDS[:5],
                         columns=["g1", "g2", "g3", "g4"]).astype(object)
    frame.loc["p3", "g2"] = cell_value
    return frame


# ----------------------------------------------------------------------------------------- valid cohort


def test_valid_cohort_builds_mask_zero_rows_and_labels(tmp_path):
    cohort = load_cohort_dir(write_cohort(tmp_path), log=_silent)
    assert cohort.modalities == ["mRNA", "miRNA"]
    assert list(cohort.sample_ids) == IDS
    assert cohort.mask.tolist() == [[True, False], [True, True], [True, True], [True, True], [True, True],
                                    [False, True]]
    assert cohort.labels.tolist() == [0, 1, 0, 1, 0, 1] and cohort.num_classes == 2
    assert np.all(cohort.X["miRNA"][0] == 0) and np.all(cohort.X["mRNA"][5] == 0)
    src = pd.read_csv(tmp_path / "mRNA.csv", index_col=0)
    np.testing.assert_allclose(cohort.X["mRNA"][2], src.loc["p3"].to_numpy(), rtol=1e-6)
    assert cohort.paired.tolist() == [False, True, True, True, True, False]
    assert detect_layout(tmp_path) == "cohort"


def test_patients_without_any_modality_are_dropped_with_a_printed_count(tmp_path):
    labels = pd.DataFrame({"Class": [0, 1, 0, 1, 0, 1, 0, 1]}, index=IDS + ["p7", "p8"])
    logs: list[str] = []
    cohort = load_cohort_dir(write_cohort(tmp_path, labels=labels), log=logs.append)
    assert cohort.n == 6 and not {"p7", "p8"} & set(cohort.sample_ids)
    dropped = [line for line in logs if "dropped" in line]
    assert len(dropped) == 1 and "dropped 2 labelled sample(s)" in dropped[0], logs


def test_unlabelled_modality_rows_are_reported_and_ignored(tmp_path):
    mirna = pd.DataFrame(np.random.default_rng(2).random((6, 3)), index=IDS[1:] + ["stranger"],
                         columns=["mir1", "mir2", "mir3"])
    logs: list[str] = []
    cohort = load_cohort_dir(write_cohort(tmp_path, mirna=mirna), log=logs.append)
    assert "stranger" not in cohort.sample_ids and cohort.n == 6
    assert any("miRNA.csv: 1 sample(s) have no label" in line for line in logs), logs


# ----------------------------------------------------------------------------------------- every data error


@pytest.mark.parametrize("cell, expected", [
    ("high", "line 4 (sample 'p3'), column 3 'g2': non-numeric value 'high' (1 such cells)"),
    ("1.2.3", "line 4 (sample 'p3'), column 3 'g2': non-numeric value '1.2.3'"),
    (np.inf, "line 4 (sample 'p3'), column 3 'g2': non-finite (inf) value"),
    (-np.inf, "line 4 (sample 'p3'), column 3 'g2': non-finite (-inf) value"),
    (np.nan, "line 4 (sample 'p3'), column 3 'g2': missing (empty or NA) value"),
    (1e300, "line 4 (sample 'p3'), column 3 'g2': too large for float32: value 1e+300 (float32 holds up to 3.4e+38; 1 such cells)"),  # noqa: E501 (one assertion string)
])
def test_bad_cell_names_file_sample_and_column(tmp_path, cell, expected):
    write_cohort(tmp_path, mrna=_mrna_with(cell))
    with pytest.raises(DataError) as err:
        load_cohort_dir(tmp_path, log=_silent)
    msg = str(err.value)
    assert msg.startswith(str(tmp_path / "mRNA.csv")), msg
    assert expected in msg, msg


def test_duplicate_sample_ids_in_a_modality(tmp_path):
    mrna = pd.DataFrame(np.ones((5, 2)), index=["p1", "p2", "p2", "p3", "p3"], columns=["g1", "g2"])
    write_cohort(tmp_path, mrna=mrna)
    with pytest.raises(DataError) as err:
        load_cohort_dir(tmp_path, log=_silent)
    assert str(err.value).startswith(str(tmp_path / "mRNA.csv"))
    assert "duplicate sample ids (2): p2, p3" in str(err.value)


def test_duplicate_sample_ids_in_labels(tmp_path):
    labels = pd.DataFrame({"Class": [0, 1, 1]}, index=["p1", "p2", "p1"])
    write_cohort(tmp_path, labels=labels)
    with pytest.raises(DataError, match=r"labels\.csv: duplicate sample ids \(1\): p1"):
        load_cohort_dir(tmp_path, log=_silent)


@pytest.mark.parametrize("classes, expected", [
    ([0, 2, 0, 2, 0, 2], "labels must be integers 0..C-1 with every class present; found [0, 2] (missing [1])"),
    ([1, 2, 1, 2, 1, 2], "found [1, 2] (missing [0])"),
    ([-1, 0, 1, 0, 1, 0], "labels must be integers 0..C-1"),
    ([0, 1.5, 0, 1, 0, 1], "label 1.5 of sample 'p2' in column 'Class' is not an integer class"),
    ([0, 1, "benign", 1, 0, 1], "label 'benign' of sample 'p3' in column 'Class' is not an integer class"),
    ([0, 1, None, 1, 0, 1], "of sample 'p3' in column 'Class' is not an integer class"),
])
def test_bad_labels_name_the_label_file(tmp_path, classes, expected):
    write_cohort(tmp_path, labels=pd.DataFrame({"Class": classes}, index=IDS))
    with pytest.raises(DataError) as err:
        load_cohort_dir(tmp_path, log=_silent)
    msg = str(err.value)
    assert msg.startswith(str(tmp_path / "labels.csv")), msg
    assert expected in msg, msg


def test_non_integer_label_is_shown_as_written(tmp_path):
    write_cohort(tmp_path, labels=pd.DataFrame({"Class": [0, 1.5, 0, 1, 0, 1]}, index=IDS))
    with pytest.raises(DataError) as err:
        load_cohort_dir(tmp_path, log=_silent)
    assert "label 1.5 of sample 'p2'" in str(err.value), str(err.value)


def test_labels_outside_a_given_number_of_classes(tmp_path):
    write_cohort(tmp_path)
    with pytest.raises(DataError, match=r"labels\.csv: labels must be in 0\.\.0; found \[0, 1\]"):
        load_cohort_dir(tmp_path, num_classes=1, log=_silent)


def test_modality_without_overlap_with_labels(tmp_path):
    mirna = pd.DataFrame(np.ones((3, 2)), index=["x1", "x2", "x3"], columns=["mir1", "mir2"])
    write_cohort(tmp_path, mirna=mirna)
    with pytest.raises(DataError) as err:
        load_cohort_dir(tmp_path, log=_silent)
    msg = str(err.value)
    assert msg.startswith(str(tmp_path / "miRNA.csv")), msg
    assert "none of its 3 sample ids matches a labelled sample" in msg and "labels.csv" in msg


def test_missing_labels_file(tmp_path):
    write_cohort(tmp_path)
    (tmp_path / "labels.csv").unlink()
    with pytest.raises(DataError, match="no labels.csv") as err:
        load_cohort_dir(tmp_path, log=_silent)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(DataError, match="not a cohort"):
        detect_layout(tmp_path)


def test_missing_split_label_file(tmp_path):
    seed_dir = tmp_path / "7"
    write_cohort(seed_dir)
    (seed_dir / "labels.csv").unlink()
    for split in ("train", "val", "test"):
        for kind in ("paired", "unpaired"):
            if (split, kind) != ("val", "unpaired"):
                pd.DataFrame({"Class": [0, 1]}, index=[f"{split}{kind}a", f"{split}{kind}b"]).to_csv(
                    seed_dir / f"label_{split}_{kind}.csv")
    with pytest.raises(DataError, match=r"7: missing label file label_val_unpaired"):
        load_magnet_split(tmp_path, 7, log=_silent)
    with pytest.raises(DataError, match=r"no split folder for seed 8 \(found: \['7'\]\)"):
        load_magnet_split(tmp_path, 8, log=_silent)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulations.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_cli_bad_data_exits_2_with_the_file_named_and_no_traceback(tmp_path):
    bad = write_cohort(tmp_path / "bad", mrna=_mrna_with("oops"))
    proc = _cli("centralized", "--data", str(bad), "--out", str(tmp_path / "out"), "--epochs", "1", "--seeds", "1")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: "), proc.stderr
    assert str(bad / "mRNA.csv") in proc.stderr and "non-numeric value 'oops'" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out" / "results.json").exists()


def test_cli_main_reports_bad_labels(tmp_path, capsys):
    from simulations.cli import main

    bad = write_cohort(tmp_path / "bad", labels=pd.DataFrame({"Class": [0, 2, 0, 2, 0, 2]}, index=IDS))
    assert main(["centralized", "--data", str(bad), "--out", str(tmp_path / "out"), "--epochs", "1",
                 "--seeds", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad / "labels.csv") in err and "missing [1]" in err


# ----------------------------------------------------------------------------------------- real data


def _label_table(seed_dir: Path) -> pd.DataFrame:
    rows = []
    for split in ("train", "val", "test"):
        for kind in ("paired", "unpaired"):
            frame = pd.read_csv(seed_dir / f"label_{split}_{kind}.csv.gz", index_col=0)
            rows.append(frame.assign(split=split, paired=kind == "paired"))
    return pd.concat(rows)


def test_split_layout_on_real_ov_seed_10(ov_path):
    logs: list[str] = []
    cohort = load_magnet_split(ov_path, 10, log=logs.append)
    assert detect_layout(ov_path) == "split"
    assert cohort.n == 305 and cohort.modalities == ["mRNA", "miRNA"] and cohort.num_classes == 2
    assert [line for line in logs if "dropped" in line] == [
        "note: dropped 55 labelled sample(s) that have none of the modalities ['mRNA', 'miRNA']"]
    counts = cohort.availability()
    assert (counts["has_mRNA"], counts["has_miRNA"], counts["complete"]) == (184, 302, 181)
    assert cohort.X["mRNA"].shape == (305, 1000) and cohort.X["miRNA"].shape == (305, 448)

    # Everything below is recomputed straight from the files.
    table = _label_table(ov_path / "10")
    assert len(table) == 360 and not table.index.duplicated().any()
    has = {m: set(pd.read_csv(ov_path / "10" / f"{m}.csv.gz", index_col=0, usecols=[0]).index)
           for m in ("mRNA", "miRNA")}
    kept = table[table.index.isin(has["mRNA"] | has["miRNA"])]
    assert len(kept) == 305
    ids = list(cohort.sample_ids)
    assert set(ids) == set(kept.index)
    kept = kept.loc[ids]
    assert (cohort.labels == kept["Class"].to_numpy()).all()
    assert (cohort.split == kept["split"].to_numpy()).all()
    assert (cohort.paired == kept["paired"].to_numpy()).all()
    for split in ("train", "val", "test"):
        assert len(cohort.split_indices(split)) == int((kept["split"] == split).sum())
    assert len(cohort.split_indices("test")) < int((table["split"] == "test").sum())  # some test ids dropped
    for j, m in enumerate(cohort.modalities):
        assert cohort.mask[:, j].tolist() == [i in has[m] for i in ids]
        assert np.all(cohort.X[m][~cohort.mask[:, j]] == 0)
    mirna = pd.read_csv(ov_path / "10" / "miRNA.csv.gz", index_col=0)
    row = ids.index(mirna.index[0])
    np.testing.assert_allclose(cohort.X["miRNA"][row], mirna.iloc[0].to_numpy(), rtol=1e-6)


def test_cohort_layout_on_real_brca_rjive(data_root):
    logs: list[str] = []
    folder = data_root / "tcga-brca-rjive"
    cohort = load_cohort_dir(folder, log=logs.append)
    assert detect_layout(folder) == "cohort"
    assert cohort.n == 341 and cohort.num_classes == 5 and cohort.mask.all()
    assert sorted(cohort.modalities) == ["DNA", "mRNA", "miRNA"]
    assert {m: cohort.X[m].shape[1] for m in cohort.modalities} == {"DNA": 574, "mRNA": 645, "miRNA": 423}
    assert sum("7 sample(s) have no label" in line for line in logs) == 3, logs
    scaled = load_for_seed(folder, 10, log=_silent)
    train = scaled.split_indices("train", "val")
    for m in scaled.modalities:  # min-max scaled with training statistics only
        assert scaled.X[m][train].min() == 0.0 and scaled.X[m][train].max() == pytest.approx(1.0)


def test_cohort_layout_on_real_brca_mixomics(data_root):
    cohort = load_cohort_dir(data_root / "tcga-brca-mixomics", log=_silent)
    assert cohort.n == 220 and cohort.num_classes == 3
    assert sorted(cohort.modalities) == ["mRNA", "miRNA", "protein"]  # split.csv is not a modality
    j = cohort.modalities.index("protein")
    assert int((~cohort.mask[:, j]).sum()) == 70
    assert cohort.mask[:, [cohort.modalities.index("mRNA"), cohort.modalities.index("miRNA")]].all()
    assert int(cohort.paired.sum()) == 150
    split_file = pd.read_csv(data_root / "tcga-brca-mixomics" / "split.csv", index_col=0).iloc[:, 0]
    no_protein = set(cohort.sample_ids[~cohort.mask[:, j]])
    assert no_protein == set(split_file[split_file.astype(str).str.lower() == "test"].index.astype(str))


def test_stratified_split_is_deterministic_and_stratified_within_paired_and_unpaired(data_root):
    cohort = load_cohort_dir(data_root / "tcga-brca-mixomics", log=_silent)
    a = stratified_split(cohort, 10)
    np.random.seed(123)  # the global RNG must not matter
    b = stratified_split(cohort, 10)
    c = stratified_split(cohort, 20)
    assert (a.split == b.split).all()
    assert (a.split != c.split).any()
    assert set(np.unique(a.split)) == {"train", "val", "test"}
    for group in (a.paired, ~a.paired):
        y, s = a.labels[group], a.split[group]
        n = len(y)
        for name, frac in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
            assert abs((s == name).sum() - frac * n) <= 1.5, (name, (s == name).sum(), n)
        for k in np.unique(y):
            n_k = int((y == k).sum())
            assert abs(int(((y == k) & (s == "test")).sum()) - 0.2 * n_k) <= 2, (k, n_k)
            assert abs(int(((y == k) & (s == "train")).sum()) - 0.7 * n_k) <= 2, (k, n_k)

"""Site data validation against the consortium manifest: every check on small bad sites, a real site, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from magnet_core.cohort.data import DataError
from magnet_core.cohort.manifest import ConsortiumManifest, ModalitySpec
from magnet_core.cohort.validation import load_site_cohort, validate_site

CLASSES = ["Basal", "Her2", "LumA"]
FEATURES = {"mRNA": ["ESR1", "ERBB2", "KRT5", "FOXA1"], "miRNA": ["mir-21", "mir-155", "mir-200a"]}


def _manifest(**kw) -> ConsortiumManifest:
    mods = [ModalitySpec(name=m, features=f) for m, f in FEATURES.items()]
    mods.append(ModalitySpec(name="protein", features=["AKT", "ER-alpha"]))
    return ConsortiumManifest(name="test", classes=CLASSES, modalities=mods, **kw)


def _frames(n: int = 15, seed: int = 0) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """A clean site: n patients with mRNA and miRNA (no protein at this site), 5 of each class."""
    rng = np.random.default_rng(seed)
    ids = [f"P{i:03d}" for i in range(n)]
    labels = pd.DataFrame({"Class": np.arange(n) % 3}, index=pd.Index(ids, name="sampleID"))
    frames = {m: pd.DataFrame(rng.normal(size=(n, len(f))).round(4), index=labels.index, columns=f)
              for m, f in FEATURES.items()}
    return labels, frames


def _write(folder, labels, frames, split=None, gz=("mRNA",)):
    folder.mkdir(parents=True, exist_ok=True)
    labels.to_csv(folder / "labels.csv")
    for m, f in frames.items():
        f.to_csv(folder / (f"{m}.csv.gz" if m in gz else f"{m}.csv"))
    if split is not None:
        split.to_csv(folder / "split.csv")
    return folder


def _site(tmp_path, edit=None, **kw):
    labels, frames = _frames()
    if edit is not None:
        labels, frames = edit(labels, frames) or (labels, frames)
    return _write(tmp_path / "site", labels, frames, **kw)


def _errors(tmp_path, edit, manifest=None):
    report, _ = validate_site(_site(tmp_path, edit), manifest or _manifest())
    assert not report.ok
    return report.errors


def test_clean_site_validates_and_loads_in_manifest_order(tmp_path):
    labels, frames = _frames()
    site = _write(tmp_path / "site", labels, frames)
    report, _ = validate_site(site, _manifest())
    assert report.ok, report.errors
    assert report.warnings == [f"{site}: no protein file: this site has no protein at all (allowed)"]
    s = report.summary
    assert s["patients"] == 15 and s["labelled"] == 15
    assert s["classes"] == {"Basal": 5, "Her2": 5, "LumA": 5}
    assert s["modalities"] == {"mRNA": 15, "miRNA": 15, "protein": 0}
    assert s["patterns"] == {"mRNA+miRNA": 15}
    cohort = load_site_cohort(site, _manifest(), seed=3)
    assert cohort.modalities == ["mRNA", "miRNA", "protein"]
    assert cohort.features == {**FEATURES, "protein": ["AKT", "ER-alpha"]}
    np.testing.assert_allclose(cohort.X["mRNA"], frames["mRNA"].to_numpy(), rtol=1e-6)
    assert cohort.mask[:, :2].all() and not cohort.mask[:, 2].any() and not cohort.X["protein"].any()
    assert list(cohort.labels) == list(labels["Class"])
    # no split.csv: the seeded stratified split, reproducible
    again = load_site_cohort(site, _manifest(), seed=3)
    assert set(cohort.split) == {"train", "val", "test"} and list(cohort.split) == list(again.split)


def test_split_csv_is_used_and_checked(tmp_path):
    labels, frames = _frames()
    split = pd.Series(["train"] * 10 + ["test"] * 4, index=labels.index[:14], name="split")
    site = _write(tmp_path / "site", labels, frames, split=split)
    report, _ = validate_site(site, _manifest())
    assert report.ok and report.summary["split"] == {"train": 11, "val": 0, "test": 4}
    assert any("split.csv: 1 patient(s) have no split row and are used for training" in w for w in report.warnings)
    cohort = load_site_cohort(site, _manifest(), seed=3)
    assert list(cohort.split) == ["train"] * 10 + ["test"] * 4 + ["train"]
    bad = split.copy()
    bad.iloc[5] = "holdout"
    _write(site, labels, frames, split=bad)
    report, _ = validate_site(site, _manifest())
    assert any(e.startswith(f"{site / 'split.csv'}, line 7 (sample 'P005'), column 2 'split': split 'holdout'")
               for e in report.errors), report.errors


def test_missing_feature_is_an_error_naming_file_and_feature(tmp_path):
    errors = _errors(tmp_path, lambda lab, fr: fr.__setitem__("miRNA", fr["miRNA"].drop(columns="mir-155")))
    assert any(e.startswith(f"{tmp_path / 'site' / 'miRNA.csv'}: 1 manifest feature(s) missing for modality "
                            f"'miRNA', e.g. 'mir-155'") for e in errors), errors
    # none of the manifest's features (another consortium's file): the same clear error
    errors = _errors(tmp_path / "b", lambda lab, fr: fr.__setitem__("miRNA", fr["miRNA"].add_prefix("hsa-")))
    assert errors == [f"{tmp_path / 'b' / 'site' / 'miRNA.csv'}: 3 manifest feature(s) missing for modality "
                      f"'miRNA', e.g. 'mir-21', 'mir-155', 'mir-200a'"]


def test_missing_feature_is_filled_when_the_manifest_allows_it(tmp_path):
    base = _manifest()
    mrna = base.modality("mRNA").model_copy(update={"impute_means": [1.0, 2.0, 3.0, 4.0],
                                                    "scale_min": [0.0, 0.0, 0.0, 0.0],
                                                    "scale_max": [4.0, 4.0, 4.0, 4.0]})
    allowed = base.model_copy(update={"missing_feature": "impute", "max_absent_features": 0.25,
                                      "modalities": [mrna, base.modality("miRNA"), base.modality("protein")]})
    def prepared_without_krt5(lab, fr):  # prepared data are scaled to [0, 1]
        fr["mRNA"] = ((fr["mRNA"] - fr["mRNA"].min()) / (fr["mRNA"].max() - fr["mRNA"].min())).drop(columns="KRT5")

    site = _site(tmp_path, prepared_without_krt5)
    default_share = allowed.model_copy(update={"max_absent_features": 0.1})
    report, _ = validate_site(site, default_share)  # 1 of 4 features (25%) absent: more than the default 10%
    assert report.errors == [f"{site / 'mRNA.csv.gz'}: 1 manifest feature(s) missing for modality 'mRNA', e.g. "
                             "'KRT5' (25% of its 4 features; the manifest fills at most 10% (max_absent_features): "
                             "renamed columns or another consortium's file?)"]
    report, _ = validate_site(site, allowed)
    assert report.ok and any("'KRT5' (filled with the consortium mean" in w for w in report.warnings)
    cohort = load_site_cohort(site, allowed, seed=1)
    np.testing.assert_allclose(cohort.X["mRNA"][:, 2], 0.75)  # (3 - 0) / (4 - 0), in the prepared (scaled) units
    # imputation allowed but no means to impute with: refused
    no_means = base.model_copy(update={"missing_feature": "impute", "max_absent_features": 0.25})
    report, _ = validate_site(site, no_means)
    assert any("gives no impute_means for 'mRNA'" in e for e in report.errors)


def test_extra_columns_are_reported_and_ignored(tmp_path):
    def edit(lab, fr):
        fr["mRNA"].insert(2, "notes", "free text")
        fr["mRNA"]["GATA3"] = 1.0

    site = _site(tmp_path, edit)
    report, _ = validate_site(site, _manifest())
    assert report.ok, report.errors  # text in a column the consortium does not use cannot corrupt training
    assert any("2 column(s) not in the manifest are ignored, e.g. 'notes', 'GATA3'" in w for w in report.warnings)
    assert load_site_cohort(site, _manifest(), seed=1).X["mRNA"].shape == (15, 4)


def test_wrong_feature_order_is_an_error_not_a_silent_reorder(tmp_path):
    errors = _errors(tmp_path, lambda lab, fr: fr.__setitem__("mRNA", fr["mRNA"][["ESR1", "KRT5", "ERBB2", "FOXA1"]]))
    assert f"{tmp_path / 'site' / 'mRNA.csv.gz'}: features are not in the manifest's order: column 3 is 'KRT5', " \
           f"the manifest expects 'ERBB2' there" in errors[0]
    with pytest.raises(DataError, match="failed validation"):
        load_site_cohort(tmp_path / "site", _manifest(), seed=1)


def test_non_numeric_value_names_line_and_column(tmp_path):
    def edit(lab, fr):
        fr["miRNA"] = fr["miRNA"].astype(object)
        fr["miRNA"].iat[3, 1] = "high"

    errors = _errors(tmp_path, edit)
    assert errors == [f"{tmp_path / 'site' / 'miRNA.csv'}, line 5 (sample 'P003'), column 3 'mir-155': "
                      f"non-numeric value 'high' (1 such cells)"]


@pytest.mark.parametrize("value, what", [(np.inf, "non-finite (inf)"), (-np.inf, "non-finite (-inf)"),
                                         (np.nan, "missing (empty or NA)"), (1e39, "too large for float32")])
def test_non_finite_values_name_line_and_column(tmp_path, value, what):
    def edit(lab, fr):
        fr["mRNA"].iat[7, 0] = value

    errors = _errors(tmp_path, edit)
    assert len(errors) == 1
    assert errors[0].startswith(f"{tmp_path / 'site' / 'mRNA.csv.gz'}, line 9 (sample 'P007'), column 2 'ESR1': "
                                f"{what}"), errors


def test_duplicate_sample_ids_name_the_lines(tmp_path):
    def edit(lab, fr):
        fr["miRNA"] = pd.concat([fr["miRNA"], fr["miRNA"].iloc[[2]]])

    errors = _errors(tmp_path, edit)
    assert errors == [f"{tmp_path / 'site' / 'miRNA.csv'}: duplicate sample ids (1 repeated rows): 'P002' on "
                      f"lines 4, 17"]
    errors = _errors(tmp_path / "b", lambda lab, fr: (pd.concat([lab, lab.iloc[[0]]]), fr))
    assert any("labels.csv: duplicate sample ids" in e and "'P000' on lines 2, 17" in e for e in errors), errors


@pytest.mark.parametrize("value, expected", [
    (3, "line 6 (sample 'P004'), column 2 'Class': label 3 is not a class of the consortium (0..2: Basal, Her2, LumA)"),
    (-1, "line 6 (sample 'P004'), column 2 'Class': label -1 is not a class of the consortium"),
    ("LumB", "line 6 (sample 'P004'), column 2 'Class': label 'LumB' is not an integer class index"),
    (1.5, "line 6 (sample 'P004'), column 2 'Class': label '1.5' is not an integer class index"),
])
def test_unknown_labels_are_errors(tmp_path, value, expected):
    def edit(lab, fr):
        lab = lab.astype(object)
        lab.iat[4, 0] = value
        return lab, fr

    errors = _errors(tmp_path, edit)
    assert any(e.startswith(f"{tmp_path / 'site' / 'labels.csv'}, {expected}") for e in errors), errors


def test_absent_modality_no_modality_patients_and_unlabelled_samples_are_reported(tmp_path):
    def edit(lab, fr):
        fr["miRNA"] = fr["miRNA"].iloc[5:]  # 5 patients lack miRNA
        fr["mRNA"] = fr["mRNA"].drop(index=["P000", "P001"])  # ... 2 of them lack everything
        extra = pd.DataFrame(np.zeros((2, 4)), index=["X1", "X2"], columns=FEATURES["mRNA"])
        fr["mRNA"] = pd.concat([fr["mRNA"], extra])  # 2 samples without a label row
        lab = lab.astype(object)
        lab.iat[10, 0] = None  # and one blank label
        return lab, fr

    site = _site(tmp_path, edit)
    report, _ = validate_site(site, _manifest())
    assert report.ok, report.errors
    w = "\n".join(report.warnings)
    assert "no protein file: this site has no protein at all (allowed)" in w
    assert "2 labelled patient(s) have no modality and will not be used, e.g. 'P000', 'P001'" in w
    assert "mRNA.csv.gz: 3 sample(s) have no label and are not used, e.g. 'P010', 'X1', 'X2'" in w
    assert f"{site / 'labels.csv'}, line 12 (sample 'P010'), column 2 'Class': no label" in w
    s = report.summary
    assert s["labelled"] == 14 and s["patients"] == 12
    assert s["patterns"] == {"mRNA+miRNA": 9, "mRNA": 3, "none": 2}
    assert s["modalities"] == {"mRNA": 12, "miRNA": 9, "protein": 0}
    cohort = load_site_cohort(site, _manifest(), seed=1)
    assert cohort.n == 12 and not {"P000", "P001", "P010", "X1", "X2"} & set(cohort.sample_ids)
    has_mirna = dict(zip(cohort.sample_ids, cohort.mask[:, 1]))
    assert not has_mirna["P002"] and has_mirna["P005"]
    assert not cohort.X["miRNA"][~cohort.mask[:, 1]].any()


def test_site_level_problems(tmp_path):
    labels, frames = _frames()
    site = _write(tmp_path / "site", labels, frames)
    (site / "RPPA.csv").write_text("id,x\nP000,1\n")
    report, _ = validate_site(site, _manifest())
    assert report.ok and any("modality 'RPPA' is not in the manifest" in w for w in report.warnings)
    (site / "labels.csv").unlink()
    report, _ = validate_site(site, _manifest())
    assert report.errors == [f"{site}: no labels.csv (sample id, Class)"]
    report, _ = validate_site(tmp_path / "nowhere", _manifest())
    assert report.errors == [f"{tmp_path / 'nowhere'}: no such directory"]
    nothing = _write(tmp_path / "nothing", labels.rename(index=lambda s: "Z" + s), frames)
    report, _ = validate_site(nothing, _manifest())
    assert any("no patient has both a label and at least one modality" in e for e in report.errors)


def _real_manifest(root) -> ConsortiumManifest:
    mods = [ModalitySpec(name=m, features=list(pd.read_csv(root / f"{m}.csv.gz", index_col=0, nrows=0).columns))
            for m in ("mRNA", "miRNA", "protein")]
    return ConsortiumManifest(name="brca-mixomics", classes=CLASSES, modalities=mods)


def test_real_site_validates_clean_and_reports_protein_missing_for_70(data_root, tmp_path):
    root = data_root / "tcga-brca-mixomics"
    manifest = _real_manifest(root)
    report, _ = validate_site(root, manifest)
    assert report.ok and report.warnings == [], (report.errors, report.warnings)
    s = report.summary
    assert s["patients"] == 220 and s["modalities"] == {"mRNA": 220, "miRNA": 220, "protein": 150}
    assert s["patterns"] == {"mRNA+miRNA+protein": 150, "mRNA+miRNA": 70}
    assert s["split"] == {"train": 150, "val": 0, "test": 70} and sum(s["classes"].values()) == 220
    cohort = load_site_cohort(root, manifest, seed=10)
    assert cohort.n == 220 and int((~cohort.mask[:, 2]).sum()) == 70
    assert set(cohort.sample_ids[~cohort.mask[:, 2]]) == set(cohort.sample_ids[cohort.split == "test"])
    protein = pd.read_csv(root / "protein.csv.gz", index_col=0)
    row = list(cohort.sample_ids).index(protein.index[0])
    np.testing.assert_allclose(cohort.X["protein"][row], protein.iloc[0].to_numpy(), rtol=1e-6)
    # the manifest round-trips through TOML, and the CLI agrees
    proc = _cli("validate-site", str(root), "--manifest", str(manifest.save(tmp_path / "manifest.toml")))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "with protein" in proc.stdout and "150 (68%)" in proc.stdout and "site data are consistent" in proc.stdout


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "simulations.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})


def test_cli_exit_codes_and_messages(tmp_path):
    def edit(lab, fr):
        fr["mRNA"].iat[7, 0] = np.inf

    site = _site(tmp_path, edit)
    manifest = _manifest().save(tmp_path / "manifest.toml")
    bad = _cli("validate-site", str(site), "--manifest", str(manifest))
    assert bad.returncode == 1 and "Traceback" not in bad.stdout + bad.stderr
    assert "line 9 (sample 'P007'), column 2 'ESR1': non-finite (inf) value" in bad.stdout
    assert "1 problem(s) would corrupt training" in bad.stdout
    assert "with miRNA" in bad.stdout and "pattern mRNA+miRNA" in bad.stdout and "class Her2" in bad.stdout
    clean = _write(tmp_path / "clean", *_frames())
    ok = _cli("validate-site", str(clean), "--manifest", str(manifest))
    assert ok.returncode == 0 and "site data are consistent with the manifest" in ok.stdout
    assert "warning:" in ok.stdout and "no protein file" in ok.stdout
    missing = _cli("validate-site", str(clean), "--manifest", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "manifest not found" in missing.stderr and "Traceback" not in missing.stderr

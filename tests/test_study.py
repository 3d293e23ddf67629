"""Studies: a small grid runs end to end on real data, is resumable, and reruns from its files to the same CSV."""

from __future__ import annotations

import json

import pandas as pd

from simulations.cli import main
from simulations.study import builtin_studies, load_study

STUDY = """
name = "tiny"
description = "two cells on OV, for the tests"
dataset = "tcga-ov-magnet"
preset = "ov"
rounds = 2
local_epochs = 1
seeds = [10]
x_label = "sites"

[[cells]]
id = "two-sites"
x = 2
scenario = { num_sites = 2, partition = "iid" }

[[cells]]
id = "no-mirna"
x = 3
scenario = { num_sites = 3, partition = "iid", sites = { "2" = { miRNA = "absent" } } }
"""


def test_study_runs_resumes_and_reruns_from_its_files(data_root, tmp_path):
    spec = tmp_path / "tiny.toml"
    spec.write_text(STUDY)
    out = tmp_path / "out"
    assert main(["study", "--data", str(data_root), "--study", str(spec), "--out", str(out)]) == 0
    tidy = pd.read_csv(out / "tiny_tidy.csv")
    assert len(tidy) == 2 * 4  # cells x methods x seeds
    assert set(tidy["method"]) == {"centralized", "local_only", "fedavg_plain", "federated"}
    assert tidy["error"].isna().all() and tidy["mcc"].notna().all()
    for name in ("tiny_mcc.png", "tiny_report.md", "tiny_summary.json", "study.toml"):
        assert (out / name).stat().st_size > 100, name
    assert "Findings (mean ± std over seeds)" in (out / "tiny_report.md").read_text()
    cell_files = sorted((out / "cells").rglob("*-seed10.json"))
    stamps = [p.stat().st_mtime_ns for p in cell_files]
    before = (out / "tiny_tidy.csv").read_text()
    # rerun from the study's own copy of its spec: nothing is trained again, the CSV is identical
    assert main(["study", "--data", str(data_root), "--study", str(out / "study.toml"), "--out", str(out)]) == 0
    assert [p.stat().st_mtime_ns for p in cell_files] == stamps
    assert (out / "tiny_tidy.csv").read_text() == before
    summary = json.loads((out / "tiny_summary.json").read_text())
    assert {r["cell"] for r in summary["rows"]} == {"two-sites", "no-mirna"}


def test_builtin_studies_are_valid():
    names = set(builtin_studies())
    assert {"rate", "heterogeneity", "stress", "sites", "extensibility"} <= names
    for name in names:
        study = load_study(name)
        assert len(study.seeds) >= 3 and study.cells

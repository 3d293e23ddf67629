"""Studies: a small grid runs end to end on real data, is resumable, reruns from its files to the same CSV, and its
report's sentences follow from the paired statistics."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from magnet_core.cohort.data import DataError
from simulations import statistics as st
from simulations.cli import main
from simulations.simulate import METHODS
from simulations.study import builtin_studies, comparisons_frame, load_study, method_pairs, write_outputs

STUDY = """
name = "tiny"
description = "two cells on OV, for the tests"
dataset = "tcga-ov-magnet"
preset = "ov"
rounds = 2
local_epochs = 1
seeds = [10, 20]
methods = ["centralized", "local_only", "fedavg_plain", "federated"]
x_label = "sites"

[[cells]]
id = "two-sites"
x = 2
scenario = { num_sites = 2, partition = "iid" }

[[cells]]
id = "no-mirna"
x = 3
test_graph = "attach-to-train"
scenario = { num_sites = 3, partition = "iid", sites = { "2" = { miRNA = "absent" } } }

[[contrasts]]
a = "no-mirna"
b = "two-sites"
label = "losing miRNA at one of 3 sites"
"""


def test_study_runs_resumes_and_reruns_from_its_files(data_root, tmp_path):
    spec = tmp_path / "tiny.toml"
    spec.write_text(STUDY)
    out = tmp_path / "out"
    assert main(["study", "--data", str(data_root), "--study", str(spec), "--out", str(out)]) == 0
    tidy = pd.read_csv(out / "tiny_tidy.csv")
    assert len(tidy) == 2 * 4 * 2  # cells x methods x seeds, one row per seed
    assert set(tidy["method"]) == {"centralized", "local_only", "fedavg_plain", "federated"}
    assert tidy["error"].isna().all() and tidy["mcc"].notna().all()
    import torch

    assert (tidy["threads"] == torch.get_num_threads()).all()  # recorded per run: part of what reproduces it
    # site 2 of "no-mirna" has no miRNA: its test patients are unpaired, so the groups differ from "all"
    sub = tidy[tidy["cell"] == "no-mirna"]
    assert sub["unpaired_mcc"].notna().all() and (sub["paired_mcc"] != sub["mcc"]).any()
    for name in ("tiny_mcc.png", "tiny_report.md", "tiny_summary.json", "study.toml"):
        assert (out / name).stat().st_size > 100, name
    report = (out / "tiny_report.md").read_text()
    summary = json.loads((out / "tiny_summary.json").read_text())
    assert {r["cell"] for r in summary["rows"]} == {"two-sites", "no-mirna"}
    for row in summary["rows"]:  # mean, sample std, t interval and n, from the tidy rows
        values = tidy[(tidy["cell"] == row["cell"]) & (tidy["method"] == row["method"])]["mcc"]
        assert row["mcc_n"] == 2 and row["mcc_std"] == pytest.approx(float(np.std(values, ddof=1)))
        assert row["mcc_ci_low"] == pytest.approx(st.cell_stats(values.tolist()).ci_low)
    assert len(summary["comparisons"]) == 2 * 5 + 4  # per cell 5 method pairs; the contrast for 4 methods
    for comp in summary["comparisons"]:  # every verdict and sentence follows from its paired interval
        c = st.PairedComparison(comp["n"], comp["mean_diff"], comp["std_diff"], _nan(comp["ci_low"]),
                                _nan(comp["ci_high"]), _nan(comp["p_value"]), tuple(comp["units"]),
                                _nan(comp.get("nb_ci_low")), _nan(comp.get("nb_ci_high")),
                                _nan(comp.get("nb_p_value")), _nan(comp.get("test_train_ratio")))
        finite_p = sum(1 for x in summary["comparisons"] if x["p_value"] is not None)
        adj = st.Adjusted(_nan(comp["p_holm"]), _nan(comp["p_bh"]), finite_p)
        if comp["p_value"] is not None:  # adjusted p-values: Holm / BH over the whole report, never below the raw
            assert comp["p_value"] <= comp["p_bh"] <= comp["p_holm"] + 1e-12
        assert comp["n"] == 2 and comp["units"] == [10, 20]
        assert comp["verdict"] == st.verdict(c.ci_low, c.ci_high)
        label = {"federated": "modality-aware FedAvg", "fedavg_plain": "plain FedAvg", "centralized": "centralized",
                 "local_only": "local-only"}
        if comp["kind"] == "methods":
            assert st.comparison_sentence(label[comp["method"]], label[comp["method_b"]], c, adjusted=adj) in report
        else:
            assert st.comparison_sentence(f"{label[comp['method']]}, no-mirna", "two-sites", c,
                                          words=("higher", "lower"), adjusted=adj) in report
    assert "sample standard deviation (ddof = 1)" in report and "95% t interval" in report
    # the cell's test-graph rule reaches its runs and the report says which rule each cell used
    for cell, rule in (("two-sites", "among-test"), ("no-mirna", "attach-to-train")):
        assert json.loads((out / "cells" / cell / "federated-seed10.json").read_text())["test_graph"] == rule
    assert "no-mirna: `attach-to-train`" in report
    cell_files = sorted((out / "cells").rglob("*-seed*.json"))
    stamps = [p.stat().st_mtime_ns for p in cell_files]
    before = (out / "tiny_tidy.csv").read_text()
    # rerun from the study's own copy of its spec: nothing is trained again, the CSV is identical
    assert main(["study", "--data", str(data_root), "--study", str(out / "study.toml"), "--out", str(out)]) == 0
    assert [p.stat().st_mtime_ns for p in cell_files] == stamps
    assert (out / "tiny_tidy.csv").read_text() == before


def _nan(v):
    return float("nan") if v is None else v


def test_new_methods_join_comparisons_report_and_figure(tmp_path):
    """A strategy added to simulate.METHODS later (e.g. "fedprox") is compared and plotted with no other change."""
    methods = ["centralized", "local_only", "fedavg_plain", "federated", "fedprox"]
    pairs = method_pairs(methods)
    assert {("fedprox", "local_only"), ("fedprox", "centralized"), ("fedprox", "fedavg_plain"),
            ("federated", "fedavg_plain")} <= set(pairs)
    assert ("fedavg_plain", "fedavg_plain") not in pairs
    assert all(a not in ("centralized", "local_only") for a, _ in pairs)
    study = load_study_text(tmp_path, STUDY.replace('x_label = "sites"', 'x_label = "sites"\ntarget_gap = 0.03'))
    study = study.model_copy(update={"methods": methods})
    rng = np.random.default_rng(0)
    rows = [{"study": "tiny", "cell": c.id, "group": c.group, "x": c.x, "dataset": "d", "method": m, "seed": s,
             "mcc": 0.5 + 0.1 * (m == "fedprox") + rng.normal(0, 0.01), "val_mcc": 0.4 + 0.1 * (m == "fedprox"),
             "acc": 0.7, "f1": 0.6, "paired_mcc": 0.5,
             "unpaired_mcc": np.nan, "seconds_per_round": 0.1, "error": ""}
            for c in study.cells for m in methods for s in (10, 20, 30)]
    report = write_outputs(study, pd.DataFrame(rows), tmp_path, "synthetic rows for a wording test").read_text()
    assert "FedProx vs local-only: **helps** (+0.0" in report and "FedProx vs plain FedAvg: **helps**" in report
    assert "target (at or above local-only and within 0.03 of centralized, on the means, MCC on own sites' test " \
           "patients) **met** by the best " \
           f"trained method ({study.best_method.describe()}), FedProx: vs local-only +0.0" in report
    assert (tmp_path / "tiny_mcc.png").stat().st_size > 1000
    comps = comparisons_frame(study, pd.DataFrame(rows))
    assert set(comps[comps["kind"] == "cells"]["method"]) == set(methods)


def test_report_names_each_cells_dataset_and_preset_and_adjusted_p_values(tmp_path):
    """Issue 23: the setup line named the study's default dataset and preset for every cell."""
    text = STUDY.replace('id = "no-mirna"\n', 'id = "no-mirna"\ndataset = "tcga-brca-rjive"\npreset = "brca"\n')
    study = load_study_text(tmp_path, text)
    methods = ["centralized", "local_only", "fedavg_plain", "federated"]
    rng = np.random.default_rng(1)
    rows = [{"study": "tiny", "cell": c.id, "group": c.group, "x": c.x, "dataset": c.dataset or study.dataset,
             "method": m, "seed": s, "mcc": 0.5 + rng.normal(0, 0.05), "acc": 0.7, "f1": 0.6, "paired_mcc": 0.5,
             "unpaired_mcc": np.nan, "seconds_per_round": 0.1, "error": ""}
            for c in study.cells for m in methods for s in (10, 20, 30)]
    report = write_outputs(study, pd.DataFrame(rows), tmp_path, "synthetic rows").read_text()
    setup = next(line for line in report.splitlines() if line.startswith("**Setup.**"))
    assert "`tcga-ov-magnet`, preset `ov` (cells two-sites)" in setup
    assert "`tcga-brca-rjive`, preset `brca` (cells no-mirna)" in setup
    summary = json.loads((tmp_path / "tiny_summary.json").read_text())
    comps = pd.DataFrame(summary["comparisons"])
    p = comps["p_value"].astype(float)
    assert np.allclose(comps["p_holm"].astype(float), st.holm(p), equal_nan=True)
    assert np.allclose(comps["p_bh"].astype(float), st.benjamini_hochberg(p), equal_nan=True)
    assert f"This report makes {len(comps)} comparisons ({int(p.notna().sum())} with a p-value)" in report
    assert "| p (paired t) | p Holm | p BH | corrected 95% CI | p corrected | verdict |" in report


def test_report_names_the_cells_that_have_fewer_seeds(tmp_path):
    """The label-skew study's OV cells have seeds 10-50 (the splits the data ship) and its BRCA cell 10-100: the
    setup line lists the study's seeds and then each cell that has fewer, with the seeds it has."""
    study = load_study_text(tmp_path, STUDY)
    rows = [{"study": "tiny", "cell": c.id, "group": c.group, "x": c.x, "dataset": study.dataset, "method": m,
             "seed": s, "mcc": 0.5 + 0.01 * s / 10 + 0.02 * i, "acc": 0.7, "f1": 0.6, "paired_mcc": 0.5,
             "unpaired_mcc": np.nan, "seconds_per_round": 0.1, "error": ""}
            for c in study.cells for i, m in enumerate(study.methods)
            for s in ((10, 20, 30) if c.id == "two-sites" else (10, 20))]
    full = study.model_copy(update={"seeds": [10, 20, 30]})
    setup = next(line for line in write_outputs(full, pd.DataFrame(rows), tmp_path, "synthetic rows").read_text()
                 .splitlines() if line.startswith("**Setup.**"))
    assert ("seeds [10, 20, 30]. Cells whose runs have the compared metric for other seeds than these (a split "
            "layout that ships fewer, failed or unfinished runs, or every site withholding its evaluation): "
            "no-mirna: [10, 20]. Torch threads per run: not recorded") in setup
    every = [r for r in rows if r["seed"] != 30]
    setup = next(line for line in write_outputs(study, pd.DataFrame(every), tmp_path, "synthetic rows").read_text()
                 .splitlines() if line.startswith("**Setup.**"))
    assert "other seeds" not in setup
    # a failed run is not a finished seed; a method with fewer seeds than the others is named
    failed = [{**r, "error": "RuntimeError: boom", "mcc": np.nan} if (r["cell"], r["method"], r["seed"]) ==
              ("two-sites", "federated", 20) else r for r in every]
    setup = next(line for line in write_outputs(study, pd.DataFrame(failed), tmp_path, "synthetic rows").read_text()
                 .splitlines() if line.startswith("**Setup.**"))
    assert "evaluation): two-sites: modality-aware FedAvg [10]. Torch threads" in setup
    # the thread counts the runs recorded (a run reproduces exactly only at its own)
    threads = [{**r, "threads": 1 if r["seed"] == 10 else 2} for r in every]
    setup = next(line for line in write_outputs(study, pd.DataFrame(threads), tmp_path, "synthetic rows").read_text()
                 .splitlines() if line.startswith("**Setup.**"))
    n = len(threads) // 2
    assert f"Torch threads per run: 1: {n} runs, 2: {n} runs; a run reproduces exactly only at its own" in setup


def load_study_text(tmp_path, text):
    path = tmp_path / "study.toml"
    path.write_text(text)
    return load_study(path)


def test_study_files_are_checked(tmp_path):
    bad = {STUDY.replace('"fedavg_plain", "federated"]', '"fedavg_plain", "fedprx"]'): "unknown methods",
           STUDY.replace('b = "two-sites"', 'b = "two-site"'): "contrasts[0] names cell 'two-site'",
           STUDY.replace('id = "no-mirna"', 'id = "two-sites"').replace('b = "two-sites"\n', 'b = "two-sites"\n'):
               "cell ids must be unique",
           STUDY.replace('miRNA = "absent"', 'miRNA = { by = "label" }'): "rates: Field required"}
    for text, message in bad.items():
        with pytest.raises(DataError, match=message.replace("[", "\\[").replace("(", "\\(")):
            load_study_text(tmp_path, text)


def test_builtin_studies_are_valid():
    names = set(builtin_studies())
    assert {"rate", "heterogeneity", "stress", "sites", "extensibility", "mnar", "gap"} <= names
    for name in names:
        study = load_study(name)
        assert len(study.seeds) >= 5 and study.cells
    gap = load_study("gap")
    assert set(gap.methods) < set(METHODS) and gap.target_gap == 0.03 and gap.evaluation == "consortium"
    assert set(gap.tune) == {"fedprox", "fedadam", "fedyogi", "personalized"}
    assert load_study("label-skew").evaluation == "consortium"
    assert {c.dataset for c in gap.cells} == {"tcga-brca-rjive", "tcga-ov-magnet", "tcga-brca-mixomics"}


def test_a_study_can_be_restricted_to_some_cells_and_methods(tmp_path):
    from simulations.study import select

    study = load_study_text(tmp_path, STUDY)
    part = select(study, "no-mirna", "federated,local_only")
    assert [c.id for c in part.cells] == ["no-mirna"] and part.methods == ["local_only", "federated"]
    assert part.contrasts == []  # its other cell is left out
    assert select(study, None, None) == study
    assert [k.a for k in select(study, None, "federated").contrasts] == ["no-mirna"]
    for cells, methods, message in (("nope", None, "--cells: unknown \\['nope'\\]"),
                                    (None, "fedprox", "--methods: unknown \\['fedprox'\\]"), (",", None, "none given")):
        with pytest.raises(ValueError, match=message):
            select(study, cells, methods)


def test_best_method_rule_reads_validation_mcc_never_test_metrics():
    from simulations.study import BestMethodRule, Study, best_methods

    study = Study.model_validate({"name": "r", "dataset": "d", "seeds": [1, 2],
                                  "methods": ["centralized", "local_only", "federated", "fedadam"],
                                  "cells": [{"id": "c", "x": 1, "scenario": {"num_sites": 2}}]})
    rows = [{"cell": "c", "method": m, "seed": s, "val_mcc": v, "mcc": t}
            for m, v, t in (("federated", 0.6, 0.1), ("fedadam", 0.4, 0.9)) for s in (1, 2)]
    df = pd.DataFrame(rows)
    assert best_methods(study, df) == {"c": "federated"}  # highest validation MCC although its test MCC is lower
    df["mcc"] = df["mcc"][::-1].to_numpy()  # any test metric: no effect
    assert best_methods(study, df) == {"c": "federated"}
    assert best_methods(study, df.drop(columns="mcc")) == {"c": "federated"}
    assert best_methods(study, df.drop(columns="val_mcc")) == {"c": None}  # no validation score: no pick
    declared = study.model_copy(update={"best_method": BestMethodRule(rule="declared", method="fedadam")})
    assert best_methods(declared, df) == {"c": "fedadam"}


def _skewed_rows(study, rng):
    """Per-seed rows where local-only reads high on its own site's test patients (0.9) and low on the consortium's
    (0.2), while the one-global-model methods score the same on both (0.5)."""
    rows = []
    for c in study.cells:
        for m in study.methods:
            for s in (10, 20, 30, 40):
                shared = 0.5 + rng.normal(0, 0.005)
                own, consortium = (0.9 + rng.normal(0, 0.01), 0.2 + rng.normal(0, 0.01)) if m == "local_only" \
                    else (shared, shared)
                rows.append({"study": "tiny", "cell": c.id, "group": c.group, "x": c.x, "dataset": "d", "method": m,
                             "seed": s, "mcc": own, "consortium_mcc": consortium, "acc": 0.7, "consortium_acc": 0.6,
                             "f1": 0.6, "paired_mcc": own, "unpaired_mcc": np.nan, "consortium_paired_mcc": consortium,
                             "consortium_unpaired_mcc": np.nan, "val_mcc": 0.6 if m == "federated" else 0.5,
                             "seconds_per_round": 0.1, "error": ""})
    return pd.DataFrame(rows)


def test_the_declared_evaluation_is_compared_and_both_are_shown_labelled(tmp_path):
    """Issue 23 item 3: a study that declares the consortium evaluation compares, judges its target and plots on the
    consortium's test patients, where local-only is not rewarded for knowing its own site; the findings, the table
    and the summary show both evaluations, labelled, the declared one first."""
    text = STUDY.replace('x_label = "sites"', 'x_label = "sites"\ntarget_gap = 0.03\nevaluation = "consortium"')
    study = load_study_text(tmp_path, text)
    assert study.metric == "consortium_mcc" and load_study_text(tmp_path, STUDY).metric == "mcc"
    df = _skewed_rows(study, np.random.default_rng(3))
    report = write_outputs(study, df, tmp_path, "synthetic rows").read_text()
    comps = comparisons_frame(study, df)
    vs_local = comps[(comps["kind"] == "methods") & (comps["method"] == "federated")
                     & (comps["method_b"] == "local_only")]
    assert (vs_local["metric"] == "consortium_mcc").all() and (vs_local["mean_diff"] > 0.25).all()
    own = comparisons_frame(study, df, "mcc")  # the other evaluation says the opposite
    assert (own[(own["method"] == "federated") & (own["method_b"] == "local_only")]["mean_diff"] < -0.35).all()
    assert "modality-aware FedAvg vs local-only: **helps** (+0.3" in report
    assert ("target (at or above local-only and within 0.03 of centralized, on the means, MCC on consortium test "
            "patients) **met**") in report
    findings = [line for line in report.splitlines() if line.startswith("- **two-sites**")][0]
    assert findings.index("MCC on consortium test patients (compared below): centralized 0.") < \
        findings.index("MCC on own sites' test patients: centralized 0.")
    assert "local-only 0.20" in findings and "local-only 0.89" in findings
    header = next(line for line in report.splitlines() if line.startswith("| cell |"))
    assert header.index("MCC consortium mean ± sd") < header.index("MCC own sites mean ± sd")
    assert "## Paired comparisons (MCC on consortium test patients)" in report
    summary = json.loads((tmp_path / "tiny_summary.json").read_text())
    assert summary["evaluation"]["declared"] == "consortium"
    rows = pd.DataFrame(summary["rows"]).set_index(["cell", "method"])
    assert rows.loc[("two-sites", "local_only"), "consortium_mcc_mean"] < 0.25 < 0.85 < \
        rows.loc[("two-sites", "local_only"), "mcc_mean"]


def test_runs_without_the_consortium_evaluation_say_so(tmp_path):
    """A tidy CSV written before the consortium evaluation was recorded is reanalysed with that column said to be
    missing, not blank and not zero; a study declaring it then has no comparison to make."""
    from simulations.study import reanalyse

    study = load_study_text(tmp_path, STUDY)
    df = _skewed_rows(study, np.random.default_rng(4)).drop(columns=[c for c in _skewed_rows(
        study, np.random.default_rng(4)).columns if c.startswith("consortium_")])
    csv = tmp_path / "old.csv"
    df.to_csv(csv, index=False)
    report = reanalyse(study, csv, tmp_path / "own", "synthetic rows").read_text()
    assert "MCC on consortium test patients: not recorded by these runs" in report
    assert "| not recorded |" in report
    assert "modality-aware FedAvg vs local-only: **hurts**" in report  # the own evaluation, as declared
    declared = study.model_copy(update={"evaluation": "consortium", "target_gap": 0.03})
    report = reanalyse(declared, csv, tmp_path / "consortium", "synthetic rows").read_text()
    assert "MCC on consortium test patients (compared below): not recorded by these runs" in report
    assert "vs local-only:" not in report
    assert ("target not judged: MCC on consortium test patients, the study's declared evaluation, is not recorded "
            "by these runs") in report


def test_seeds_a_split_layout_does_not_ship_are_skipped_not_failed(data_root, tmp_path, monkeypatch, capsys):
    """tcga-ov-magnet ships splits for seeds 10-50 only, each preprocessed on its own training patients: a study
    asking for seed 60 runs the seeds the data ship and says which it leaves out, instead of recording failures."""
    from simulations import study as study_module

    study = load_study_text(tmp_path, STUDY).model_copy(update={"seeds": [10, 60]})
    ran = []
    monkeypatch.setattr(study_module, "run_tasks", lambda fn, todo, n, **kw: ran.extend(todo))
    advanced = []
    study_module.run_grid(study, data_root, tmp_path / "out", advance=advanced.append)
    assert sorted({(r.cell.id, r.seed) for r in ran}) == [("no-mirna", 10), ("two-sites", 10)]
    assert "seeds [60] are not run" in capsys.readouterr().out.replace("\n", " ")
    assert sum(advanced) == 2 * len(study.methods) * study.rounds  # the skipped cell-seeds still end the bar


def test_the_rules_held_out_sensitivity_reads_each_tuned_seed_at_the_other_seeds_choice():
    """A tuned method's validation MCC is the best of its grid's on the patients it is read on; the sensitivity
    reads each seed at the setting the other seeds chose. Here the grid's best setting flips between seeds, so the
    tuned method wins the declared rule (its per-seed maxima) and loses the held-out reading to an untuned one."""
    from simulations.study import BestMethodRule, choose_best, held_out_validation

    def tuned(a, b):
        return json.dumps({"choice": None, "grid": [{"k": "a", "val_mcc": a}, {"k": "b", "val_mcc": b}]})

    grid = {1: (0.9, 0.1), 2: (0.2, 0.5), 3: (0.3, 0.6)}
    rows = [{"cell": "c", "method": "m", "seed": s, "val_mcc": max(a, b), "tuned": tuned(a, b)}
            for s, (a, b) in grid.items()]
    rows += [{"cell": "c", "method": "u", "seed": s, "val_mcc": 0.4, "tuned": ""} for s in grid]
    df = pd.DataFrame(rows)
    held = held_out_validation(df)
    # seed 1: the others prefer b (0.55 vs 0.25) -> 0.1; seed 2: a (0.6 vs 0.35) -> 0.2; seed 3: a -> 0.3
    assert held[held["method"] == "m"]["val_mcc"].tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert held[held["method"] == "u"]["val_mcc"].tolist() == [0.4, 0.4, 0.4]
    rule = BestMethodRule()
    assert choose_best(rule, ["m", "u"], df[["method", "seed", "val_mcc"]]) == "m"
    assert choose_best(rule, ["m", "u"], held[["method", "seed", "val_mcc"]]) == "u"
    assert df["val_mcc"].tolist()[:3] == [0.9, 0.5, 0.6]  # the input is not modified

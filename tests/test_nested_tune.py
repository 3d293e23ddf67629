"""Nested (per-split) tuning in a study (issue 23 item 2): each (cell, seed) chooses its tuned methods' settings on
its own validation-only view, reports the run with the chosen setting, and reads no test label before that run.
Tiny budgets (2 rounds x 2 local epochs, one seed, OV)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_tune import flip_test_labels

import magnet_core.consortium.simulated as simulated
from client.handlers import forget_sites
from magnet_core.cohort.data import DataError
from magnet_core.consortium.scenarios import load_scenario
from simulations.nested import RULE, compact
from simulations.simulate import RunSpec, run_methods
from simulations.study import Study, load_study, run_cell_seed, select, tidy_frame, write_outputs

GRIDS = {"fedprox": {"proximal-mu": [0.01, 1.0]}, "personalized": {"personalize-part": ["head", "head+graph"]}}
SPEC = {"name": "nested", "dataset": "tcga-ov-magnet", "seeds": [10], "rounds": 2, "local_epochs": 2,
        "methods": ["local_only", "federated", "fedprox", "personalized"], "target_gap": 0.03, "tune": GRIDS,
        "evaluation": "consortium",
        "cells": [{"id": "c", "x": 3, "scenario": {"num_sites": 3, "partition": "iid"}}]}


def _fresh() -> None:
    simulated.load_consortium.cache_clear()
    forget_sites()


def _run(data_root: Path, out: Path) -> dict[str, dict]:
    study = Study.model_validate(SPEC)
    _fresh()
    try:
        run_cell_seed(study, study.cells[0], 10, data_root, out, "inprocess", lambda n: None)
    finally:
        _fresh()
    return {m: json.loads((out / "cells" / "c" / f"{m}-seed10.json").read_text()) for m in study.methods}


@pytest.fixture(scope="module")
def baseline(data_root, tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    out = tmp_path_factory.mktemp("nested") / "study"
    return out, _run(data_root, out)


def test_test_labels_take_no_part_in_nested_tuning(baseline, data_root, tmp_path, monkeypatch):
    """Flipping every test patient's label leaves every grid score, every choice and every val_mcc identical,
    while the reported runs (scored on those test patients) do change: the tuning cannot have read a test label."""
    _, records = baseline
    monkeypatch.setattr(simulated, "load_for_seed", flip_test_labels(simulated.load_for_seed))
    other = _run(data_root, tmp_path / "flipped")
    for method, record in records.items():
        assert record["error"] is None, (method, record["error"])
        assert _choices(other[method]["tuned"]) == _choices(record["tuned"]), method
        assert other[method]["metrics"].get("val_mcc") == record["metrics"].get("val_mcc"), method
        assert other[method]["run_settings"] == record["run_settings"], method
    assert any(other[m]["metrics"]["mcc"] != records[m]["metrics"]["mcc"] for m in records)  # the flip reached them


def _choices(tuned: dict | None) -> dict | None:
    """A tuning record without its CPU time: the grid, every setting's validation MCC and the choice."""
    return None if tuned is None else {k: v for k, v in tuned.items() if k != "cpu_seconds"}


def test_chosen_setting_is_the_validation_argmax_and_the_reported_run_uses_it(baseline, ov_path):
    out, records = baseline
    cell_dir = out / "cells" / "c"
    assert {m for m, r in records.items() if r["tuned"]} == set(GRIDS)
    # a reference (local-only, centralized) is never a best-method candidate: it is not trained on the view
    assert "val_mcc" not in records["local_only"]["metrics"]
    for method, record in records.items():
        if method == "local_only":
            continue
        assert record["metrics"]["val_mcc"] is not None, method
        tuned = record["tuned"]
        if not tuned:
            continue
        scores = [s["val_mcc"] for s in tuned["settings"]]
        assert [s["setting"] for s in tuned["settings"]] == [{k: v} for k, vs in GRIDS[method].items() for v in vs]
        assert all(v is not None and math.isfinite(v) for v in scores)
        best = scores.index(max(scores))  # the first of the highest: ties go to the grid's order
        assert tuned["choice_index"] == best and tuned["choice"] == tuned["settings"][best]["setting"]
        assert record["metrics"]["val_mcc"] == scores[best]  # the chosen setting's score, no extra training
        assert tuned["rule"] == RULE
        for key, value in tuned["choice"].items():
            assert record["run_settings"][key] == value
    # the reported runs ran with the choice: FedProx's run identity, the personalization record
    mu = records["fedprox"]["tuned"]["choice"]["proximal-mu"]
    state = torch.load(cell_dir / "runs" / "fedprox-seed10" / "checkpoint.pt", weights_only=True)
    assert state["config"]["proximal_mu"] == mu
    tuning_runs = sorted((cell_dir / "validation").glob("tune-fedprox-*/runs/fedprox-seed10"))
    assert len(tuning_runs) == 2 and all((d / "model.pt").exists() and not (d / "checkpoint.pt").exists()
                                         for d in tuning_runs)  # scored, and no resume checkpoint left behind
    part = records["personalized"]["tuned"]["choice"]["personalize-part"]
    assert json.loads((cell_dir / "runs" / "federated-seed10" / "personalization.json").read_text())["part"] == part
    # this budget separates the two mu values (the argmax is not just the first setting by a tie)
    fedprox_scores = [s["val_mcc"] for s in records["fedprox"]["tuned"]["settings"]]
    assert len(set(fedprox_scores)) == 2
    # each grid score is what a run of that setting on the validation-only view scores on its own: FedProx with the
    # other mu, and personalized with the chosen part trained from scratch (not re-using the view's global model)
    view = RunSpec(data_path="validation:" + str(ov_path), scenario=str(cell_dir / "scenario.toml"), seed=10,
                   rounds=2, local_epochs=2, out_dir=out.parent / "view")
    alone, _, _ = run_methods(dataclasses.replace(view, method_overrides={"fedprox": {"proximal_mu": 1.0}}),
                              ["fedprox"])
    assert alone["fedprox"]["consortium_mcc"] == fedprox_scores[1]
    # scored as the study declares (evaluation = "consortium"): each site's personalized model on every site's
    # validation patients, not only its own (which would reward knowing its own site's label mix)
    assert {r["tuned"]["validation_metric"] for r in records.values() if r["tuned"]} == {"consortium_mcc"}
    alone, _, _ = run_methods(dataclasses.replace(view, personalize_part=part), ["personalized"])
    assert alone["personalized"]["consortium_mcc"] == records["personalized"]["metrics"]["val_mcc"]
    assert alone["personalized"]["mcc"] != alone["personalized"]["consortium_mcc"]  # the two differ here
    # the tidy CSV carries the record compactly
    study = Study.model_validate(SPEC)
    df = tidy_frame(study, out)
    cells = dict(zip(df["method"], df["tuned"]))
    assert cells["local_only"] == "" and cells["federated"] == ""
    for method in GRIDS:
        assert json.loads(cells[method]) == json.loads(compact(records[method]["tuned"]))
        assert json.loads(cells[method])["choice"] == records[method]["tuned"]["choice"]


def test_report_lists_the_grids_and_the_rule(tmp_path):
    study = Study.model_validate(SPEC)
    rows = [{"study": "nested", "cell": "c", "group": "", "x": 3, "dataset": "d", "method": m, "seed": s,
             "mcc": 0.3 + 0.01 * s, "val_mcc": 0.2, "acc": 0.6, "f1": 0.5, "paired_mcc": 0.3, "unpaired_mcc": None,
             "seconds_per_round": 0.1, "tuned": "", "error": ""} for m in study.methods for s in (10, 20)]
    report = write_outputs(study, pd.DataFrame(rows), tmp_path, "synthetic rows").read_text()
    setup = next(line for line in report.splitlines() if line.startswith("**Setup.**"))
    assert "FedProx: `proximal-mu` in [0.01, 1.0]" in setup
    assert "personalized: `personalize-part` in [\"head\", \"head+graph\"]" in setup
    assert RULE in setup and "`tuned` column" in setup
    summary = json.loads((tmp_path / "nested_summary.json").read_text())
    assert summary["tune"] == {"grids": GRIDS, "rule": RULE}
    assert select(study, None, "federated,fedprox").tune == {"fedprox": GRIDS["fedprox"]}


STUDY_TOML = """
name = "bad"
dataset = "tcga-ov-magnet"
methods = ["centralized", "local_only", "federated", "fedprox", "fedadam"]
{extra}
[tune.{method}]
{grid}

[[cells]]
id = "c"
x = 1
scenario = {{ num_sites = 2 }}
"""


@pytest.mark.parametrize("method, grid, extra, words", [
    ("fedprox", "mu = [0.1]", "", "[tune] fedprox: mu: not a setting of method 'fedprox'"),
    ("fedprox", "proximal-mu = [0.1, -1]", "", "[tune] fedprox: proximal-mu=-1:"),
    ("fedprox", "proximal-mu = [0.1, 0.1]", "", "[tune] fedprox: proximal-mu: value 0.1 given more than once"),
    ("fedprox", "proximal-mu = []", "", "[tune] fedprox: proximal-mu: expected a non-empty list"),
    ("fedadam", "server-lr = [0]", "", "[tune] fedadam: server-lr=0:"),
    ("fedadam", "server-lr = [0.1]\nserver-beta1 = [0.9]\nserver-beta2 = [0.99]", "",
     "[tune] fedadam: at most two settings"),
    ("fedlc", "label-tau = [1.0]", "", "[tune] fedlc: not a method the study runs"),
    ("centralized", "proximal-mu = [0.1]", "", "method 'centralized' has no setting to tune"),
    ("fedadam", "server-lr = [0.1]", "settings = { server-lr = 0.05 }",
     "[tune] fedadam server-lr: also fixed by the settings of cell 'c'"),
])
def test_bad_study_grids_name_the_file_method_and_key(tmp_path, method, grid, extra, words):
    path = tmp_path / "bad.toml"
    path.write_text(STUDY_TOML.format(method=method, grid=grid, extra=extra))
    with pytest.raises(DataError) as info:
        load_study(path)
    message = str(info.value)
    assert str(path) in message and words in message


def test_label_skew_study_is_declared_before_it_runs():
    study = load_study("label-skew")
    assert study.target_gap == 0.03 and study.best_method.rule == "highest-validation-mcc"
    assert len(study.seeds) == 10 and "fedadam" not in study.methods and "fedyogi" not in study.methods
    assert set(study.tune) == {"fedprox", "logit_adjusted", "fedlc", "fedproto", "personalized"}
    assert all(len(v) in (2, 3) for grid in study.tune.values() for v in grid.values())
    rjive = next(c for c in study.cells if c.dataset == "tcga-brca-rjive")
    builtin = load_scenario("label-skew-3").model_dump(exclude={"name", "description"})
    assert study.scenario_of(rjive).model_dump(exclude={"name", "description"}) == builtin
    sites = load_study("sites")
    for cell in ("alpha-0.1", "alpha-1.0"):  # the same scenarios as the sites study's label-skew cells
        mine = next(c for c in study.cells if c.id == cell)
        theirs = next(c for c in sites.cells if c.id == cell)
        assert mine.scenario == theirs.scenario and (mine.dataset or study.dataset) == sites.dataset
    gap = load_study("gap")
    assert set(gap.tune) == {"fedprox", "fedadam", "fedyogi", "personalized"}

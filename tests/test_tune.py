"""magnet-fl tune: settings chosen on validation patients only (issue 23 item 2), and runs that record their
validation MCC for the study's best-method rule. Tiny budgets (2 rounds x 1 local epoch, one seed)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import magnet_core.consortium.simulated as simulated
from client.handlers import forget_sites
from simulations.cli import main
from simulations.simulate import FEDPROX_MU, RunSpec, run_methods
from simulations.study import Study, best_methods, run_cell_seed, tidy_frame
from simulations.tune import choose, parse_grid, settings_of, tune

TINY = {"rounds": 2, "local_epochs": 1}


def _fresh() -> None:
    simulated.load_consortium.cache_clear()
    forget_sites()


@pytest.fixture
def cold():
    _fresh()
    yield
    _fresh()


def _tune_ov(ov_path: Path, out: Path) -> dict:
    spec = RunSpec(data_path=str(ov_path), scenario="iid-3", seed=10, out_dir=out, **TINY)
    return tune(spec, "fedadam", parse_grid(["server-lr=0.01,0.3"], "fedadam"), [10])


def flip_test_labels(real_load):
    """``load_for_seed`` with every test patient's label changed (class c -> C - 1 - c): what a tuning that never
    reads a test label must not notice."""

    def flipped(path, seed, **kw):
        cohort = real_load(path, seed, **kw)
        test = cohort.split_indices("test")
        labels = cohort.labels.copy()
        labels[test] = cohort.num_classes - 1 - labels[test]
        assert (labels[test] != cohort.labels[test]).any()
        return dataclasses.replace(cohort, labels=labels)

    return flipped


def test_test_patients_take_no_part_in_tuning(ov_path, tmp_path, monkeypatch, cold):
    """(a) Flipping every test patient's label changes nothing: not one validation MCC and not the choice. Tuning
    cannot have read a test label. (Removing the test patients is checked on the view itself, below.)"""
    real_load = simulated.load_for_seed
    baseline = _tune_ov(ov_path, tmp_path / "a")
    _fresh()
    monkeypatch.setattr(simulated, "load_for_seed", flip_test_labels(real_load))
    other = _tune_ov(ov_path, tmp_path / "flipped")
    assert [r["val_mcc"] for r in other["settings"]] == [r["val_mcc"] for r in baseline["settings"]]
    assert other["choice"] == baseline["choice"]
    # and the runs did train and score: every setting has a validation MCC from 31 validation patients of seed 10
    assert all(r["val_mcc"]["10"] is not None for r in baseline["settings"])


def test_validation_view_drops_test_patients_before_its_own_split(ov_path, monkeypatch, cold):
    full, _ = simulated.load_consortium(str(ov_path), "iid-3", 10)
    view, sites = simulated.load_consortium("validation:" + str(ov_path), "iid-3", 10)
    real_load = simulated.load_for_seed

    def removed(path, seed, **kw):  # the same data with no test patient at all: the very same view and sites
        cohort = real_load(path, seed, **kw)
        return cohort.subset(cohort.split_indices("train", "val"))

    _fresh()
    monkeypatch.setattr(simulated, "load_for_seed", removed)
    view_b, sites_b = simulated.load_consortium("validation:" + str(ov_path), "iid-3", 10)
    assert list(view_b.sample_ids) == list(view.sample_ids) and list(view_b.split) == list(view.split)
    for a, b in zip(sites, sites_b, strict=True):
        assert list(a.sample_ids) == list(b.sample_ids) and list(a.split) == list(b.split)
        assert (a.mask == b.mask).all() and (a.labels == b.labels).all()
    test_ids = set(full.sample_ids[full.split == "test"])
    assert not test_ids & set(view.sample_ids)
    assert set(view.sample_ids) == set(full.sample_ids[full.split != "test"])
    assert set(view.split) == {"train", "test"}  # "test" in the view = its validation patients
    assert int((view.split == "test").sum()) == pytest.approx(0.125 * view.n, abs=2)
    with pytest.raises(ValueError, match="validation:"):
        simulated.load_consortium("validation:validation:" + str(ov_path), "iid-3", 10)


@pytest.mark.parametrize("scores, expected", [
    ([[0.1, 0.3], [0.4, 0.2], [0.25, 0.25]], 1),     # means 0.2, 0.3, 0.25: the argmax
    ([[0.3], [0.5], [0.5]], 1),                       # a tie: the setting given first in the grid
    ([[0.5, 0.5], [0.7, None], [0.6, float("nan")]], 1),  # undefined scores are left out of a mean
    ([[None], [-0.2], [-0.1]], 2),                    # a setting with no score is never chosen
])
def test_choice_is_the_argmax_of_mean_validation_mcc_first_on_ties(scores, expected):
    """(b)"""
    assert choose(scores) == expected


def test_choice_needs_a_validation_score():
    with pytest.raises(ValueError, match="no setting has a validation MCC"):
        choose([[None], [float("nan")]])


def test_grid_order_is_the_tie_order():
    grid = parse_grid(["server-lr=0.1,0.01", "server-beta1=0.9,0.5"], "fedadam")
    assert settings_of(grid) == [{"server-lr": 0.1, "server-beta1": 0.9}, {"server-lr": 0.1, "server-beta1": 0.5},
                                 {"server-lr": 0.01, "server-beta1": 0.9}, {"server-lr": 0.01, "server-beta1": 0.5}]


def test_runs_record_validation_mcc_and_the_study_rule_reads_it(data_root, ov_path, tmp_path, cold):
    """(c) The trained methods' runs record val_mcc (from the validation-only view: the same number a run on that
    view scores), the study's tidy rows carry it, and the best-method rule picks by it. The references
    (centralized, local-only) are never picked, so they are not trained on the view: no val_mcc."""
    study = Study.model_validate({"name": "tiny", "dataset": ov_path.name, "seeds": [10],
                                  "methods": ["centralized", "local_only", "fedavg_plain", "federated"], **TINY,
                                  "target_gap": 0.03,  # the target is what reads the rule
                                  "cells": [{"id": "c", "x": 3, "scenario": {"num_sites": 3, "partition": "iid"}}]})
    out = tmp_path / "study"
    run_cell_seed(study, study.cells[0], 10, data_root, out, "inprocess", lambda n: None)
    df = tidy_frame(study, out)
    assert (df["error"] == "").all()
    assert df.set_index("method")["val_mcc"].notna().to_dict() == {"centralized": False, "local_only": False,
                                                                    "fedavg_plain": True, "federated": True}
    rows = {r["method"]: r for r in df.to_dict("records")}
    # the number is the same run on the validation-only view (test patients dropped first)
    view = RunSpec(data_path="validation:" + str(ov_path), scenario=str(out / "cells" / "c" / "scenario.toml"),
                   seed=10, out_dir=tmp_path / "view", **TINY)
    alone, _, _ = run_methods(view, ["fedavg_plain"])
    assert rows["fedavg_plain"]["val_mcc"] == alone["fedavg_plain"]["mcc"]
    trained = df[df["method"].isin(["fedavg_plain", "federated"])]
    top = trained["val_mcc"].max()
    expected = next(m for m in ["fedavg_plain", "federated"] if rows[m]["val_mcc"] == top)
    assert best_methods(study, df) == {"c": expected}
    # the rule reads the validation column only: scrambling every test metric changes nothing
    scrambled = df.assign(mcc=np.random.default_rng(0).permutation(df["mcc"].to_numpy()))
    assert best_methods(study, scrambled) == {"c": expected}


@pytest.mark.parametrize("grid, method, words", [
    (["mu=0.1"], "fedprox", "--grid mu: not a setting of method 'fedprox'; tunable: aggregation, proximal-mu"),
    (["proximal-mu=0.1,abc"], "fedprox", "--grid proximal-mu=abc:"),
    (["proximal-mu=0.1,-1"], "fedprox", "--grid proximal-mu=-1:"),
    (["server-lr=0.1,,0.3"], "fedadam", "--grid server-lr: empty value"),
    (["server-lr=0.1,0.1"], "fedadam", "--grid server-lr: value 0.1 given more than once"),
    (["server-lr=0"], "fedadam", "--grid server-lr=0:"),
    (["proximal-mu=0.1"], "fedadam", "--grid proximal-mu: not a setting of method 'fedadam'"),
    (["server-lr"], "fedadam", "--grid 'server-lr': expected KEY=V1,V2"),
    (["server-lr=0.1", "server-lr=0.3"], "fedadam", "--grid server-lr: given twice"),
    (["a=1", "b=2", "c=3"], "fedadam", "--grid: at most two settings"),
    (["personalize-part=head,body"], "personalized", "--grid personalize-part=body: not a part"),
    (["proximal-mu=0.1"], "centralized", "method 'centralized' has no setting to tune"),
])
def test_bad_grid_is_one_clear_line(grid, method, words):
    """(d)"""
    with pytest.raises(ValueError) as info:
        parse_grid(grid, method)
    message = str(info.value)
    assert words in message and "\n" not in message


def test_cli_refuses_a_bad_grid_in_one_line(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["tune", "--method", "fedadam", "--grid", "server-lr=0.01,fast", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --grid server-lr=fast:") and "\n" not in err
    assert not out.exists()


def test_cli_refuses_seeds_a_split_layout_does_not_ship(ov_path, tmp_path, capsys):
    assert main(["tune", "--method", "fedprox", "--grid", "proximal-mu=0,0.1", "--data", str(ov_path),
                 "--seeds", "1,2,3", "--out", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err
    assert "--seeds 1,2,3" in err and "ships splits for seeds [10, 20, 30, 40, 50] only" in err


def test_cli_writes_every_setting_the_choice_command_and_seeds(ov_path, tmp_path, cold):
    out = tmp_path / "tuning.json"
    argv = ["tune", "--method", "fedprox", "--grid", "proximal-mu=0.01,1", "--data", str(ov_path), "--seeds", "10",
            "--rounds", "2", "--local-epochs", "1", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["command"] == "magnet-fl " + " ".join(argv)
    assert result["seeds"] == [10] and result["grid"] == {"proximal-mu": [0.01, 1]}
    assert [r["setting"] for r in result["settings"]] == [{"proximal-mu": 0.01}, {"proximal-mu": 1}]
    means = [r["mean"] for r in result["settings"]]
    assert result["choice_index"] == choose([list(r["val_mcc"].values()) for r in result["settings"]])
    assert means[result["choice_index"]] == max(means)
    assert result["current_defaults"] == {"proximal-mu": FEDPROX_MU}
    assert pd.notna(means).all()


def test_cli_chooses_on_the_declared_evaluation(ov_path, tmp_path, cold):
    """--evaluation consortium scores each site's personalized model on every site's validation patients; own
    (the default) on its own site's only. The record says which."""
    results = {}
    for evaluation in ("own", "consortium"):
        out = tmp_path / f"{evaluation}.json"
        assert main(["tune", "--method", "personalized", "--grid", "personalize-part=head,head+graph", "--data",
                     str(ov_path), "--seeds", "10", "--rounds", "2", "--local-epochs", "1", "--evaluation",
                     evaluation, "--out", str(out)]) == 0
        results[evaluation] = json.loads(out.read_text())
    assert results["own"]["validation_metric"] == "mcc"
    assert results["consortium"]["validation_metric"] == "consortium_mcc"
    scores = {e: [r["val_mcc"]["10"] for r in results[e]["settings"]] for e in results}
    assert scores["own"] != scores["consortium"]  # site models score differently on the other sites' patients
    with pytest.raises(ValueError, match="validation_metric 'auroc': one of"):
        RunSpec(data_path="", scenario="iid-3", seed=1, validation_metric="auroc")

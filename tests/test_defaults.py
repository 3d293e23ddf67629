"""``magnet-fl defaults``: built-in values derived from the settings studies chose per split on validation patients
(simulations/defaults.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from simulations.cli import main
from simulations.defaults import derive, study_choices
from simulations.tune import current_defaults

ROOT = Path(__file__).resolve().parents[1]
DERIVED = ROOT / "benchmarks" / "results" / "derived_defaults.json"

MU = [{"proximal-mu": 0.01}, {"proximal-mu": 0.1}, {"proximal-mu": 1.0}]
PART = [{"personalize-part": "head"}, {"personalize-part": "head+graph"}]


def _tuned(grid, choice_index, scores=None, metric="consortium_mcc"):
    # by default the chosen setting has the top score alone (what the nested pass chooses)
    scores = scores or [0.5 if i == choice_index else 0.1 * i for i in range(len(grid))]
    return json.dumps({"choice": None if choice_index is None else grid[choice_index],
                       "grid": [{**g, "val_mcc": v} for g, v in zip(grid, scores)], "validation_metric": metric},
                      separators=(",", ":"))


def _write(folder, name, rows):
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame([{"study": name, "cell": c, "seed": s, "method": m, "mcc": 0.5, "tuned": t, "error": e}
                          for c, s, m, t, e in rows])
    frame.to_csv(folder / f"{name}_tidy.csv", index=False)
    return folder


def test_the_most_chosen_setting_wins_pooled_over_studies_ties_to_the_grid_order(tmp_path):
    a = _write(tmp_path / "a", "label-skew", [
        ("c1", 10, "fedprox", _tuned(MU, 2), ""), ("c1", 20, "fedprox", _tuned(MU, 2), ""),
        ("c2", 10, "fedprox", _tuned(MU, 0), ""),
        ("c1", 10, "personalized", _tuned(PART, 1), ""), ("c1", 20, "personalized", _tuned(PART, 0), ""),
        ("c1", 10, "federated", "", ""),  # untuned: no record
        ("c2", 20, "fedprox", _tuned(MU, 2), "RuntimeError: boom"),  # a failed run does not vote
        ("c2", 30, "fedprox", _tuned(MU, None), "")])  # nothing chosen: no vote
    b = _write(tmp_path / "b", "gap", [("g", 10, "fedprox", _tuned(MU, 0), ""),
                                       ("g", 20, "fedprox", _tuned(MU, 1), "")])
    derived = derive(dict([study_choices(a), study_choices(b)]))
    assert derived["fedprox"]["counts"] == [2, 1, 2] and derived["fedprox"]["cell_seeds"] == 5
    assert derived["fedprox"]["derived"] == {"proximal-mu": 0.01}  # 2 vs 2: the grid's first
    assert derived["fedprox"]["validation_metric"] == "consortium_mcc"
    assert derived["fedprox"]["per_study"] == {"label-skew": [1, 0, 2], "gap": [1, 1, 0]}
    assert derived["personalized"]["derived"] == {"personalize-part": "head"}  # 1 vs 1: the grid's first
    assert set(derived) == {"fedprox", "personalized"}
    # one more vote for mu = 1.0 decides it
    c = _write(tmp_path / "c", "extra", [("x", 10, "fedprox", _tuned(MU, 2), "")])
    assert derive(dict([study_choices(a), study_choices(b), study_choices(c)]))["fedprox"]["derived"] == \
        {"proximal-mu": 1.0}



def test_choices_decided_by_a_tie_are_counted(tmp_path):
    """A validation MCC pooled over a few dozen patients ties often; a tie goes to the grid's first setting, so the
    derivation says how many of each setting's choices were ties rather than wins."""
    a = _write(tmp_path / "a", "s", [
        ("c", 10, "fedprox", _tuned(MU, 0, [0.5, 0.5, 0.2]), ""),  # tied with mu = 0.1: the order chose 0.01
        ("c", 20, "fedprox", _tuned(MU, 0, [0.6, 0.5, 0.2]), ""),  # a win
        ("c", 30, "fedprox", _tuned(MU, 2, [0.1, 0.2, 0.3]), ""),  # a win
        ("c", 40, "fedprox", _tuned(MU, 1, [0.1, 0.4, 0.4]), "")])  # tied with mu = 1.0: the order chose 0.1
    d = derive(dict([study_choices(a)]))["fedprox"]
    assert d["counts"] == [2, 1, 1] and d["tied"] == [1, 1, 0]
    # sensitivity: each tied vote split over its tied settings: 0.01 gets 1.5, 0.1 gets 1.0, 1.0 gets 1.5
    assert d["split_ties"]["counts"] == [1.5, 1.0, 1.5] and d["split_ties"]["derived"] == {"proximal-mu": 0.01}
    assert d["split_ties"]["same"] is True
    # four choices of 0.01, three of them ties with 1.0, against two outright wins of 1.0: the declared rule
    # keeps 0.01 (4 vs 2); with tied votes split, 1.0 wins (3.5 vs 2.5): the derivation says they differ
    b = _write(tmp_path / "b", "s", [("c", s, "fedprox", _tuned(MU, 0, [0.5, 0.2, 0.5]), "") for s in (1, 2, 3)]
               + [("c", 4, "fedprox", _tuned(MU, 0, [0.6, 0.2, 0.5]), "")]
               + [("c", s, "fedprox", _tuned(MU, 2, [0.1, 0.2, 0.5]), "") for s in (5, 6)])
    d = derive(dict([study_choices(b)]))["fedprox"]
    assert d["counts"] == [4, 0, 2] and d["derived"] == {"proximal-mu": 0.01}
    assert d["split_ties"]["counts"] == [2.5, 0.0, 3.5] and d["split_ties"]["derived"] == {"proximal-mu": 1.0}
    assert d["split_ties"]["same"] is False


def test_a_choice_without_the_top_validation_score_is_refused(tmp_path):
    a = _write(tmp_path / "a", "s", [("c", 10, "fedprox", _tuned(MU, 0, [0.1, 0.5, 0.2]), "")])
    with pytest.raises(ValueError, match=r"s_tidy.csv row 2 .*does not have the grid's highest validation score"):
        study_choices(a)

def test_no_test_metric_takes_part(tmp_path):
    rows = [("c", s, "fedprox", _tuned(MU, s % 3), "") for s in range(1, 8)]
    a = _write(tmp_path / "a", "s", rows)
    before = derive(dict([study_choices(a)]))
    df = pd.read_csv(a / "s_tidy.csv")
    df["mcc"] = np.random.default_rng(0).uniform(-1, 1, len(df))  # any test metric
    df.to_csv(a / "s_tidy.csv", index=False)
    assert derive(dict([study_choices(a)])) == before


def test_bad_records_are_named_by_file_and_row(tmp_path):
    a = _write(tmp_path / "a", "s", [("c", 10, "fedprox", _tuned(MU, 0), ""), ("c", 20, "fedprox", "{not json", "")])
    with pytest.raises(ValueError, match=r"s_tidy.csv row 3 \(method 'fedprox', seed 20\): unreadable `tuned`"):
        study_choices(a)
    other = [{"proximal-mu": 0.1}, {"proximal-mu": 1.0}]
    b = _write(tmp_path / "b", "t", [("c", 10, "fedprox", _tuned(other, 0), "")])
    a = _write(tmp_path / "a", "s", [("c", 10, "fedprox", _tuned(MU, 0), "")])
    with pytest.raises(ValueError, match="tuned on grid .* in study 't'.*not pooled"):
        derive(dict([study_choices(a), study_choices(b)]))
    own = _write(tmp_path / "own", "o", [("c", 10, "fedprox", _tuned(MU, 0, metric="mcc"), "")])
    with pytest.raises(ValueError, match="'fedprox' was chosen on different validation scores.*not pooled"):
        derive(dict([study_choices(a), study_choices(own)]))
    with pytest.raises(ValueError, match="expected one <study>_tidy.csv, found none"):
        study_choices(tmp_path / "b" / "nowhere")


def test_the_command_writes_the_derivation_with_the_built_in_values(tmp_path, monkeypatch):
    from simulations import defaults as module

    monkeypatch.setattr(module, "current_defaults", lambda method, grid: {
        "fedprox": {"proximal-mu": 0.1}, "personalized": {"personalize-part": "head+graph"}}[method])
    a = _write(tmp_path / "a", "s", [("c", s, "fedprox", _tuned(MU, 2), "") for s in (10, 20)]
               + [("c", s, "personalized", _tuned(PART, 1), "") for s in (10, 20)])
    out = tmp_path / "defaults.json"
    assert main(["defaults", "--study", str(a), "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["studies"]["s"]["cell_seeds"] == 2
    fedprox, part = record["methods"]["fedprox"], record["methods"]["personalized"]
    assert fedprox["derived"] == {"proximal-mu": 1.0} and fedprox["built_in"] == {"proximal-mu": 0.1}
    assert fedprox["changed"] is True
    assert part["derived"] == {"personalize-part": "head+graph"} and part["changed"] is False


def test_the_built_in_defaults_are_the_ones_derived_from_the_studies():
    """Issue 23 item 2: the built-in value of every tunable is the one `magnet-fl defaults` derived from the
    label-skew and gap studies' per-split choices on validation patients (benchmarks/results/derived_defaults.json,
    the declared procedure); the stored derivation is recomputed from the committed tidy CSVs."""
    record = json.loads(DERIVED.read_text())
    assert sorted(record["studies"]) == ["gap", "label-skew"]
    recomputed = derive(dict(study_choices(ROOT / v["folder"]) for v in record["studies"].values()))
    assert set(record["methods"]) == set(recomputed)
    for method, d in recomputed.items():
        assert {k: record["methods"][method][k] for k in d} == d, method
        assert current_defaults(method, {k: [] for k in d["derived"]}) == d["derived"], method

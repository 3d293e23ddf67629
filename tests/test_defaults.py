"""``magnet-fl defaults``: built-in values derived from the settings studies chose per split on validation patients
(simulations/defaults.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from simulations.cli import main
from simulations.defaults import derive, study_choices

MU = [{"proximal-mu": 0.01}, {"proximal-mu": 0.1}, {"proximal-mu": 1.0}]
PART = [{"personalize-part": "head"}, {"personalize-part": "head+graph"}]


def _tuned(grid, choice_index, scores=None, metric="consortium_mcc"):
    scores = scores or [0.1 * i for i in range(len(grid))]
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


def test_the_command_writes_the_derivation_with_the_built_in_values(tmp_path):
    a = _write(tmp_path / "a", "s", [("c", s, "fedprox", _tuned(MU, 2), "") for s in (10, 20)]
               + [("c", s, "personalized", _tuned(PART, 1), "") for s in (10, 20)])
    out = tmp_path / "defaults.json"
    assert main(["defaults", "--study", str(a), "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["studies"]["s"]["cell_seeds"] == 2
    fedprox = record["methods"]["fedprox"]
    assert fedprox["derived"] == {"proximal-mu": 1.0} and fedprox["built_in"] == {"proximal-mu": 0.1}
    assert fedprox["changed"] is True
    assert record["methods"]["personalized"]["changed"] is False  # head+graph is the built-in part

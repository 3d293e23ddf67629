"""benchmarks/screening_record.py: what the coordinator's screen did to a study's federated runs, read back from the
runs' own per-round records: clip factors over accepted site-rounds, rejected site-rounds and their rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_module import benchmark


def _history(folder: Path, rounds: list[dict]) -> None:
    folder.mkdir(parents=True)
    (folder / "history.json").write_text(json.dumps(rounds))


def test_clip_factors_and_rejections_are_counted_per_method(tmp_path):
    sr = benchmark("screening_record")
    cell = tmp_path / "cells" / "c"
    _history(cell / "runs" / "fedsgd-seed10", [
        {"accepted": ["site0", "site1"], "rejected": {},
         "screening": {"clip": {"scale": {"site0": 1.0, "site1": 0.5}}}},
        {"accepted": ["site0"], "rejected": {"site1": "node 2: update is opposed and large: norm 11.9 is 10.5x"},
         "screening": {"clip": {"scale": {"site0": 0.8}}}},
    ])
    _history(cell / "runs" / "fedsgd-seed20", [
        {"accepted": ["site0", "site1"], "rejected": {}, "screening": {"clip": {"scale": {"site0": 1.0,
                                                                                         "site1": 1.0}}}}])
    _history(cell / "runs" / "federated-seed10", [
        {"accepted": ["site0", "site1"], "rejected": {}, "screening": {"clip": {"scale": {"site0": 1.0,
                                                                                         "site1": 1.0}}}}])
    record = sr.cell_record(cell)
    g = record["fedsgd"]
    assert (g["runs"], g["site_rounds"], g["accepted_site_rounds"], g["rejected_site_rounds"]) == (2, 6, 5, 1)
    assert g["mean_clip_factor"] == pytest.approx((1.0 + 0.5 + 0.8 + 1.0 + 1.0) / 5)
    assert (g["min_clip_factor"], g["share_shortened_over_10pct"]) == (0.5, pytest.approx(2 / 5))
    assert g["rejection_reasons"] == {"update is opposed and large: norm # is #": 1}
    assert record["federated"]["mean_clip_factor"] == 1.0 and record["federated"]["rejected_site_rounds"] == 0


def test_a_cell_without_runs_is_named(tmp_path):
    sr = benchmark("screening_record")
    (tmp_path / "cells" / "c").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no federated runs of cell 'c'"):
        sr.main(["--study-out", str(tmp_path), "--cells", "c", "--result", str(tmp_path / "r.json")])


def test_the_validation_view_reads_the_validation_runs_only(tmp_path):
    """--view validation reads the runs of a cell's validation-only view (cells/<cell>/validation/runs), not its
    reported runs, and says so in the result."""
    sr = benchmark("screening_record")
    cell = tmp_path / "cells" / "c"
    _history(cell / "runs" / "fedsgd-seed10", [
        {"accepted": ["site0"], "rejected": {"site1": "node 2: gradient barely differs from zero"},
         "screening": {"clip": {"scale": {"site0": 0.5}}}}])
    _history(cell / "validation" / "runs" / "fedsgd-seed10", [
        {"accepted": ["site0", "site1"], "rejected": {}, "screening": {"clip": {"scale": {"site0": 1.0,
                                                                                         "site1": 0.25}}}}])
    sr.main(["--study-out", str(tmp_path), "--cells", "c", "--view", "validation",
             "--result", str(tmp_path / "r.json")])
    result = json.loads((tmp_path / "r.json").read_text())
    g = result["cells"]["c"]["fedsgd"]
    assert result["view"] == "validation"
    assert (g["site_rounds"], g["rejected_site_rounds"], g["min_clip_factor"]) == (2, 0, 0.25)
    assert sr.cell_record(cell)["fedsgd"]["rejected_site_rounds"] == 1  # the reported runs: the default view

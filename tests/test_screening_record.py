"""benchmarks/screening_record.py: what the coordinator's screen did to a study's federated runs, read back from the
runs' own per-round records: clip factors over accepted site-rounds, rejected site-rounds and their rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_module import benchmark

ROOT = Path(__file__).resolve().parents[1]


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


def test_the_clip_probe_pairs_each_variant_with_the_stored_step_screen_scores(tmp_path, data_root, monkeypatch):
    """benchmarks/fedsgd_clip_probe.py, with training replaced by a recorder: the check seed runs with the study's
    own settings (the pinned step screen), every other seed with the variant's overrides, and the result pairs the
    variant with the stored validation MCCs under its own keys (both variants)."""
    import simulations.simulate as simulate

    probe = benchmark("fedsgd_clip_probe")
    seen = []

    def fake(spec, methods):
        seen.append((spec.seed, spec.overrides.get("update_screen"), spec.overrides.get("clip_factor")))
        return {"fedsgd": 0.5}

    monkeypatch.setattr(simulate, "validation_scores", fake)
    for variant, key, override in (("gradient-screen", "gradient_screen", ("auto", None)),
                                   ("clip-off", "clip_off", ("step", 0.0))):
        seen.clear()
        out = tmp_path / f"{key}.json"
        assert probe.main(["--data", str(data_root), "--study", str(ROOT / "docs/studies/label-skew-fedsgd"),
                           "--cell", "rjive-label-skew-3", "--seeds", "10,20", "--variant", variant,
                           "--result", str(out)]) == 0
        r = json.loads(out.read_text())
        assert seen == [(10, "step", None), (10, *override), (20, *override)]
        assert r[key] == {"10": 0.5, "20": 0.5} and r[f"{key}_minus_on"]["n"] == 2
        assert r["means"]["clip_on"] == pytest.approx((r["clip_on_stored"]["10"] + r["clip_on_stored"]["20"]) / 2)

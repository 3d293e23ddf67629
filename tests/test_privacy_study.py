"""The privacy study on the generated cohort: plain, secure aggregation and distributed DP through the real engine."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from magnet_core.federation.dp import exact_epsilon
from simulations.privacy_study import main, mode_of

MODES = "plain,secagg,dp-secagg-z1"


def test_privacy_study_runs_every_mode_records_epsilon_and_resumes(tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["--seeds", "1,2", "--rounds", "2", "--local-epochs", "1", "--modes", MODES, "--out", str(out)]
    assert main(argv) == 0

    rows = list(csv.DictReader((out / "privacy_tidy.csv").open()))
    assert sorted((r["mode"], r["seed"]) for r in rows) == sorted((m, s) for m in MODES.split(",") for s in "12")
    assert not any(r["error"] for r in rows)
    by = {(r["mode"], int(r["seed"])): r for r in rows}
    for seed in (1, 2):
        assert int(by["plain", seed]["secure_rounds"]) == 0
        assert int(by["secagg", seed]["secure_rounds"]) == int(by["dp-secagg-z1", seed]["secure_rounds"]) == 2
        assert float(by["secagg", seed]["secagg_up_bytes_per_site"]) > 0
        assert by["plain", seed]["epsilon"] == by["secagg", seed]["epsilon"] == ""

    # the clip norm is the median honest step norm of the first seed's plain run
    clip = json.loads((out / "clip.json").read_text())
    plain1 = json.loads((out / "cells" / "plain-seed1.json").read_text())
    assert clip["clip_norm"] == pytest.approx(float(np.median(plain1["step_norms"])))
    assert float(by["dp-secagg-z1", 1]["clip_norm"]) == pytest.approx(clip["clip_norm"])

    summary = json.loads((out / "privacy_summary.json").read_text())["modes"]
    assert summary["plain"]["mcc"]["n"] == 2 and "epsilon" not in summary["plain"]
    assert summary["secagg"]["mcc_minus_plain"]["n"] == 2
    # distributed noise: 3 pieces of std z C / sqrt(t), t = 3 - 1 dropout allowed = 2 -> multiplier z sqrt(3/2)
    z_eff = 1.0 * math.sqrt(3 / 2)
    assert summary["dp-secagg-z1"]["epsilon"] == pytest.approx(exact_epsilon([z_eff] * 2, 1e-5), rel=1e-9)
    per_round = [r for r in csv.DictReader((out / "privacy_rounds.csv").open())
                 if r["mode"] == "dp-secagg-z1" and r["seed"] == "1"]
    eps = [float(r["epsilon"]) for r in per_round]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]
    assert (out / "privacy_mcc_vs_epsilon.png").stat().st_size > 1000

    # resumable: a second call runs nothing again and reports the same numbers
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert main(argv) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == stamps
    assert json.loads((out / "privacy_summary.json").read_text())["modes"] == summary


def test_unknown_mode_is_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["--modes", "plain,dp-central-zero", "--out", "unused"])
    assert "unknown mode 'dp-central-zero'" in capsys.readouterr().err
    assert mode_of("dp-central-z0.5").noise_multiplier == 0.5 and mode_of("dp-secagg-z2").secagg

"""End to end: MAGNET trained on the real OV split beats the majority class, deterministically; the CLI's output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from magnet_core.cohort.data import load_magnet_split
from magnet_core.cohort.generated import make_generated_cohort
from magnet_core.model.config import get_preset
from magnet_core.model.metrics import metrics_with_groups
from magnet_core.model.train import fit_and_predict

REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = [p + k for p in ("", "paired_", "unpaired_") for k in ("mcc", "acc", "f1", "auroc", "auprc")]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine, two spinning threads are many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train_ov(ov_path, seed=10, epochs=30):
    preset = get_preset("ov")
    cohort = load_magnet_split(ov_path, 10, log=lambda *a: None)
    train_cfg = preset.train.model_copy(update={"epochs": epochs})
    _, test, probs = fit_and_predict(cohort, preset.model, train_cfg, preset.graph, seed)
    return cohort, test, probs


def test_short_training_on_real_ov_beats_the_majority_class_deterministically(ov_path):
    cohort, test, probs = _train_ov(ov_path)
    assert test.n == len(cohort.split_indices("test")) and probs.shape == (test.n, 2)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(test.n))
    y = test.y.numpy()
    majority = np.full_like(y, np.bincount(y).argmax())
    assert metrics_with_groups(y, np.eye(2)[majority], test.paired.numpy(), 2)["mcc"] == 0.0
    m = metrics_with_groups(y, probs.numpy(), test.paired.numpy(), 2)
    assert m["mcc"] > 0.0, m  # always predicting the majority class gives MCC 0
    assert m["auroc"] > 0.5, m
    assert len(np.unique(probs.argmax(dim=1).numpy())) == 2  # predicts both classes

    _, _, again = _train_ov(ov_path)
    assert torch.equal(probs, again)  # same seed: bit-identical probabilities
    _, _, other = _train_ov(ov_path, seed=11)
    assert not torch.equal(probs, other)


def _magnet_fl() -> list[str]:
    script = Path(sys.executable).with_name("magnet-fl")
    if script.exists():
        return [str(script)]
    found = shutil.which("magnet-fl")
    return [found] if found else [sys.executable, "-m", "simulations.cli"]


def _check_results(res: dict, seeds: list[int]) -> None:
    assert res["mode"] == "centralized" and res["seeds"] == seeds
    for key in METRIC_KEYS:
        stat = res["metrics"][key]
        assert set(stat) == {"mean", "std", "per_seed"}, key
        assert len(stat["per_seed"]) == len(seeds), key
    assert isinstance(res["wall_seconds"], float) and res["wall_seconds"] > 0
    mcc = res["metrics"]["mcc"]
    assert -1 <= mcc["mean"] <= 1
    if len(seeds) == 1:
        assert mcc["std"] is None  # a sample std (ddof 1) needs two values
    else:
        assert mcc["std"] == pytest.approx(np.std(mcc["per_seed"], ddof=1))
    assert mcc["mean"] == pytest.approx(np.mean(mcc["per_seed"]))


def test_cli_without_data_runs_on_a_generated_cohort_and_says_so(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "150"}
    proc = subprocess.run([*_magnet_fl(), "centralized", "--epochs", "2", "--seeds", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "GENERATED" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    _check_results(res, [1])
    assert res["generated_data"] is True and res["data"] == "generated" and res["cohort"]["generated"] is True
    # the table says over how many test patients each row (all / paired / unpaired) is computed, as run
    cohort = make_generated_cohort(seed=1)
    paired = cohort.paired[cohort.split_indices("test")]
    counts = {"all": paired.size, "paired": int(paired.sum()), "unpaired": int((~paired).sum())}
    assert res["test_patients"] == {g: [n] for g, n in counts.items()}
    assert 0 < counts["paired"] < counts["all"]
    printed = " ".join(proc.stdout.split())
    for group, n in counts.items():
        assert f"{group} │ 1 site, {n} patients │" in printed


def test_cli_on_a_cohort_layout_folder_writes_real_data_results(tmp_path, capsys):
    """--data with labels.csv + modality files (written from a generated cohort): not flagged as generated."""
    from simulations.cli import main

    cohort = make_generated_cohort(n=120, dims={"mRNA": 30, "miRNA": 20}, missing={"mRNA": 0.3, "miRNA": 0.1},
                                   seed=2)
    folder = tmp_path / "cohort"
    folder.mkdir()
    pd.DataFrame({"Class": cohort.labels}, index=pd.Index(cohort.sample_ids, name="sampleID")).to_csv(
        folder / "labels.csv")
    for j, m in enumerate(cohort.modalities):
        rows = cohort.mask[:, j]
        pd.DataFrame(cohort.X[m][rows], index=pd.Index(cohort.sample_ids[rows], name="sampleID"),
                     columns=cohort.features[m]).to_csv(folder / f"{m}.csv.gz")
    out = tmp_path / "out"
    assert main(["centralized", "--data", str(folder), "--seeds", "3,4", "--epochs", "2", "--preset", "brca",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    _check_results(res, [3, 4])
    assert res["generated_data"] is False and res["data"] == str(folder)
    assert res["cohort"]["patients"] == 120 and res["preset"]["model"]["hidden"] == 128
    assert "GENERATED" not in capsys.readouterr().out


def test_centralized_writes_a_signed_package_that_predict_uses(tmp_path, capsys):
    """`centralized --package`: the package holds exactly the evaluated model, is verified like a federated one
    and scores held-out patients through predict's library path; a half-given signing option or data the package
    cannot describe is refused before training."""
    from test_package import make_pki

    from client.predict_cli import attach_rule, reference_patients, score_patients, split_patients
    from magnet_core.artefacts.model_package import read_package
    from magnet_core.model.train import PatientSet, predict_proba
    from simulations.cli import main

    ca, key, cert = make_pki(tmp_path)
    out, pkg_path = tmp_path / "run", tmp_path / "central.magnet"
    assert main(["centralized", "--epochs", "2", "--seeds", "1", "--preset", "brca", "--out", str(out),
                 "--package", str(pkg_path), "--signing-key", str(key), "--signing-cert", str(cert)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["packages"] == [str(pkg_path.resolve())]
    pkg = read_package(pkg_path, ca_cert=ca)
    meta = pkg.metadata
    assert meta.method == "centralized" and meta.run_config["seed"] == 1 and meta.run_config["epochs"] == 2
    assert meta.preset == "brca" and meta.model.hidden == 128
    assert meta.metrics["mcc"] == pytest.approx(res["metrics"]["mcc"]["per_seed"][0], abs=1e-12)
    # the packaged weights are the model results.json evaluated: same test metrics under the same (among-test) rule
    cohort = make_generated_cohort(seed=1)
    test_set = cohort.subset(cohort.split_indices("test"))
    probs = predict_proba(pkg.build_model(), PatientSet.from_cohort(test_set, meta.graph.sparsity)).numpy()
    m = metrics_with_groups(test_set.labels, probs, test_set.paired, 2)
    assert m["mcc"] == pytest.approx(res["metrics"]["mcc"]["per_seed"][0], abs=1e-12)
    # predict's path: attached to the training patients, one finite row per held-out patient
    ref, patients = reference_patients(cohort), split_patients(cohort, "test")
    scored = score_patients(pkg, ref, patients, attach_rule("auto", 10, False, ref.n))
    assert scored.probs.shape == (test_set.n, 2) and np.isfinite(scored.probs).all() and scored.rule == "quantile"
    np.testing.assert_allclose(scored.probs.sum(axis=1), 1.0, atol=1e-5)

    capsys.readouterr()
    assert main(["centralized", "--epochs", "2", "--seeds", "1", "--out", str(tmp_path / "r2"), "--package",
                 str(tmp_path / "x.magnet"), "--signing-key", str(key)]) == 2
    assert "go together" in capsys.readouterr().err and not (tmp_path / "r2" / "results.json").exists()
    other_ca, other_key, _ = make_pki(tmp_path, "other")
    assert main(["centralized", "--epochs", "2", "--seeds", "1", "--out", str(tmp_path / "r4"), "--package",
                 str(tmp_path / "z.magnet"), "--signing-key", str(other_key), "--signing-cert", str(cert)]) == 2
    assert "not the signing key's certificate" in capsys.readouterr().err and not (tmp_path / "z.magnet").exists()
    folder = tmp_path / "cohort"  # cohort layout: scaled at load time, which a package cannot record
    folder.mkdir()
    pd.DataFrame({"Class": cohort.labels}, index=pd.Index(cohort.sample_ids, name="sampleID")).to_csv(
        folder / "labels.csv")
    pd.DataFrame(cohort.X["mRNA"], index=pd.Index(cohort.sample_ids, name="sampleID"),
                 columns=cohort.features["mRNA"]).to_csv(folder / "mRNA.csv")
    assert main(["centralized", "--data", str(folder), "--epochs", "2", "--seeds", "1", "--out",
                 str(tmp_path / "r3"), "--package", str(tmp_path / "y.magnet"), "--signing-key", str(key),
                 "--signing-cert", str(cert)]) == 2
    err = capsys.readouterr().err
    assert "min-max scaled at load time" in err and "Traceback" not in err and not (tmp_path / "y.magnet").exists()

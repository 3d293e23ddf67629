"""Inductive prediction: new patients attach to reference patients only; one-vs-batch; `magnet-fl predict`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from test_package import make_pki

from magnet_core.artefacts.model_package import manifest_from_cohort, write_package
from magnet_core.cohort.data import load_magnet_split
from magnet_core.cohort.manifest import ModalitySpec
from magnet_core.model.config import GraphConfig, ModelConfig, TrainConfig
from magnet_core.model.graph import build_patient_graph, masked_cosine_similarity
from magnet_core.model.inductive import AttachRule, Reference, attach_new_patients, masked_cosine_cross, predict_new
from magnet_core.model.network import build_model
from magnet_core.model.train import PatientSet, predict_proba, split_sets, train_epochs

TINY = ModelConfig(hidden=16, heads=2, dropout=0.2)


def _patients(n: int, seed: int, dims=(6, 5), p_missing=0.35):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.rand(n, d, generator=g) for d in dims]
    mask = torch.rand(n, len(dims), generator=g) > p_missing
    mask[:, 0] |= ~mask.any(dim=1)
    return xs, mask


def _model(dims=(6, 5)):
    return build_model({f"m{i}": d for i, d in enumerate(dims)}, 3, TINY, seed=3).eval()


def test_cross_similarity_and_reference_graph_match_the_training_graph():
    xs, mask = _patients(40, 0)
    cross = masked_cosine_cross(xs, mask, xs, mask).fill_diagonal_(0.0)
    assert torch.allclose(cross, masked_cosine_similarity(xs, mask), atol=1e-6)
    ref = Reference.build(xs, mask, 0.8)
    same = build_patient_graph(xs, mask, None, 0.8)
    assert torch.equal(ref.graph.edge_index, same.edge_index) and torch.equal(ref.graph.edge_weight, same.edge_weight)
    assert (cross[mask[:, 0] & ~mask[:, 1]][:, ~mask[:, 0] & mask[:, 1]] == 0).all()  # nothing shared, no similarity


@pytest.mark.parametrize("rule", [AttachRule(rule="quantile"), AttachRule(rule="topk", k=4)])
def test_reference_edges_never_change_and_one_patient_alone_equals_the_batch(rule):
    xs, mask = _patients(50, 1)
    ref = Reference.build(xs, mask, 0.8)
    new_xs, new_mask = _patients(12, 2)
    att = attach_new_patients(ref, new_xs, new_mask, rule)
    ei = att.graph.edge_index
    into_reference = ei[1] < ref.n
    assert (ei[0][into_reference] < ref.n).all()  # no message ever reaches a reference patient from a new one
    assert torch.equal(ei[:, into_reference], ref.graph.edge_index)
    assert torch.equal(att.graph.edge_weight[into_reference], ref.graph.edge_weight)
    src, dst = ei[:, ~into_reference]
    shares = (att.mask[src].float() * att.mask[dst].float()).sum(dim=1)
    assert (shares > 0).all() and (src < ref.n).all()  # reference -> new only, over a shared modality
    if rule.rule == "topk":
        assert (att.reference_neighbours <= 4).all() and (att.reference_neighbours == 4).any()
    else:
        assert (att.reference_neighbours >= 1).all()
    model = _model()
    batch = predict_new(model, ref, new_xs, new_mask, rule)
    for i in range(12):
        alone = predict_new(model, ref, [x[i : i + 1] for x in new_xs], new_mask[i : i + 1], rule)
        np.testing.assert_allclose(alone.probs[0], batch.probs[i], atol=1e-6)
    chunked = predict_new(model, ref, new_xs, new_mask, rule, batch_size=5)
    np.testing.assert_allclose(chunked.probs, batch.probs, atol=1e-6)
    linked = predict_new(model, ref, new_xs, new_mask, rule.model_copy(update={"link_new": True}))
    assert np.abs(linked.probs - batch.probs).max() > 1e-4  # linking new patients makes the batch matter (by rule)


def test_single_modality_and_unshared_patients_get_finite_probabilities_and_a_flag():
    xs, mask = _patients(30, 4)
    mask[:, 1] = False  # no reference patient has modality m1
    ref = Reference.build(xs, mask, 0.8, ids=[f"r{i}" for i in range(30)])
    new_xs, _ = _patients(3, 5)
    new_mask = torch.tensor([[True, False], [False, True], [True, True]])
    out = predict_new(_model(), ref, new_xs, new_mask, AttachRule())
    assert np.isfinite(out.probs).all() and np.allclose(out.probs.sum(axis=1), 1.0, atol=1e-6)
    assert out.no_shared_modality.tolist() == [False, True, False]
    assert out.reference_neighbours[1] == 0 and out.reference_neighbours[0] >= 1
    # a new patient that is also a reference patient (same id) is never linked to its own reference copy
    copy = attach_new_patients(ref, [x[:1] for x in xs], mask[:1], AttachRule(rule="topk", k=3), new_ids=["r0"])
    src = copy.graph.edge_index[0][copy.graph.edge_index[1] == ref.n]
    assert 0 not in src.tolist() and len(src) == 3


@pytest.fixture(scope="module")
def ov_package(ov_path, tmp_path_factory):
    """A tiny model trained 2 epochs on OV seed 10 (train+val), packaged and signed."""
    tmp = tmp_path_factory.mktemp("ov-package")
    cohort = load_magnet_split(ov_path, 10, log=lambda *a: None)
    manifest = manifest_from_cohort(cohort, classes=["long-term", "short-term"])
    assert manifest.modalities[1] == ModalitySpec(name="miRNA", features=cohort.features["miRNA"])
    train, _ = split_sets(cohort, 0.8)
    model = build_model({m: len(cohort.features[m]) for m in cohort.modalities}, 2, TINY, seed=10)
    torch.manual_seed(10)
    train_epochs(model, train, TrainConfig(lr=1e-3), 2)
    pki = make_pki(tmp)
    params = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    path = write_package(tmp / "ov.magnet", params, manifest=manifest, preset="ov", model_cfg=TINY,
                         graph_cfg=GraphConfig(sparsity=0.8), run_config={"seed": 10, "epochs": 2},
                         signing_key=pki[1], signing_cert=pki[2], round=2, method="centralized")
    return path, pki[0], cohort, model, train


def _predict(*args):
    from simulations.cli import main

    return main(["predict", *map(str, args)])


def test_predict_cli_scores_held_out_ov_patients(ov_path, ov_package, tmp_path, capsys):
    path, ca, cohort, model, train = ov_package
    out = tmp_path / "pred.csv"
    seed_dir = ov_path / "10"
    assert _predict("--package", path, "--ca", ca, "--reference", seed_dir, "--patients", seed_dir, "--split",
                    "test", "--out", out) == 0
    frame = pd.read_csv(out)
    test = cohort.subset(cohort.split_indices("test"))
    assert frame["sample_id"].tolist() == test.sample_ids.tolist()
    probs = frame[["prob_long-term", "prob_short-term"]].to_numpy()
    assert np.isfinite(probs).all() and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert set(frame["predicted_class"]) <= {"long-term", "short-term"}
    assert (frame["predicted_class"] == np.where(probs[:, 1] > probs[:, 0], "short-term", "long-term")).all()
    expected_used = ["+".join(m for m, h in zip(cohort.modalities, row) if h) for row in test.mask]
    assert frame["modalities_used"].tolist() == expected_used
    single = frame["modalities_used"] == "miRNA"
    assert single.sum() >= 10 and np.isfinite(probs[single.to_numpy()]).all()  # real single-modality patients
    assert not frame["no_shared_modality"].any() and (frame["reference_neighbours"] >= 1).all()
    assert (frame["true_class"] == np.array(["long-term", "short-term"])[test.labels]).all()
    # the CLI gives exactly what the in-memory inductive evaluation gives for the same rule
    ref = Reference.from_patient_set(train, 0.8)
    direct = predict_new(model, ref, [torch.from_numpy(test.X[m]) for m in cohort.modalities],
                         torch.from_numpy(test.mask), AttachRule())
    np.testing.assert_allclose(probs, direct.probs, atol=2e-6)
    # attached to the training patients is not the paper's among-test graph: the predictions differ
    among_test = predict_proba(model, PatientSet.from_cohort(test, 0.8)).numpy()
    assert np.abs(among_test - direct.probs).max() > 1e-4

    # a file of new patients with one modality: the same answers as in the batch for patients holding only it
    only = test.subset(np.flatnonzero(single.to_numpy()))
    table = pd.DataFrame(only.X["miRNA"], index=only.sample_ids, columns=cohort.features["miRNA"])
    table = table[table.columns[::-1]]  # column order does not matter, names do
    table.rename_axis("sampleID").to_csv(tmp_path / "miRNA.csv")
    out2 = tmp_path / "one.csv"
    assert _predict("--package", path, "--ca", ca, "--reference", seed_dir, "--patients", tmp_path / "miRNA.csv",
                    "--out", out2) == 0
    again = pd.read_csv(out2)
    assert again["sample_id"].tolist() == only.sample_ids.tolist() and "true_class" not in again
    np.testing.assert_allclose(again[["prob_long-term", "prob_short-term"]].to_numpy(), probs[single.to_numpy()],
                               atol=2e-6)

    # a feature name that does not match: one clear error naming the file and the feature, no traceback
    (tmp_path / "bad").mkdir()
    table.rename(columns={table.columns[0]: "hsa-mir-nonexistent"}).rename_axis("sampleID").to_csv(
        tmp_path / "bad" / "miRNA.csv")
    capsys.readouterr()
    assert _predict("--package", path, "--ca", ca, "--reference", seed_dir, "--patients", tmp_path / "bad",
                    "--out", tmp_path / "bad.csv") == 2
    err = capsys.readouterr().err
    assert "bad/miRNA.csv" in err and repr(cohort.features["miRNA"][-1]) in err and "Traceback" not in err
    assert not (tmp_path / "bad.csv").exists()


def test_predict_cli_refuses_a_package_from_another_ca(ov_path, ov_package, tmp_path, capsys):
    path, _, _, _, _ = ov_package
    other_ca, _, _ = make_pki(tmp_path, "other")
    capsys.readouterr()
    assert _predict("--package", path, "--ca", other_ca, "--reference", ov_path / "10", "--patients",
                    ov_path / "10", "--split", "test", "--out", tmp_path / "p.csv") == 2
    assert "not issued by the consortium CA" in capsys.readouterr().err and not (tmp_path / "p.csv").exists()


def test_predict_cli_reads_a_prepared_site_folder(tmp_path, capsys):
    """The layout validate-site reads (labels.csv, split.csv, <modality>.csv): reference = its train+val patients."""
    from test_package import MODEL, _package, small_manifest

    rng = np.random.default_rng(0)
    manifest = small_manifest()
    ids = [f"P{i:03d}" for i in range(40)]
    site = tmp_path / "site"
    site.mkdir()
    pd.DataFrame({"Class": rng.integers(0, 2, 40)}, index=pd.Index(ids, name="sampleID")).to_csv(site / "labels.csv")
    split = np.where(np.arange(40) < 30, "train", "test")
    pd.DataFrame({"split": split}, index=pd.Index(ids, name="sampleID")).to_csv(site / "split.csv")
    has_mirna = rng.random(40) < 0.6
    has_mirna[[30, 35]] = [False, True]  # P030 has no data at all (no mRNA for every fifth patient either)
    for spec, keep in ((manifest.modalities[0], np.arange(40) % 5 != 0), (manifest.modalities[1], has_mirna)):
        values = rng.random((40, len(spec.features)))
        pd.DataFrame(values, index=pd.Index(ids, name="sampleID"), columns=spec.features)[keep].to_csv(
            site / f"{spec.name}.csv")
    pki = make_pki(tmp_path)
    path, _ = _package(tmp_path, pki)
    out = tmp_path / "p.csv"
    assert _predict("--package", path, "--ca", pki[0], "--reference", site, "--patients", site, "--split", "test",
                    "--attach", "topk", "--k", "3", "--out", out) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "have no value for any modality and are not scored" in err and "P030" in err  # said, not dropped silently
    frame = pd.read_csv(out)
    assert frame["sample_id"].tolist() == ids[31:] and (frame["reference_neighbours"] <= 3).all()
    assert np.isfinite(frame[["prob_low", "prob_high"]].to_numpy()).all()
    used = frame.set_index("sample_id")["modalities_used"]
    assert used["P035"] == "miRNA"  # every fifth patient has no mRNA
    assert used["P031"] == ("mRNA+miRNA" if has_mirna[31] else "mRNA")
    # the reference is the site's training patients, attached with the same rule as in memory
    from magnet_core.cohort.validation import load_site_cohort

    cohort = load_site_cohort(site, manifest, seed=10)
    ref = cohort.subset(cohort.split_indices("train", "val"))
    test = cohort.subset(cohort.split_indices("test"))
    pkg_model = build_model({m.name: len(m.features) for m in manifest.modalities}, 2, MODEL, seed=1).eval()
    direct = predict_new(pkg_model, Reference.build([ref.X[m] for m in ref.modalities], ref.mask, 0.8),
                         [test.X[m] for m in test.modalities], test.mask, AttachRule(rule="topk", k=3))
    np.testing.assert_allclose(frame[["prob_low", "prob_high"]].to_numpy(), direct.probs, atol=2e-6)


def test_predict_splits_a_site_without_split_csv_as_its_policy_does(tmp_path, capsys):
    """A deployed site without split.csv trained on its policy's split (client/handlers.py own_split); ``--policy``
    scores exactly that split's test patients against that split's training patients. ``--seed`` with it is
    refused: two names for one split."""
    from test_package import _package, small_manifest

    from client.policy import template
    from magnet_core.cohort.validation import load_site_cohort

    rng = np.random.default_rng(1)
    manifest = small_manifest()
    ids = [f"P{i:03d}" for i in range(60)]
    site = tmp_path / "site"
    site.mkdir()
    pd.DataFrame({"Class": np.arange(60) % 2}, index=pd.Index(ids, name="sampleID")).to_csv(site / "labels.csv")
    for spec in manifest.modalities:
        pd.DataFrame(rng.random((60, len(spec.features))), index=pd.Index(ids, name="sampleID"),
                     columns=spec.features).to_csv(site / f"{spec.name}.csv")
    policy = tmp_path / "policy.toml"
    policy.write_text(template("c", split_seed=4))
    pki = make_pki(tmp_path)
    path, _ = _package(tmp_path, pki)  # its run seed is not 4
    out = tmp_path / "p.csv"
    args = ("--package", path, "--ca", pki[0], "--reference", site, "--patients", site, "--split", "test", "--attach",
            "topk", "--k", "3")
    assert _predict(*args, "--policy", policy, "--out", out) == 0, capsys.readouterr().err
    own = load_site_cohort(site, manifest, seed=4)
    assert pd.read_csv(out)["sample_id"].tolist() == sorted(own.sample_ids[own.split == "test"].tolist())
    other = load_site_cohort(site, manifest, seed=10)  # the package's run seed: another split (the test can fail)
    assert sorted(other.sample_ids[other.split == "test"]) != sorted(own.sample_ids[own.split == "test"])
    capsys.readouterr()
    assert _predict(*args, "--policy", policy, "--seed", "4", "--out", tmp_path / "q.csv") != 0
    assert "--seed and --policy both name the split" in capsys.readouterr().err


def test_predict_reproduces_the_federated_evaluation_of_every_site(tmp_path):
    """A short federated run evaluated with attach-to-train: predict (signed package, library path of the CLI) on
    each site's held-out patients gives the same classes and the same per-site and pooled metrics as the run
    reported, and the exact pooled AUROC lies inside the reported bound."""
    from server.config import FederatedConfig
    from simulations.engine import run_inprocess
    from simulations.predict_check import check_seed

    torch.set_num_threads(1)
    cfg = FederatedConfig(num_server_rounds=2, local_epochs=1, preset="brca", seed=3, data_path="", scenario="demo-3",
                          min_sites=3, out_dir=str(tmp_path / "run"), overwrite=True, test_graph="attach-to-train",
                          report=False)
    params, history = run_inprocess(cfg, 3)
    r = check_seed("", "demo-3", 3, "brca", "", params, history, "attach-to-train")
    assert r["all_classes_agree"] and r["all_reported_metrics_equal"], r
    assert r["pooled_patients"]["predict"] == r["pooled_patients"]["evaluation"] > 0
    assert all(s["max_abs_probability_difference"] == 0.0 for s in r["sites"].values())
    assert r["auroc"]["inside_bound"], r["auroc"]
    # a run evaluated among test patients is not what predict does: its numbers are not compared
    other = check_seed("", "demo-3", 3, "brca", "", params, history, "among-test")
    assert other["all_classes_agree"] and not other["all_reported_metrics_equal"]
    assert other["pooled"] == {"reported": None}

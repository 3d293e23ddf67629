"""simulate's two evaluations (issue 23 item 3, issue 25 item 4): own sites' vs consortium test patients, with over
how many sites, patients and models each is pooled; the generated-cohort data paths."""

from __future__ import annotations

import json

import numpy as np
import pytest

from magnet_core.artefacts.report import comparison_rows, pooled_over
from magnet_core.consortium.simulated import load_consortium, parse_generated
from magnet_core.federation.privacy import release_eval
from magnet_core.model.metrics import EvalCounts
from simulations.pooled_evaluation import CONSORTIUM, coverage, pooled, pooled_as_released

K, BINS = 5, 20


def counts(site: str, y: list[int], pred: list[int], paired: list[bool]) -> EvalCounts:
    y, pred, paired = np.asarray(y), np.asarray(pred), np.asarray(paired)
    conf = {}
    for g, sel in (("all", np.ones_like(paired)), ("paired", paired), ("unpaired", ~paired)):
        cm = np.zeros((2, 2), np.int64)
        np.add.at(cm, (y[sel], pred[sel]), 1)
        conf[g] = cm
    return EvalCounts(site, conf, {})


def constant_model_evaluations(per_site: bool):
    """Two sites whose test patients are all of one class each (site a: class 0, site b: class 1), and two models
    that predict their own site's class for everyone: they learned which site a patient is from, not the disease."""
    labels = {"a": 0, "b": 1}
    n = 10
    pairs = [(m, s) for m in labels for s in labels] if per_site else [(s, s) for s in labels]
    return [(m, release_eval(counts(s, [labels[s]] * n, [labels[m]] * n, [True] * 6 + [False] * 4), K, BINS))
            for m, s in pairs]


def test_site_identity_model_is_perfect_on_own_sites_and_useless_on_the_consortium():
    own = pooled(constant_model_evaluations(per_site=False))
    everyone = pooled(constant_model_evaluations(per_site=True), CONSORTIUM)
    assert own["mcc"] == pytest.approx(1.0) and own["acc"] == pytest.approx(1.0)
    assert everyone["consortium_acc"] == pytest.approx(0.5)
    assert everyone["consortium_mcc"] == pytest.approx(0.0)
    assert (own["sites"], own["patients"], own["models"], own["pairs"]) == (2, 20, 2, 2)
    assert (everyone["consortium_sites"], everyone["consortium_patients"], everyone["consortium_models"],
            everyone["consortium_pairs"]) == (2, 20, 2, 4)


def test_coverage_counts_only_the_sites_that_released_a_group():
    big = release_eval(counts("a", [0, 1] * 6, [0, 1] * 6, [True] * 8 + [False] * 4), K, BINS)  # 4 unpaired < k
    small = release_eval(counts("b", [0, 1] * 5, [0, 0] * 5, [True] * 5 + [False] * 5), K, BINS)
    # site a withholds unpaired (< k) and so paired too (all minus paired would reveal unpaired)
    assert list(big.confusion) == ["all"] and set(small.confusion) == {"all", "paired", "unpaired"}
    cov = coverage([("g", big), ("g", small)])
    assert cov["sites"] == 2 and cov["patients"] == 22
    assert (cov["paired_sites"], cov["paired_patients"]) == (1, 5)  # "paired" rows are pooled over site b only
    assert (cov["unpaired_sites"], cov["unpaired_patients"]) == (1, 5)
    # the coordinator's record of a federated round: it pooled both, site a withheld paired and unpaired
    rec = pooled_as_released({"mcc": 0.5}, [("g", big), ("g", small)], ["a", "b"], {"a": ["paired", "unpaired"]})
    assert (rec["mcc"], rec["sites"], rec["patients"], rec["paired_sites"], rec["paired_patients"]) == \
        (0.5, 2, 22, 1, 5)
    rec = pooled_as_released({"mcc": 0.5}, [("g", big), ("g", small)], ["a"], {"a": ["paired", "unpaired"]})
    assert (rec["sites"], rec["patients"], rec["unpaired_sites"], rec["unpaired_models"]) == (1, 12, 0, 0)


def test_pooled_over_text_names_sites_patients_and_models():
    stat = lambda *v: {"per_seed": list(v)}  # noqa: E731
    fed = {"sites": stat(3, 3), "patients": stat(62, 61), "models": stat(1, 1), "pairs": stat(3, 3)}
    assert pooled_over(fed, "") == "3 sites, 61-62 patients"
    local = {"consortium_sites": stat(3), "consortium_patients": stat(62), "consortium_models": stat(3),
             "consortium_pairs": stat(9), "sites": stat(3), "patients": stat(62), "models": stat(3),
             "pairs": stat(3)}
    assert pooled_over(local, CONSORTIUM) == "3 sites, 62 patients, each by 3 models"
    assert pooled_over(local, "") == "3 sites, 62 patients, each by its own model"
    assert pooled_over({"mcc": stat(0.5)}, "") == ""  # results written before the counts were recorded


def test_comparison_rows_label_both_evaluations():
    stat = lambda v: {"mean": v, "std": 0.0, "per_seed": [v]}  # noqa: E731
    res = {"results": {"local_only": {"mcc": stat(0.9), "sites": stat(3), "patients": stat(60),
                                      "consortium_mcc": stat(0.4), "consortium_sites": stat(3),
                                      "consortium_patients": stat(60), "consortium_models": stat(3),
                                      "consortium_pairs": stat(9)}}}
    rows = comparison_rows(res)
    assert [(r["evaluation"], r["cells"]["mcc"]["mean"]) for r in rows] == \
        [("own sites' test patients", 0.9), ("consortium test patients", 0.4)]
    assert rows[1]["pooled_over"] == "3 sites, 60 patients, each by 3 models"


def test_generated_data_paths():
    assert parse_generated("") == ("default", None)
    assert parse_generated("generated:200") == ("default", 200)
    assert parse_generated("generated:demo") == ("demo", None)
    assert parse_generated("generated:demo:120") == ("demo", 120)
    assert parse_generated("/data/ov") is None
    for bad in ("generated:nope", "generated:demo:x", "generated:demo:1:2", "generated:5"):
        with pytest.raises(ValueError, match="generated:NAME"):
            parse_generated(bad)
    cohort, sites = load_consortium("generated:demo", "demo-6", 1)
    assert cohort.generated and len(sites) == 6 and cohort.n == 360


def test_simulate_reports_both_evaluations_and_their_coverage(tmp_path, capsys):
    from simulations.cli import main
    from simulations.simulate import DEMO_DATA

    out = tmp_path / "sim"
    assert main(["simulate", "--scenario", "iid-2", "--rounds", "1", "--local-epochs", "1", "--seeds", "1",
                 "--engine", "inprocess", "--methods", "federated,centralized,local_only", "--out", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "own sites' test patients" in printed and "consortium test patients" in printed
    assert "each by 2 models" in printed and "auprc" not in printed
    res = json.loads((out / "results.json").read_text())
    r = {m: {k: v["per_seed"][0] for k, v in res["results"][m].items()} for m in res["results"]}
    assert res["data"] == DEMO_DATA  # no --data: the generated demo cohort
    _, sites = load_consortium(DEMO_DATA, "iid-2", 1)
    n_test = sum(int(s.split_indices("test").size) for s in sites)
    for m in ("federated", "centralized", "local_only"):
        assert r[m]["sites"] == r[m]["consortium_sites"] == 2
        assert r[m]["patients"] == r[m]["consortium_patients"] == n_test
    assert r["local_only"]["consortium_pairs"] == 4 and r["local_only"]["pairs"] == 2
    assert r["federated"]["consortium_pairs"] == r["centralized"]["consortium_pairs"] == 2
    for m in ("federated", "centralized"):  # one model: the consortium is the own sites' test population
        assert r[m]["consortium_mcc"] == pytest.approx(r[m]["mcc"])
    assert "auprc_low" not in res["evaluation"] and "AUPRC is not released" in res["evaluation"]


def test_generated_cohort_is_deterministic_per_seed():
    from magnet_core.cohort.generated import generated_cohort

    a, b, c = (generated_cohort("demo", seed=s) for s in (5, 5, 6))
    for m in a.modalities:
        assert np.array_equal(a.X[m], b.X[m]) and not np.array_equal(a.X[m], c.X[m])
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.labels, b.labels)
    for part in ("train", "val", "test"):
        assert np.array_equal(a.split_indices(part), b.split_indices(part))
    _, sites_a = load_consortium("generated:demo", "demo-6", 5)
    _, sites_b = load_consortium("generated:demo", "demo-6", 5)
    for sa, sb in zip(sites_a, sites_b):
        assert np.array_equal(sa.labels, sb.labels) and np.array_equal(sa.mask, sb.mask)


@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_equal_separation_puts_every_pair_of_class_centres_at_the_same_distance(num_classes):
    from magnet_core.cohort.generated import simplex_centers

    for seed in range(4):
        c = simplex_centers(num_classes, 8, np.random.default_rng(seed))
        d = np.linalg.norm(c[:, None] - c[None], axis=-1)[np.triu_indices(num_classes, 1)]
        assert np.allclose(d, 4.0)  # sqrt(2 * 8), whatever the seed
    with pytest.raises(ValueError, match="num_classes <= 8"):
        simplex_centers(9, 8, np.random.default_rng(0))

"""The test-graph rule "isolated": each test patient scored alone, so that no neighbour brings its site's label mix
into a prediction (docs/studies/README.md, "Where the label-skew gap comes from", found that a model trained on
site-local graphs gains through the test graph under label skew). Available wherever a test-graph rule is chosen."""

from __future__ import annotations

import json
from typing import get_args

import numpy as np
import torch

from magnet_core.cohort.generated import generated_cohort
from magnet_core.model.config import get_preset
from magnet_core.model.site import TEST_GRAPHS, SiteRuntime, isolated
from magnet_core.model.train import predict_proba


def test_every_place_that_names_a_test_graph_rule_offers_the_same_rules():
    from magnet_core.protocol.messages import RoundConfig
    from server.config import FederatedConfig
    from simulations.study import Cell, Study

    for model, field in ((RoundConfig, "test_graph"), (FederatedConfig, "test_graph"), (Study, "test_graph"),
                         (Cell, "test_graph")):
        annotation = model.model_fields[field].annotation
        rules = [a for arg in get_args(annotation) for a in (get_args(arg) or (arg,)) if a is not type(None)]
        assert tuple(rules) == TEST_GRAPHS, (model.__name__, rules)


def test_an_isolated_test_patient_gets_the_prediction_it_gets_alone():
    preset = get_preset("ov")
    site = SiteRuntime.build("s", generated_cohort("default", n=80, seed=4), preset.model, 0.8, "dense")
    site.model.eval()
    probs = site.test_probabilities("isolated")
    one = isolated(site.test)
    for i in (0, site.test.n - 1):
        alone = one.subset(torch.tensor([i]), one.graph.subgraph(np.array([i])))
        np.testing.assert_allclose(predict_proba(site.model, alone).numpy()[0], probs[i], rtol=1e-5, atol=1e-6)
    assert not np.allclose(site.test_probabilities("among-test"), probs)  # the test graph did matter
    counts = site.evaluate_counts(site.get_params(), test_graph="isolated")
    assert int(counts.confusion["all"].sum()) == site.test.n


def test_a_simulated_run_is_evaluated_with_the_isolated_rule(tmp_path, monkeypatch):
    """The rule reaches every evaluation of the run (the sites' in the rounds and the consortium's at the end)."""
    from simulations.cli import main

    used = []
    scored = SiteRuntime.test_probabilities

    def recording(self, test_graph="among-test"):
        used.append(test_graph)
        return scored(self, test_graph)

    monkeypatch.setattr(SiteRuntime, "test_probabilities", recording)
    out = tmp_path / "run"
    assert main(["simulate", "--engine", "inprocess", "--seeds", "1", "--rounds", "1", "--local-epochs", "1",
                 "--methods", "federated", "--test-graph", "isolated", "--out", str(out)]) == 0
    assert used and set(used) == {"isolated"}
    assert json.loads((out / "results.json").read_text())["test_graph"] == "isolated"

"""Class prototypes shared under the minimum count (fedproto, magnet_core.model.prototypes): the maths, what a site
releases (nothing about a class it holds fewer than k patients of), the coordinator's side (aggregation, server
optimizers), the contract between them (a model that carries prototypes only when the round config says so) and a
federated run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from magnet_core.federation.aggregate import ServerOptState, SiteUpdate, aggregate_updates, server_opt_step
from magnet_core.model.config import get_preset
from magnet_core.model.network import MAGNET
from magnet_core.model.prototypes import (
    MIN_MASS,
    class_means,
    global_prototypes,
    prediction_params,
    prototype_loss,
    site_release,
)
from magnet_core.protocol.errors import ContractError
from magnet_core.protocol.messages import RoundConfig
from magnet_core.protocol.wire import Layout, pack
from simulations.simulate import FEDPROTO_WEIGHT

DATA = dict(data_path="generated:160", scenario="label-skew-3")


def test_class_means_release_only_classes_with_k_patients():
    fused = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [7.0, 9.0], [0.5, 0.5]])
    y = torch.tensor([0, 0, 0, 1, 2])
    means, held = class_means(fused, y, num_classes=4, min_count=2)
    assert held.tolist() == [True, False, False, False]
    assert torch.allclose(means[0], torch.tensor([3.0, 2.0]))
    assert torch.equal(means[1:], torch.zeros(3, 2))  # below k: nothing computed from those patients is kept
    _, held1 = class_means(fused, y, num_classes=4, min_count=1)
    assert held1.tolist() == [True, True, True, False]
    with pytest.raises(ValueError, match="min_count"):
        class_means(fused, y, 4, 0)


def test_site_release_echoes_every_class_it_does_not_hold():
    received_sum, received_mass = torch.randn(3, 4), torch.tensor([0.0, 0.4, 1.0])
    means, held = torch.randn(3, 4), torch.tensor([False, True, False])
    out_sum, out_mass = site_release(received_sum, received_mass, means, held)
    assert torch.equal(out_sum[0], received_sum[0]) and torch.equal(out_sum[2], received_sum[2])
    assert torch.equal(out_sum[1], means[1])
    assert out_mass.tolist() == pytest.approx([0.0, 1.0, 1.0])


def test_weighted_average_of_releases_is_the_contributors_weighted_mean():
    """Round 1 through the coordinator's own aggregation: S / m is the mean of the class means of the sites that
    hold the class, weighted by their training patients; a class no site holds stays without a prototype."""
    c, d = 3, 4
    rng = np.random.default_rng(0)
    start = {"prototype_sum": np.zeros((c, d), np.float32), "prototype_mass": np.zeros(c, np.float32),
             "head_out.bias": np.zeros(c, np.float32)}
    means = [rng.normal(size=(c, d)).astype(np.float32) for _ in range(2)]
    holds = [np.array([True, True, False]), np.array([True, False, False])]
    n = [30, 10]
    updates = []
    for i in range(2):
        s, m = site_release(torch.from_numpy(start["prototype_sum"]), torch.from_numpy(start["prototype_mass"]),
                            torch.from_numpy(means[i]), torch.from_numpy(holds[i]))
        params = {"prototype_sum": s.numpy(), "prototype_mass": m.numpy(), "head_out.bias": np.ones(c, np.float32)}
        updates.append(SiteUpdate(f"s{i}", params, n[i], {}))
    new = aggregate_updates(start, updates)
    protos, defined = global_prototypes(torch.from_numpy(new["prototype_sum"]),
                                        torch.from_numpy(new["prototype_mass"]))
    assert defined.tolist() == [True, True, False]
    np.testing.assert_allclose(protos[0].numpy(), (30 * means[0][0] + 10 * means[1][0]) / 40, rtol=1e-5)
    np.testing.assert_allclose(protos[1].numpy(), means[0][1], rtol=1e-5)  # only site 0 holds class 1
    assert torch.equal(protos[2], torch.zeros(d))


def test_received_prototypes_are_checked_and_bounded():
    with pytest.raises(ValueError, match="non-finite"):
        global_prototypes(torch.tensor([[float("nan")]]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="do not fit"):
        global_prototypes(torch.zeros(2, 3), torch.zeros(3))
    protos, defined = global_prototypes(torch.full((3, 2), 2.0), torch.tensor([5.0, -1.0, MIN_MASS / 2]))
    assert defined.tolist() == [True, False, False]  # a mass above 1 is clipped to 1; below MIN_MASS: no prototype
    assert protos[0].tolist() == [2.0, 2.0] and protos[1:].abs().sum() == 0


def test_prototype_loss_pulls_towards_the_class_prototype_only():
    fused = torch.tensor([[1.0, 1.0], [0.0, 2.0]], requires_grad=True)
    y = torch.tensor([0, 1])
    protos = torch.tensor([[0.0, 0.0], [9.0, 9.0]])
    loss = prototype_loss(fused, y, protos, torch.tensor([True, False]))
    assert float(loss.detach()) == pytest.approx(1.0)  # ((1 - 0)^2 + (1 - 0)^2) / 2, patient 1's class has none
    loss.backward()
    assert fused.grad[1].abs().sum() == 0 and fused.grad[0].tolist() == pytest.approx([1.0, 1.0])
    none = prototype_loss(fused, y, protos, torch.tensor([False, False]))
    assert float(none) == 0.0 and none.requires_grad


def test_server_optimizers_average_prototypes_and_never_step_them():
    g = {"prototype_sum": np.zeros((2, 2)), "w": np.zeros(2)}
    agg = {"prototype_sum": np.full((2, 2), 3.0), "w": np.full(2, 3.0)}
    new, _ = server_opt_step(g, agg, ServerOptState(), "adam", eta=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    assert np.array_equal(new["prototype_sum"], agg["prototype_sum"])
    assert not np.allclose(new["w"], agg["w"])  # weights are stepped
    assert MAGNET.is_statistic("prototype_mass") and not MAGNET.is_statistic("head_out.bias")


def test_prototype_buffers_never_change_a_prediction():
    torch.manual_seed(0)
    dims = {"a": 5, "b": 3}
    plain = MAGNET(dims, 3, get_preset("brca").model)
    proto = MAGNET(dims, 3, get_preset("brca", prototypes=True).model)
    proto.load_state_dict({**plain.state_dict(), "prototype_sum": torch.randn(3, 128),
                           "prototype_mass": torch.ones(3)})
    assert set(proto.state_dict()) - set(plain.state_dict()) == {"prototype_sum", "prototype_mass"}
    plain.load_state_dict(prediction_params(proto.state_dict()))
    plain.eval(), proto.eval()
    xs, mask = [torch.randn(6, 5), torch.randn(6, 3)], torch.ones(6, 2)
    ei, ew = torch.tensor([[0, 1, 2], [1, 2, 3]]), torch.ones(3)
    assert torch.equal(plain(xs, mask, ei, ew)[0], proto(xs, mask, ei, ew)[0])


# ------------------------------------------------------------------ a site under a (possibly dishonest) coordinator


def _site_and_model(weight: float):
    from client.handlers import forget_sites, site_for

    forget_sites()
    cfg = RoundConfig(server_round=1, seed=0, preset="ov", local_epochs=1, histogram_bins=10, min_count=5,
                      prototype_weight=weight, **DATA)
    site = site_for(cfg, {"partition-id": 0}, 0)
    return cfg, site, {k: v.detach().numpy().copy() for k, v in site.model.state_dict().items()}


def _send(cfg: RoundConfig, params: dict, **kw):
    from client.handlers import train_site

    layout = Layout.from_params(params)
    cfg = cfg.model_copy(update=kw)
    return train_site(RoundConfig.decode(cfg.encode()), {"partition-id": 0}, 0, pack(params, layout),
                      layout.to_record())


def test_a_site_releases_class_means_only_for_classes_with_k_patients():
    """A dishonest coordinator plants prototypes for every class and asks k = 5; the site replaces only the classes
    it holds at least k (here: its own, larger) training patients of, and returns every other class exactly as
    it was sent (nothing computed from those patients leaves)."""
    from magnet_core.protocol.wire import unpack

    cfg, site, params = _site_and_model(1.0)
    counts = site.label_counts()
    k = int(counts[counts > 0].min()) + 1  # at least one class the site holds falls below k
    assert (counts >= k).any() and ((counts > 0) & (counts < k)).any()
    planted_sum = np.random.default_rng(1).normal(size=params["prototype_sum"].shape).astype(np.float32)
    planted = {**params, "prototype_sum": planted_sum, "prototype_mass": np.full_like(params["prototype_mass"], 0.5)}
    _, _, flat = _send(cfg, planted, min_count=k)
    back = unpack(flat, Layout.from_params(planted))
    held = (counts >= k).numpy()
    assert np.array_equal(back["prototype_sum"][~held], planted_sum[~held])
    assert np.array_equal(back["prototype_mass"][~held], planted["prototype_mass"][~held])
    assert np.all(back["prototype_mass"][held] == 1.0)
    assert not np.allclose(back["prototype_sum"][held], planted_sum[held])


def test_the_model_carries_prototypes_only_when_the_round_config_says_so():
    """A coordinator cannot collect class means under a plain round (a model with prototype buffers and weight 0),
    nor start a prototype round with a model that lacks them: the site checks the layout against its own model."""
    cfg_plain, _, plain = _site_and_model(0.0)
    _, _, with_protos = _site_and_model(1.0)
    with pytest.raises(ContractError, match="does not fit"):
        _send(cfg_plain, with_protos)
    with pytest.raises(ContractError, match="does not fit"):
        _send(cfg_plain.model_copy(update={"prototype_weight": 1.0}), plain)
    with pytest.raises(Exception, match="prototype_weight|prototype-weight"):
        RoundConfig(server_round=1, seed=0, preset="ov", local_epochs=1, histogram_bins=10, prototype_weight=1e9)


def test_a_model_without_buffers_or_a_site_without_k_refuses_prototype_training():
    from client.handlers import forget_sites, site_for

    _, site, params = _site_and_model(1.0)
    with pytest.raises(ValueError, match="min_count"):
        site.fit(params, get_preset("ov").train, 1, 1, 0, prototype_weight=1.0)
    forget_sites()
    plain = site_for(RoundConfig(server_round=1, seed=0, preset="ov", local_epochs=1, histogram_bins=10, **DATA),
                     {"partition-id": 0}, 0)
    with pytest.raises(ValueError, match="prototype buffers|class-prototype buffers"):
        plain.fit(prediction_params(params), get_preset("ov").train, 1, 1, 0, prototype_weight=1.0, min_count=5)


def test_fedproto_runs_end_to_end_and_is_reproducible(tmp_path):
    from simulations.cli import main

    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        code = main(["simulate", "--scenario", "label-skew-3", "--rounds", "2", "--local-epochs", "1", "--seeds", "10",
                     "--engine", "inprocess", "--methods", "federated,fedproto", "--out", str(out)])
        assert code == 0
        runs.append(out)
    res = json.loads((runs[0] / "results.json").read_text())
    assert res["method_settings"]["fedproto"]["prototype-weight"] == FEDPROTO_WEIGHT
    assert res["method_settings"]["federated"]["prototype-weight"] == 0.0
    assert res["results"]["fedproto"]["mcc"]["per_seed"][0] is not None
    rounds = (runs[0] / "rounds.csv").read_text().splitlines()
    rejected = rounds[0].split(",").index("sites_rejected")
    assert all(line.split(",")[rejected] == "0" for line in rounds[1:])  # honest releases pass the coordinator's check
    models = [torch.load(r / "runs" / "fedproto-seed10" / "model.pt", weights_only=True) for r in runs]
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])  # same seed, same model
    mass = models[0]["prototype_mass"]
    assert bool((mass > 0).any()) and bool(((mass >= 0) & (mass <= 1 + 1e-6)).all())
    fed = torch.load(runs[0] / "runs" / "federated-seed10" / "model.pt", weights_only=True)
    assert "prototype_sum" not in fed
    assert any(not torch.equal(models[0][k], fed[k]) for k in fed)  # the term changed training


def _honest_release(c: int = 3, d: int = 4):
    rng = np.random.default_rng(2)
    g = {"prototype_sum": rng.normal(size=(c, d)).astype(np.float32),
         "prototype_mass": np.array([0.0, 0.5, 1.0], np.float32)[:c]}
    s, m = site_release(torch.from_numpy(g["prototype_sum"]), torch.from_numpy(g["prototype_mass"]),
                        torch.from_numpy(rng.normal(size=(c, d)).astype(np.float32)), torch.tensor([True, False, True]))
    return g, {"prototype_sum": s.numpy(), "prototype_mass": m.numpy()}


def test_the_coordinator_accepts_honest_releases():
    from magnet_core.federation.aggregate import prototype_problems, released_means

    g, new = _honest_release()
    assert prototype_problems(g, new) == []
    assert released_means(g, new).tolist() == [True, False, True]


@pytest.mark.parametrize("forge,match", [
    (lambda n: n["prototype_mass"].__setitem__(1, 0.9), "neither the received ones nor 1"),  # weight it never had
    (lambda n: n["prototype_sum"].__setitem__(1, n["prototype_sum"][1] + 5), "changed while their mass"),
    (lambda n: n["prototype_mass"].__setitem__(0, 50.0), "neither the received ones nor 1"),
    (lambda n: n["prototype_mass"].__setitem__(0, -0.5), "neither the received ones nor 1"),
])
def test_a_dishonest_site_cannot_forge_prototype_weight(forge, match):
    """Replies no honest site can send are rejected by the coordinator's shared update check."""
    from magnet_core.federation.aggregate import validate_update

    g, new = _honest_release()
    forge(new)
    problems = validate_update(g, new)
    assert problems and match in problems[0]


def test_an_out_of_scale_class_mean_is_refused_and_honest_ones_are_not():
    from magnet_core.federation.aggregate import prototype_outliers

    g, _ = _honest_release()
    honest = {i: _honest_release()[1] for i in range(3)}
    assert prototype_outliers(g, honest) == {}
    poisoned = {**honest, 3: {"prototype_sum": honest[0]["prototype_sum"] * 1000,
                              "prototype_mass": honest[0]["prototype_mass"]}}
    out = prototype_outliers(g, poisoned)
    assert set(out) == {3} and "released class mean" in out[3]
    assert prototype_outliers({"w": np.zeros(2)}, {0: {"w": np.ones(2)}}) == {}  # no prototypes: nothing to check


def test_prototypes_are_no_step_for_the_screen_and_always_averaged():
    """The screen's norms, clip and direction read the weights only (a prototype's size cannot widen the band a
    dishonest weight step must fit in), the clip leaves the prototypes as sent, and a robust rule still averages
    them (a coordinate-wise median of sums and masses is no prototype)."""
    from magnet_core.federation.aggregate import flat_delta
    from magnet_core.federation.screening import model_norm, shrink

    g = {"w": np.zeros(2), "prototype_sum": np.zeros((2, 2)), "prototype_mass": np.zeros(2)}
    u = {"w": np.array([3.0, 4.0]), "prototype_sum": np.full((2, 2), 100.0), "prototype_mass": np.ones(2)}
    assert np.linalg.norm(flat_delta(g, u)) == pytest.approx(5.0)
    assert model_norm(u) == pytest.approx(5.0)
    clipped = shrink(g, u, 0.5)
    assert clipped["w"].tolist() == [1.5, 2.0] and np.array_equal(clipped["prototype_sum"], u["prototype_sum"])
    ups = [SiteUpdate(f"s{i}", {"w": np.full(2, float(i)), "prototype_sum": np.full((2, 2), float(i)),
                                "prototype_mass": np.array([1.0, 1.0 if i == 0 else 0.0])}, 10, {})
           for i in range(3)]
    new = aggregate_updates(g, ups, robust="median")
    assert new["w"].tolist() == [1.0, 1.0]
    assert new["prototype_mass"].tolist() == pytest.approx([1.0, 1 / 3])  # the mean, not the median (0)


def test_prototypes_are_refused_with_secure_aggregation_or_dp():
    from server.config import FederatedConfig, RunConfigError

    for extra in ({"secagg": True}, {"dp-clip-norm": 0.5, "dp-noise-multiplier": 1.0}):
        with pytest.raises(RunConfigError, match="aggregates in the clear only"):
            FederatedConfig.from_run_config({"prototype-weight": 1.0, **extra})
    assert FederatedConfig.from_run_config({"prototype-weight": 1.0}).prototype_weight == 1.0


def test_one_site_releasing_every_class_cannot_outvote_the_others():
    """Per-site votes: a dishonest site releasing all C classes at 1e4 x, against honest sites that each release
    one class, is flagged in the first round (no current prototypes yet)."""
    from magnet_core.federation.aggregate import prototype_outliers

    c, d = 5, 3
    g = {"prototype_sum": np.zeros((c, d), np.float32), "prototype_mass": np.zeros(c, np.float32)}
    honest = {}
    for i in range(2):
        s, m = g["prototype_sum"].copy(), g["prototype_mass"].copy()
        s[i], m[i] = 1.0, 1.0
        honest[i] = {"prototype_sum": s, "prototype_mass": m}
    attacker = {"prototype_sum": np.full((c, d), 2e4, np.float32), "prototype_mass": np.ones(c, np.float32)}
    assert set(prototype_outliers(g, {**honest, "x": attacker})) == {"x"}
    assert prototype_outliers(g, honest) == {}

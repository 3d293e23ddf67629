"""Strategies beyond FedAvg: FedProx's proximal term, FedAdam / FedYogi server steps (as Flower computes them),
untrained blocks that stay put, resumable optimizer state, and the simulate methods and --set overrides."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flower_messages import instruction, reply

from magnet_core.consortium.simulated import load_consortium
from magnet_core.federation.aggregate import ServerOptState, SiteUpdate, server_opt_step, trained_arrays
from magnet_core.model.config import get_preset
from magnet_core.model.site import SiteRuntime
from magnet_core.protocol.messages import ContractError, RoundConfig
from server.config import FederatedConfig, RunConfigError

# ------------------------------------------------------------------------------------------------- FedProx


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a))


def test_fedprox_pulls_the_local_model_toward_the_global_one():
    preset = get_preset("ov")
    _, sites = load_consortium("", "demo-3", 10)
    site = SiteRuntime.build("site1", sites[1], preset.model, preset.graph.sparsity)
    start = {k: v.clone() for k, v in site.get_state().items()}
    distances = {}
    for mu in (0.0, 1.0):
        new, stats = site.fit(start, preset.train, 3, server_round=1, seed=10, proximal_mu=mu)
        distances[mu] = _distance(new, start)
        assert math.isfinite(stats["loss"]) and (("proximal" in stats) == (mu > 0))
    print(f"distance to the global model after 3 local epochs: mu=0 {distances[0.0]:.4f}, mu=1 {distances[1.0]:.4f}")
    assert 0 < distances[1.0] < distances[0.0]


# ---------------------------------------------------------------------------------------- server optimizer


def _flower_step(strategy_cls, current: dict, aggregated: dict, server_round: int, state=None, **kw):
    """Flower's own strategy on one aggregated model (a single reply carrying it, weight 1)."""
    from flwr.app import Array, ArrayRecord, MetricRecord

    strategy = strategy_cls(**kw) if state is None else state
    strategy.current_arrays = {k: v.copy() for k, v in current.items()}
    msg = instruction(1, "train")
    rep = reply(msg, {"arrays": ArrayRecord({k: Array(v) for k, v in aggregated.items()}),
                      "metrics": MetricRecord({"num-examples": 1})})
    out, _ = strategy.aggregate_train(server_round, [rep])
    return {k: v.numpy() for k, v in out.items()}, strategy


@pytest.mark.parametrize("rule", ["adam", "yogi"])
def test_server_step_matches_flowers_fedadam_and_fedyogi(rule):
    from flwr.serverapp.strategy import FedAdam, FedYogi

    rng = np.random.default_rng(0)
    w0 = {"encoders.mRNA.w": rng.normal(size=(3, 4)).astype(np.float32),
          "head.b": rng.normal(size=5).astype(np.float32)}
    eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    cls = FedAdam if rule == "adam" else FedYogi
    ours, state, flower, strategy = w0, ServerOptState(), w0, None
    for t in (1, 2, 3):  # three rounds: the moments carry over
        agg = {k: (v + rng.normal(scale=0.01, size=v.shape)).astype(np.float32) for k, v in ours.items()}
        # Flower's FedAdam bias-corrects with exponent server_round + 1; ours with the step count t
        flower, strategy = _flower_step(cls, ours, agg, t - 1, strategy, eta=eta, beta_1=b1, beta_2=b2, tau=tau)
        ours, state = server_opt_step(ours, agg, state, rule, eta, b1, b2, tau)
        for k in w0:
            np.testing.assert_allclose(ours[k], flower[k], rtol=1e-5, atol=1e-6, err_msg=f"{rule} round {t} {k}")
            assert ours[k].dtype == np.float32
        assert state.steps == {k: t for k in w0}
    # and by hand for Adam's first step: m = 0.1 d, v = 0.01 d^2, eta_1 = eta -> w + eta * d / (|d| + 10 tau)
    d = np.array([0.02, -0.005, 0.0])
    new, _ = server_opt_step({"x": np.zeros(3)}, {"x": d}, ServerOptState(), "adam", eta, b1, b2, tau)
    np.testing.assert_allclose(new["x"], eta * 0.1 * d / (0.1 * np.abs(d) + tau))


def test_blocks_without_contributions_do_not_move():
    glob = {"encoders.mRNA.w": np.ones(3, np.float32), "encoders.miRNA.w": np.full(2, 5.0, np.float32),
            "attention.att": np.zeros(2, np.float32)}
    aggregated = {"encoders.mRNA.w": np.full(3, 1.1, np.float32), "encoders.miRNA.w": glob["encoders.miRNA.w"].copy(),
                  "attention.att": np.full(2, 0.1, np.float32)}
    updates = [SiteUpdate("a", aggregated, 10, {"mRNA": 10, "miRNA": 0}),
               SiteUpdate("b", aggregated, 5, {"mRNA": 5, "miRNA": 0})]
    trained = trained_arrays(glob, updates)
    assert trained == {"encoders.mRNA.w", "attention.att"}
    # a previous round left momentum on the miRNA encoder: it must not push it now that nobody trains it
    state = ServerOptState(m={"encoders.miRNA.w": np.full(2, 0.3)}, v={"encoders.miRNA.w": np.full(2, 0.01)},
                           steps={"encoders.miRNA.w": 1})
    for rule in ("adam", "yogi"):
        new, after = server_opt_step(glob, aggregated, state, rule, 0.1, 0.9, 0.99, 1e-3, active=trained)
        np.testing.assert_array_equal(new["encoders.miRNA.w"], glob["encoders.miRNA.w"])
        np.testing.assert_array_equal(after.m["encoders.miRNA.w"], state.m["encoders.miRNA.w"])
        assert after.steps["encoders.miRNA.w"] == 1 and after.steps["attention.att"] == 1
        assert np.all(new["encoders.mRNA.w"] > glob["encoders.mRNA.w"])  # trained blocks step along aggregate
        # without the mask the stale momentum would have moved it
        moved, _ = server_opt_step(glob, aggregated, state, rule, 0.1, 0.9, 0.99, 1e-3)
        assert not np.array_equal(moved["encoders.miRNA.w"], glob["encoders.miRNA.w"])
    assert trained_arrays(glob, []) == set()


def test_optimizer_state_round_trips_and_bad_state_is_refused():
    glob = {"a": np.zeros((2, 2), np.float32)}
    _, state = server_opt_step(glob, {"a": np.ones((2, 2), np.float32)}, ServerOptState(), "adam", .1, .9, .99, 1e-3)
    back = ServerOptState.from_tensors(state.to_tensors(), glob)
    np.testing.assert_array_equal(back.m["a"], state.m["a"])
    np.testing.assert_array_equal(back.v["a"], state.v["a"])
    assert back.steps == {"a": 1}
    with pytest.raises(ValueError, match="does not fit the model"):
        ServerOptState.from_tensors(state.to_tensors(), {"a": np.zeros(3, np.float32)})
    broken = state.to_tensors()
    broken["v"]["a"] = -broken["v"]["a"]
    with pytest.raises(ValueError, match="inconsistent"):
        ServerOptState.from_tensors(broken, glob)


# ---------------------------------------------------------------------------------------- configuration


def test_config_round_trip_and_bad_values_are_refused():
    cfg = FederatedConfig.from_run_config({"proximal-mu": 0.1, "server-optimizer": "yogi", "server-lr": 0.03})
    assert FederatedConfig.from_run_config(cfg.to_run_config()) == cfg
    assert cfg.fingerprint() != FederatedConfig.from_run_config({**cfg.to_run_config(), "server-lr": 0.1}).fingerprint()
    for bad, key in (({"proximal-mu": -0.1}, "proximal-mu"), ({"proximal-mu": float("nan")}, "proximal-mu"),
                     ({"proximal-mu": 11}, "proximal-mu"), ({"server-optimizer": "sgd"}, "server-optimizer"),
                     ({"server-lr": 0}, "server-lr"), ({"server-beta2": 1.0}, "server-beta2"),
                     ({"server-tau": 0}, "server-tau"), ({"secagg": True, "robust": "median"}, "robust")):
        with pytest.raises(RunConfigError, match=key):
            FederatedConfig.from_run_config(bad)
    # DP then a server step, or a step after a secure sum: post-processing of the aggregate, allowed
    assert FederatedConfig.from_run_config({"secagg": True, "server-optimizer": "yogi"}).server_optimizer == "yogi"
    assert FederatedConfig.from_run_config({"dp-clip-norm": 1.0, "server-optimizer": "adam"}).server_optimizer == "adam"
    rc = RoundConfig(server_round=2, seed=1, preset="ov", local_epochs=3, histogram_bins=20, proximal_mu=0.01)
    assert rc.encode()["proximal-mu"] == 0.01 and RoundConfig.decode(rc.encode()) == rc
    assert RoundConfig.decode({k: v for k, v in rc.encode().items() if k != "proximal-mu"}).proximal_mu == 0.0
    for value in (-1.0, float("inf"), 10.5, "0.1x"):
        with pytest.raises(ContractError, match="proximal_mu"):
            RoundConfig.decode({**rc.encode(), "proximal-mu": value})


def test_set_overrides_are_checked_and_name_the_key():
    from simulations.simulate import key_value, parse_overrides

    assert parse_overrides([key_value("dp-clip-norm=1"), key_value("dp-noise-multiplier=0.8")], ["federated"]) == \
        {"dp_clip_norm": 1, "dp_noise_multiplier": 0.8}
    assert key_value("secagg=true") == ("secagg", True) and key_value("robust=median") == ("robust", "median")
    assert parse_overrides([key_value("proximal-mu=0.1")], ["fedprox", "centralized"]) == {"proximal_mu": 0.1}
    for pairs, methods, message in (
            (["no-such-key=1"], ["federated"], "--set no-such-key: not a run-config field"),
            (["seed=3"], ["federated"], "--set seed: set by simulate itself"),
            (["dp-noise-multiplier=-1"], ["federated"], "dp-noise-multiplier"),
            (["proximal-mu=0.1"], ["federated", "fedprox"], "contradicts method 'federated'"),
            (["server-optimizer=adam"], ["fedyogi"], "contradicts method 'fedyogi'"),
            (["robust=median", "secagg=true"], ["fedadam"], "robust")):
        with pytest.raises(ValueError, match=message):
            parse_overrides([key_value(p) for p in pairs], methods)


# ------------------------------------------------------------------------------------------------ end to end


def test_simulate_fedprox_and_fedadam_end_to_end(tmp_path):
    """Both methods run through the ClientApp/ServerApp on the generated cohort; nobody holds DNA, so FedAdam's
    DNA encoder is exactly the initial one after two rounds while the rest moved; --set is recorded."""
    from magnet_core.model.network import build_model
    from magnet_core.model.train import in_dims_of
    from simulations.cli import main

    scenario = tmp_path / "no-dna.toml"
    scenario.write_text('name = "no-dna"\nnum_sites = 3\npartition = "iid"\n'
                        + "".join(f'[sites.{i}]\nDNA = "absent"\n' for i in range(3)))
    out = tmp_path / "sim"
    code = main(["simulate", "--scenario", str(scenario), "--rounds", "2", "--local-epochs", "1", "--seeds", "10",
                 "--engine", "inprocess", "--methods", "fedprox,fedadam", "--set", "server-lr=0.02",
                 "--out", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["results"]) == {"fedprox", "fedadam"} and res["overrides"] == {"server-lr": 0.02}
    assert res["method_settings"]["fedprox"]["proximal-mu"] > 0
    assert res["method_settings"]["fedadam"]["server-optimizer"] == "adam"
    assert res["method_settings"]["fedadam"]["server-lr"] == 0.02
    for method in ("fedprox", "fedadam"):
        assert res["results"][method]["mcc"]["per_seed"][0] is not None
    final = torch.load(out / "runs" / "fedadam-seed10" / "model.pt", weights_only=True)
    history = json.loads((out / "runs" / "fedadam-seed10" / "history.json").read_text())
    assert all(r["screening"]["server_optimizer"]["rule"] == "adam" for r in history)
    pooled, _ = load_consortium("", str(scenario), 10)
    init = build_model(in_dims_of(pooled), pooled.num_classes, get_preset("ov").model, 10).state_dict()
    dna = [k for k in final if k.startswith("encoders.DNA.")]
    assert dna and all(torch.equal(final[k], init[k]) for k in dna)
    assert any(not torch.equal(final[k], init[k]) for k in final if not k.startswith("encoders.DNA."))


def test_server_optimizer_state_survives_resume(tmp_path):
    from simulations.engine import run_inprocess

    def cfg(name, rounds, **kw):
        return FederatedConfig(num_server_rounds=rounds, local_epochs=1, scenario="iid-2", seed=3, min_sites=2,
                               server_optimizer="yogi", server_lr=0.02, report=False, out_dir=str(tmp_path / name), **kw)  # noqa: E501 (one assertion string)

    straight, _ = run_inprocess(cfg("a", 3), 2)
    run_inprocess(cfg("b", 2), 2)
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert set(ckpt["server_opt"]["steps"].values()) == {2}
    resumed, hist = run_inprocess(cfg("b", 3, resume=True), 2)
    assert [r["round"] for r in hist] == [1, 2, 3]
    for k in straight:
        np.testing.assert_allclose(resumed[k], straight[k], atol=1e-6, err_msg=k)

"""Federated MAGNET: aggregation math, exact pooled metrics, reply privacy, scenarios, engines, resume."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from flower_messages import instruction as _instruction
from flower_messages import reply as _reply
from sklearn.metrics import matthews_corrcoef

from magnet_core.consortium.scenarios import Scenario, build_consortium, load_scenario
from magnet_core.consortium.simulated import load_consortium
from magnet_core.federation.aggregate import (
    SiteUpdate,
    aggregate_updates,
    pooled_metrics,
    validate_update,
)
from magnet_core.model.config import get_preset
from magnet_core.model.metrics import metrics_from_confusion
from magnet_core.protocol.messages import site_record
from server.config import FederatedConfig


def _params(enc_a: float, enc_b: float, shared: float) -> dict[str, np.ndarray]:
    return {
        "encoders.mRNA.net.0.weight": np.full((2, 2), enc_a, np.float32),
        "encoders.miRNA.net.0.weight": np.full((3,), enc_b, np.float32),
        "attention.att": np.full((2,), shared, np.float32),
    }


def test_modality_aware_weighted_means_by_hand():
    glob = _params(0.0, 0.0, 0.0)
    u1 = SiteUpdate("a", _params(1.0, 10.0, 2.0), num_train=30, modality_counts={"mRNA": 10, "miRNA": 30})
    u2 = SiteUpdate("b", _params(4.0, 99.0, 5.0), num_train=10, modality_counts={"mRNA": 30, "miRNA": 0})
    new = aggregate_updates(glob, [u1, u2], modality_aware=True)
    # mRNA encoder: (10*1 + 30*4) / 40 = 3.25 ; miRNA only from site a (site b lacks it) = 10
    np.testing.assert_allclose(new["encoders.mRNA.net.0.weight"], 3.25)
    np.testing.assert_allclose(new["encoders.miRNA.net.0.weight"], 10.0)
    # shared layers weighted by training patients: (30*2 + 10*5) / 40 = 2.75
    np.testing.assert_allclose(new["attention.att"], 2.75)
    plain = aggregate_updates(glob, [u1, u2], modality_aware=False)
    np.testing.assert_allclose(plain["encoders.miRNA.net.0.weight"], (30 * 10 + 10 * 99) / 40)


def test_encoder_of_a_modality_no_site_holds_is_left_untouched():
    glob = _params(7.0, -3.0, 0.0)
    u1 = SiteUpdate("a", _params(1.0, 5.0, 1.0), 5, {"mRNA": 5, "miRNA": 0})
    u2 = SiteUpdate("b", _params(2.0, 6.0, 1.0), 5, {"mRNA": 5, "miRNA": 0})
    new = aggregate_updates(glob, [u1, u2])
    np.testing.assert_array_equal(new["encoders.miRNA.net.0.weight"], glob["encoders.miRNA.net.0.weight"])
    np.testing.assert_allclose(new["encoders.mRNA.net.0.weight"], 1.5)


def test_robust_aggregation_resists_one_outlier():
    glob = _params(0, 0, 0)
    ups = [SiteUpdate(s, _params(v, v, v), 10, {"mRNA": 10, "miRNA": 10}) for s, v in
           (("a", 1.0), ("b", 1.2), ("c", 0.8), ("d", 1000.0), ("e", 1.1))]
    med = aggregate_updates(glob, ups, robust="median")
    np.testing.assert_allclose(med["attention.att"], 1.1)
    trimmed = aggregate_updates(glob, ups, robust="trimmed-mean", trim=0.2)
    np.testing.assert_allclose(trimmed["attention.att"], np.mean([1.0, 1.2, 1.1]), rtol=1e-6)


def test_update_validation_names_shapes_and_finiteness():
    glob = _params(0, 0, 0)
    assert validate_update(glob, _params(1, 1, 1)) == []
    bad = _params(1, 1, 1)
    bad["attention.att"] = np.array([np.nan, 1.0], np.float32)
    assert any("non-finite" in p for p in validate_update(glob, bad))
    wrong_shape = _params(1, 1, 1)
    wrong_shape["attention.att"] = np.zeros(3, np.float32)
    assert any("shape" in p for p in validate_update(glob, wrong_shape))
    renamed = {("x" + k): v for k, v in _params(1, 1, 1).items()}
    problems = validate_update(glob, renamed)
    assert any("missing" in p for p in problems) and any("unexpected" in p for p in problems)


def test_error_replies_are_reported_as_failures_not_crashes():
    """A site's error reply (bad data, a crash, or the SuperLink's reply for a node that went away) has no content;
    the round goes on with the other sites and the failure is recorded under the node id."""
    from flwr.app import ConfigRecord, MetricRecord

    from magnet_core.protocol.wire import Layout
    from server.strategy import MagnetFedAvg, to_numpy, to_record

    strategy = MagnetFedAvg(FederatedConfig(min_sites=1), ["mRNA", "miRNA"], 2)
    strategy.current = _params(1, 1, 1)
    layout = Layout.from_params(strategy.current)
    good = _reply(_instruction(1, "train"), {
        "arrays": to_record(_params(1.01, 1.01, 1.01), layout), "site": ConfigRecord(site_record("site-a")),
        "metrics": MetricRecord({"num-examples": 10, "count-mRNA": 10, "count-miRNA": 5, "loss": 0.5})})
    failed = _reply(_instruction(2, "train"), error="node unavailable")
    failed.metadata.__dict__["_src_node_id"] = 1  # the SuperLink answers for a node that went away
    strategy.destinations = {"instruction-2-train": 2}  # filled by server.collect.collect
    new, _ = strategy.aggregate_train(1, [failed, good])
    np.testing.assert_allclose(to_numpy(new, layout)["attention.att"], 1.01)
    assert strategy.report.accepted == ["site-a"]
    assert strategy.report.failed == {"node2": "node 2: node unavailable"}

    cm = MetricRecord({"num-examples": 10, "cm-all": [3, 1, 2, 4]})
    evaluated = _reply(_instruction(1, "evaluate"), {"metrics": cm, "site": ConfigRecord(site_record("site-a"))})
    metrics = strategy.aggregate_evaluate(1, [_reply(_instruction(2, "evaluate"), error="crashed"), evaluated])
    assert metrics["acc"] == pytest.approx(0.7)
    assert set(strategy.report.site_metrics) == {"site-a"}


class _ScriptedGrid:
    """A grid whose replies arrive at scripted times: {node: (seconds, error or None)}."""

    def __init__(self, script: dict[int, tuple[float, str | None]]):
        self.script, self.sent, self.t0 = script, {}, 0.0

    def push_messages(self, messages):
        import time

        self.t0 = time.monotonic()
        self.sent = {m.metadata.message_id: m for m in messages}  # ids set by _instruction, as a grid would
        return list(self.sent)

    def pull_messages(self, ids):
        import time

        now = time.monotonic() - self.t0
        out = []
        for mid in ids:
            msg = self.sent[mid]
            delay, error = self.script[msg.metadata.dst_node_id]
            if now >= delay:
                out.append(_reply(msg, {} if error is None else None, error))
        return out


def test_collect_waits_for_enough_successful_replies_and_bounds_stragglers():
    from server.collect import collect

    def instructions():
        return [_instruction(n, "train") for n in (1, 2, 3)]

    # node 3 is gone: the SuperLink's error reply arrives at once and must not count towards min_replies
    grid = _ScriptedGrid({1: (0.0, None), 2: (0.6, None), 3: (0.0, "node unavailable")})
    destinations = {}
    replies = collect(grid, instructions(), timeout=5.0, min_replies=2, grace=0.2, destinations=destinations)
    assert sorted(m.metadata.src_node_id for m in replies if not m.has_error()) == [1, 2]
    assert destinations == {f"instruction-{n}-train": n for n in (1, 2, 3)}
    # a straggler delays the round by at most `grace` once enough sites answered
    grid = _ScriptedGrid({1: (0.0, None), 2: (0.0, None), 3: (60.0, None)})
    start = time.monotonic()
    replies = collect(grid, instructions(), timeout=30.0, min_replies=2, grace=0.3)
    assert len(replies) == 2 and time.monotonic() - start < 5.0


def test_pooled_metrics_equal_pooled_predictions_and_differ_from_mean_of_site_mccs(ov_path):
    from magnet_core.model.site import SiteRuntime

    preset = get_preset("ov")
    _, sites = load_consortium(str(ov_path), "iid-3", 10)
    torch.manual_seed(0)
    runtimes = [SiteRuntime.build(s.name, s, preset.model, preset.graph.sparsity) for s in sites]
    params = runtimes[0].get_params()
    ys, preds, counts = [], [], []
    for rt in runtimes:
        c = rt.evaluate_counts(params)
        counts.append(c)
        probs = rt.model.eval()(rt.test.xs, rt.test.mask, rt.test.graph.edge_index, rt.test.graph.edge_weight)[0]
        ys.append(rt.test.y.numpy())
        preds.append(probs.argmax(1).numpy())
    pooled = pooled_metrics(counts)
    y, p = np.concatenate(ys), np.concatenate(preds)
    assert pooled["mcc"] == pytest.approx(matthews_corrcoef(y, p), abs=1e-12)
    assert pooled["acc"] == pytest.approx(float((y == p).mean()), abs=1e-12)
    site_mccs = [metrics_from_confusion(c.confusion["all"])["mcc"] for c in counts]
    assert len(counts) == 3 and sum(c.num for c in counts) == len(y)
    assert np.isfinite(site_mccs).all()


def test_scenario_rules_and_errors(tmp_path, ov_path):
    cohort, sites = load_consortium(str(ov_path), "no-mirna-site-3", 10)
    j = cohort.modalities.index("miRNA")
    assert not sites[2].mask[:, j].any(), "site 2 must have no miRNA at all"
    assert sites[0].mask[:, j].any() and sites[1].mask[:, j].any()
    # site 2 patients who only had miRNA are dropped, everyone else kept
    assert sum(s.n for s in sites) < cohort.n
    assert all(s.mask.any(axis=1).all() for s in sites)
    half = Scenario(name="half", num_sites=2, missing={"mRNA": 0.5})
    logs: list[str] = []
    dropped = build_consortium(cohort, half, 10, log=logs.append)
    jm = cohort.modalities.index("mRNA")
    before = sum(cohort.subset(i).mask[:, jm].sum() for i in [np.arange(cohort.n)])
    after = sum(s.mask[:, jm].sum() for s in dropped)
    assert after == pytest.approx(before / 2, abs=2)
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nnum_sites = 2\n[missing]\nmRNA = 1.5\n')
    with pytest.raises(ValueError, match="bad.toml"):
        load_scenario(bad)
    with pytest.raises(ValueError, match="unknown scenario"):
        load_scenario("no-such-scenario")
    assert load_scenario("label-skew-3").alpha == 0.5


def test_no_patient_level_data_in_replies(ov_path):
    """Every reply holds model arrays, counts and fixed-size summaries only."""
    from flower_messages import model_records
    from flwr.app import ConfigRecord, Context, RecordDict

    from client.app import app as client_app
    from magnet_core.protocol.version import stamped
    from server.loop import ModelSpec, initial_params

    cohort, sites = load_consortium(str(ov_path), "iid-2", 10)
    cfg = FederatedConfig(seed=10, data_path=str(ov_path), scenario="iid-2", local_epochs=1)
    params = initial_params(ModelSpec({m: cohort.X[m].shape[1] for m in cohort.modalities}, 2), cfg)
    ids = {str(s) for s in cohort.sample_ids}
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                  run_config={})
    conf = stamped({"preset": "ov", "seed": 10, "local-epochs": 1, "data-path": str(ov_path), "scenario": "iid-2",
                    "server-round": 1, "histogram-bins": 1000})
    for kind in ("train", "evaluate"):
        msg = _instruction(1, kind, {**model_records(params), "config": ConfigRecord(conf)})
        reply = client_app(msg, ctx)
        content = reply.content
        if kind == "train":
            assert list(content["arrays"].keys()) == ["model"]  # one flat array, nothing else
            assert content["arrays"]["model"].shape == (sum(v.size for v in params.values()),)
        metrics = content["metrics"]
        for key, value in metrics.items():  # fixed-size summaries: 2 x 2 matrices, at most 20 merged score bins
            if isinstance(value, list):
                assert len(value) == 4 or (key.startswith("hist-") and len(value) <= 40) or \
                    (key.startswith("edges-") and len(value) <= 21), f"{key} has {len(value)} entries"
        text = repr(dict(metrics)) + repr(dict(content["site"]))
        assert not any(sid in text for sid in ids)
        allowed = {"num-examples", "loss", "count-mRNA", "count-miRNA"} if kind == "train" else \
            {"num-examples"} | {f"{p}-{g}" for p in ("cm", "hist", "edges", "withheld")
                                for g in ("all", "paired", "unpaired")}
        assert set(metrics.keys()) <= allowed


def _cfg(ov_path, tmp_path, name, **kw) -> FederatedConfig:
    base = dict(num_server_rounds=2, local_epochs=2, data_path=str(ov_path), scenario="iid-2", seed=10,
                min_sites=2, out_dir=str(tmp_path / name))
    base.update(kw)
    return FederatedConfig(**base)


def test_resume_from_checkpoint_continues_at_next_round(ov_path, tmp_path):
    from simulations.engine import run_inprocess

    straight, hist = run_inprocess(_cfg(ov_path, tmp_path, "a", num_server_rounds=3), 2)
    run_inprocess(_cfg(ov_path, tmp_path, "b", num_server_rounds=2), 2)
    resumed, hist_b = run_inprocess(_cfg(ov_path, tmp_path, "b", num_server_rounds=3, resume=True), 2)
    assert [r["round"] for r in hist_b] == [1, 2, 3]
    for k in straight:
        np.testing.assert_allclose(resumed[k], straight[k], atol=1e-6)
    saved = json.loads((tmp_path / "b" / "history.json").read_text())
    assert [r["round"] for r in saved] == [1, 2, 3] and (tmp_path / "b" / "model.pt").exists()


def test_flower_engine_and_inprocess_engine_agree(ov_path, tmp_path, monkeypatch):
    """A real Flower simulation (Ray, 2 sites, 2 rounds) gives the in-process engine's global weights."""
    from client.handlers import forget_sites
    from simulations.engine import run_flower, run_inprocess

    threads = torch.get_num_threads()
    monkeypatch.setenv("MAGNET_FL_THREADS", "1")  # the thread policy of every app: one torch thread, both engines
    forget_sites()  # rebuild the sites' graphs with one thread too, as the Ray actors do
    try:
        a, hist_a = run_inprocess(_cfg(ov_path, tmp_path, "inproc"), 2)
        b, hist_b = run_flower(_cfg(ov_path, tmp_path, "flower"), 2)
    finally:
        torch.set_num_threads(threads)
    assert len(hist_b) == 2 and all(len(r["accepted"]) == 2 for r in hist_b)
    print(f"max |in-process - Flower| weight difference: {max(float(np.abs(a[k] - b[k]).max()) for k in a):.3g}")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)
    assert hist_a[-1]["global"]["mcc"] == pytest.approx(hist_b[-1]["global"]["mcc"])


def test_simulate_cli_writes_results_csv_and_plot(tmp_path):
    from simulations.cli import main

    out = tmp_path / "sim"
    code = main(["simulate", "--scenario", "iid-2", "--rounds", "2", "--local-epochs", "1", "--seeds", "1",
                 "--engine", "inprocess", "--out", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["mode"] == "simulate" and res["generated_data"] is True
    for method in ("federated", "centralized", "local_only", "fedavg_plain"):
        assert set(res["results"][method]["mcc"]) == {"mean", "std", "per_seed"}
    assert len([r for r in res["rounds"] if r["method"] == "federated"]) == 2
    assert (out / "rounds.csv").read_text().startswith("method,seed,round,mcc")
    assert (out / "mcc_per_round.png").stat().st_size > 1000


@pytest.mark.parametrize("poison", ["nan", "scale"])
def test_poisoned_update_is_rejected_and_named(ov_path, tmp_path, poison, caplog, monkeypatch):
    from poisoned_site import poison as poison_sites

    from simulations.engine import run_inprocess

    cfg = _cfg(ov_path, tmp_path, f"poison-{poison}", scenario="iid-3", min_sites=2, num_server_rounds=1)
    poison_sites(monkeypatch, {"site1": poison})  # the test side corrupts site1's update (no hook in the site)
    with caplog.at_level("WARNING", logger="flwr"):
        params, hist = run_inprocess(cfg, 3)
    assert hist[0]["accepted"] == ["site0", "site2"]
    assert set(hist[0]["rejected"]) == {"site1"}
    reason = hist[0]["rejected"]["site1"]
    assert ("non-finite" in reason) if poison == "nan" else ("update norm" in reason)
    assert reason.startswith("node 2: ")
    assert "REJECTED update from node 2 (site1)" in caplog.text
    assert all(np.isfinite(v).all() for v in params.values())


def test_differential_privacy_clips_and_adds_noise(ov_path, tmp_path, caplog):
    from simulations.engine import run_inprocess

    plain, _ = run_inprocess(_cfg(ov_path, tmp_path, "nodp", num_server_rounds=1), 2)
    with caplog.at_level("INFO", logger="flwr"):
        noisy, hist = run_inprocess(_cfg(ov_path, tmp_path, "dp", num_server_rounds=2, dp_clip_norm=0.5,
                                         dp_noise_multiplier=1.0, dp_noise_seed=7), 2)
    dp = hist[-1]["dp"]
    assert dp["clip_norm"] == 0.5 and dp["noise_multiplier"] == 1.0 and dp["sites_averaged"] == 2
    # two rounds of the Gaussian mechanism with multiplier 1 compose to mu-GDP with mu = sqrt(2)
    from magnet_core.federation.dp import exact_epsilon

    assert dp["rounds"] == 2 and dp["epsilon"] == pytest.approx(exact_epsilon([1.0, 1.0], 1e-5))
    assert hist[0]["dp"]["epsilon"] < dp["epsilon"]  # spent privacy grows every round
    assert "clipped" in caplog.text and "noise std" in caplog.text
    assert any(not np.allclose(plain[k], noisy[k]) for k in plain)


def test_site_with_invalid_data_replies_a_clear_error(tmp_path, data_root):
    """Deployment-style node_config: the ClientApp validates the site's folder and replies an error, no crash."""
    import pandas as pd
    from flwr.app import ConfigRecord, Context, RecordDict

    from client.app import app as client_app
    from magnet_core.cohort.manifest import ConsortiumManifest, ModalitySpec
    from magnet_core.protocol.errors import DATA_ERROR_CODE

    root = data_root / "tcga-brca-mixomics"
    site = tmp_path / "site"
    site.mkdir()
    pd.read_csv(root / "labels.csv", index_col=0).to_csv(site / "labels.csv")
    mrna = pd.read_csv(root / "mRNA.csv.gz", index_col=0)
    manifest = ConsortiumManifest(classes=["Basal", "Her2", "LumA"],
                                  modalities=[ModalitySpec(name="mRNA", features=list(mrna.columns))])
    mrna.iloc[:, ::-1].to_csv(site / "mRNA.csv")  # features in the wrong order
    path = manifest.save(tmp_path / "manifest.toml")
    ctx = Context(run_id=1, node_id=7, node_config={"data-dir": str(site), "manifest": str(path)},
                  state=RecordDict(), run_config={})
    from magnet_core.protocol.messages import RoundConfig

    config = RoundConfig(server_round=1, seed=1, preset="brca", local_epochs=1, histogram_bins=100)
    msg = _instruction(7, "train", {"config": ConfigRecord(config.encode())})
    reply = client_app(msg, ctx)
    assert reply.has_error() and reply.error.code == DATA_ERROR_CODE
    assert "not in the manifest's order" in reply.error.reason and "mRNA.csv" in reply.error.reason


def test_a_site_releases_no_statistic_of_fewer_than_k_patients(tmp_path):
    """The ClientApp's actual evaluation reply: a site whose test patients number fewer than k withholds every
    group; a larger site's released histogram bins each hold >= k patients."""
    from flower_messages import model_records
    from flwr.app import ConfigRecord, Context, RecordDict

    from client.app import app as client_app
    from magnet_core.model.network import build_model
    from magnet_core.protocol.messages import RoundConfig

    scenario = tmp_path / "tiny-site.toml"
    scenario.write_text('name = "tiny"\nnum_sites = 2\npartition = "size-skew"\nsizes = [0.04, 1.0]\n')
    from magnet_core.consortium.simulated import load_consortium

    cohort, sites = load_consortium("generated:200", str(scenario), 5)
    assert sites[0].split_indices("test").size < 5 <= sites[1].split_indices("test").size
    model = build_model({m: cohort.X[m].shape[1] for m in cohort.modalities}, 2, get_preset("ov").model, 5)
    config = RoundConfig(server_round=1, seed=5, preset="ov", local_epochs=1, histogram_bins=1000, min_count=5,
                         data_path="generated:200", scenario=str(scenario))
    for pid in (0, 1):
        ctx = Context(run_id=1, node_id=pid + 1, node_config={"partition-id": pid, "num-partitions": 2},
                      state=RecordDict(), run_config={})
        msg = _instruction(pid + 1, "evaluate", {"config": ConfigRecord(config.encode()),
                                                 **model_records(model.state_dict())})
        metrics = dict(client_app(msg, ctx).content["metrics"])
        if pid == 0:
            assert metrics == {"num-examples": 0, "withheld-all": 1, "withheld-paired": 1, "withheld-unpaired": 1} \
                or all(k.startswith("withheld-") or k == "num-examples" for k in metrics), metrics
            assert metrics["num-examples"] == 0
        else:
            hists = [k for k in metrics if k.startswith("hist-")]
            assert hists and all(len(metrics[f"edges-{k[5:]}"]) - 1 <= 20 for k in hists)  # bins capped at the site
            for key in hists:
                counts = np.asarray(metrics[key]).reshape(2, -1).sum(axis=0)
                edges = np.asarray(metrics[f"edges-{key[5:]}"])
                whole_side = np.isclose(edges[:-1], 0) & np.isclose(edges[1:], 0.5) | \
                    np.isclose(edges[:-1], 0.5) & np.isclose(edges[1:], 1)
                assert ((counts >= 5) | whole_side).all(), (key, counts)

"""A federated round with secagg=true through Flower's Message API: masked vectors only, the plain mean recovered."""

from __future__ import annotations

import math
import uuid

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from reachable import reachable_arrays as _arrays

from magnet_core.federation.aggregate import SiteUpdate, aggregate_updates
from magnet_core.federation.secagg import DEFAULT_FRAC_BITS, SecAggServer, decode_fixed, encode_fixed
from magnet_core.protocol.messages import round_of
from magnet_core.protocol.secagg import UnmaskRequest
from server.config import FederatedConfig
from simulations.engine import InProcessGrid

# fixed point (magnet_core/federation/secagg.py): the sum is off by <= 3 * 2^-33 per coordinate before division by a
# weight
# >= 1; both paths then cast to float32, so they agree to one float32 rounding step
RTOL, ATOL = 2.0**-22, 1e-6


def _cfg(tmp_path, name: str, **kw) -> FederatedConfig:
    base = dict(data_path="generated:160", scenario="iid-3", local_epochs=1, num_server_rounds=2, secagg=True,
                secagg_clip_norm=0.1, out_dir=str(tmp_path / name), report=False, server_eval=False,
                round_timeout=60.0, straggler_grace=0.0)
    return FederatedConfig(**{**base, **kw})


class _Recorder:
    """What each site computed (its clipped update, counts, vector), and every SecAggServer the coordinator made."""

    def __init__(self, monkeypatch):
        import client.secure as site_side
        import server.secure_strategy as server_side

        self.calls: list[dict] = []
        self.servers: list[SecAggServer] = []
        self.snapshots: list[list[np.ndarray]] = []  # the server's arrays right after each masked input
        original = site_side.site_vector
        rec = self

        def site_vector(global_params, new_params, num_train, counts, loss, clip_norm, modality_aware):
            vec, clipped, norm = original(global_params, new_params, num_train, counts, loss, clip_norm,
                                          modality_aware)
            rec.calls.append(dict(global_params={k: v.copy() for k, v in global_params.items()}, clipped=clipped,
                                  num_train=num_train, counts=dict(counts), vector=vec.copy(), norm=norm))
            return vec, clipped, norm

        class Recording(SecAggServer):
            def __init__(self, setup, roster=None):
                super().__init__(setup, roster)
                rec.servers.append(self)

            def add_masked(self, item):
                super().add_masked(item)
                rec.snapshots.append([a.copy() for a in _arrays(self)])

        monkeypatch.setattr(site_side, "site_vector", site_vector)
        monkeypatch.setattr(server_side, "SecAggServer", Recording)

    def round(self, r: int, n: int = 3) -> list[dict]:
        return self.calls[(r - 1) * n: r * n]


def _leaks(arrays: list[np.ndarray], vectors: list[np.ndarray]) -> list[str]:
    found = []
    for arr in arrays:
        for i, x in enumerate(vectors):
            if arr.shape != x.shape:
                continue
            if arr.dtype == np.uint64:
                close = np.mean(arr == encode_fixed(x, DEFAULT_FRAC_BITS, 3)) > 0.01 or np.allclose(
                    decode_fixed(arr), x, atol=1e-3)
            else:
                close = np.allclose(arr, x, atol=1e-3)
            if close:
                found.append(f"site {i}")
    return found


def _plain(calls: list[dict]) -> dict[str, np.ndarray]:
    """Modality-aware FedAvg (robust mean) of the sites' own clipped updates."""
    ups = [SiteUpdate(f"s{i}", c["clipped"], c["num_train"], c["counts"]) for i, c in enumerate(calls)]
    return aggregate_updates(calls[0]["global_params"], ups, modality_aware=True, robust="mean")


def _assert_params_close(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=RTOL, atol=ATOL, err_msg=k)


class DroppingGrid(InProcessGrid):
    """Answers chosen (round, message type, node) deliveries with an error reply, as the SuperLink does for a
    node that went away; the site never sees the message."""

    def __init__(self, *args, drop: set[tuple[int, str, int]], **kw):
        super().__init__(*args, **kw)
        self.drop = drop

    def push_messages(self, messages):
        keep, ids = [], []
        for m in messages:
            rnd = round_of(m.content.config_records.get("config")) if m.has_content() else 0
            if (rnd, m.metadata.message_type, m.metadata.dst_node_id) in self.drop:
                m.metadata.__dict__["_message_id"] = str(uuid.uuid4())
                self._replies[m.metadata.message_id] = Message(Error(code=0, reason="node went away (test)"),
                                                               reply_to=m)
                ids.append(m.metadata.message_id)
            else:
                keep.append(m)
        return ids + list(super().push_messages(keep))


def _run(cfg: FederatedConfig, drop: set[tuple[int, str, int]] = frozenset(), node_configs: dict | None = None):
    from client.app import app as client_app
    from server.app import server_main

    grid = DroppingGrid(client_app, 3, cfg.to_run_config(), drop=set(drop), node_configs=node_configs)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_run_config())
    params, history = server_main(grid, ctx)
    return params, history, grid


def test_secure_rounds_equal_plain_aggregation_and_the_server_holds_no_individual_vector(tmp_path, monkeypatch):
    rec = _Recorder(monkeypatch)
    params, history, grid = _run(_cfg(tmp_path, "secure"))
    assert [r["accepted"] for r in history] == [["site0", "site1", "site2"]] * 2
    for r in history:
        sa = r["screening"]["secure_aggregation"]
        assert sa["status"] == "aggregated" and sa["threshold"] == 2 and not r["failed"] and not r["rejected"]
        assert sa["weights"]["shared"] == sum(c["num_train"] for c in rec.round(r["round"]))
        assert set(sa["bytes_per_site"]) == {"site0", "site1", "site2"}
        assert r["train_loss"] is not None and r["global"]
    # each site clipped its own update to the clip norm (it was longer: the clip is active)
    assert all(c["norm"] > 0.1 for c in rec.calls) and len(rec.calls) == 6
    # round 1's result is round 2's global model; the final model is round 2's secure mean
    _assert_params_close(rec.round(2)[0]["global_params"], _plain(rec.round(1)))
    _assert_params_close(params, _plain(rec.round(2)))
    # the sites' vectors were deleted from their state once masked
    assert all("secagg-vector" not in c.state and "secagg" not in c.state for c in grid.contexts.values())
    # the coordinator's secure-sum objects never held a site's unmasked vector (after each masked input, at the end)
    assert len(rec.servers) == 2 and len(rec.snapshots) == 6
    for r, server in enumerate(rec.servers, start=1):
        vectors = [c["vector"] for c in rec.round(r)]
        assert not _leaks(_arrays(server), vectors)
        for snap in rec.snapshots[(r - 1) * 3: r * 3]:
            assert not _leaks(snap, vectors)
        np.testing.assert_allclose(server.total, np.sum(vectors, axis=0), atol=3 * 2.0**-33 + 1e-9)
    # the inspection would find a vector that is there
    assert _leaks([encode_fixed(rec.calls[0]["vector"], DEFAULT_FRAC_BITS, 3)], [rec.calls[0]["vector"]])


def test_dropouts_are_recovered_or_excluded_and_too_many_fail_the_round(tmp_path, monkeypatch):
    rec = _Recorder(monkeypatch)
    # round 1: node 2 drops after masking (its input stays in the sum); round 2: node 3 drops before masking
    drop = {(1, "query.secagg_unmask", 2), (2, "query.secagg_mask", 3)}
    params, history, _ = _run(_cfg(tmp_path, "drop"), drop)
    r1, r2 = (h["screening"]["secure_aggregation"] for h in history)
    assert history[0]["accepted"] == ["site0", "site1", "site2"] and r1["dropped_after_masking"] == ["site1"]
    assert "node went away" in history[0]["failed"]["site1"]
    _assert_params_close(rec.round(2)[0]["global_params"], _plain(rec.round(1)))
    assert history[1]["accepted"] == ["site0", "site1"] and r2["dropped_before_masking"] == ["site2"]
    assert r2["excluded"] == ["site2"] and r1["excluded"] == []
    _assert_params_close(params, _plain(rec.round(2)[:2]))

    # two of three drop after masking with at most one dropout allowed: the round fails, the model is unchanged
    rec.calls.clear()
    drop = {(1, "query.secagg_unmask", 1), (1, "query.secagg_unmask", 3)}
    params, history, _ = _run(_cfg(tmp_path, "fail", num_server_rounds=1), drop)
    sa = history[0]["screening"]["secure_aggregation"]
    assert sa["status"] == "failed" and history[0]["accepted"] == []
    assert "only 1 of 3 sites answered the unmask request" in sa["error"] and "run the round again" in sa["error"]
    assert set(history[0]["failed"]) == {"site0", "site2"}
    for k, v in rec.round(1)[0]["global_params"].items():
        np.testing.assert_array_equal(params[k], v)
    assert history[0]["global"]  # evaluation still ran on the unchanged model


def test_summed_counts_beyond_the_enrolment_reject_the_round(tmp_path, monkeypatch):
    """The coordinator cannot check one site's counts, but checks their sum against the sites' enrolment."""
    import magnet_core.consortium.simulated as consortium

    real = consortium.enrolment_of

    def understated(sites):  # every site enrolled with one training patient fewer than it trains with
        e = real(sites)
        return e.model_copy(update={"sites": {n: f.model_copy(update={"train": f.train - 1})
                                              for n, f in e.sites.items()}})

    monkeypatch.setattr(consortium, "enrolment_of", understated)
    rec = _Recorder(monkeypatch)
    params, history, _ = _run(_cfg(tmp_path, "counts", num_server_rounds=1))
    sa = history[0]["screening"]["secure_aggregation"]
    assert sa["status"] == "failed" and history[0]["accepted"] == []
    total = sum(c["num_train"] for c in rec.calls)
    assert f"summed training patients {total} exceeds the {total - 3}" in sa["error"]
    assert set(history[0]["rejected"]) == {"site0", "site1", "site2"}
    for k, v in rec.calls[0]["global_params"].items():
        np.testing.assert_array_equal(params[k], v)


class _DPRecorder(_Recorder):
    """Also records each site's DP vector with and without its noise piece (client.secure.dp_vector)."""

    def __init__(self, monkeypatch):
        super().__init__(monkeypatch)
        import client.secure as site_side

        self.dp_calls: list[dict] = []
        original = site_side.dp_vector
        rec = self

        def dp_vector(global_params, new_params, counts, clip_norm, z, threshold, modality_aware, rng):
            noisy, clean, norm = original(global_params, new_params, counts, clip_norm, z, threshold,
                                          modality_aware, rng)
            rec.dp_calls.append(dict(global_params={k: v.copy() for k, v in global_params.items()},
                                     noisy=noisy.copy(), clean=clean.copy(), threshold=threshold, counts=dict(counts)))
            return noisy, clean, norm

        monkeypatch.setattr(site_side, "dp_vector", dp_vector)


def test_dp_under_secure_aggregation_noise_at_the_sites_accounted_by_pieces(tmp_path, monkeypatch):
    """secagg + DP: each site clips and adds its noise piece before masking; the coordinator decodes the noisy sum
    (never a noise-free one, never one site's vector), accounts the pieces in the sum; a site dropping before
    masking leaves an aggregated round with fewer pieces and a smaller effective multiplier."""
    from magnet_core.federation.dp import exact_epsilon
    from magnet_core.federation.secagg import UpdateLayout

    z, clip = 1.0, 0.1
    rec = _DPRecorder(monkeypatch)
    cfg = _cfg(tmp_path, "dp", dp_clip_norm=clip, dp_noise_multiplier=z, dp_noise_seed=7)
    params, history, _ = _run(cfg, {(2, "query.secagg_mask", 3)})  # round 2: node 3 drops before masking
    assert rec.calls == [] and len(rec.dp_calls) == 6  # the DP path only
    assert [r["accepted"] for r in history] == [["site0", "site1", "site2"], ["site0", "site1"]]
    pieces, z_eff = [3, 2], [z * math.sqrt(3 / 2), z * math.sqrt(2 / 2)]  # t = 3 - 1 dropout = 2
    for r, h in enumerate(history):
        assert h["screening"]["secure_aggregation"]["status"] == "aggregated"
        assert h["train_loss"] is None  # no noise-free loss or patient count is released under DP
        d = h["dp"]
        assert d["noise"] == "distributed" and d["threshold"] == 2 and d["noise_pieces"] == pieces[r]
        assert d["effective_noise_multiplier"] == pytest.approx(z_eff[r], rel=1e-12)
        assert d["epsilon"] == pytest.approx(exact_epsilon(z_eff[: r + 1], cfg.dp_delta), rel=1e-9)
    assert history[1]["dp"]["effective_noise_multiplier"] < history[0]["dp"]["effective_noise_multiplier"]

    finals = [rec.dp_calls[3]["global_params"], params]  # round 1's result is round 2's global model
    for r in (1, 2):
        calls = rec.dp_calls[(r - 1) * 3: r * 3]
        summed = calls[:pieces[r - 1]]
        g = calls[0]["global_params"]
        layout = UpdateLayout.from_params(g)
        for c in calls:  # clipped over the blocks the site holds, noise piece of std z C / sqrt(t)
            assert np.linalg.norm(c["clean"][:layout.param_size]) <= clip * (1 + 1e-9)
        clean_sum = np.sum([c["clean"][:layout.length] for c in summed], axis=0)
        arrays, sites_per_block = layout.split(clean_sum)
        noise = []
        for name in layout.names:
            s_blk = sites_per_block[layout.block(name)]
            assert s_blk == len(summed)
            got = finals[r - 1][name].astype(np.float64) - g[name].astype(np.float64)
            noise.append((got - arrays[name] / s_blk).ravel())  # decoded = mean of clipped updates + noise
        noise = np.concatenate(noise)
        expected_var = len(summed) * (z * clip) ** 2 / 2 / len(summed) ** 2  # s pieces of var sigma^2/t, / S^2
        assert noise.size > 5000
        assert abs(noise.mean()) < 5 * math.sqrt(expected_var / noise.size)
        assert np.var(noise) == pytest.approx(expected_var, rel=6 * math.sqrt(2 / noise.size))
        # the coordinator's sum is the noisy one; it never held a site's vector, noisy or clean
        server = rec.servers[r - 1]
        np.testing.assert_allclose(server.total, np.sum([c["noisy"] for c in summed], axis=0),
                                   atol=3 * 2.0**-33 + 1e-9)
        individual = [c[k] for c in calls for k in ("noisy", "clean")]
        assert not _leaks(_arrays(server), individual)
        for snap in rec.snapshots[(r - 1) * 3: (r - 1) * 3 + pieces[r - 1]]:
            assert not _leaks(snap, individual)
    # seeded noise (dp-noise-seed): the same pieces again for the same seed, round and site
    from magnet_core.federation.dp import site_noise_rng

    assert np.array_equal(site_noise_rng(7, 1, 1).normal(size=5), site_noise_rng(7, 1, 1).normal(size=5))
    assert not np.array_equal(site_noise_rng(7, 1, 1).normal(size=5), site_noise_rng(7, 1, 2).normal(size=5))


def test_a_site_refuses_noise_below_its_own_floor_and_the_round_goes_on_without_it(tmp_path):
    """A site may set dp-min-noise-multiplier in its node config: it refuses (before training) a round whose
    multiplier is lower; the others' round is aggregated and accounted with their pieces only."""
    cfg = _cfg(tmp_path, "floor", num_server_rounds=1, dp_clip_norm=0.1, dp_noise_multiplier=0.5, dp_noise_seed=1)
    _, history, _ = _run(cfg, node_configs={0: {"dp-min-noise-multiplier": 1.0}})
    h = history[0]
    assert h["accepted"] == ["site1", "site2"] and "below this site's floor" not in str(h["rejected"])
    assert "requires differential privacy with noise multiplier >= 1.0" in next(iter(h["failed"].values()))
    assert h["dp"]["noise_pieces"] == 2 and h["dp"]["effective_noise_multiplier"] == pytest.approx(0.5)


def test_dp_noise_too_large_for_the_fixed_point_range_is_refused(tmp_path):
    """The noise is never clipped to fit the ring: a setting whose noise could wrap the sum stops the run."""
    from server.config import RunConfigError

    cfg = _cfg(tmp_path, "huge", num_server_rounds=1, dp_clip_norm=1.0, dp_noise_multiplier=1e8)
    with pytest.raises(RunConfigError, match="beyond the fixed-point range"):
        _run(cfg)


def test_site_refuses_a_stage_without_its_state():
    from flwr.app import ConfigRecord

    from client.app import app as client_app

    InProcessGrid(client_app, 1)  # task identity for messages created outside a SuperLink
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    request = UnmaskRequest((1, 2), (), "r")
    msg = Message(RecordDict({"secagg": ConfigRecord(request.to_record())}),
                  1, "query.secagg_unmask")
    msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    reply = client_app(msg, ctx)
    assert reply.has_error() and "holds no secure-aggregation state for 'r'" in reply.error.reason


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])


def test_a_neighbourhood_graph_round_equals_plain_aggregation(tmp_path, monkeypatch):
    """secagg-graph='neighbourhood' over 5 sites with 2 neighbours each (a ring; threshold 2 of 3 per neighbourhood):
    each site gets its own neighbours' keys only, and with a site dropping after masking the mean equals plain
    aggregation of all five clipped updates."""
    from client.app import app as client_app
    from server.app import server_main

    rec = _Recorder(monkeypatch)
    cfg = _cfg(tmp_path, "hood", data_path="generated:250", scenario="iid-5", secagg_graph="neighbourhood",
               secagg_graph_degree=2, num_server_rounds=1)
    grid = DroppingGrid(client_app, 5, cfg.to_run_config(), drop={(1, "query.secagg_unmask", 4)})
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_run_config())
    params, history = server_main(grid, ctx)
    sa = history[0]["screening"]["secure_aggregation"]
    assert sa["status"] == "aggregated" and sa["graph_degree"] == 2 and sa["threshold"] == 2
    assert len(history[0]["accepted"]) == 5 and sa["dropped_after_masking"] == ["site3"]
    (server,) = rec.servers
    assert server.setup.graph_degree == 2
    assert all(len(server.book_for(i).keys) == 3 for i in server.setup.site_ids)
    _assert_params_close(params, _plain(rec.calls[:5]))

"""A federated round with secagg=true through Flower's Message API: masked vectors only, the plain mean recovered."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict

from magnet_core.aggregate import SiteUpdate, aggregate_updates
from magnet_core.contract import round_of
from magnet_core.secagg import DEFAULT_FRAC_BITS, SecAggServer, decode_fixed, encode_fixed
from server.config import FederatedConfig
from simulations.engine import InProcessGrid
from reachable import reachable_arrays as _arrays

# fixed point (magnet_core/secagg.py): the sum is off by <= 3 * 2^-33 per coordinate before division by a weight
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
        import server.secure as server_side

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
            def __init__(self, setup):
                super().__init__(setup)
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


def _run(cfg: FederatedConfig, drop: set[tuple[int, str, int]] = frozenset()):
    from client.app import app as client_app
    from server.app import server_main

    grid = DroppingGrid(client_app, 3, cfg.to_run_config(), drop=set(drop))
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
    import magnet_core.consortium as consortium

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


def test_secure_aggregation_with_dp_is_refused_clearly(tmp_path):
    from server.config import RunConfigError

    from server.config import FederatedConfig

    with pytest.raises(RunConfigError, match="secure aggregation with differential privacy .* is not implemented"):
        FederatedConfig.from_run_config({"secagg": True, "dp-clip-norm": 1.0})  # refused when the run config is read


def test_site_refuses_a_stage_without_its_state():
    from flwr.app import ConfigRecord

    from client.app import app as client_app

    InProcessGrid(client_app, 1)  # task identity for messages created outside a SuperLink
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    msg = Message(RecordDict({"secagg": ConfigRecord({"round-id": "r", "survivors": [1, 2], "dropped": []})}),
                  1, "query.secagg_unmask")
    msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    reply = client_app(msg, ctx)
    assert reply.has_error() and "holds no secure-aggregation state for 'r'" in reply.error.reason


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])

"""The model on the wire as one flat array: pack/unpack, the coordinator's checks of a flat reply, the site's layout
check."""

from __future__ import annotations

import numpy as np
import pytest
from flower_messages import instruction, model_records, reply
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from magnet_core.protocol.messages import ContractError, site_record
from magnet_core.protocol.wire import MODEL_KEY, Layout, pack, unpack
from server.config import FederatedConfig


def _params(scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "encoders.mRNA.net.0.weight": np.arange(6, dtype=np.float32).reshape(2, 3) * scale,
        "encoders.miRNA.net.0.weight": np.full((3,), 2.0, np.float32) * scale,
        "attention.att": np.full((2,), 0.5, np.float32) * scale,
    }


def test_pack_and_unpack_round_trip_in_the_layout_order():
    params = _params()
    layout = Layout.from_params(params)
    flat = pack(params, layout)
    assert flat.dtype == np.float32 and flat.shape == (11,)
    back = unpack(flat, layout)
    assert list(back) == list(params)
    for k in params:
        assert back[k].dtype == params[k].dtype and np.array_equal(back[k], params[k])
    assert Layout.from_record(layout.to_record()) == layout  # names, shapes (float32) survive a ConfigRecord
    shuffled = Layout.from_params(dict(reversed(list(params.items()))))
    assert shuffled.mismatch(layout) is None  # same arrays in another order: fine, the sender's order is used
    assert np.array_equal(unpack(pack(params, shuffled), shuffled)["attention.att"], params["attention.att"])


def test_unpack_refuses_wrong_length_dtype_and_rank():
    layout = Layout.from_params(_params())
    flat = pack(_params(), layout)
    with pytest.raises(ContractError, match="holds 10 values, the model has 11"):
        unpack(flat[:-1], layout)
    with pytest.raises(ContractError, match="dtype float64, expected float32"):
        unpack(flat.astype(np.float64), layout)
    with pytest.raises(ContractError, match="expected one dimension"):
        unpack(flat.reshape(1, -1), layout)


def test_a_malformed_or_foreign_layout_is_named():
    own = Layout.from_params(_params())
    rec = own.to_record()
    with pytest.raises(ContractError, match="do not fit together"):
        Layout.from_record({**rec, "dims": rec["dims"][:-1]})
    with pytest.raises(ContractError, match="exactly names, ranks, dims"):
        Layout.from_record({**rec, "dtypes": ["float32"]})
    with pytest.raises(ContractError, match="distinct names"):
        Layout.from_record({**rec, "names": [rec["names"][0]] * 3})
    other = Layout.from_record({**rec, "dims": [2, 4, 3, 2]})
    assert "'encoders.mRNA.net.0.weight' is [2, 4], here [2, 3]" in other.mismatch(own)
    renamed = Layout.from_record({**rec, "names": ["a", *rec["names"][1:]]})
    assert "missing arrays ['encoders.mRNA.net.0.weight']" in renamed.mismatch(own)
    assert "unknown arrays ['a']" in renamed.mismatch(own)


def _train_reply(node: int, arrays: ArrayRecord):
    return reply(instruction(node, "train"), {
        "arrays": arrays, "site": ConfigRecord(site_record(f"site-{node}")),
        "metrics": MetricRecord({"num-examples": 10, "count-mRNA": 10, "count-miRNA": 5, "loss": 0.5})})


def test_the_coordinator_splits_a_flat_reply_with_its_own_layout_and_rejects_bad_ones():
    """Wrong length, wrong dtype, a NaN, the old one-array-per-name format: each rejected by node with a clear
    reason in the round's report (the validate_update path); the good reply is aggregated."""
    from server.strategy import MagnetFedAvg, to_numpy, to_record

    strategy = MagnetFedAvg(FederatedConfig(min_sites=1), ["mRNA", "miRNA"], 2)
    strategy.current = _params(1.0)
    layout = Layout.from_params(strategy.current)
    good = pack(_params(1.01), layout)
    nan = good.copy()
    nan[-1] = np.nan  # the last value belongs to attention.att
    replies = [
        _train_reply(1, to_record(_params(1.01), layout)),
        _train_reply(2, ArrayRecord({MODEL_KEY: Array(good[:-1])})),
        _train_reply(3, ArrayRecord({MODEL_KEY: Array(good.astype(np.float64))})),
        _train_reply(4, ArrayRecord({MODEL_KEY: Array(nan)})),
        _train_reply(5, ArrayRecord({k: Array(v) for k, v in _params(1.01).items()})),
    ]
    new, _ = strategy.aggregate_train(1, replies)
    assert strategy.report.accepted == ["site-1"]
    rejected = strategy.report.rejected
    assert rejected["node2"] == "node 2: model array holds 10 values, the model has 11 (3 arrays)"
    assert rejected["node3"] == "node 3: model array has dtype float64, expected float32"
    assert rejected["site-4"] == "node 4: array 'attention.att' has 1 non-finite values"
    assert rejected["node5"].startswith("node 5: model arrays must be exactly ['model'] (one flat array)")
    out = to_numpy(new, layout)
    np.testing.assert_allclose(out["encoders.mRNA.net.0.weight"], _params(1.01)["encoders.mRNA.net.0.weight"])


def _site(tmp_path):
    """A simulated site (generated cohort) and the model the coordinator would send it."""
    from magnet_core.consortium.simulated import load_consortium
    from magnet_core.model.config import get_preset
    from magnet_core.model.network import build_model
    from magnet_core.protocol.messages import RoundConfig

    scenario = tmp_path / "two.toml"
    scenario.write_text('name = "two"\nnum_sites = 2\npartition = "iid"\n')
    cohort, _ = load_consortium("generated:120", str(scenario), 4)
    model = build_model({m: cohort.X[m].shape[1] for m in cohort.modalities}, 2, get_preset("ov").model, 4)
    config = RoundConfig(server_round=1, seed=4, preset="ov", local_epochs=1, histogram_bins=20,
                         data_path="generated:120", scenario=str(scenario))
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                  run_config={})
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}, ConfigRecord(config.encode()), ctx


def test_a_site_refuses_a_model_whose_layout_does_not_fit_its_own(tmp_path):
    from client.app import app as client_app
    from magnet_core.protocol.errors import CONTRACT_ERROR_CODE

    params, config, ctx = _site(tmp_path)
    ok = client_app(instruction(1, "train", {**model_records(params), "config": config}), ctx)
    assert not ok.has_error(), ok.error.reason
    assert list(ok.content["arrays"].keys()) == [MODEL_KEY]
    assert ok.content["arrays"][MODEL_KEY].shape == (sum(v.size for v in params.values()),)

    name = next(iter(params))
    wrong = {**params, name: params[name][:, :-1]}  # one input feature fewer: another manifest
    refused = client_app(instruction(1, "train", {**model_records(wrong), "config": config}), ctx)
    assert refused.has_error() and refused.error.code == CONTRACT_ERROR_CODE
    assert "does not fit this site's model" in refused.error.reason and name in refused.error.reason

    short = model_records(params)
    short["arrays"] = ArrayRecord({MODEL_KEY: Array(short["arrays"][MODEL_KEY].numpy()[:-3])})
    refused = client_app(instruction(1, "evaluate", {**short, "config": config}), ctx)
    assert refused.has_error() and refused.error.code == CONTRACT_ERROR_CODE
    assert "values, the model has" in refused.error.reason

    no_layout = model_records(params)
    del no_layout["layout"]
    refused = client_app(instruction(1, "evaluate", {**no_layout, "config": config}), ctx)
    assert refused.has_error() and "no model layout" in refused.error.reason

"""Issue 22, item 1: a site's name is bound to its enrolment, never taken from the first reply.

Name squatting played against the real ServerApp body (server.app.server_main: the run config, the manifest, the
name binding, the round loop, MagnetFedAvg and its reply checks). The sites are scripted ClientApps (a small step
along the global model, a valid evaluation release) so that each run takes about a second; what they train is not
the point, which node the coordinator believes is which site is."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flower_messages import flat_model, model_of
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from flower_compat.wire import NodeInfo
from magnet_core.cohort.manifest import ConsortiumManifest, EnrolledSite, ModalitySpec
from magnet_core.protocol.messages import site_record
from server.app import model_spec_enrolment_and_evaluator, server_main
from server.config import FederatedConfig, RunConfigError
from simulations.engine import InProcessGrid

MODALITIES = {"mRNA": 6, "miRNA": 4}
TRAIN, TEST = 30, 12


class ScriptedSites:
    """A ClientApp per node: node -> the site name it answers under. Training replies step 1 % along the global
    model (every site the same direction, so the screen accepts them all); evaluation replies release a confusion
    matrix over ``TEST`` patients. ``seen`` records (round, kind, node) of every message a node received."""

    def __init__(self, speaks_as: dict[int, str], modalities: list[str], train: int = TRAIN, test: int = TEST):
        self.speaks_as, self.modalities, self.train, self.test = speaks_as, modalities, train, test
        self.seen: list[tuple[int, str, int]] = []

    def __call__(self, msg: Message, context: Context) -> Message:
        node, kind = msg.metadata.dst_node_id, msg.metadata.message_type.split(".")[0]
        self.seen.append((int(msg.content["config"]["server-round"]), kind, node))
        site = ConfigRecord(site_record(self.speaks_as[node]))
        if kind == "train":
            stepped = {k: (v * np.float32(1.0 + 0.01 * (1 + node / 10))).astype(v.dtype)
                       for k, v in model_of(msg).items()}
            metrics = MetricRecord({"num-examples": self.train, "loss": 0.5,
                                    **{f"count-{m}": self.train for m in self.modalities}})
            content = RecordDict({"arrays": flat_model(stepped, msg), "metrics": metrics, "site": site})
        else:
            cm = np.zeros((2, 2), int)
            cm[0, 0], cm[1, 1] = self.test // 2, self.test - self.test // 2
            content = RecordDict({"metrics": MetricRecord({"num-examples": self.test, "cm-all": cm.ravel().tolist()}),
                                  "site": site})
        reply = Message(content, reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = node
        return reply

    def received(self, node: int) -> bool:
        return any(n == node for _, _, n in self.seen)


class KeyedGrid(InProcessGrid):
    """In-process grid whose nodes are known by the public key the SuperLink authenticated (Flower's
    ``Grid.get_nodes``: a node signs every Fleet request with its key, so the key is the node's, see
    test_flower_binds_node_ids_to_the_keys_that_signed)."""

    def __init__(self, client_app, keys: dict[int, bytes], run_config: dict):
        super().__init__(client_app, len(keys), run_config)
        self.keys = keys

    def get_nodes(self):
        return [NodeInfo(node_id=n, public_key=self.keys[n]) for n in self.contexts]


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _openssh(key) -> str:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode() + " site"


def _pem(key) -> bytes:  # how Flower's SuperLink keeps a node's key (flwr.supercore.primitives.asymmetric)
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _manifest(tmp_path: Path, sites: dict[str, EnrolledSite] | None) -> Path:
    manifest = ConsortiumManifest(
        name="names", classes=["a", "b"], min_count=5, sites=sites or {},
        modalities=[ModalitySpec(name=m, features=[f"{m}_{i}" for i in range(d)]) for m, d in MODALITIES.items()])
    return manifest.save(tmp_path / "consortium.toml")


def _enrolled(key=None) -> EnrolledSite:
    return EnrolledSite(train=TRAIN, test=TEST, modalities=dict.fromkeys(MODALITIES, TRAIN),
                        public_key=None if key is None else _openssh(key))


def _run(grid, cfg: FederatedConfig):
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_run_config())
    return server_main(grid, ctx)


def _cfg(tmp_path: Path, **kw) -> FederatedConfig:
    return FederatedConfig(**{"num_server_rounds": 3, "min_sites": 1, "seed": 1, "out_dir": str(tmp_path / "run"),
                              "round_timeout": 30.0, "straggler_grace": 0.0, "report": False, **kw})


def _reason(record: dict, node: int) -> str:
    hits = [r for r in record["rejected"].values() if r.startswith(f"node {node}:")]
    assert hits, f"node {node} is not among the rejected: {record['rejected']}"
    return hits[0]


def _pooled_over(record: dict) -> list[str]:
    return sorted(record["pooled_over"]["sites"])


# ------------------------------------------------------------------------------------------------ deployment


def test_a_squatter_answering_first_under_an_enrolled_name_is_refused_by_node_id(tmp_path):
    """Node 1 holds hospital-a's key and answers first, as hospital-b; node 2 is hospital-b's node. In every round
    hospital-b (node 2) keeps its name and its update, node 1 is refused by node id, its update never aggregated, and
    the record names both nodes."""
    keys = {"hospital-a": _key(), "hospital-b": _key()}
    path = _manifest(tmp_path, {name: _enrolled(k) for name, k in keys.items()})
    sites = ScriptedSites({1: "hospital-b", 2: "hospital-b"}, list(MODALITIES))
    grid = KeyedGrid(sites, {1: _pem(keys["hospital-a"]), 2: _pem(keys["hospital-b"])}, {})
    _, history = _run(grid, _cfg(tmp_path, manifest=str(path)))
    assert len(history) == 3
    for record in history:
        assert record["accepted"] == ["hospital-b"] and record["nodes"]["hospital-b"] == 2, record
        why = _reason(record, 1)
        assert "enrolled as 'hospital-a' and now calls itself 'hospital-b'; 'hospital-b' belongs to node 2" in why
        assert _pooled_over(record) == ["hospital-b"]
        assert record["screening"]["site_names"] == "bound to each enrolled site's node public key"
        assert list(record["screening"]["step_norms"]) == ["hospital-b"]  # the squatter's step never screened


def test_an_unenrolled_node_is_sent_nothing_and_refused_by_node_id(tmp_path):
    """Node 3 holds a key no [sites] entry enrols and calls itself hospital-a: it receives no model, its node id is
    in every round's record, and hospital-a is still node 1."""
    keys = {"hospital-a": _key(), "hospital-b": _key()}
    path = _manifest(tmp_path, {name: _enrolled(k) for name, k in keys.items()})
    sites = ScriptedSites({1: "hospital-a", 2: "hospital-b", 3: "hospital-a"}, list(MODALITIES))
    grid = KeyedGrid(sites, {1: _pem(keys["hospital-a"]), 2: _pem(keys["hospital-b"]), 3: _pem(_key())}, {})
    _, history = _run(grid, _cfg(tmp_path, manifest=str(path), num_server_rounds=2))
    assert not sites.received(3)
    for record in history:
        assert "not enrolled (its public key matches no enrolled site); sent nothing" in _reason(record, 3)
        assert sorted(record["accepted"]) == ["hospital-a", "hospital-b"] and record["nodes"]["hospital-a"] == 1


def test_a_deployment_without_sites_is_refused_unless_the_coordinator_allows_it(tmp_path):
    """A manifest without [sites] cannot bind names to keys: the run is refused before any node is contacted.
    With allow-unenrolled=true it runs, every round's record and the HTML report say the names were unverified."""
    path = _manifest(tmp_path, None)
    sites = ScriptedSites({1: "hospital-a", 2: "hospital-b"}, list(MODALITIES))
    grid = InProcessGrid(sites, 2, {})
    with pytest.raises(RunConfigError, match=r"enrols no sites \(\[sites\]\).*allow-unenrolled=true"):
        _run(grid, _cfg(tmp_path, manifest=str(path)))
    assert sites.seen == []
    _, history = _run(grid, _cfg(tmp_path, manifest=str(path), num_server_rounds=1, allow_unenrolled=True,
                                    report=True))
    record = history[0]
    assert sorted(record["accepted"]) == ["hospital-a", "hospital-b"]
    assert "NOT bound to keys" in record["screening"]["site_names"]
    report = html.unescape((tmp_path / "run" / "report.html").read_text())
    assert "Site names were taken from each node's first reply, NOT bound to enrolled keys" in report


def test_a_site_enrolled_without_a_key_is_refused_unless_allowed(tmp_path):
    """One [sites] entry without its node's key: names cannot be bound for that site, so the run is refused."""
    path = _manifest(tmp_path, {"hospital-a": _enrolled(_key()), "hospital-b": _enrolled()})
    grid = InProcessGrid(ScriptedSites({1: "hospital-a", 2: "hospital-b"}, list(MODALITIES)), 2, {})
    with pytest.raises(RunConfigError, match=r"\['hospital-b'\] have no public key"):
        _run(grid, _cfg(tmp_path, manifest=str(path)))


# ------------------------------------------------------------------------------------------------ simulation


def test_a_squatter_in_a_simulation_is_refused_by_partition(tmp_path):
    """Simulation: the simulated consortium's site list is the enrolment (partition i is site i). Node 1
    (partition 0) answers first under partition 1's name: every round site1 stays node 2, node 1 is refused."""
    scenario = tmp_path / "iid-3.toml"
    scenario.write_text('name = "iid-3"\nnum_sites = 3\npartition = "iid"\n')
    cfg = _cfg(tmp_path, data_path="generated:150", scenario=str(scenario), server_eval=False, histogram_bins=4)
    spec, enrolment, *_ = model_spec_enrolment_and_evaluator(cfg)
    names = list(enrolment.sites)
    train = min(min([f.train, *f.modalities.values()]) for f in enrolment.sites.values())
    sites = ScriptedSites({1: names[1], 2: names[1], 3: names[2]}, list(spec.in_dims), train,
                          min(f.test for f in enrolment.sites.values()))
    _, history = _run(InProcessGrid(sites, 3, {}), cfg)
    for record in history:
        assert sorted(record["accepted"]) == sorted(names[1:]) and record["nodes"][names[1]] == 2, record
        assert f"enrolled as {names[0]!r} and now calls itself {names[1]!r}" in _reason(record, 1)
        assert record["screening"]["site_names"] == "bound to the simulation's partition ids"


# ---------------------------------------------------------------------------- the premise: Flower's own binding


def test_flower_binds_node_ids_to_the_keys_that_signed():
    """What the key binding rests on, pinned against Flower 1.41's SuperLink (its real link state and Fleet
    interceptor): a Fleet request is admitted only if the key it presents signed a fresh timestamp and the node id it
    names is the one registered with that key; the ServerApp is then told each node's key (Runtime ``GetNodes`` ->
    ``Grid.get_nodes``). So a node cannot speak as another site without that site's private key: presenting the key
    with its own signature, replaying a signature from an earlier request (another run) or naming another node's id
    is refused before any message reaches the coordinator."""
    from datetime import timedelta
    from types import SimpleNamespace

    import grpc
    from flwr.common.constant import PUBLIC_KEY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, TIMESTAMP_TOLERANCE
    from flwr.proto.fleet_pb2 import PullMessagesRequest, RegisterNodeFleetRequest
    from flwr.proto.node_pb2 import Node
    from flwr.server.superlink.fleet.grpc_rere.node_auth_server_interceptor import NodeAuthServerInterceptor
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.date import now
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message
    from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager
    from flwr.superlink.servicer.fleet.fleet_handlers import register_node

    from server.names import SiteNames

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    site_a, site_b, impostor = _key(), _key(), _key()
    node_of = {k: register_node(RegisterNodeFleetRequest(public_key=public_key_to_bytes(k.public_key())),
                                factory.state(), enable_supernode_auth=False).node_id for k in (site_a, site_b)}
    interceptor = NodeAuthServerInterceptor(factory)
    admitted = grpc.unary_unary_rpc_method_handler(lambda request, context: "admitted")

    class Aborted(Exception):
        pass

    def abort(code, details):
        raise Aborted(details)

    def call(presented, signer, node_id, stamp=None):
        stamp = stamp or now().isoformat()
        details = SimpleNamespace(method="/flwr.proto.Fleet/PullMessages", invocation_metadata=(
            (PUBLIC_KEY_HEADER, public_key_to_bytes(presented.public_key())), (TIMESTAMP_HEADER, stamp),
            (SIGNATURE_HEADER, sign_message(signer, stamp.encode("ascii")))))
        handler = interceptor.intercept_service(lambda _: admitted, details)
        try:
            return handler.unary_unary(PullMessagesRequest(node=Node(node_id=node_id)),
                                       SimpleNamespace(abort=abort))
        except Aborted as exc:
            return str(exc)

    assert call(site_a, site_a, node_of[site_a]) == "admitted"
    assert call(site_a, impostor, node_of[site_a]) == "Invalid signature"  # site a's key, not its signature
    assert call(site_b, site_b, node_of[site_a]) == "Invalid node ID"  # site b's node naming site a's node id
    old = (now() - timedelta(seconds=TIMESTAMP_TOLERANCE + 60)).isoformat()
    assert call(site_a, site_a, node_of[site_a], old) == "Invalid timestamp"  # a replayed old signature
    # what the ServerApp's grid reports (Runtime GetNodes: LinkState.get_node_info) binds each node to its site
    grid = SimpleNamespace(get_nodes=lambda: factory.state().get_node_info(node_ids=list(node_of.values())))
    names = SiteNames.from_keys({"site-a": _openssh(site_a), "site-b": _openssh(site_b)})
    names.refresh(grid)
    assert names.by_node == {node_of[site_a]: "site-a", node_of[site_b]: "site-b"}

"""A site's settings are its own, and its secure sums are authenticated whatever the coordinator ships (issue 21).

* The site worker answers the preparation queries (the preparation ClientApp, the coordinator's bundle, only forwards
  them) and takes ``prepare-require-secagg``, ``site-log-dir`` and its raw / prepared folders from its own command
  line: a bundle that forwards a node config switching them off or moving them has no effect.
* A policy line ``secure_aggregation.authenticated = true`` (written by `magnet-fl site policy init`): a secure sum
  without signed key adverts, or at a site without its roster and identity key, is refused naming that line, also
  by the site worker.
* The secure preparation sum is authenticated as the training rounds' are: a coordinator that substitutes public keys
  in one site's key book is refused by that site, and the statistics are summed over the honest others.

Every message is built as the coordinator builds it and answered by the real site handlers."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flower_messages import instruction
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from test_malicious_coordinator import PREP, Site, answered, raw_site, refused

from magnet_core.cohort.preprocess import PrepareConfig, SiteSpec
from magnet_core.federation.secagg import SecAggSetup, _raw_public
from magnet_core.protocol.keys import NODE_SECAGG_IDENTITY_KEY, NODE_SECAGG_ROSTER, SECAGG_KEY
from magnet_core.protocol.messages import RoundConfig
from magnet_core.protocol.prepare import PrepareRequest
from magnet_core.protocol.secagg import KeyBook, SecAggStart, SecureTrainTerms
from magnet_core.protocol.version import stamped
from magnet_core.protocol.worker import MESSAGE_PAYLOAD, WorkerRequest
from server.pki import make_site_key

NAMES = ["h0", "h1", "h2"]


def _prepare_message(cfg: PrepareConfig, secagg: bool, sites: list[SiteSpec] | None = None):
    request = PrepareRequest(prepare=cfg, secagg=secagg, num_classes=2, sites=sites or [])
    return instruction(0, "query.prepare_stats", {"config": ConfigRecord(request.encode())})


class ServedWorker:
    """A SiteWorker serving its private socket from a thread of this process (the real serve loop)."""

    def __init__(self, worker, sock: Path):
        from client.worker import bind_private_socket

        self.worker, self.sock = worker, sock
        self.listener, self.lock = bind_private_socket(sock)
        self.stopping = False
        self.thread = threading.Thread(target=worker.serve, args=(self.listener, lambda: self.stopping), daemon=True)
        self.thread.start()

    def close(self):
        import os

        self.stopping = True
        self.thread.join(timeout=10)
        self.listener.close()
        os.close(self.lock)


# ------------------------------------------------------------------------------------------- 1. preparation


def test_the_site_worker_answers_preparation_and_ignores_a_forwarded_node_config_lifting_its_settings(tmp_path):
    """The hospital starts its worker with --raw-dir, --prepare-require-secagg and --site-log-dir. The coordinator's
    preparation ClientApp runs on a SuperNode whose node config (as the bundle forwards it) says
    prepare-require-secagg = false and names another log folder and other raw / prepared folders: the clear
    statistics are still refused by the worker, the worker's own log records it, nothing is written where the
    bundle said. A secure preparation is answered by the worker, from its own raw folder. On code where the
    ClientApp answers preparation itself, the clear statistics are sent."""
    from client.prepare_app import app as prepare_app
    from client.worker import SiteWorker

    raw, decoy = raw_site(tmp_path / "raw"), raw_site(tmp_path / "decoy")
    (decoy / "labels.csv").write_text("not,a\nlabels,file\n")  # read, it would fail the preparation
    own_log, elsewhere = tmp_path / "site-log", tmp_path / "bundle-log"
    worker = SiteWorker(tmp_path / "prepared", tmp_path / "manifest.toml", "h0", raw_dir=raw, site_log_dir=own_log,
                        prepare_require_secagg=True)
    served = ServedWorker(worker, tmp_path / "run" / "worker.sock")
    try:
        forwarded = {"worker-socket": str(served.sock), "site-name": "h0", "prepare-require-secagg": False,
                     "site-log-dir": str(elsewhere), "raw-dir": str(decoy), "prepared-dir": str(tmp_path / "out")}
        ctx = Context(run_id=1, node_id=0, node_config=forwarded, state=RecordDict(), run_config={})
        clear = prepare_app(_prepare_message(PrepareConfig(**PREP), secagg=False), ctx)
        assert "stats" not in clear.content, "the clear statistics were sent"
        assert "prepare-require-secagg" in clear.content["site"]["error"], dict(clear.content["site"])
        secure = prepare_app(_prepare_message(PrepareConfig(**PREP), secagg=True), ctx)
        answered(secure)
        assert "stats" not in secure.content and secure.content["site"]["name"] == "h0"
        assert worker.requests == 2  # both answered by the worker, not by the ClientApp
    finally:
        served.close()
    assert not elsewhere.exists() and not (tmp_path / "out").exists()
    entries = [json.loads(line) for line in (own_log / "site_log.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in entries] == ["query", "query"]
    assert [any(i["name"].startswith("stats/") for i in e["sent"]) for e in entries] == [False, False]


def test_a_forwarded_partition_id_cannot_point_the_site_worker_at_folders_the_request_names(tmp_path):
    """A simulated node's preparation reads the folders listed in the request; a bundle forwarding partition-id to a
    real site's worker must not make the worker read (or write) them."""
    from client.worker import SiteWorker
    from flower_compat.wire import message_bytes, recorddict_of
    from magnet_core.protocol.worker import CONTENT_PAYLOAD

    decoy = raw_site(tmp_path / "decoy")
    worker = SiteWorker(tmp_path / "prepared", tmp_path / "manifest.toml", "h0")  # no --raw-dir: no preparation
    msg = _prepare_message(PrepareConfig(**PREP), secagg=False,
                           sites=[SiteSpec(name="x", raw_dir=str(decoy), out_dir=str(tmp_path / "written"))])
    answer, payloads = worker.answer(WorkerRequest(kind="message", node_id=0, node_config={"partition-id": 0}),
                                     {MESSAGE_PAYLOAD: message_bytes(msg)})
    content = recorddict_of(payloads[CONTENT_PAYLOAD])
    assert "stats" not in content and "serves no raw data folder" in content["site"]["error"], answer
    assert not (tmp_path / "written").exists()


# ------------------------------------------------------------------------------- 2. the authenticated policy line


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Three sites' keys as `magnet-fl pki site-key` makes them, the roster as registered_sites.csv; each site's
    node config names its own key and its own copy of the roster."""
    root = tmp_path_factory.mktemp("pki")
    rows = ["site,public_key"]
    for name in NAMES:
        _, pub = make_site_key(root / name, comment=name)
        rows.append(f"{name},{pub.read_text().strip()}")
    roster = root / "registered_sites.csv"
    roster.write_text("\n".join(rows) + "\n")
    own = {}
    for i, name in enumerate(NAMES):
        (root / name / "roster.csv").write_text(roster.read_text())
        own[i] = {NODE_SECAGG_ROSTER: str(root / name / "roster.csv"),
                  NODE_SECAGG_IDENTITY_KEY: str(root / name / "node_auth_key")}
    return roster, own


def _authenticated_policy(site: Site) -> Site:
    text = site.policy.read_text().replace("[secure_aggregation]\n", "[secure_aggregation]\nauthenticated = true\n")
    assert "authenticated = true" in text
    site.policy.write_text(text)
    return site


def _secure_train_stage0(site: Site, round_id: str):
    """Stage 0 of a secure round as server/secure_strategy.py builds it, for a tiny stand-in model (the policy
    decides before any training)."""
    config = RoundConfig(server_round=1, seed=0, preset="ov", local_epochs=1, histogram_bins=10,
                         data_path="generated:160", scenario="iid-3")
    terms = SecureTrainTerms(0.1, True, True, 1.0, -1)
    rec = SecAggStart(SecAggSetup(round_id, (1, 2, 3), 3, 10), 1, terms).to_record()
    arrays = ArrayRecord({"model": Array(__import__("numpy").zeros(8, dtype="float32"))})
    return site.send("train.secagg", {"config": ConfigRecord(config.encode()), "arrays": arrays,
                                      "secagg": ConfigRecord(stamped(rec))})


def test_the_policy_line_requiring_authentication_refuses_unsigned_sums_naming_it(tmp_path, pki):
    roster, own = pki
    # a site without its roster and identity key cannot take part in any secure sum, training or preparation
    bare = _authenticated_policy(Site(tmp_path / "bare", {"partition-id": 0}, secure_train=True))
    refused(bare, _secure_train_stage0(bare, "r-1"), "secure_aggregation.authenticated")
    raw = raw_site(tmp_path / "raw")
    prep = _authenticated_policy(Site(tmp_path / "prep", {"raw-dir": str(raw), "prepared-dir": str(tmp_path / "p"),
                                                           "site-name": "h0"}, secure_prepare=False))
    refused(prep, _prepare_message_via(prep, PrepareConfig(**PREP), secagg=False), "secure_aggregation.authenticated")
    # a site holding them: a key book whose adverts carry no signature is refused before any share is made
    signer = _authenticated_policy(Site(tmp_path / "signer", {"raw-dir": str(raw), "prepared-dir":
                                                               str(tmp_path / "q"), "site-name": "h0", **own[0]}))
    answered(_prepare_message_via(signer, PrepareConfig(**PREP), secagg=True))
    from magnet_core.federation.secagg import StatsLayout

    layout = StatsLayout.from_feature_lists([{"mRNA": [f"g{j}" for j in range(12)]}], 2)
    setup = SecAggSetup("prepare/abc", (1, 2, 3), 3, layout.length)
    request = PrepareRequest(prepare=PrepareConfig(**PREP), secagg=True, num_classes=2)
    answered(signer.send("query.prepare_secagg", {"config": ConfigRecord(request.encode()),
                                                  "layout": ConfigRecord(layout.to_record()),
                                                  "secagg": ConfigRecord(SecAggStart(setup, 1).to_record())}))
    keys = {i: (_raw_public(X25519PrivateKey.generate()), _raw_public(X25519PrivateKey.generate())) for i in (1, 2, 3)}
    book = KeyBook(keys, "prepare/abc", {}, {}, {})
    refused(signer, signer.send("query.secagg_share", {"config": ConfigRecord(request.encode()),
                                                      SECAGG_KEY: ConfigRecord(book.to_record())}),
            "secure_aggregation.authenticated")


def _prepare_message_via(site: Site, cfg: PrepareConfig, secagg: bool):
    request = PrepareRequest(prepare=cfg, secagg=secagg, num_classes=2)
    return site.send("query.prepare_stats", {"config": ConfigRecord(request.encode())})


def test_policy_init_writes_the_authenticated_line_and_the_site_worker_enforces_it(tmp_path, monkeypatch):
    from client.policy import load_policy
    from client.worker import SiteWorker
    from flower_compat.wire import message_bytes
    from simulations.cli import main

    path = tmp_path / "hospital" / "policy.toml"
    monkeypatch.setattr(sys, "argv", ["magnet-fl", "site", "policy", "init", str(path), "--consortium", "ov-test",
                                      "--state-dir", "state"])
    assert main() == 0
    policy = load_policy(path)
    assert policy.secure_aggregation.authenticated is True
    line = next(n for n, t in enumerate(path.read_text().splitlines(), 1) if t.startswith("authenticated = true"))
    assert policy.where("secure_aggregation.authenticated").endswith(f"line {line}: "
                                                                      "secure_aggregation.authenticated = True")
    # the site worker started with this policy and no roster: a secure round is refused naming the line
    worker = SiteWorker(tmp_path / "data", tmp_path / "manifest.toml", "h0", policy=path)
    site = Site(tmp_path / "unused", {})
    captured = {}
    site.send = lambda kind, content, run=1: captured.setdefault("msg", instruction(0, kind, content))
    _secure_train_stage0(site, "r-9")
    answer, _ = worker.answer(WorkerRequest(kind="message", node_id=0, node_config={}),
                              {MESSAGE_PAYLOAD: message_bytes(captured["msg"])})
    assert answer.ok is False and f"line {line}: secure_aggregation.authenticated" in answer.reason, answer
    audit = [json.loads(x) for x in (path.parent / "state" / "audit.jsonl").read_text().splitlines()]
    assert (audit[-1]["decision"], audit[-1]["rule"]) == ("refused", "secure_aggregation.authenticated")


# ------------------------------------------------------------------------ 3. the authenticated preparation sum


def _prepare_nodes(tmp_path: Path, own: dict) -> dict:
    return {i: {"raw-dir": str(raw_site(tmp_path / "raw" / n, per=40 + 4 * i)),
                "prepared-dir": str(tmp_path / "prepared" / n), "site-name": n, **own[i]} for i, n in enumerate(NAMES)}


def test_an_authenticated_secure_preparation_sums_all_sites(tmp_path, pki):
    from simulations.prepare_federated import make_run, run_inprocess

    roster, own = pki
    summary = run_inprocess(make_run([], tmp_path / "coordinator", PrepareConfig(**PREP), min_sites=3, secagg=True,
                                     secagg_roster=str(roster)), node_configs=_prepare_nodes(tmp_path, own))
    sa = summary["secure_aggregation"]
    assert summary["status"] == "ok" and sa["authenticated"] and sorted(sa["sites"]) == NAMES, sa


def test_a_substituted_key_in_the_secure_preparation_is_refused_by_the_target_site(tmp_path, pki, monkeypatch):
    """The coordinator replaces the other sites' public keys in h1's key book by keys it holds (unauthenticated, it
    would then decrypt h1's shares and unmask its statistics): h1 refuses the book naming the substituted sites,
    and the sum goes on over h0 and h2 only."""
    from simulations.engine import InProcessGrid
    from simulations.prepare_federated import make_run, run_inprocess

    roster, own = pki
    push, target, substituted = InProcessGrid.push_messages, 2, []  # node 2 is h1 in the in-process grid

    def substituting_push(self, messages):
        messages = list(messages)
        for m in messages:
            if m.metadata.message_type == "query.secagg_share" and m.metadata.dst_node_id == target:
                book = KeyBook.from_record(m.content[SECAGG_KEY])
                mine = next(i for i, n in book.names.items() if n == "h1")
                keys = {i: k if i == mine else (_raw_public(X25519PrivateKey.generate()),
                                                _raw_public(X25519PrivateKey.generate()))
                        for i, k in book.keys.items()}
                m.content[SECAGG_KEY] = ConfigRecord(KeyBook(keys, book.round_id, dict(book.names),
                                                             dict(book.commits), dict(book.signatures)).to_record())
                substituted.append(m.metadata.dst_node_id)
        return push(self, messages)

    monkeypatch.setattr(InProcessGrid, "push_messages", substituting_push)
    summary = run_inprocess(make_run([], tmp_path / "coordinator", PrepareConfig(**PREP), min_sites=3, secagg=True,
                                     secagg_roster=str(roster)), node_configs=_prepare_nodes(tmp_path, own))
    assert substituted == [target]
    sa = summary["secure_aggregation"]
    why = json.dumps({**sa["failed"], **sa["rejected"]})
    assert "refuses the key book" in why and "substituted keys" in why, sa
    assert "'h0'" in why and "'h2'" in why
    assert sorted(sa["sites"]) == ["h0", "h2"], sa

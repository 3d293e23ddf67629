"""Authenticated secure aggregation through the real round loop (server_main, the in-process grid, the sites' own
handlers): the run config's secagg-roster on the coordinator, each site's roster and identity key in its own node
config. An honest round equals the plain mean of the clipped updates; a coordinator that substitutes keys in one
site's key book is refused by that site, naming them; a site that deals corrupted shares is named and the round
completes with the honest sites' sum."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ConfigRecord, Context, RecordDict
from test_secure_round import DroppingGrid, _assert_params_close, _cfg, _plain, _Recorder

from magnet_core.federation import secagg
from magnet_core.federation.secagg import _raw_public
from magnet_core.protocol.keys import NODE_SECAGG_IDENTITY_KEY, NODE_SECAGG_ROSTER, SECAGG_KEY
from magnet_core.protocol.secagg import KeyBook
from server.pki import make_site_key

NAMES = ["site0", "site1", "site2"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Three sites' keys made as `magnet-fl pki site-key` makes them and the roster as registered_sites.csv; the
    node config of each simulated site names its own key and its own copy of the roster."""
    root = tmp_path_factory.mktemp("pki")
    rows = ["site,public_key"]
    for name in NAMES:
        _, pub = make_site_key(root / name, comment=name)
        rows.append(f"{name},{pub.read_text().strip()}")
    roster = root / "registered_sites.csv"
    roster.write_text("\n".join(rows) + "\n")
    node_configs = {}
    for i, name in enumerate(NAMES):
        own = root / name / "roster.csv"  # the site's own copy
        own.write_text(roster.read_text())
        node_configs[i] = {NODE_SECAGG_ROSTER: str(own), NODE_SECAGG_IDENTITY_KEY: str(root / name / "node_auth_key")}
    return roster, node_configs


def _run(cfg, node_configs, grid_class=DroppingGrid, **kw):
    from client.app import app as client_app
    from server.app import server_main

    grid = grid_class(client_app, 3, cfg.to_run_config(), drop=set(), node_configs=node_configs, **kw)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_run_config())
    params, history = server_main(grid, ctx)
    return params, history, grid


def test_an_honest_authenticated_round_equals_the_plain_mean_of_the_clipped_updates(tmp_path, monkeypatch, pki):
    roster, node_configs = pki
    rec = _Recorder(monkeypatch)
    params, history, grid = _run(_cfg(tmp_path, "auth", secagg_roster=str(roster)), node_configs)
    assert [r["accepted"] for r in history] == [NAMES] * 2
    for r in history:
        sa = r["screening"]["secure_aggregation"]
        assert sa["status"] == "aggregated" and sa["authenticated"] and not r["rejected"] and not r["failed"]
        assert sa["left_out"] == {} and sa["blamed"] == {}
    # every advert was signed by its enrolled name and checked against the coordinator's roster
    for server in rec.servers:
        assert server.roster is not None and server.book.names == {1: "site0", 2: "site1", 3: "site2"}
        assert all(server.book.signatures[i] for i in (1, 2, 3))
    _assert_params_close(rec.round(2)[0]["global_params"], _plain(rec.round(1)))
    _assert_params_close(params, _plain(rec.round(2)))


class KeySubstitutingGrid(DroppingGrid):
    """The coordinator (it controls delivery) replaces every other site's public keys in ``target``'s key book by
    keys it holds itself: unauthenticated, it then decrypts the target's shares and unmasks its input (issue 21)."""

    def __init__(self, *args, target: int, **kw):
        super().__init__(*args, **kw)
        self.target = target
        self.substituted = 0

    def push_messages(self, messages):
        messages = list(messages)
        for m in messages:
            if m.metadata.message_type == "query.secagg_share" and m.metadata.dst_node_id == self.target:
                book = KeyBook.from_record(m.content[SECAGG_KEY])
                mine = self.target  # secagg ids follow node ids in the in-process grid (1..3)
                fake = {i: (_raw_public(X25519PrivateKey.generate()), _raw_public(X25519PrivateKey.generate()))
                        for i in book.keys if i != mine}
                keys = {i: fake.get(i, k) for i, k in book.keys.items()}
                m.content[SECAGG_KEY] = ConfigRecord(KeyBook(keys, book.round_id, dict(book.names),
                                                             dict(book.commits), dict(book.signatures)).to_record())
                self.substituted += 1
        return super().push_messages(messages)


def test_a_coordinator_substituting_keys_in_one_sites_key_book_is_refused_by_that_site(tmp_path, monkeypatch, pki):
    roster, node_configs = pki
    rec = _Recorder(monkeypatch)
    params, history, grid = _run(_cfg(tmp_path, "subst", secagg_roster=str(roster), num_server_rounds=1),
                                 node_configs, KeySubstitutingGrid, target=2)
    assert grid.substituted == 1
    r = history[0]
    sa = r["screening"]["secure_aggregation"]
    why = {**r["failed"], **r["rejected"]}.get("site1", "")
    # the target refused the book before deriving anything from it, naming the sites whose keys were replaced
    assert "refuses the key book" in why and "substituted keys" in why, r
    assert "'site0'" in why and "'site2'" in why
    # its input is not in the sum: the round went on over the two others (t = 2) and equals their mean
    assert sa["status"] == "aggregated" and r["accepted"] == ["site0", "site2"]
    _assert_params_close(params, _plain([rec.round(1)[0], rec.round(1)[2]]))


def test_a_site_dealing_corrupted_shares_is_named_and_the_round_completes_without_it(tmp_path, monkeypatch, pki):
    roster, node_configs = pki
    real_share, real_split = secagg.SecAggSite.share, secagg.shamir_split

    def share(self, book):  # the site running as site1 runs modified code: every share + 1, signed as its own
        if self.auth is None or self.auth.identity.name != "site1":
            return real_share(self, book)

        def bad(secret, threshold, xs):
            return {x: (int.from_bytes(v, "big") + 1).to_bytes(secagg.SHARE_BYTES, "big")
                    for x, v in real_split(secret, threshold, xs).items()}

        monkeypatch.setattr(secagg, "shamir_split", bad)
        try:
            return real_share(self, book)
        finally:
            monkeypatch.setattr(secagg, "shamir_split", real_split)

    monkeypatch.setattr(secagg.SecAggSite, "share", share)
    rec = _Recorder(monkeypatch)
    params, history, _ = _run(_cfg(tmp_path, "cheat", secagg_roster=str(roster), num_server_rounds=1),
                              node_configs)
    r = history[0]
    sa = r["screening"]["secure_aggregation"]
    assert sa["status"] == "aggregated", sa
    assert r["accepted"] == ["site0", "site2"]
    assert "contradict its own commitment" in r["rejected"]["site1"], r["rejected"]
    assert list(sa["left_out"]) == ["site1"]
    _assert_params_close(params, _plain([rec.round(1)[0], rec.round(1)[2]]))


def test_a_site_with_a_roster_refuses_an_unauthenticated_secure_round(tmp_path, monkeypatch, pki):
    """A coordinator that simply leaves secagg-roster out (unsigned key book) gets no site's shares."""
    _, node_configs = pki
    params, history, _ = _run(_cfg(tmp_path, "unauth", num_server_rounds=1), node_configs)
    r = history[0]
    assert r["screening"]["secure_aggregation"]["status"] == "failed" and r["accepted"] == []
    reasons = {**r["failed"], **r["rejected"]}
    assert set(reasons) == set(NAMES), reasons
    assert all("the key book does not hold this site's own signed advert" in v for v in reasons.values()), reasons


def test_the_site_worker_holds_the_identity_key_and_roster_from_its_own_command_line(tmp_path, pki):
    """In deployment the key and roster are the worker's (--secagg-roster / --identity-key), never the request's:
    the bundle's node config cannot point the site at another key or roster, nor give one to a worker without."""
    from client.worker import NodeConfigRefused, SiteWorker, check_secagg_identity

    roster, node_configs = pki
    key = node_configs[1][NODE_SECAGG_IDENTITY_KEY]
    data, manifest = tmp_path / "data", tmp_path / "manifest.toml"
    data.mkdir()
    manifest.write_text("")
    worker = SiteWorker(data, manifest, "site1", secagg_roster=roster, identity_key=key)
    got = worker.node_config({})
    assert got[NODE_SECAGG_ROSTER] == str(roster.resolve()) and got[NODE_SECAGG_IDENTITY_KEY] == key
    with pytest.raises(NodeConfigRefused, match="secagg-identity-key"):
        worker.node_config({NODE_SECAGG_IDENTITY_KEY: node_configs[0][NODE_SECAGG_IDENTITY_KEY]})
    with pytest.raises(NodeConfigRefused, match="secagg-roster"):
        worker.node_config({NODE_SECAGG_ROSTER: str(tmp_path / "other.csv")})
    plain = SiteWorker(data, manifest, "site1")
    with pytest.raises(NodeConfigRefused, match="no key"):
        plain.node_config({NODE_SECAGG_ROSTER: str(roster), NODE_SECAGG_IDENTITY_KEY: key})
    check_secagg_identity(roster, key, "site1")
    with pytest.raises(Exception, match="not this site's identity key"):
        check_secagg_identity(roster, key, "site0")  # another site's name: the roster's key is not this key
